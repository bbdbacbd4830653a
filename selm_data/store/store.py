"""The store: one folder of Delta Lake tables that holds every row of every iteration.

    <store>/selm-store.json     format marker
    <store>/<table>/            one Delta table per entry of `schema.TABLES`
    <store>/_leases/            who is building what (see `leases`)

Writes are idempotent appends: rows whose id the table already holds are dropped before the
write, so re-running a step adds nothing twice. Each append is one Delta commit: it becomes
visible whole or not at all, so a process killed mid-batch leaves the table at its last
version, and the rerun writes exactly the rows that are missing. Every commit carries the run's
metadata (command, run id, manifest hash, package version) in the Delta log, where
`DeltaTable.history()` and `selm-data log` show it.

Readers need nothing of ours: ``pl.scan_delta("<store>/pairs")`` is what `Store.scan` returns.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import DeltaError
from deltalake.transaction import AddAction

from selm_data.errors import StoreError
from selm_data.store import leases
from selm_data.store.schema import TABLES, Batch, TableSpec, conform, table_spec

STORE_FORMAT = 1
MARKER = "selm-store.json"
LEASES_DIR = "_leases"
CHECKPOINT_INTERVAL = 10
_UNSAFE_PATH = re.compile(r"[^A-Za-z0-9._/+=,@~:-]")


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

    def refresh(self, dt: DeltaTable, root: Path, id_column: str) -> None:
        if dt.version() == self.version:
            return
        paths = set(pa.table(dt.get_add_actions(flatten=False)).column("path").to_pylist())
        if self.files - paths:
            self.files, self.ids = set(), set()
        for path in paths - self.files:
            ids = pq.read_table(root / unquote(path), columns=[id_column]).column(0)
            self.ids.update(ids.to_pylist())
        self.files = paths
        self.version = dt.version()


class Store:
    """A selm store. Open one with `open_store`."""

    def __init__(self, root: Path, run: RunInfo):
        self.root = root
        self.run = run
        self._tables: dict[str, DeltaTable] = {}
        self._indexes: dict[str, _IdIndex] = {}
        self._run_recorded = False

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # --- reading ----------------------------------------------------------------------------

    def path(self, table: str) -> Path:
        return self.root / table_spec(table).name

    def scan(self, table: str, *, version: int | datetime | None = None) -> pl.LazyFrame:
        """A polars LazyFrame of `table`, at its latest or a past version (time travel)."""
        if isinstance(version, int) and not 0 <= version <= self.version(table):
            raise StoreError(
                f"{table} has versions 0..{self.version(table)}, not {version}: "
                f"`selm-data log --store {self.root} --table {table}` lists them."
            )
        return pl.scan_delta(str(self.path(table)), version=version)

    def delta_table(self, table: str) -> DeltaTable:
        """The live Delta table (refreshed to its latest version)."""
        dt = self._tables.get(table)
        if dt is None:
            dt = DeltaTable(str(self.path(table)))
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
        if table != "runs":
            self.record_run()
        # Which rows are new is only true until another writer commits: decide and commit
        # under the table's lock, so overlapping writers in several processes cannot both
        # write a row. The lock is held for this one append only.
        with leases.exclusive(self.root / LEASES_DIR / f".table-{table}.lock"):
            dt = self.delta_table(table)
            index = self._indexes.setdefault(table, _IdIndex())
            index.refresh(dt, self.path(table), spec.id_column)
            ids = batch.column(spec.id_column).to_pylist()
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
        try:
            actions = _write_parquet(spec, self.path(spec.name), rows, token)
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
            for orphan in self.path(spec.name).rglob(f"part-{token}-*"):
                orphan.unlink(missing_ok=True)  # not in the log, so no reader saw it
            raise StoreError(
                f"writing {rows.num_rows} rows to {spec.name} failed: {e}. The table is "
                f"unchanged at version {before} (a Delta commit is all or nothing). Fix the "
                "cause (a full disk, permissions) and run the same command again: the rows "
                "already stored are skipped."
            ) from e
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

    def claim(self, work: str) -> leases.Lease:
        """Claim a unit of work for this run; fails fast if a live process holds it."""
        return leases.claim(
            self.root / LEASES_DIR, work, run_id=self.run.run_id, command=self.run.command
        )

    def leases(self) -> list[tuple[leases.Holder, str]]:
        return leases.list_leases(self.root / LEASES_DIR)


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


def _write_parquet(spec: TableSpec, root: Path, rows: pa.Table, token: str) -> list[AddAction]:
    """One Parquet file per partition value, laid out and described as the Delta spec says:
    partition columns live in the path, not the file; statistics for `spec.stats_columns`.
    File names carry `token`, so the files of one failed write can be found and removed."""
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
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(part.drop_columns(list(spec.partition_by)), path, compression="snappy")
        stat = path.stat()
        actions.append(
            AddAction(
                path=relative,
                size=stat.st_size,
                partition_values={column: str(value) for column, value in key},
                modification_time=int(stat.st_mtime * 1000),
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


def _create_tables(root: Path, run: RunInfo) -> None:
    for spec in TABLES.values():
        path = root / spec.name
        if DeltaTable.is_deltatable(str(path)):
            continue
        try:
            DeltaTable.create(
                str(path),
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
                },
                commit_properties=CommitProperties(custom_metadata=run.commit_metadata()),
            )
        except DeltaError:
            # Another process created it between our check and our commit.
            if not DeltaTable.is_deltatable(str(path)):
                raise


def open_store(
    path: str | os.PathLike[str], *, create: bool = False, run: RunInfo | None = None
) -> Store:
    """Open the store at `path` (creating it, or adding missing tables, if `create`).

    `run` identifies the writer; reading needs none.
    """
    root = Path(path).expanduser().absolute()
    unsafe = sorted(set(_UNSAFE_PATH.findall(str(root))))
    if unsafe:
        raise StoreError(
            f"the store path {str(root)!r} contains {unsafe}: polars and delta-rs percent-encode "
            "such characters and then cannot find the files. Use a path of letters, digits "
            "and . _ - / only."
        )
    run = run or RunInfo.new("python")
    marker = root / MARKER
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _create_tables(root, run)
            if not marker.exists():
                info = {"format": STORE_FORMAT, "created_by": package_version()}
                tmp = root / f".{MARKER}.{uuid.uuid4().hex}"
                tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
                os.replace(tmp, marker)
        except (OSError, DeltaError) as e:
            raise StoreError(f"cannot create a store at {root}: {e}") from e
    if not marker.exists():
        raise StoreError(
            f"no selm store at {root}. Create one with `selm-data init --store {root}` "
            "(or `--manifest FILE`, which uses the manifest's store)."
        )
    info = json.loads(marker.read_text(encoding="utf-8"))
    if info.get("format") != STORE_FORMAT:
        raise StoreError(
            f"the store at {root} has format {info.get('format')}, this selm "
            f"({package_version()}) reads format {STORE_FORMAT}. Use a matching selm version."
        )
    missing = [name for name in TABLES if not DeltaTable.is_deltatable(str(root / name))]
    if missing:
        raise StoreError(
            f"the store at {root} lacks table(s) {missing}. Run `selm-data init --store {root}` "
            "to add them; existing tables are left as they are."
        )
    return Store(root, run)


__all__ = ["AppendResult", "Commit", "RunInfo", "Store", "open_store", "package_version"]
