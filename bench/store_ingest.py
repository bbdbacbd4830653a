"""Benchmark: ingesting responses into the selm store against plain Parquet files.

What is measured, in one run on one machine (medians over `--repeats`):

1. ingest: `Store.append("responses", batch)` for every batch (`--rows` rows, `--batch` rows a
   batch, one Delta commit each) into a fresh store, against the same Arrow batches written with
   `pyarrow.parquet.write_table`, one file per batch, into a fresh folder (the baseline). The
   store's extra work is its schema check, the duplicate check against the ids it holds, Delta
   commits and per-file statistics. Goal: at most 1.5x the baseline.
2. re-append: the same batches again through a freshly opened store (a rerun is a new process,
   so the id index is rebuilt from the table's files inside the timing). It must add 0 rows.
   Goal: at most 2x the first ingest.
3. read: one iteration back with polars (`Store.scan` with a filter, against `pl.scan_parquet`
   on the baseline folder with the same filter). No goal; reported for scale.

Rows are made the way the builder makes them, before any timing: content-derived ids
(`schema.row_ids`), `run_id` and `created_at` included. Hashing the ids is timed on its own and
printed as an extra line; it is part of neither ingest.

Run: python bench/store_ingest.py [--rows 1000000] [--batch 10000] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from selm_data.store.schema import RESPONSES, SAMPLING, row_ids
from selm_data.store.store import RunInfo, open_store

ITERATIONS = 3
POOL_SIZE = 20_000
VOCAB_SIZE = 8_000
SEED = 20240601
TEXT_CHARS = (50, 8_000)  # clip range of response lengths, in characters
MEDIAN_CHARS = 1_200


# --- data -------------------------------------------------------------------------------------


def make_vocab(rng: random.Random) -> tuple[list[str], list[float]]:
    """Random lowercase words with Zipf-like weights, so text compresses like prose-ish text."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(1, 10))) for _ in range(VOCAB_SIZE)]
    cum, total = [], 0.0
    for rank in range(1, VOCAB_SIZE + 1):
        total += 1.0 / rank
        cum.append(total)
    return words, cum


