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
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError

from selm_data import leases
from selm_data.errors import StoreError
from selm_data.schema import TABLES, Batch, TableSpec, conform, table_spec

STORE_FORMAT = 1
MARKER = "selm-store.json"
LEASES_DIR = "_leases"


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
                    rows_added=metrics.get("num_added_rows"),
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
        dt = self.delta_table(table)
        index = self._indexes.setdefault(table, _IdIndex())
        index.refresh(dt, self.path(table), spec.id_column)
        keep = _new_rows(batch.column(spec.id_column).to_pylist(), index.ids)
        new = batch.take(pa.array(keep, pa.int64()))
        if new.num_rows == 0:
            return AppendResult(table, 0, batch.num_rows, dt.version())
        if table != "runs":
            self.record_run()
        self._write(spec, dt, new)
        index.ids.update(new.column(spec.id_column).to_pylist())
        return AppendResult(table, new.num_rows, batch.num_rows - new.num_rows, dt.version())

    def _write(self, spec: TableSpec, dt: DeltaTable, rows: pa.Table) -> None:
        before = dt.version()
        try:
            write_deltalake(
                dt,
                rows,
                mode="append",
                commit_properties=CommitProperties(custom_metadata=self.run.commit_metadata()),
            )
        except (DeltaError, OSError) as e:
            raise StoreError(
                f"writing {rows.num_rows} rows to {spec.name} failed: {e}. The table is "
                f"unchanged at version {before} (a Delta commit is all or nothing). Fix the "
                "cause (a full disk, permissions) and run the same command again: the rows "
                "already stored are skipped."
            ) from e

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
    seen: set[str] = set()
    keep = []
    for i, id_ in enumerate(ids):
        if id_ not in existing and id_ not in seen:
            seen.add(id_)
            keep.append(i)
    return keep


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
                configuration={"delta.dataSkippingStatsColumns": ",".join(spec.stats_columns)},
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
