"""Where a store lives: a local folder or an object-store URI, and one filesystem for both.

    runs/store, /data/store, file:///data/store   -> a local folder (flock leases)
    s3://bucket/store                              -> Amazon S3 or an S3-compatible server
    gs://bucket/store                              -> Google Cloud Storage
    az://container/store, abfs[s]://...            -> Azure Blob / ADLS Gen2

Anything else that looks like a URI is refused: `s3:/bucket` or `S3://bucket` must never
become a local folder named `s3:` that builds, verifies and exports without complaint.

Credentials are never handled here. delta-rs, polars, pyarrow (S3) and obstore (GCS and Azure,
see `cloud`) each read the provider's usual configuration themselves (``AWS_ACCESS_KEY_ID``/
``AWS_SECRET_ACCESS_KEY``/``AWS_PROFILE``, instance roles, ``AWS_ENDPOINT_URL`` and
``AWS_ALLOW_HTTP`` for S3-compatible servers, ``GOOGLE_APPLICATION_CREDENTIALS``,
``GOOGLE_SERVICE_ACCOUNT``, ``AZURE_STORAGE_*``), so nothing secret is ever passed
through selm, stored, logged or put in a message. The one setting we do read is a refusal:
``AWS_S3_ALLOW_UNSAFE_RENAME`` turns off delta-rs's put-if-absent commits, which concurrent
builders rely on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from selm_data.errors import StoreError
from selm_data.store.secrets import scrub

# scheme -> provider name, for messages
SCHEMES = {"s3": "S3", "gs": "GCS", "az": "Azure", "abfs": "Azure", "abfss": "Azure"}
_LOOKS_LIKE_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_UNSAFE = re.compile(r"[^A-Za-z0-9._/+=,@~:-]")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Location:
    """A parsed store location. `uri` is what users see; `local` is set for folders only."""

    uri: str  # absolute path for a folder, scheme://bucket/path otherwise (no trailing /)
    local: Path | None

    @property
    def is_local(self) -> bool:
        return self.local is not None

    @property
    def scheme(self) -> str:
        return "file" if self.local is not None else self.uri.split("://", 1)[0]

    def join(self, *parts: str) -> str:
        """The URI (or absolute path) of `parts` below the store."""
        return "/".join([self.uri, *(p.strip("/") for p in parts if p)])

    def filesystem(self) -> pafs.FileSystem:
        """A pyarrow filesystem rooted at the store: paths are relative to it ("pairs/x").

        On S3, pyarrow resolves credentials from the environment itself, as delta-rs does; on
        GCS and Azure the files go through obstore, which reads what delta-rs reads.
        """
        if self.local is not None:
            return pafs.SubTreeFileSystem(str(self.local), pafs.LocalFileSystem())
        if self.scheme != "s3":
            from selm_data.store import cloud  # GCS and Azure: obstore (see its module doc)

            return cloud.filesystem(self.uri)
        try:
            fs, base = pafs.FileSystem.from_uri(self.uri)
        except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise StoreError(
                f"cannot reach the store at {self.uri}: {scrub(str(e))}. Check the provider's "
                "settings in the environment (for S3: AWS_REGION, AWS_ENDPOINT_URL, a profile "
                "or role); selm passes no credentials of its own."
            ) from None
        return pafs.SubTreeFileSystem(base, fs)


def parse_location(text: str | os.PathLike[str]) -> Location:
    """The store location `text` names, or a StoreError saying why it cannot be one.

    Raises:
        StoreError: an unknown or malformed URI scheme, a URI without bucket, a local path
            with characters delta-rs percent-encodes, or an unsafe S3 setting.
    """
    raw = os.fspath(text)
    if "://" in raw:
        scheme = raw.split("://", 1)[0]
        if scheme == "file":
            return _local(urlsplit(raw).path or "/")
        if scheme not in SCHEMES:
            raise StoreError(
                f"store {raw!r}: unknown scheme {scheme!r}. Use a local path, file://, "
                "s3://bucket/path, gs://bucket/path, az://container/path or abfss://..."
            )
        return _remote(raw, scheme)
    if _LOOKS_LIKE_URI.match(raw):
        raise StoreError(
            f"store {raw!r} looks like a URI but is not one (a URI is scheme://bucket/path); "
            "as written it would be a local folder named "
            f"{raw.split('/', 1)[0]!r}. Write e.g. s3://bucket/store, or ./{raw} if you "
            "really mean a local folder."
        )
    return _local(raw)


def _local(raw: str) -> Location:
    root = Path(raw).expanduser().absolute()
    unsafe = sorted(set(_UNSAFE.findall(str(root))))
    if unsafe:
        raise StoreError(
            f"the store path {str(root)!r} contains {unsafe}: polars and delta-rs percent-encode "
            "such characters and then cannot find the files. Use a path of letters, digits "
            "and . _ - / only."
        )
    return Location(str(root), root)


def _remote(raw: str, scheme: str) -> Location:
    parts = urlsplit(raw)
    # abfss://CONTAINER@ACCOUNT.dfs.core.windows.net/path names its container where a user goes
    user = parts.username if scheme not in ("abfs", "abfss") else None
    if user or parts.password or parts.query:
        # s3://KEY:SECRET@bucket would put a credential into every message and commit
        raise StoreError(
            f"store URI for {SCHEMES[scheme]} must not carry credentials or options "
            "(user:password@ or ?...): give them in the environment as the provider's "
            "SDK reads them (AWS_* variables, a profile, an instance role; AZURE_STORAGE_*; "
            "GOOGLE_APPLICATION_CREDENTIALS)."
        )
    bucket, path = parts.netloc, parts.path.strip("/")
    if not bucket:
        raise StoreError(f"store {raw!r} names no bucket: write {scheme}://BUCKET/path")
    unsafe = sorted(set(_UNSAFE.findall(path)))
    if unsafe:
        raise StoreError(
            f"store {raw!r}: the path contains {unsafe}, which delta-rs percent-encodes; use "
            "letters, digits and . _ - / only."
        )
    if scheme == "s3" and os.environ.get("AWS_S3_ALLOW_UNSAFE_RENAME", "").lower() in _TRUE:
        raise StoreError(
            "AWS_S3_ALLOW_UNSAFE_RENAME is set: delta-rs would then commit without "
            "put-if-absent, and two builders could overwrite each other's commits. Unset it; "
            "S3 (and S3-compatible servers with conditional writes) need no lock provider."
        )
    return Location(f"{scheme}://{bucket}" + (f"/{path}" if path else ""), None)


__all__ = ["SCHEMES", "Location", "parse_location", "scrub"]