def make_text_pool(rng: random.Random) -> tuple[pa.Array, pa.Array, pa.Array]:
    """`POOL_SIZE` distinct response texts (lognormal lengths), their token counts and ends.

    Making 1M distinct texts in Python would take minutes and ~1.6 GB of str objects, so rows
    draw their text from this pool; each batch draws without replacement, so no text repeats
    inside one Parquet file and compression sees no unrealistic duplicates.
    """
    words, cum = make_vocab(rng)
    texts, tokens, finish = [], [], []
    lo, hi = TEXT_CHARS
    for _ in range(POOL_SIZE):
        want = round(rng.lognormvariate(0.0, 0.8) * MEDIAN_CHARS)
        length = min(max(want, lo), hi)
        picked = rng.choices(words, cum_weights=cum, k=length // 5 + 2)
        text = " ".join(picked)[:length]
        texts.append(text)
        tokens.append(max(1, len(text) // 4))
        finish.append("length" if want > hi else "stop")
    return pa.array(texts, pa.string()), pa.array(tokens, pa.int32()), pa.array(finish)


def draw(rng: random.Random, n: int) -> list[int]:
    """`n` pool positions, none repeated until the whole pool is used (batches > pool repeat)."""
    picks: list[int] = []
    while len(picks) < n:
        picks += rng.sample(range(POOL_SIZE), min(POOL_SIZE, n - len(picks)))
    return picks


def prompt_ids(count: int) -> list[str]:
    return [hashlib.sha256(f"prompt-{i}".encode()).hexdigest()[:32] for i in range(count)]


@dataclass(frozen=True)
class Source:
    """What every batch draws from: prompts, the text pool, and the writing run's stamp."""

    per_iter: int  # rows per iteration (contiguous thirds of all rows)
    prompts: list[str]
    texts: pa.Array
    tokens: pa.Array
    finish: pa.Array
    run_id: str
    created_at: datetime


def policy_columns(its: list[int]) -> dict[str, pa.Array]:
    """Each iteration samples with its own checkpoint, so fingerprints differ by iteration."""
    policy = {it: f"/ckpt/selm-zephyr-7b/iter{it}" for it in set(its)}
    fingerprint = {it: hashlib.sha256(p.encode()).hexdigest() for it, p in policy.items()}
    sampling = {
        it: {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "max_tokens": 2048, "seed": 1000 + it}
        for it in policy
    }
    return {
        "policy": pa.array([policy[it] for it in its]),
        "policy_fingerprint": pa.array([fingerprint[it] for it in its]),
        "sampling": pa.array([sampling[it] for it in its], SAMPLING),
    }


def make_batch(src: Source, start: int, stop: int, rng: random.Random) -> pa.Table:
    """Rows `start..stop`; row i is prompt (i mod per_iter) of iteration (i div per_iter), so
    (prompt, policy fingerprint), hence the response id, is unique per row."""
    n = stop - start
    its = [i // src.per_iter for i in range(start, stop)]
    pick = pa.array(draw(rng, n), pa.int64())
    cols = {
        "prompt_id": pa.array([src.prompts[i % src.per_iter] for i in range(start, stop)]),
        "iteration": pa.array(its, pa.int32()),
        "origin": pa.array(["policy"] * n),
        "sample_index": pa.array([0] * n, pa.int32()),
        "status": pa.array(["ok"] * n),
        "error": pa.nulls(n, pa.string()),
        "text": src.texts.take(pick),
        **policy_columns(its),
        "backend": pa.array(["vllm"] * n),
        "prompt_tokens": pa.array([20 + (i * 7919) % 580 for i in range(start, stop)], pa.int32()),
        "completion_tokens": src.tokens.take(pick),
        "finish_reason": src.finish.take(pick),
        "source_score": pa.nulls(n, pa.float64()),
        "run_id": pa.array([src.run_id] * n),
        "created_at": pa.array([src.created_at] * n, pa.timestamp("us", tz="UTC")),
    }
    return pa.table(cols).select(RESPONSES.schema.names[1:])


def make_batches(rows: int, batch: int, run_id: str) -> tuple[list[pa.Table], float]:
    """All batches, with ids, in the table's schema; also the seconds spent hashing ids."""
    rng = random.Random(SEED)
    per_iter = -(-rows // ITERATIONS)
    src = Source(per_iter, prompt_ids(per_iter), *make_text_pool(rng), run_id, datetime.now(UTC))
    batches, hashing = [], 0.0
    for start in range(0, rows, batch):
        table = make_batch(src, start, min(start + batch, rows), rng)
        t0 = time.perf_counter()
        ids = row_ids(RESPONSES, table)
        hashing += time.perf_counter() - t0
        batches.append(table.add_column(0, "response_id", ids).cast(RESPONSES.schema))
    return batches, hashing


# --- timed steps ------------------------------------------------------------------------------


def ingest_baseline(batches: list[pa.Table], folder: Path) -> float:
    t0 = time.perf_counter()
    folder.mkdir(parents=True)
    for i, table in enumerate(batches):
        pq.write_table(table, folder / f"part-{i:05d}.parquet")
    return time.perf_counter() - t0


def ingest_store(batches: list[pa.Table], path: Path, run: RunInfo) -> float:
    """First ingest into a store created (empty) before the timer starts."""
    store = open_store(path, create=True, run=run)
    t0 = time.perf_counter()
    added = sum(store.append("responses", table).added for table in batches)
    seconds = time.perf_counter() - t0
    assert added == sum(t.num_rows for t in batches), f"first ingest added {added} rows"
    return seconds


def reappend_store(batches: list[pa.Table], path: Path, run: RunInfo) -> float:
    """The same rows again, as a rerun would: a new `Store`, whose id index starts empty."""
    t0 = time.perf_counter()
    store = open_store(path, run=run)
    results = [store.append("responses", table) for table in batches]
    seconds = time.perf_counter() - t0
    added = sum(r.added for r in results)
    skipped = sum(r.skipped for r in results)
    assert added == 0, f"re-append added {added} rows, expected 0"
    assert skipped == sum(t.num_rows for t in batches), f"re-append skipped {skipped} rows"
    return seconds


def read_iteration(frame: pl.LazyFrame, expected: int) -> float:
    t0 = time.perf_counter()
    got = frame.filter(pl.col("iteration") == ITERATIONS - 1).collect()
    seconds = time.perf_counter() - t0
    assert got.height == expected, f"read {got.height} rows of iteration 2, expected {expected}"
    return seconds


# --- one repeat and the report ----------------------------------------------------------------


def parquet_info(folder: Path) -> tuple[int, int, str]:
    """Bytes of data files, bytes of everything else (the Delta log), compression codecs."""
    data = [p for p in folder.rglob("*.parquet") if "_delta_log" not in p.parts]
    other = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) - sum(
        p.stat().st_size for p in data
    )
    meta = pq.ParquetFile(data[0]).metadata
    codecs = {meta.row_group(0).column(c).compression for c in range(meta.num_columns)}
    return sum(p.stat().st_size for p in data), other, ",".join(sorted(codecs))


def run_repeat(
    batches: list[pa.Table], root: Path, rep: int, run: RunInfo, times: dict[str, list]
) -> dict:
    """One repeat; baseline and store ingest alternate which goes first."""
    base, store = root / f"rep{rep}" / "baseline", root / f"rep{rep}" / "store"
    first = ["baseline", "store"] if rep % 2 == 0 else ["store", "baseline"]
    for which in first:
        if which == "baseline":
            times["ingest_base"].append(ingest_baseline(batches, base))
        else:
            times["ingest_selm"].append(ingest_store(batches, store, run))
    times["reappend_selm"].append(reappend_store(batches, store, RunInfo.new("bench rerun")))
    last = ITERATIONS - 1
    expected = sum(pc.sum(pc.equal(t.column("iteration"), last)).as_py() for t in batches)
    base_scan = pl.scan_parquet(base / "*.parquet")
    store_scan = open_store(store, run=run).scan("responses")
    times["read_base"].append(read_iteration(base_scan, expected))
    times["read_selm"].append(read_iteration(store_scan, expected))
    info = {"baseline": parquet_info(base), "store": parquet_info(store / "responses")}
    shutil.rmtree(root / f"rep{rep}")
    return info


def fmt_rate(rows: int, nbytes: int, seconds: float) -> str:
    return f"{rows / seconds:>12,.0f} rows/s  {nbytes / seconds / 1e6:>8.1f} MB/s"


def verdict(ratio: float, limit: float) -> str:
    return "PASS" if ratio <= limit else "FAIL"


def print_table(rows: int, nbytes: int, med: dict[str, float], repeats: int) -> None:
    ingest = med["ingest_selm"] / med["ingest_base"]
    reappend = med["reappend_selm"] / med["ingest_selm"]
    read = med["read_selm"] / med["read_base"]
    lines = [
        ("ingest", med["ingest_base"], med["ingest_selm"], ingest, "<= 1.5x baseline"),
        ("re-append (0 added)", None, med["reappend_selm"], reappend, "<= 2x first ingest"),
        ("read iteration 2", med["read_base"], med["read_selm"], read, "(none)"),
    ]
    results = [verdict(ingest, 1.5), verdict(reappend, 2.0), "-"]
    print(f"\n{rows:,} rows, {nbytes / 1e6:,.0f} MB in Arrow, medians of {repeats} repeat(s)")
    print(f"{'step':<22}{'baseline s':>11}{'selm s':>9}{'ratio':>8}  {'goal':<20}result")
    for (step, b, s, ratio, goal), result in zip(lines, results, strict=True):
        base = f"{b:>11.2f}" if b is not None else f"{'-':>11}"
        print(f"{step:<22}{base}{s:>9.2f}{ratio:>7.2f}x  {goal:<20}{result}")


def print_details(
    rows: int, nbytes: int, times: dict[str, list], info: dict, hashing: float
) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\nthroughput (Arrow in-memory bytes / wall time):")
    print(f"  baseline ingest   {fmt_rate(rows, nbytes, med['ingest_base'])}")
    print(f"  selm ingest       {fmt_rate(rows, nbytes, med['ingest_selm'])}")
    print(f"  selm re-append    {fmt_rate(rows, nbytes, med['reappend_selm'])}")
    print(
        f"\nid hashing (row_ids, done by the builder, in neither ingest): {hashing:.2f} s"
        f" ({rows / hashing:,.0f} rows/s)"
    )
    for name, (data, other, codecs) in info.items():
        print(
            f"on disk, {name:<8}: {data / 1e6:,.1f} MB data files + {other / 1e6:,.2f} MB Delta"
            f" log, compression {codecs}"
        )
    print("\nall runs (s):")
    for key, values in times.items():
        print(f"  {key:<14} " + "  ".join(f"{v:.2f}" for v in values))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {peak:,.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir in /tmp")
    args = parser.parse_args()
    t0 = time.perf_counter()
    run = RunInfo.new("bench store_ingest")  # the run stamped on the rows, as a builder does
    batches, hashing = make_batches(args.rows, args.batch, run.run_id)
    nbytes = sum(t.nbytes for t in batches)
    print(f"made {len(batches)} batches in {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[str, list] = {
        k: [] for k in ("ingest_base", "ingest_selm", "reappend_selm", "read_base", "read_selm")
    }
    root = Path(tempfile.mkdtemp(prefix="selm-bench-", dir=args.workdir))
    try:
        for rep in range(args.repeats):
            info = run_repeat(batches, root, rep, run, times)
            print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print_table(args.rows, nbytes, med, args.repeats)
    print_details(args.rows, nbytes, times, info, hashing)


if __name__ == "__main__":
    main()
