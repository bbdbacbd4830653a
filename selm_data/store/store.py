"""The store: one folder (or object-store URI) of Delta Lake tables that holds every row of
every iteration.

    <store>/selm-store.json     format marker
    <store>/<table>/            one Delta table per entry of `schema.TABLES`
    <store>/_leases/            who is building what (see `leases`, `object_leases`)

A store is a local folder or an s3:// (gs://, az://) URI (`location`). Files are written through
one pyarrow filesystem rooted at the store, commits through delta-rs, which on S3 commits with
put-if-absent, so concurrent writers are safe there as on a local disk.

Writes are idempotent appends: rows whose id the table already holds are dropped before the
write, so re-running a step adds nothing twice. Each append is one Delta commit: it becomes
visible whole or not at all, so a process killed mid-batch leaves the table at its last
version, and the rerun writes exactly the rows that are missing. Every commit carries the run's
metadata (command, run id, manifest hash, package version) in the Delta log, where
`DeltaTable.history()` and `selm-data log` show it.

Readers need nothing of ours: ``pl.scan_delta("<store>/pairs")`` is what `Store.scan` returns
(with ``s3://bucket/store/pairs`` polars reads the same AWS_* environment delta-rs does).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import uuid
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import DeltaError
from deltalake.transaction import AddAction

from selm_data.errors import StoreError
from selm_data.store import leases, object_leases
from selm_data.store.location import Location, parse_location, scrub
from selm_data.store.schema import TABLES, Batch, TableSpec, conform, table_spec

STORE_FORMAT = 1
MARKER = "selm-store.json"
LEASES_DIR = "_leases"
CHECKPOINT_INTERVAL = 10


def package_version() -> str:
    try:
        return metadata.version("selm")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class RunInfo:
    """Who is writing: stamped on every row (`run_id`) and every commit (all fields)."""

    run_id: str
    command: str
    manifest_hash: str | None = None
    manifest_json: str | None = None  # the validated manifest, recorded once in `runs`

    @classmethod
    def new(
        cls, command: str, *, manifest_hash: str | None = None, manifest_json: str | None = None
    ) -> RunInfo:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        return cls(f"{stamp}-{uuid.uuid4().hex[:8]}", command, manifest_hash, manifest_json)

    def commit_metadata(self) -> dict[str, str]:
        return {
            "selm.command": self.command,
            "selm.run_id": self.run_id,
            "selm.manifest_hash": self.manifest_hash or "",
            "selm.version": package_version(),
        }


_SECRET_FLAG = re.compile(r"^--?[\w-]*(token|key|secret|password)[\w-]*", re.IGNORECASE)


def command_line(argv: list[str] | None = None, *, program: str = "selm-data") -> str:
    """This invocation as text for the store's metadata, with secret-looking values redacted."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = [program]
    redact_next = False
    for arg in args:
        if redact_next:
            out.append("***")
            redact_next = False
        elif _SECRET_FLAG.match(arg):
            flag, eq, _ = arg.partition("=")
            out.append(f"{flag}=***" if eq else flag)
            redact_next = not eq
        else:
            out.append(arg)
    return " ".join(out)


@dataclass(frozen=True)
class AppendResult:
    table: str
    added: int
    skipped: int  # rows the table already held, or repeated within the batch
    version: int  # the table's version after the append


@dataclass(frozen=True)
class Commit:
    table: str
    version: int
    timestamp: datetime
    operation: str
    rows_added: int | None
    run_id: str | None
    command: str | None
    manifest_hash: str | None
    package_version: str | None


@dataclass
class _IdIndex:
    """The ids a table holds, kept in step with its files so that an append checks only a set.

    Refreshing reads the id column of files added since the last look (ours or another
    writer's); if files were removed (compaction, delete) it starts over.
    """

    version: int = -1
    files: set[str] = field(default_factory=set)
    ids: set[str] = field(default_factory=set)

    def refresh(self, dt: DeltaTable, fs: pafs.FileSystem, table: str, id_column: str) -> None:
        if dt.version() == self.version:
            return
        paths = set(pa.table(dt.get_add_actions(flatten=False)).column("path").to_pylist())
        if self.files - paths:
            self.files, self.ids = set(), set()
        for path in paths - self.files:
            ids = pq.read_table(f"{table}/{unquote(path)}", columns=[id_column],
                                filesystem=fs).column(0)
            self.ids.update(ids.to_pylist())
        self.files = paths
        self.version = dt.version()


