"""Keeping a store that lives for years cheap to write and small: `optimize` and `vacuum`.

Every append is one Delta commit with a few small files, and a commit's cost grows with the
number of files in the table (bench/README.md: about 21 ms more per 1,000 files). So:

- `optimize` compacts each table's small files into few large ones per partition (a commit
  that removes the old files and adds the new, with the same rows: no data change), writes a
  checkpoint, and removes the log entries (JSON commits, old checkpoints) of versions before the
  retention window. Measured (bench/store_longevity.py), the growing cost of a commit is the
  number of entries in `_delta_log/` that delta-rs lists on every refresh and commit, one per
  commit, not the data files nor the tombstones: compaction alone does not bring it back.
  Readers of older versions still see the old data files until `vacuum` removes them.
- Snapshots pin versions: the versions every snapshot was exported from stay readable
  forever (the card and provenance read them). Their data files are kept by `vacuum`
  (`keep_versions`), and each such version gets a checkpoint of its own (written at export,
  or here for older snapshots) that log cleanup never removes: a version with a checkpoint
  needs no other log entry. delta-rs's own expired-log cleanup is switched off
  (`delta.enableExpiredLogCleanup=false`), since it knows nothing of snapshots.
- `vacuum` deletes data files that no version inside the retention window still names, and
  files that were never committed (a failed write's) once older than the window, except the
  files of every version a snapshot was exported from (`keep_versions`): a snapshot's lineage
  can always be read back at its exact versions. Dry run by default: it says what it would
  remove.

Both are safe while builders write: each table is maintained under the table's append lock
(the same lock every append takes around "which ids are new, then commit"), so no append has
written files it has not committed yet while its table is compacted or vacuumed, and each
builder waits at most one table's maintenance before its next append. Leases and snapshot
exports live outside the tables and are never touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import DeltaError

from selm_data.errors import StoreError
from selm_data.store.location import scrub
from selm_data.store.schema import TABLES
from selm_data.store.store import Store

DEFAULT_RETENTION_HOURS = 168  # Delta's default (delta.deletedFileRetentionDuration, a week)
NO_AUTO_CLEANUP = {"delta.enableExpiredLogCleanup": "false"}
_LOG_ENTRY = re.compile(r"^(\d{20})\.(json|crc|checkpoint\.parquet|checkpoint\.\d+\.\d+\.parquet)$")


@dataclass(frozen=True)
class Optimized:
    table: str
    files_removed: int
    files_added: int
    version: int  # after compaction and checkpoint
    log_entries_removed: int = 0


@dataclass(frozen=True)
class Vacuumed:
    table: str
    files: list[str]  # removed, or that would be removed in a dry run
    kept_versions: list[int]  # versions kept readable because a snapshot names them


def optimize(store: Store, *, tables: list[str] | None = None, target_size: int | None = None,
             retention_hours: int = DEFAULT_RETENTION_HOURS) -> list[Optimized]:
    """Compact each table (all partitions), checkpoint it, and remove the log entries of
    versions older than `retention_hours` that no snapshot pins. See the module docstring.

    Raises:
        StoreError: an unknown table, or a failure of delta-rs (the table is then unchanged).
    """
    if retention_hours < 0:
        raise StoreError(f"--retention-hours {retention_hours}: give 0 or more hours")
    pinned = snapshot_versions(store)
    out = []
    for table in _tables(tables):
        keep = sorted(pinned.get(table, set()))
        with store.table_lock(table):
            dt = store.delta_table(table)
            try:
                if dt.metadata().configuration.get(
                        "delta.enableExpiredLogCleanup") != "false":
                    dt.alter.set_table_properties(NO_AUTO_CLEANUP)
                pin_checkpoints(store, table, keep)
                metrics = dt.optimize.compact(
                    target_size=target_size,
                    commit_properties=CommitProperties(
                        custom_metadata={**store.run.commit_metadata(), "selm.maintenance":
                                         "optimize"}))
                dt.update_incremental()
                dt.create_checkpoint()
                removed = _clean_log(store, table, retention_hours, keep)
            except (DeltaError, OSError) as e:
                raise StoreError(f"optimize {table} failed: {scrub(str(e))}. Its rows are "
                                 "unchanged (compaction is one commit); run it again.") from None
        out.append(Optimized(table, int(metrics.get("numFilesRemoved", 0)),
                             int(metrics.get("numFilesAdded", 0)), dt.version(), removed))
    return out


def pin_checkpoints(store: Store, table: str, versions: list[int]) -> None:
    """A checkpoint at each of `versions`, so each stays readable after log cleanup.

    Needs the log up to each version, so it is done at export (`publish.snapshot`) and again
    here for snapshots made before this existed.
    """
    for version in versions:
        name = f"{table}/_delta_log/{version:020d}.checkpoint.parquet"
        if store.fs.get_file_info(name).type == pafs.FileType.NotFound:
            DeltaTable(store.table_uri(table), version=version).create_checkpoint()


def _clean_log(store: Store, table: str, retention_hours: int, pinned: list[int]) -> int:
    """Remove the log entries of versions before the newest checkpoint written before the
    retention window began: every version from that checkpoint on stays readable, which covers
    the window. The pinned versions' own checkpoints stay. Returns how many entries went."""
    cutoff = datetime.now(UTC) - timedelta(hours=retention_hours)
    entries = []
    for info in store.fs.get_file_info(pafs.FileSelector(f"{table}/_delta_log")):
        match = _LOG_ENTRY.match(info.base_name)
        if match and info.type == pafs.FileType.File:
            entries.append((int(match.group(1)), match.group(2), info))
    old_checkpoints = [v for v, kind, info in entries if kind == "checkpoint.parquet"
                       and info.mtime is not None and info.mtime <= cutoff]
    if not old_checkpoints:
        return 0
    start = max(old_checkpoints)
    keep = {f"{v:020d}.checkpoint.parquet" for v in pinned}
    doomed = [info.path for v, _, info in entries if v < start and info.base_name not in keep]
    for path in doomed:
        store.fs.delete_file(path)
    return len(doomed)


