"""Push a snapshot to the Hugging Face Hub as a dataset repo whose card states its lineage.

A pushed repo holds exactly these files, which `repo_files` builds:

    data/train-0000i-of-0000n.parquet   the snapshot's shards, byte for byte
    README.md                           the dataset card: YAML metadata (configs and splits,
                                        license, task categories, tags, size), then what the
                                        data is, how it was made, its lineage, the manifest
                                        and statistics
    selm_lineage.json                   the lineage, machine-readable (`Lineage`)

`dry_run` writes them to a folder (which `datasets.load_dataset(folder)` loads); `push` creates
the repo (private unless asked otherwise) and commits them in one commit. The card and the
lineage file are a function of the store alone (no clock, no host), so a dry run and a push of
the same snapshot write the same bytes. The card's license is the source's when selm knows it
(`KNOWN_SOURCES`: the bundled UltraFeedback slice and UltraFeedback on the Hub are MIT), else
`unknown`, which the card says to check; `license=` overrides it.

The token is the `token` argument or huggingface_hub's own (HF_TOKEN, then the saved login). It
goes only into the Authorization header: never into the store, a file, a log line or an error
message (errors from the Hub are re-raised with it masked).

Push writes nothing to the store: it reads the snapshot at the table versions the snapshot
recorded, so it runs on a read-only copy of a store, and the token has no way in. The Hub commit
is the record of a push: its message names the snapshot and its content hash, which the store's
`snapshots` table matches back to the rows.
"""


from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selm_data.errors import SelmError
from selm_data.publish.card import CARD_FILE, render_card
from selm_data.publish.provenance import LINEAGE_FILE, scrub, snapshot_lineage
from selm_data.publish.snapshot import local_folder, snapshot_row
from selm_data.store.progress import Steps, interactive, steps
from selm_data.store.store import Store, package_version

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


# --- the files --------------------------------------------------------------------------------


def repo_files(store: Store, name: str, *, repo_id: str | None = None,
               license: str | None = None,
               secrets: Iterable[str | None] = ()) -> dict[str, bytes | Path]:
    """Exactly the files of the dataset repo: path in the repo -> bytes or a local file.

    `secrets` are masked in the card and lineage file should they appear anywhere in the store.
    """
    lineage = snapshot_lineage(store, name, license=license)
    folder = local_folder(store, snapshot_row(store, name))  # cached copy for a URI store
    secrets = tuple(secrets)
    files: dict[str, bytes | Path] = {rel: folder / rel for rel in lineage.files}
    files[CARD_FILE] = scrub(render_card(lineage, repo_id=repo_id), secrets).encode("utf-8")
    files[LINEAGE_FILE] = scrub(lineage.to_json(), secrets).encode("utf-8")
    return files


