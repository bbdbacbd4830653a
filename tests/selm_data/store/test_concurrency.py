"""Killed writers, concurrent writers and leases, with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from selm_data import LeaseHeldError, open_store, verify
from selm_data.store.store import RunInfo

WORKER = Path(__file__).with_name("store_worker.py")
pytestmark = pytest.mark.slow


def start(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None and proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            raise AssertionError(f"worker exited ({proc.returncode}): {proc.stderr.read()}")
    raise AssertionError(f"no line starting {prefix!r} within {timeout}s")


def prompt_rows_of(store_path: Path) -> pl.DataFrame:
    return open_store(store_path).scan("prompts").select("prompt_id", "source_row").collect()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    open_store(path, create=True, run=RunInfo.new("pytest"))
    return path


def test_sigkill_mid_batch_leaves_last_commit_and_rerun_completes(store_path):
    batches, rows = 12, 5000
    proc = start("append", store_path, batches, rows, 0)
    wait_for_line(proc, "begin 3")  # batches 0-2 are committed, batch 3 is being prepared
    data_dir = store_path / "prompts" / "iteration=1"
    deadline = time.monotonic() + 60
    while len(list(data_dir.iterdir())) <= 3:  # wait until batch 3's data file is being written
        assert proc.poll() is None and time.monotonic() < deadline, "batch 3 never started"
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    after_kill = prompt_rows_of(store_path)
    on_disk = len(list(data_dir.iterdir()))
    committed = open_store(store_path).delta_table("prompts").get_add_actions().num_rows
    assert after_kill.height == committed * rows, "a batch is visible whole or not at all"
    if after_kill.height == 3 * rows:  # the usual case: killed before batch 3's commit
        assert on_disk > committed, "batch 3's uncommitted file shows the kill was mid-batch"
    else:  # the commit landed in the instant between seeing the file and the kill
        assert after_kill.height == 4 * rows
    assert verify(open_store(store_path)) == []

    rerun = start("append", store_path, batches, rows, 0)
    rerun.communicate(timeout=300)
    assert rerun.returncode == 0
    final = prompt_rows_of(store_path)
    assert final.height == batches * rows
    assert final["prompt_id"].n_unique() == batches * rows
    assert sorted(final["source_row"].to_list()) == list(range(batches * rows))
    assert verify(open_store(store_path)) == []


def test_disjoint_writers_at_once_lose_nothing(store_path):
    batches, rows = 6, 2000
    writers = [start("append", store_path, batches, rows, k * batches * rows) for k in range(2)]
    for w in writers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    final = prompt_rows_of(store_path)
    assert final.height == 2 * batches * rows
    assert sorted(final["source_row"].to_list()) == list(range(2 * batches * rows))
    assert verify(open_store(store_path)) == []


def test_overlapping_writers_at_once_store_each_row_once(store_path, tmp_path):
    go = tmp_path / "go"
    writers = [start("overlap", store_path, go, 100 * k, 400) for k in range(4)]
    for w in writers:
        wait_for_line(w, "ready")
    go.touch()  # all four append overlapping rows (0-399, 100-499, ...) at the same moment
    added = 0
    for w in writers:
        out, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
        added += int(out.split()[-1])
    rows = prompt_rows_of(store_path)
    assert added == rows.height == 700
    assert sorted(rows["source_row"].to_list()) == list(range(700))
    assert verify(open_store(store_path)) == []


def test_two_claimants_of_the_same_work_only_one_writes(store_path):
    first = start("claim", store_path, "build/iter=1/shard=0", 3.0, 0)
    holder_line = wait_for_line(first, "claimed")
    holder_run = holder_line.split()[1]
    second = start("claim", store_path, "build/iter=1/shard=0", 0.0, 100)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 3
    assert first.poll() is None, "the second claimant failed fast, while the first still held"
    assert "work 'build/iter=1/shard=0' is already being done by" in err
    assert f"run {holder_run}" in err and f"pid {first.pid}" in err
    out, _ = first.communicate(timeout=60)
    assert "wrote" in out
    assert sorted(prompt_rows_of(store_path)["source_row"].to_list()) == list(range(10))


def test_lease_of_a_killed_process_is_taken_over(store_path):
    hung = start("hang", store_path, "build/iter=2/shard=1")
    wait_for_line(hung, "claimed")
    store = open_store(store_path, run=RunInfo.new("pytest takeover"))
    with pytest.raises(LeaseHeldError, match=f"pid {hung.pid}"):
        store.claim("build/iter=2/shard=1")
    states = {h.work: state for h, state in store.leases()}
    assert states["build/iter=2/shard=1"] == "held"

    hung.send_signal(signal.SIGKILL)
    hung.wait()
    states = {h.work: state for h, state in store.leases()}
    assert states["build/iter=2/shard=1"] == "stale"
    with store.claim("build/iter=2/shard=1") as lease:
        assert lease.taken_over is not None and lease.taken_over.pid == hung.pid
        assert lease.holder.pid == os.getpid()
    states = {h.work: state for h, state in store.leases()}
    assert states["build/iter=2/shard=1"] == "released"
    with store.claim("build/iter=2/shard=1") as again:
        assert again.taken_over is None, "a cleanly released lease is not a take-over"


def test_one_process_cannot_claim_work_twice(store_path):
    store = open_store(store_path, run=RunInfo.new("pytest"))
    with store.claim("w"), pytest.raises(LeaseHeldError, match="already being done"):
        store.claim("w")
    with store.claim("w"):  # released on exit, so free again
        pass


def test_failed_write_loses_nothing_and_says_what_to_do(store_path):
    proc = start("fsize", store_path, 200_000)  # a 5,000-row batch needs ~5 MB
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err
    assert "writing 5000 rows to prompts failed" in err and "File too large" in err
    assert "unchanged at version 1" in err and "run the same command again" in err
    assert prompt_rows_of(store_path).height == 10
    data_files = list((store_path / "prompts").rglob("*.parquet"))
    data_files = [p for p in data_files if "_delta_log" not in p.parts]
    assert len(data_files) == 1, "no partial file of the failed write is left"
    assert verify(open_store(store_path)) == []
    rerun = start("append", store_path, 1, 5010, 0)  # the same rows, without the limit
    rerun.communicate(timeout=120)
    assert sorted(prompt_rows_of(store_path)["source_row"].to_list()) == list(range(5010))


def test_processes_creating_one_store_at_once_all_succeed(tmp_path):
    path = tmp_path / "fresh"
    creators = [start("create", path) for _ in range(3)]  # e.g. one builder per GPU
    for c in creators:
        out, err = c.communicate(timeout=120)
        assert c.returncode == 0 and "created" in out, err
    store = open_store(path)
    assert store.scan("runs").select("run_id").collect().height == 3
    assert all(store.version(t) >= 0 for t in ("prompts", "pairs"))
    assert verify(store) == []


def test_rows_already_stored_need_no_table_lock(store_path):
    """Every rank appends the source's same quarantine: a batch the table holds returns at once,
    without queueing for the table's lock behind other writers (here a holder that never lets
    go); a batch with one new row waits for it."""
    import threading

    from helpers import chain_rows
    from selm_data.store.leases import exclusive
    from selm_data.store.store import LEASES_DIR

    rows = chain_rows(1, 3)["prompts"]
    open_store(store_path).append("prompts", rows)
    other = open_store(store_path)  # another writer, which has read nothing yet
    results: list[object] = []
    with exclusive(store_path / LEASES_DIR / ".table-prompts.lock"):
        same = threading.Thread(target=lambda: results.append(other.append("prompts", rows)))
        same.start()
        same.join(timeout=20)
        assert not same.is_alive() and results[0].added == 0
        more = threading.Thread(target=lambda: results.append(
            other.append("prompts", chain_rows(1, 4)["prompts"])))
        more.start()
        more.join(timeout=1)
        assert more.is_alive()  # waits for the lock: it has a row to write
    more.join(timeout=20)
    assert results[1].added == 1