def vacuum(store: Store, *, retention_hours: int = DEFAULT_RETENTION_HOURS,
           dry_run: bool = True, tables: list[str] | None = None) -> list[Vacuumed]:
    """Remove the files no retained version, snapshot or in-flight write needs.

    Raises:
        StoreError: a negative retention, an unknown table, or a failure of delta-rs.
    """
    if retention_hours < 0:
        raise StoreError(f"--retention-hours {retention_hours}: give 0 or more hours")
    pinned = snapshot_versions(store)
    out = []
    for table in _tables(tables):
        keep = sorted(pinned.get(table, set()))
        with store.table_lock(table):
            dt = store.delta_table(table)
            present = _present(store, table)
            try:
                files = dt.vacuum(
                    retention_hours=retention_hours, dry_run=dry_run,
                    enforce_retention_duration=False, full=True, keep_versions=keep or None,
                    commit_properties=CommitProperties(
                        custom_metadata={**store.run.commit_metadata(), "selm.maintenance":
                                         "vacuum"}))
            except DeltaError as e:
                raise StoreError(f"vacuum {table} failed: {scrub(str(e))}. Nothing a "
                                 "version in the retention window names was removed; run it "
                                 "again.") from None
        # delta-rs lists a removed file for as long as its tombstone is in the log, also
        # after an earlier vacuum deleted it: count only the files that are there
        out.append(Vacuumed(table, sorted(set(files) & present), keep))
    return out


def _present(store: Store, table: str) -> set[str]:
    """The data files in the table's folder, relative to it (one listing)."""
    listing = store.fs.get_file_info(pafs.FileSelector(table, recursive=True))
    return {info.path.removeprefix(f"{table}/") for info in listing
            if info.type == pafs.FileType.File and "/_delta_log/" not in f"/{info.path}"}


def snapshot_versions(store: Store) -> dict[str, set[int]]:
    """The table versions every registered snapshot was exported from."""
    rows = store.scan("snapshots").select("table_versions").collect()
    pinned: dict[str, set[int]] = {}
    for versions in rows["table_versions"].to_list():
        for entry in versions or []:
            pinned.setdefault(entry["table"], set()).add(int(entry["version"]))
    return pinned


def _tables(names: list[str] | None) -> list[str]:
    if not names:
        return list(TABLES)
    unknown = sorted(set(names) - set(TABLES))
    if unknown:
        raise StoreError(f"unknown table(s) {unknown}; the store has {', '.join(TABLES)}")
    return names


__all__ = ["DEFAULT_RETENTION_HOURS", "Optimized", "Vacuumed", "optimize", "pin_checkpoints",
           "snapshot_versions", "vacuum"]
