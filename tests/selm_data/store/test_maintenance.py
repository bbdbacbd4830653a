"""`optimize` and `vacuum` on a local store and on the S3 server: fewer files, the same rows,
verify passes, time travel within the retention window and to every snapshot's versions keeps
working, a dry run removes nothing, and both are safe while another process appends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from helpers import chain_rows
from s3server import child_env
from selm_data import open_store, verify
from selm_data.publish.snapshot import export
from selm_data.store.maintenance import optimize, vacuum
from selm_data.store.store import RunInfo

WORKER = Path(__file__).with_name("store_worker.py")


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_uri")


def files(store, table: str) -> int:
    return len(pa.table(store.delta_table(table).get_add_actions(flatten=False)))


def test_optimize_then_vacuum_keeps_rows_snapshots_and_the_window(location):
    store = open_store(location, create=True, run=RunInfo.new("pytest maintenance"))
    first, later = chain_rows(1, 6), chain_rows(1, 12)["prompts"][6:]
    for table in ("responses", "judgments", "pairs"):
        store.append(table, first[table])
    for row in first["prompts"]:  # one small commit, one file, per prompt
        store.append("prompts", [row])
    export(store, 1, name="it1")  # pins the tables at their current versions
    pinned = store.version("prompts")
    for row in later:
        store.append("prompts", [row])
    unpinned = store.version("prompts") - 3  # nine prompts; no snapshot names it
    assert files(store, "prompts") == 12

    done = {r.table: r for r in optimize(store)}
    assert (done["prompts"].files_removed, done["prompts"].files_added) == (12, 1)
    assert files(store, "prompts") == 1 and store.scan("prompts").collect().height == 12
    assert verify(store) == []

    # inside the retention window nothing goes, and old versions read as before
    within = {r.table: r for r in vacuum(store, retention_hours=1, dry_run=False)}
    assert within["prompts"].files == []
    assert store.scan("prompts", version=unpinned).collect().height == 9

    # past it: the six files only the later versions named go; the snapshot's six stay
    dry = {r.table: r for r in vacuum(store, retention_hours=0)}
    assert dry["prompts"].kept_versions == [pinned] and len(dry["prompts"].files) == 6
    assert store.scan("prompts", version=unpinned).collect().height == 9  # a dry run
    gone = {r.table: r for r in vacuum(store, retention_hours=0, dry_run=False)}
    assert gone["prompts"].files == dry["prompts"].files
    assert store.scan("prompts", version=pinned).collect().height == 6  # the snapshot's
    assert store.scan("prompts").collect().height == 12
    assert verify(store) == []


def test_vacuum_dry_run_counts_what_apply_removes(location):
    store = open_store(location, create=True, run=RunInfo.new("pytest maintenance"))
    rows = chain_rows(1, 4)
    for i in range(4):
        store.append("prompts", rows["prompts"][i:i + 1])
    optimize(store, tables=["prompts"])
    dry = vacuum(store, retention_hours=0, tables=["prompts"])[0]
    assert len(dry.files) == 4  # the four small files the compaction replaced
    applied = vacuum(store, retention_hours=0, dry_run=False, tables=["prompts"])[0]
    assert applied.files == dry.files
    assert vacuum(store, retention_hours=0, tables=["prompts"])[0].files == []
    assert verify(store) == []


def test_optimize_and_vacuum_while_another_process_appends(tmp_path):
    path = str(tmp_path / "store")
    store = open_store(path, create=True, run=RunInfo.new("pytest maintenance"))
    store.record_run()
    writer = subprocess.Popen([sys.executable, str(WORKER), "append", path, "30", "5", "0"],
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=child_env())
    assert writer.stdout.readline().startswith("begin")
    rounds = 0
    while writer.poll() is None:
        optimize(store, tables=["prompts"])
        vacuum(store, retention_hours=0, dry_run=False, tables=["prompts"])
        rounds += 1
    assert writer.returncode == 0, writer.stderr.read()
    assert rounds >= 2
    prompts = store.scan("prompts").collect()
    assert prompts.height == 150 and prompts["prompt_id"].n_unique() == 150
    assert verify(store) == []


def log_entries(store, table: str) -> list[str]:
    import pyarrow.fs as pafs

    return sorted(i.base_name for i in store.fs.get_file_info(
        pafs.FileSelector(f"{table}/_delta_log")) if i.base_name[0].isdigit())


def test_optimize_drops_the_old_log_but_snapshot_versions_stay_readable(location):
    from deltalake.exceptions import DeltaError

    from selm_data.publish.snapshot import Filters, snapshot_row, snapshot_table

    store = open_store(location, create=True, run=RunInfo.new("pytest maintenance"))
    first, later = chain_rows(1, 6), chain_rows(1, 30)["prompts"][6:]
    for table in ("responses", "judgments", "pairs"):
        store.append(table, first[table])
    for row in first["prompts"]:
        store.append("prompts", [row])
    export(store, 1, name="it1")
    pinned = store.version("prompts")
    versions = {v["table"]: v["version"] for v in snapshot_row(store, "it1")["table_versions"]}
    for row in later:
        store.append("prompts", [row])
    # a snapshot from before exports pinned checkpoints: optimize writes the missing one
    store.fs.delete_file(f"prompts/_delta_log/{pinned:020d}.checkpoint.parquet")
    unpinned = store.version("prompts") - 5
    entries = len(log_entries(store, "prompts"))

    result = optimize(store, tables=["prompts"], retention_hours=0)[0]
    assert result.log_entries_removed > 0
    latest = store.version("prompts")
    # what is left: the pinned version's checkpoint, and the newest version's commit and
    # checkpoint (entries before the optimize's own commits all went)
    assert log_entries(store, "prompts") == [
        f"{pinned:020d}.checkpoint.parquet", f"{latest:020d}.checkpoint.parquet",
        f"{latest:020d}.json"]
    assert result.log_entries_removed >= entries - 1
    assert store.scan("prompts", version=pinned).collect().height == 6
    assert snapshot_table(store, 1, versions, Filters()).num_rows == 6  # as provenance reads it
    with pytest.raises((DeltaError, OSError, Exception)):  # outside the window, not pinned
        store.scan("prompts", version=unpinned).collect()
    assert store.append("prompts", chain_rows(1, 31)["prompts"][30:]).added == 1
    assert store.scan("prompts").collect().height == 31
    assert verify(store) == []
    # a window that covers every commit removes nothing
    assert optimize(store, tables=["prompts"])[0].log_entries_removed == 0
