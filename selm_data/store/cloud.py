"""Google Cloud Storage and Azure Blob through obstore (the Rust `object_store` crate that
delta-rs and polars use themselves): the client for a gs:// or az:// store, and a pyarrow
filesystem over it for the store's own files (data files, snapshots, the format marker).

Why not pyarrow's own GCS and Azure filesystems: they resolve credentials and endpoints their
own way (pyarrow's Azure filesystem reads neither ``AZURE_STORAGE_ACCOUNT_NAME`` nor the
emulator settings, and has no ``az://``), so a store could commit through delta-rs and then
fail, or write elsewhere, through pyarrow. obstore reads exactly the variables delta-rs and
polars read (``AZURE_STORAGE_ACCOUNT_NAME``/``AZURE_STORAGE_ACCOUNT_KEY``, SAS tokens, service
principals, managed identity, ``AZURE_STORAGE_USE_EMULATOR``; ``GOOGLE_APPLICATION_CREDENTIALS``,
``GOOGLE_SERVICE_ACCOUNT``, the metadata server), so every part of selm reaches the same place
with the same credentials, and none of them pass through selm.

S3 stays on pyarrow and boto3: they read AWS profiles and SSO, which object_store does not.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from selm_data.errors import StoreError
from selm_data.store.secrets import scrub

if TYPE_CHECKING:
    from obstore import ObjectMeta
    from obstore.store import ClientConfig, ObjectStore, RetryConfig

OBSTORE_SCHEMES = ("gs", "az", "abfs", "abfss")
# The settings a client is built from: a client is cached per bucket and these values, so a
# changed environment (a test's emulator, a rotated token) gets a new client.
_ENV_PREFIXES = ("AZURE_", "AZURITE_", "GOOGLE_")
_clients: dict[tuple[str, str, tuple[tuple[str, str], ...]], ObjectStore] = {}
T = TypeVar("T")


def client(uri: str, *, purpose: str = "files") -> ObjectStore:
    """The obstore client for the bucket (or container) of the store at `uri`; paths are
    bucket keys.

    `purpose` "leases" fails fast (short timeouts, two retries): a heartbeat must not hang;
    "files" retries longer, as delta-rs does for its own requests.
    """
    try:
        from obstore.store import from_url
    except ImportError as e:
        raise StoreError(
            f"a {uri.split(':', 1)[0]}:// store needs obstore: `pip install 'selm[cloud]'`"
        ) from e
    parts = urlsplit(uri)
    root = f"{parts.scheme}://{parts.netloc}"
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))
    key = (root, purpose, env)
    if key not in _clients:
        fast = purpose == "leases"
        retries: RetryConfig = {"max_retries": 2 if fast else 5,
                                "retry_timeout": timedelta(seconds=15 if fast else 120)}
        # allow_http: the endpoints are https unless the user's settings name an http one (an
        # emulator's), which delta-rs then reaches too; without it such a store would commit
        # through delta-rs and fail here
        options: ClientConfig = {"connect_timeout": timedelta(seconds=5), "allow_http": True,
                                 "timeout": timedelta(seconds=10 if fast else 300)}
        try:
            _clients[key] = from_url(root, client_options=options, retry_config=retries)
        except Exception as e:  # obstore raises its own config errors, and ValueError
            raise StoreError(
                f"cannot reach the store at {uri}: {_scrub(e)}. Check the provider's "
                "settings in the environment (Azure: AZURE_STORAGE_ACCOUNT_NAME and a key, "
                "SAS token or identity; GCS: GOOGLE_APPLICATION_CREDENTIALS or "
                "GOOGLE_SERVICE_ACCOUNT); selm passes no credentials of its own.") from None
    return _clients[key]


def bucket_path(uri: str) -> str:
    """The store's key prefix inside its bucket ("" for a store at the bucket's root)."""
    return urlsplit(uri).path.strip("/")


def filesystem(uri: str) -> pafs.FileSystem:
    """A pyarrow filesystem rooted at the store at `uri`, over obstore (see the module doc)."""
    fs = pafs.PyFileSystem(_Handler(client(uri)))
    base = bucket_path(uri)
    return pafs.SubTreeFileSystem(base, fs) if base else fs


def _scrub(e: BaseException) -> str:
    return scrub(str(e))


def _io(fn: Callable[[], T], path: str) -> T:
    """Run one obstore call; its errors become the OSErrors pyarrow callers expect."""
    from obstore.exceptions import BaseError, NotFoundError

    try:
        return fn()
    except (FileNotFoundError, NotFoundError) as e:
        raise FileNotFoundError(f"{path}: not found") from e
    except (BaseError, OSError) as e:
        raise OSError(_scrub(e)) from None


class _PutOnClose(io.BytesIO):
    """An output stream that sends the whole file as one put when closed: one request for
    a small file, and nothing visible at all if the writer fails before closing."""

    def __init__(self, store: ObjectStore, path: str):
        super().__init__()
        self._store, self._path = store, path

    def close(self) -> None:
        if not self.closed:
            import obstore

            data = self.getvalue()
            super().close()
            _io(lambda: obstore.put(self._store, self._path, data), self._path)


class _Handler(pafs.FileSystemHandler):
    """pyarrow's filesystem interface over one obstore client; paths are bucket keys.

    Object stores have no directories: a "directory" is any prefix that has objects below it.
    """

    def __init__(self, store: ObjectStore):
        self.store = store

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Handler) and other.store is self.store

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "selm-obstore"

    def normalize_path(self, path: str) -> str:
        return path.strip("/")

    def _objects(self, prefix: str) -> Iterator[ObjectMeta]:
        import obstore

        prefix = prefix.strip("/")
        chunks = _io(lambda: list(obstore.list(self.store, f"{prefix}/" if prefix else None)),
                     prefix)
        for chunk in chunks:
            yield from chunk

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        import obstore

        out = []
        for path in paths:
            path = path.strip("/")
            try:
                meta = _io(lambda p=path: obstore.head(self.store, p), path)  # type: ignore[misc]
                out.append(pafs.FileInfo(path, pafs.FileType.File, size=meta["size"],
                                         mtime=meta["last_modified"]))
            except FileNotFoundError:
                kind = pafs.FileType.Directory if next(self._objects(path), None) else \
                    pafs.FileType.NotFound
                out.append(pafs.FileInfo(path, kind))
        return out

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        base = selector.base_dir.strip("/")
        infos: dict[str, pafs.FileInfo] = {}
        for meta in self._objects(base):
            path = meta["path"]
            rest = path[len(base) + 1:] if base else path
            parts = rest.split("/")
            depth = len(parts) if selector.recursive else 1
            for n in range(1, min(depth, len(parts))):  # the "directories" on the way
                folder = "/".join(filter(None, [base, *parts[:n]]))
                infos.setdefault(folder, pafs.FileInfo(folder, pafs.FileType.Directory))
            if len(parts) == 1 or selector.recursive:
                infos[path] = pafs.FileInfo(path, pafs.FileType.File, size=meta["size"],
                                            mtime=meta["last_modified"])
        if not infos and not selector.allow_not_found:
            raise FileNotFoundError(f"{base}: no such directory")
        return list(infos.values())

    def create_dir(self, path: str, recursive: bool) -> None:
        pass  # nothing to create: a prefix exists once an object is below it

    def delete_dir(self, path: str) -> None:
        self.delete_dir_contents(path, missing_dir_ok=False)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        import obstore

        keys = [meta["path"] for meta in self._objects(path)]
        if not keys and not missing_dir_ok:
            raise FileNotFoundError(f"{path}: no such directory")
        for key in keys:
            _io(lambda k=key: obstore.delete(self.store, k), key)  # type: ignore[misc]

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete every object of a bucket")

    def delete_file(self, path: str) -> None:
        import obstore

        _io(lambda: obstore.delete(self.store, path.strip("/")), path)

    def move(self, src: str, dest: str) -> None:
        import obstore

        _io(lambda: obstore.rename(self.store, src.strip("/"), dest.strip("/")), src)

    def copy_file(self, src: str, dest: str) -> None:
        import obstore

        _io(lambda: obstore.copy(self.store, src.strip("/"), dest.strip("/")), src)

    def _read(self, path: str) -> pa.BufferReader:
        import obstore

        data = _io(lambda: obstore.get(self.store, path.strip("/")).bytes(), path)
        return pa.BufferReader(pa.py_buffer(data))

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self._read(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        # whole-file reads: the store's files are small appends, or compacted ones read whole
        return self._read(path)

    def open_output_stream(self, path: str, metadata: dict[str, str] | None = None
                           ) -> pa.NativeFile:
        return pa.PythonFile(_PutOnClose(self.store, path.strip("/")), mode="w")

    def open_append_stream(self, path: str, metadata: dict[str, str] | None = None
                           ) -> pa.NativeFile:
        raise OSError("object stores cannot append to an object")


__all__ = ["OBSTORE_SCHEMES", "bucket_path", "client", "filesystem"]