def dry_run(store: Store, name: str, directory: str | Path, *, repo_id: str | None = None,
            license: str | None = None) -> list[Path]:
    """Write the files `push` would commit into `directory` (new or empty); returns them.

    Raises:
        SelmError: `directory` holds files already, or the snapshot is unknown or modified.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise SelmError(f"--dry-run {directory}: give a new or empty folder, so that it holds "
                        "exactly the files a push would commit")
    files = repo_files(store, name, repo_id=repo_id, license=license,
                       secrets=_environment_tokens())
    written = []
    for rel, content in files.items():
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            shutil.copyfile(content, target)  # the bytes only: exports are read-only
        written.append(target)
    return written


def _environment_tokens() -> list[str | None]:
    return [os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]


# --- the push ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    repo_url: str
    commit_url: str
    commit_oid: str
    private: bool | None  # the repo's visibility (None: an existing repo that did not say)
    created: bool  # the repo was made by this push
    files: list[str]


def push(store: Store, name: str, repo_id: str, *, private: bool = True,
         token: str | None = None, revision: str | None = None,
         commit_message: str | None = None, license: str | None = None,
         endpoint: str | None = None) -> PushResult:
    """Create the dataset repo `repo_id` (private unless `private=False`) and commit the
    snapshot's shards, card and lineage file in one commit.

    `token` defaults to huggingface_hub's (HF_TOKEN, then the saved login); `endpoint` to
    huggingface_hub's (HF_ENDPOINT, then huggingface.co). An existing repo is pushed to as it
    is, except that a private push into an existing public repo is refused: pushing there would
    publish what was meant to stay private.

    Raises:
        SelmError: a bad repo id, no token, an unknown or modified snapshot, a public repo
            where a private one was asked for, or any error from the Hub (token masked).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    if not _REPO_ID.fullmatch(repo_id):
        raise SelmError(f"--repo-id {repo_id!r}: give ORG/NAME (letters, digits, '.', '_', "
                        "'-'), e.g. my-org/selm-iter2")
    try:
        token = token or get_token()
    except Exception as e:  # e.g. a failed OIDC exchange; its text is not shown
        raise SelmError(f"could not read the Hugging Face token ({type(e).__name__}): set "
                        "HF_TOKEN or run `hf auth login`") from None
    if not token:
        raise SelmError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (the token "
                        "is read from there and never written anywhere by selm)")
    files = repo_files(store, name, repo_id=repo_id, license=license, secrets=[token])
    lineage_json = files[LINEAGE_FILE]
    assert isinstance(lineage_json, bytes)  # repo_files renders it in memory
    lineage = json.loads(lineage_json)
    message = commit_message or (
        f"SELM snapshot {lineage['snapshot']}: iteration {lineage['iteration']}, "
        f"{lineage['statistics']['rows']} pairs, content {lineage['content_hash'][:12]}")
    description = (f"Pushed by selm {package_version()}. Snapshot content hash "
                   f"{lineage['content_hash']}; lineage in {LINEAGE_FILE}.")
    api = HfApi(endpoint=endpoint, token=token)
    failure: SelmError
    try:
        repo_url, created, visibility = _ensure_repo(api, repo_id, private)
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=(
            content if isinstance(content, bytes) else str(content)))
            for rel, content in files.items()]
        with _upload_progress(files) as uploaded:
            info = api.create_commit(repo_id, operations, repo_type="dataset",
                                     revision=revision, commit_message=scrub(message, [token]),
                                     commit_description=description)
            uploaded.update(uploaded.total or 0)
    except SelmError as e:
        failure = SelmError(scrub(str(e), [token]))
    except Exception as e:  # the Hub's boundary: HTTP, network and protocol errors alike
        failure = _hub_error(e, name, repo_id, token)
    else:
        return PushResult(repo_id, repo_url, info.commit_url, info.oid, visibility, created,
                          list(files))
    # Raised here, outside the except block, so the Hub's exception (whose text may echo the
    # Authorization header) is neither the cause nor the context of what the user sees.
    raise failure


@contextmanager
def _upload_progress(files: dict[str, bytes | Path]) -> Iterator[Steps]:
    """On a terminal, huggingface_hub draws its own upload bars (rate, ETA); in a log they
    would be carriage-return debris, so they are off and one closing line says size and rate."""
    total = sum(len(c) if isinstance(c, bytes) else c.stat().st_size for c in files.values())
    quiet = not interactive()
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    with steps(f"push: {len(files)} files", total, unit="B", show=quiet) as uploaded:
        yield uploaded


def _ensure_repo(api: Any, repo_id: str, private: bool) -> tuple[str, bool, bool | None]:
    """Create the repo, or check that a private push does not land in an existing public one.
    Returns the repo's URL, whether this call created it, and whether it is private."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return str(api.create_repo(repo_id, repo_type="dataset", private=private)), True, private
    except HfHubHTTPError as e:
        if _status(e) not in (403, 409):  # 403: may exist, but the token cannot create repos
            raise
        try:
            info = api.dataset_info(repo_id)
        except HfHubHTTPError:
            raise e from None
    if private and info.private is False:
        raise SelmError(f"the dataset repo {repo_id} exists and is public, and this push is "
                        "private: pass --public to push into it, or make it private on the Hub "
                        "first")
    return f"{api.endpoint}/datasets/{repo_id}", False, info.private


def _status(error: BaseException) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


_HINTS = {
    401: "the Hub refused the token: set HF_TOKEN or run `hf auth login` with a valid token",
    403: "the token cannot write there: use a token with write access to the namespace",
    404: "the namespace or repo was not found: check --repo-id and that the token can see it",
}


def _hub_error(error: Exception, name: str, repo_id: str, token: str) -> SelmError:
    status = _status(error)
    hint = _HINTS.get(status or 0, "check the network, HF_ENDPOINT and the repo id, and push "
                      "again (a commit is all or nothing)")
    detail = scrub(f"{type(error).__name__}: {error}", [token])
    return SelmError(f"pushing snapshot {name} to {repo_id} failed: {detail}. {hint}")


__all__ = ["PushResult", "dry_run", "push", "repo_files"]
