"""`selm-data verify`: is the store whole and consistent?

Checks, per table: the Delta schema is the one `schema.TABLES` declares; every data file the
log names is present with its recorded size; ids are unique; every reference resolves (a
pair's responses exist, a response's prompt exists, each row's run is recorded).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs

from selm_data.store.schema import TABLES, TableSpec
from selm_data.store.store import Store


@dataclass(frozen=True)
class Problem:
    table: str
    check: str  # schema | files | unique ids | references | skipped
    detail: str


def verify(store: Store) -> list[Problem]:
    problems: list[Problem] = []
    broken: set[str] = set()  # tables whose schema or files are wrong cannot be read safely
    for spec in TABLES.values():
        found = _check_schema(store, spec) + _check_files(store, spec)
        if found:
            broken.add(spec.name)
        problems += found
    for spec in TABLES.values():
        blocked = sorted(broken & {spec.name, *(ref.table for ref in spec.references)})
        if blocked:
            problems.append(
                Problem(spec.name, "skipped", f"ids and references not checked: {blocked} broken")
            )
            continue
        problems += _check_unique(store, spec) + _check_references(store, spec)
    if "snapshots" not in broken:
        problems += _check_snapshot_files(store)
    return problems


def _check_snapshot_files(store: Store) -> list[Problem]:
    """Each snapshot's files still hash to its recorded content hash."""
    from selm_data.publish.snapshot import check_snapshot

    return [Problem("snapshots", "snapshot files", detail)
            for row in store.scan("snapshots").collect().iter_rows(named=True)
            for detail in check_snapshot(store, row)]


def _check_schema(store: Store, spec: TableSpec) -> list[Problem]:
    actual = pa.schema(store.delta_table(spec.name).schema().to_arrow())
    if actual.equals(spec.schema):
        return []
    expected = {f.name: f for f in spec.schema}
    found = {f.name: f for f in actual}
    details = [f"missing column {n}" for n in expected if n not in found]
    details += [f"unexpected column {n}" for n in found if n not in expected]
    details += [
        f"column {n} is {found[n].type} (nullable={found[n].nullable}), expected "
        f"{f.type} (nullable={f.nullable})"
        for n, f in expected.items()
        if n in found and not found[n].equals(f)
    ]
    return [Problem(spec.name, "schema", d) for d in details]


def _check_files(store: Store, spec: TableSpec) -> list[Problem]:
    """Every file the log names exists with its recorded size: one listing of the table (one
    request per 1,000 files on an object store, not one per file)."""
    dt = store.delta_table(spec.name)
    actions = pa.table(dt.get_add_actions(flatten=False))
    listing = store.fs.get_file_info(pafs.FileSelector(spec.name, recursive=True))
    sizes = {info.path: info.size for info in listing if info.type == pafs.FileType.File}
    where = store.table_uri(spec.name)
    problems = []
    for path, size in zip(
        actions.column("path").to_pylist(), actions.column("size_bytes").to_pylist(), strict=True
    ):
        found = sizes.get(f"{spec.name}/{unquote(path)}")
        if found is None:
            problems.append(Problem(spec.name, "files", f"data file missing: {where}/{path}"))
        elif found != size:
            problems.append(
                Problem(spec.name, "files",
                        f"data file {where}/{path} has {found} bytes, the log says {size}")
            )
    return problems


def _check_unique(store: Store, spec: TableSpec) -> list[Problem]:
    dupes = (
        store.scan(spec.name)
        .group_by(spec.id_column)
        .agg(pl.len().alias("n"))
        .filter(pl.col("n") > 1)
        .collect()
    )
    if dupes.height == 0:
        return []
    example = dupes.row(0)[0]
    return [
        Problem(
            spec.name,
            "unique ids",
            f"{dupes.height} {spec.id_column} value(s) occur more than once (e.g. {example})",
        )
    ]


def _check_references(store: Store, spec: TableSpec) -> list[Problem]:
    problems = []
    for ref in spec.references:
        targets = store.scan(ref.table).select(pl.col(ref.target).alias(ref.column)).unique()
        dangling = (
            store.scan(spec.name)
            .select(ref.column)
            .drop_nulls()
            .unique()
            .join(targets, on=ref.column, how="anti")
            .collect()
        )
        if dangling.height:
            problems.append(
                Problem(
                    spec.name,
                    "references",
                    f"{dangling.height} {ref.column} value(s) name no {ref.table}.{ref.target} "
                    f"(e.g. {dangling.row(0)[0]})",
                )
            )
    return problems