class Store:
    """A selm store. Open one with `open_store`."""

    def __init__(self, location: Location, run: RunInfo):
        self.location = location
        self.run = run
        self.fs = location.filesystem()  # paths relative to the store: "pairs/part-...parquet"
        self._tables: dict[str, DeltaTable] = {}
        self._indexes: dict[str, _IdIndex] = {}
        self._run_recorded = False
        self._leases: list[object_leases.ObjectLease] = []

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    @property
    def uri(self) -> str:
        """The store's location as users write it: an absolute path or scheme://bucket/path."""
        return self.location.uri

    @property
    def root(self) -> Path:
        """The store's folder. Only local stores have one: code that needs files on disk asks
        here and gets a clear error for an object-store URI instead of a wrong local path."""
        if self.location.local is None:
            raise StoreError(
                f"this command reads the store's files from a local folder, and {self.uri} is "
                "an object-store URI; it is not supported there yet. Copy the store to a local "
                "folder, or use build, export, verify, status, log, optimize, vacuum or "
                "selm-train train, which read object stores."
            )
        return self.location.local

    # --- reading ----------------------------------------------------------------------------

    def path(self, table: str) -> Path:
        return self.root / table_spec(table).name

    def table_uri(self, table: str) -> str:
        """Where delta-rs and polars find `table` (a path for local stores)."""
        return self.location.join(table_spec(table).name)

    def scan(self, table: str, *, version: int | datetime | None = None) -> pl.LazyFrame:
        """A polars LazyFrame of `table`, at its latest or a past version (time travel)."""
        if isinstance(version, int) and not 0 <= version <= self.version(table):
            raise StoreError(
                f"{table} has versions 0..{self.version(table)}, not {version}: "
                f"`selm-data log --store {self.uri} --table {table}` lists them."
            )
        return pl.scan_delta(self.table_uri(table), version=version)

    def delta_table(self, table: str) -> DeltaTable:
        """The live Delta table (refreshed to its latest version)."""
        dt = self._tables.get(table)
        if dt is None:
            dt = DeltaTable(self.table_uri(table))
            self._tables[table] = dt
        else:
            dt.update_incremental()
        return dt

    def version(self, table: str) -> int:
        return self.delta_table(table).version()

    def versions(self) -> dict[str, int]:
        return {name: self.version(name) for name in TABLES}

    def history(self, table: str, limit: int | None = None) -> list[Commit]:
        """The table's commits, newest first, with the metadata selm stamped on them."""
        commits = []
        for entry in self.delta_table(table).history(limit):
            metrics = entry.get("operationMetrics") or {}
            commits.append(
                Commit(
                    table=table,
                    version=int(entry["version"]),
                    timestamp=datetime.fromtimestamp(entry["timestamp"] / 1000, UTC),
                    operation=str(entry.get("operation", "")),
                    rows_added=entry.get("selm.rows", metrics.get("num_added_rows")),
                    run_id=entry.get("selm.run_id") or None,
                    command=entry.get("selm.command") or None,
                    manifest_hash=entry.get("selm.manifest_hash") or None,
                    package_version=entry.get("selm.version") or None,
                )
            )
        return commits

    # --- writing ----------------------------------------------------------------------------

    def append(self, table: str, data: Batch) -> AppendResult:
        """Add the rows of `data` that `table` does not hold yet, as one commit.

        `data` is an Arrow table, a polars DataFrame or a list of dicts. Missing `run_id` and
        `created_at` are filled from this store's run; a missing derived id is computed.
        """
        spec = table_spec(table)
        fill = {"run_id": self.run.run_id, "created_at": datetime.now(UTC)}
        batch = conform(spec, data, fill)
        self._check_leases()
        if table != "runs":
            self.record_run()
        ids = batch.column(spec.id_column).to_pylist()
        index = self._indexes.setdefault(table, _IdIndex())
        # First without the lock: read what other writers committed so far (their files' ids),
        # so the locked section below reads only what came since; rows already stored stay
        # stored, so a batch found all there needs no lock (every rank's same quarantine).
        try:
            dt = self.delta_table(table)
            index.refresh(dt, self.fs, spec.name, spec.id_column)
        except (DeltaError, OSError, pa.ArrowException) as e:
            raise StoreError(
                f"reading {spec.name} before writing {batch.num_rows} rows failed: "
                f"{scrub(str(e))}. Nothing was written. Fix the cause (an unreachable object "
                "store, permissions) and run the command again: the rows already stored are "
                "skipped.") from None
        if not _new_rows(ids, index.ids):
            return AppendResult(table, 0, batch.num_rows, dt.version())
        # Which rows are new is only true until another writer commits: decide and commit
        # under the table's lock, so overlapping writers in several processes cannot both
        # write a row. The lock is held for this one append only.
        with self.table_lock(table):
            dt = self.delta_table(table)
            index.refresh(dt, self.fs, spec.name, spec.id_column)
            keep = _new_rows(ids, index.ids)
            new = batch if len(keep) == len(ids) else batch.take(pa.array(keep, pa.int64()))
            if new.num_rows == 0:
                return AppendResult(table, 0, batch.num_rows, dt.version())
            before = dt.version()
            written = self._write(spec, dt, new)
            index.ids.update(ids if new is batch else (ids[i] for i in keep))
            index.files.update(written)
            if dt.version() == before + 1:  # no other commit came between: index is current
                index.version = dt.version()
        return AppendResult(table, new.num_rows, batch.num_rows - new.num_rows, dt.version())

    def _write(self, spec: TableSpec, dt: DeltaTable, rows: pa.Table) -> list[str]:
        """Write `rows` as Parquet files and commit them to the Delta log in one transaction.

        pyarrow writes the files (as fast as plain Parquet); delta-rs commits them, with
        conflict detection and retries against concurrent writers. Files of a failed attempt
        are never named by the log, so readers never see them. Returns the files' paths.
        """
        before = dt.version()
        token = uuid.uuid4().hex
        written: list[str] = []
        try:
            actions = _write_parquet(spec, self.fs, self.location.is_local, rows, token, written)
            dt.create_write_transaction(
                list(actions),  # a list of AddAction | RemoveAction, as it is declared
                mode="append",
                schema=spec.schema,
                partition_by=list(spec.partition_by) or None,
                commit_properties=CommitProperties(
                    custom_metadata={**self.run.commit_metadata(), "selm.rows": rows.num_rows}
                ),
            )
        except (DeltaError, OSError, pa.ArrowException) as e:
            for orphan in written:  # not in the log, so no reader saw it
                with suppress(OSError, pa.ArrowException):  # else `vacuum` removes it later
                    self.fs.delete_file(orphan)
            raise StoreError(
                f"writing {rows.num_rows} rows to {spec.name} failed: {scrub(str(e))}. The "
                f"table is unchanged at version {before} (a Delta commit is all or nothing). "
                "Fix the cause (a full disk, permissions, an unreachable object store) and run "
                "the same command again: the rows already stored are skipped."
            ) from None
        dt.update_incremental()
        return [a.path for a in actions]

    def record_run(self) -> None:
        """Record this run (command, manifest) in `runs`; done once, before its first row."""
        if self._run_recorded:
            return
        row = {
            "run_id": self.run.run_id,
            "command": self.run.command,
            "manifest_hash": self.run.manifest_hash,
            "manifest": self.run.manifest_json,
            "package_version": package_version(),
            "host": socket.gethostname(),
        }
        self.append("runs", [row])
        self._run_recorded = True

    def claim(self, work: str) -> leases.Lease | object_leases.ObjectLease:
        """Claim a unit of work for this run; fails fast if a live process holds it.

        A local store uses flock (freed the moment its holder dies); an object store uses
        put-if-absent objects with a heartbeat, taken over once expired (`object_leases`).
        """
        if self.location.local is not None:
            return leases.claim(self.location.local / LEASES_DIR, work,
                                run_id=self.run.run_id, command=self.run.command)
        lease = object_leases.claim(self.location, work, run_id=self.run.run_id,
                                    command=self.run.command)
        self._leases = [*(held for held in self._leases if held.held), lease]
        return lease

    def table_lock(self, table: str) -> AbstractContextManager[None]:
        """The short exclusive section around one table's "which ids are new, then commit"."""
        if self.location.local is not None:
            return leases.exclusive(self.location.local / LEASES_DIR / f".table-{table}.lock")
        return object_leases.exclusive(self.location, f"table/{table}",
                                       run_id=self.run.run_id, command=self.run.command)

    def leases(self) -> list[tuple[leases.Holder, str]]:
        if self.location.local is not None:
            return leases.list_leases(self.location.local / LEASES_DIR)
        return object_leases.list_leases(self.location)

    def _check_leases(self) -> None:
        """Refuse to write for work whose object lease was lost (heartbeat lapsed, taken over):
        the new holder writes it now, and two writers must never do the same work."""
        for lease in self._leases:
            if lease.lost:
                raise StoreError(
                    f"the lease on {lease.holder.work!r} was lost (its heartbeat could not be "
                    "written in time, so another process may have taken the work over); this "
                    "process stops writing. Check `selm-data status`, and rerun if nobody "
                    "holds it."
                )


