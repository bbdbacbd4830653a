"""A writer process for the concurrency tests: run as `python store_worker.py MODE ...`.

Prints progress lines (flushed) so the test can act at a known point: kill it mid-batch,
or start a second claimant while the first holds its lease.
"""

from __future__ import annotations

import importlib
import resource
import signal
import sys
import time
from pathlib import Path

from selm_data import LeaseHeldError, StoreError, open_store
from selm_data.store.store import RunInfo

TEXT = "lorem ipsum dolor sit amet " * 40  # ~1 KB a prompt, so a batch takes a while to write


def prompt_rows(first: int, count: int) -> list[dict]:
    return [
        {"iteration": 1, "messages": [{"role": "user", "content": f"{i}: {TEXT}"}],
         "source": "worker", "source_row": i}
        for i in range(first, first + count)
    ]


def append_batches(store_path: str, batches: int, rows: int, first: int) -> None:
    store = open_store(store_path, run=RunInfo.new("worker append"))
    for b in range(batches):
        print(f"begin {b}", flush=True)
        store.append("prompts", prompt_rows(first + b * rows, rows))
        print(f"done {b}", flush=True)


def claim_and_write(store_path: str, work: str, hold: float, first: int,
                    go: str | None = None) -> None:
    store = open_store(store_path, run=RunInfo.new(f"worker claim {work}"))
    if go is not None:  # claimants start together: the claim itself is the race
        # the lease client's library imported before the start, as claim would
        importlib.import_module("boto3" if store_path.startswith("s3://") else "obstore")

        print("ready", flush=True)
        while not Path(go).exists():
            time.sleep(0.001)
    try:
        lease = store.claim(work)
    except LeaseHeldError as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(3)
    with lease:
        print(f"claimed {store.run.run_id}", flush=True)
        time.sleep(hold)
        store.append("prompts", prompt_rows(first, 10))
        print("wrote", flush=True)


def append_on_signal(store_path: str, go: str, first: int, count: int) -> None:
    """Open the store, wait until the file `go` exists, then append: writers start together."""
    store = open_store(store_path, run=RunInfo.new("worker overlap"))
    store.record_run()
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.001)
    result = store.append("prompts", prompt_rows(first, count))
    print(f"added {result.added}", flush=True)


def create(store_path: str) -> None:
    store = open_store(store_path, create=True, run=RunInfo.new("worker create"))
    store.record_run()
    print("created", flush=True)


def claim_and_hang(store_path: str, work: str) -> None:
    store = open_store(store_path, run=RunInfo.new("worker hang"))
    store.claim(work)
    print(f"claimed {store.run.run_id}", flush=True)
    time.sleep(600)


def append_past_file_size_limit(store_path: str, limit: int) -> None:
    """Stands in for a full disk: the kernel refuses to grow a file past `limit` bytes."""
    store = open_store(store_path, run=RunInfo.new("worker fsize"))
    store.append("prompts", prompt_rows(0, 10))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write(), not a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        store.append("prompts", prompt_rows(10, 5000))
    except StoreError as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(4)


def claim_and_write_chunks(store_path: str, work: str, chunks: int) -> None:
    """A builder of one shard: claim, then commit `chunks` chunks of 10 rows (the same rows on
    every run, as a rebuilt shard would be), a pause between chunks so it can be killed there."""
    store = open_store(store_path, run=RunInfo.new(f"worker chunks {work}"))
    with store.claim(work) as lease:
        if lease.taken_over is not None:
            print(f"took over from run {lease.taken_over.run_id}", flush=True)
        for c in range(chunks):
            store.append("prompts", prompt_rows(c * 10, 10))
            print(f"done {c}", flush=True)
            time.sleep(0.5)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "append":
        append_batches(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif mode == "claim":
        claim_and_write(args[0], args[1], float(args[2]), int(args[3]),
                        args[4] if len(args) > 4 else None)
    elif mode == "overlap":
        append_on_signal(args[0], args[1], int(args[2]), int(args[3]))
    elif mode == "create":
        create(args[0])
    elif mode == "fsize":
        append_past_file_size_limit(args[0], int(args[1]))
    elif mode == "claimwrite":
        claim_and_write_chunks(args[0], args[1], int(args[2]))
    elif mode == "hang":
        claim_and_hang(args[0], args[1])
    else:
        raise SystemExit(f"unknown mode {mode}")
