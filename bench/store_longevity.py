"""Benchmark: a store used for months. Does `optimize` bring the append cost back to a fresh
table's, and what does an S3 server cost against a local disk?

What is measured, in one run on one machine (per-append medians):

1. aged vs fresh: `--commits` small appends (one `prompts` row each, one Delta commit each) to
   one table; then `--probe` more appends timed one by one on that aged table (before), again
   after `selm-data optimize` (compaction, checkpoint, log entries before the retention window
   removed; after), and on a fresh table in a fresh store (baseline). Goal: after / fresh
   <= 1.2x. The commits here are seconds old, where a store's would be weeks old, so optimize
   runs with `--retention-hours 0` (the flag sets it): every commit is "older than the
   window", as the months-old commits of a real store are. The first append after optimize re-reads
   the table's ids from the compacted file (the id index starts over when files are removed);
   it is timed on its own and left out of the median.
2. local vs S3: `--s3-commits` appends of the same rows into a fresh local store and into a
   fresh store on moto's S3 server on 127.0.0.1 (its own process). No goal; the ratio says what
   an object store's round trips (leases, conditional put) cost per commit.

Run: python bench/store_longevity.py [--commits 10000] [--probe 30] [--s3-commits 200]
     [--retention-hours 0]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from selm_data.store.maintenance import optimize
from selm_data.store.store import RunInfo, Store, open_store


def rows(first: int, count: int) -> list[dict]:
    return [{"iteration": 1, "messages": [{"role": "user", "content": f"prompt {i}"}],
             "source": "bench", "source_row": i} for i in range(first, first + count)]


def timed_appends(store: Store, first: int, count: int) -> list[float]:
    times = []
    for i in range(first, first + count):
        start = time.perf_counter()
        result = store.append("prompts", rows(i, 1))
        times.append(time.perf_counter() - start)
        assert result.added == 1
    return times


def ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def aged_vs_fresh(workdir: Path, commits: int, probe: int, retention_hours: int) -> None:
    store = open_store(workdir / "aged", create=True, run=RunInfo.new("bench longevity"))
    store.record_run()
    start = time.perf_counter()
    ingest = timed_appends(store, 0, commits)
    print(f"{commits} commits in {time.perf_counter() - start:.1f} s "
          f"(first 100 median {ms(ingest[:100]):.1f} ms, last 100 {ms(ingest[-100:]):.1f} ms)",
          flush=True)
    before = timed_appends(store, commits, probe)
    start = time.perf_counter()
    result = optimize(store, tables=["prompts"], retention_hours=retention_hours)[0]
    took = time.perf_counter() - start
    print(f"optimize (retention {retention_hours} h): {result.files_removed} files -> "
          f"{result.files_added}, {result.log_entries_removed} log entries removed, "
          f"in {took:.1f} s", flush=True)
    first_after = timed_appends(store, commits + probe, 1)[0]
    after = timed_appends(store, commits + probe + 1, probe)
    fresh_store = open_store(workdir / "fresh", create=True, run=RunInfo.new("bench fresh"))
    fresh_store.record_run()
    fresh = timed_appends(fresh_store, 0, probe)
    print(f"first append after optimize (id index rebuilt): {1000 * first_after:.1f} ms")
    print()
    print("| append to a table of | baseline: fresh table, ms | selm, ms | ratio | goal |")
    print("|---|---|---|---|---|")
    print(f"| {commits} commits, before optimize | {ms(fresh):.1f} | {ms(before):.1f} | "
          f"{ms(before) / ms(fresh):.2f}x | |")
    verdict = "pass" if ms(after) / ms(fresh) <= 1.2 else "fail"
    print(f"| {commits} commits, after optimize | {ms(fresh):.1f} | {ms(after):.1f} | "
          f"{ms(after) / ms(fresh):.2f}x | <= 1.2x: {verdict} |")
    print(flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_s3(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server on 127.0.0.1 and the environment that reaches it (dummy keys)."""
    port = free_port()
    log = (workdir / "moto.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
                      AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true")
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    import boto3

    boto3.client("s3").create_bucket(Bucket="selm-bench")
    return server, f"s3://selm-bench/{uuid.uuid4().hex[:8]}/store"


def local_vs_s3(workdir: Path, commits: int) -> None:
    server, uri = start_s3(workdir)
    try:
        results = {}
        for label, where in (("local disk", str(workdir / "local")), ("S3 (moto)", uri)):
            store = open_store(where, create=True, run=RunInfo.new("bench longevity"))
            store.record_run()
            start = time.perf_counter()
            results[label] = (timed_appends(store, 0, commits), time.perf_counter() - start)
    finally:
        server.terminate()
        server.wait(10)
    local, s3 = results["local disk"], results["S3 (moto)"]
    print(f"| {commits} appends | baseline: local disk | selm on S3 (moto, 127.0.0.1) | ratio |")
    print("|---|---|---|---|")
    print(f"| median per append, ms | {ms(local[0]):.1f} | {ms(s3[0]):.1f} | "
          f"{ms(s3[0]) / ms(local[0]):.2f}x |")
    print(f"| total, s | {local[1]:.1f} | {s3[1]:.1f} | {s3[1] / local[1]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=10_000)
    parser.add_argument("--probe", type=int, default=30)
    parser.add_argument("--s3-commits", type=int, default=200)
    parser.add_argument("--retention-hours", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--skip", choices=["aged", "s3"], default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        if args.skip != "aged":
            aged_vs_fresh(workdir, args.commits, args.probe, args.retention_hours)
        if args.skip != "s3":
            local_vs_s3(workdir, args.s3_commits)


if __name__ == "__main__":
    main()