def _new_rows(ids: list[str], existing: set[str]) -> list[int]:
    """Positions of the first occurrence of each id the table does not hold yet."""
    distinct = set(ids)
    if len(distinct) == len(ids) and existing.isdisjoint(distinct):
        return list(range(len(ids)))  # the common case: every row is new
    seen: set[str] = set()
    keep = []
    for i, id_ in enumerate(ids):
        if id_ not in existing and id_ not in seen:
            seen.add(id_)
            keep.append(i)
    return keep


def _write_parquet(spec: TableSpec, fs: pafs.FileSystem, local: bool, rows: pa.Table,
                   token: str, written: list[str]) -> list[AddAction]:
    """One Parquet file per partition value, laid out and described as the Delta spec says:
    partition columns live in the path, not the file; statistics for `spec.stats_columns`.
    Each file is encoded in memory and written with one put (one request on an object store);
    its store-relative path goes to `written` first, so a failed write's files can be removed."""
    # (the partition's (column, value) pairs, its rows)
    groups: list[tuple[tuple[tuple[str, Any], ...], pa.Table]] = [((), rows)]
    for column in spec.partition_by:
        split: list[tuple[tuple[tuple[str, Any], ...], pa.Table]] = []
        for key, part in groups:
            values = pc.unique(part.column(column)).to_pylist()
            if len(values) == 1:  # the usual case: no copy of the batch
                split.append(((*key, (column, values[0])), part))
                continue
            split += [
                ((*key, (column, v)), part.filter(pc.equal(part.column(column), v)))
                for v in values
            ]
        groups = split
    actions = []
    for n, (key, part) in enumerate(groups):
        folder = "/".join(f"{column}={value}" for column, value in key)
        relative = f"{folder}/" if folder else ""
        relative += f"part-{token}-{n:04d}.snappy.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(part.drop_columns(list(spec.partition_by)), sink, compression="snappy")
        data = sink.getvalue()
        path = f"{spec.name}/{relative}"
        if local:
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        written.append(path)
        with fs.open_output_stream(path) as out:
            out.write(data)
        actions.append(
            AddAction(
                path=relative,
                size=data.size,
                partition_values={column: str(value) for column, value in key},
                modification_time=int(datetime.now(UTC).timestamp() * 1000),
                data_change=True,
                stats=_file_stats(spec, part),
            )
        )
    return actions


def _file_stats(spec: TableSpec, part: pa.Table) -> str:
    """Delta per-file statistics (numRecords, minValues, maxValues, nullCount) as JSON."""
    mins, maxs, nulls = {}, {}, {}
    for column in spec.stats_columns:
        if column in spec.partition_by:
            continue
        values = part.column(column)
        bounds = pc.min_max(values).as_py()
        nulls[column] = values.null_count
        if bounds["min"] is not None:
            mins[column], maxs[column] = bounds["min"], bounds["max"]
    return json.dumps(
        {"numRecords": part.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}
    )


def _create_tables(location: Location, run: RunInfo) -> None:
    for spec in TABLES.values():
        path = location.join(spec.name)
        if DeltaTable.is_deltatable(path):
            continue
        try:
            DeltaTable.create(
                path,
                spec.schema,
                mode="ignore",
                partition_by=list(spec.partition_by) or None,
                name=spec.name,
                description=spec.description,
                configuration={
                    "delta.dataSkippingStatsColumns": ",".join(spec.stats_columns),
                    # Each append is a commit; replaying the JSON commits since the last
                    # checkpoint is most of a commit's cost, so checkpoint every 10, not 100
                    # (measured: 5 ms instead of 9 ms a commit, 2 ms instead of 6 ms a refresh).
                    "delta.checkpointInterval": str(CHECKPOINT_INTERVAL),
                    # delta-rs would delete log entries older than 30 days at each checkpoint,
                    # snapshots' versions included; `selm-data optimize` cleans the log instead
                    "delta.enableExpiredLogCleanup": "false",
                },
                commit_properties=CommitProperties(custom_metadata=run.commit_metadata()),
            )
        except DeltaError:
            # Another process created it between our check and our commit.
            if not DeltaTable.is_deltatable(path):
                raise


def open_store(
    path: str | os.PathLike[str], *, create: bool = False, run: RunInfo | None = None
) -> Store:
    """Open the store at `path`, a folder or an object-store URI (creating it, or adding
    missing tables, if `create`). `run` identifies the writer; reading needs none.

    Raises:
        StoreError: a location that cannot be a store (see `location.parse_location`), no
            store there, another format, missing tables, or an unreachable object store.
    """
    location = parse_location(path)
    uri = location.uri
    run = run or RunInfo.new("python")
    fs = location.filesystem()
    try:
        if create:
            if location.local is not None:
                location.local.mkdir(parents=True, exist_ok=True)
            _create_tables(location, run)
            if fs.get_file_info(MARKER).type == pafs.FileType.NotFound:
                _write_marker(location, fs)
        info = _read_marker(fs)
        missing = [name for name in TABLES if not DeltaTable.is_deltatable(location.join(name))]
    except (OSError, DeltaError, pa.ArrowException) as e:
        raise StoreError(f"cannot {'create' if create else 'open'} a store at {uri}: "
                         f"{scrub(str(e))}") from None
    if info is None:
        raise StoreError(
            f"no selm store at {uri}. Create one with `selm-data init --store {uri}` "
            "(or `--manifest FILE`, which uses the manifest's store)."
        )
    if info.get("format") != STORE_FORMAT:
        raise StoreError(
            f"the store at {uri} has format {info.get('format')}, this selm "
            f"({package_version()}) reads format {STORE_FORMAT}. Use a matching selm version."
        )
    if missing:
        raise StoreError(
            f"the store at {uri} lacks table(s) {missing}. Run `selm-data init --store {uri}` "
            "to add them; existing tables are left as they are."
        )
    return Store(location, run)


def _write_marker(location: Location, fs: pafs.FileSystem) -> None:
    data = (json.dumps({"format": STORE_FORMAT, "created_by": package_version()}, indent=2)
            + "\n").encode("utf-8")
    if location.local is None:  # one put is atomic on an object store
        with fs.open_output_stream(MARKER) as out:
            out.write(data)
        return
    tmp = location.local / f".{MARKER}.{uuid.uuid4().hex}"
    tmp.write_bytes(data)
    os.replace(tmp, location.local / MARKER)


def _read_marker(fs: pafs.FileSystem) -> dict[str, object] | None:
    if fs.get_file_info(MARKER).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(MARKER) as f:
        info = json.loads(f.read().decode("utf-8"))
    return info if isinstance(info, dict) else None


__all__ = ["AppendResult", "Commit", "RunInfo", "Store", "open_store", "package_version"]
