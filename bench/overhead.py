"""Benchmark: selm's own per-prompt overhead in `build`, with test doubles for the models.

A build spends nearly all its time in model calls; this measures everything else: loading and
normalising the source, cutting portions, content ids, store appends (one Delta commit each),
the resume bookkeeping (`_done`, the id indexes) and pairing. The generator and the ranker are
test doubles (`DoubleGenerator`, `DoubleRanker`): they answer at once with deterministic
output, so the time left is ours. Goal: per-prompt overhead flat in the number of prompts,
within 25% (ms/prompt at each size at most 1.25x that at the smallest size).

For each size N (`--sizes`, default 1k, 10k, 100k) and each `--batch-size` (prompts per batch,
i.e. per commit of each table; the manifest default is 32, GPU builds use larger ones):

1. build: `build(manifest, 1, store, generator=double, ranker=double)` into a fresh store
   (created before the timer) from a local flat jsonl of N distinct prompts. The source is new
   to `datasets`, so its jsonl -> Arrow conversion is inside the timing, as in a first build.
2. rerun: the same command again through a freshly opened store (a rerun is a new process):
   everything is done, so it reads what the store holds and writes nothing. Timed with
   `open_store` included.

The source rows are the bundled 1,000 UltraFeedback rows repeated, each prompt made distinct by
appending its row number. `datasets` caches into the benchmark's temp dir, removed at the end.
Medians over `--repeats` (the largest size runs `--big-repeats` times). The table's
`commits` column counts the build's per-batch commits: responses, judgments and pairs, one
each a batch (plus four fixed ones: runs, quarantine, prompts, dataset responses).
`--profile N` runs one more build of N prompts under cProfile and prints the top functions by
cumulative time.

Run: python bench/overhead.py [--sizes 1000 10000 100000] [--batch-size 32 256] [--repeats 3]
     [--big-repeats 1] [--profile 10000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from selm_data.builder.iteration import BuildReport, build
from selm_data.generation.backends import GenerationRequest, GenerationResult
from selm_data.manifest import BUNDLED_DATA, Manifest
from selm_data.rankers.base import RankRequest
from selm_data.store.store import RunInfo, open_store

ROWS = BUNDLED_DATA / "ultrafeedback_binarized_1000.jsonl"
GOAL = 1.25  # ms/prompt at any size, relative to the smallest size
TEXT_CHARS = (200, 600)  # length range of the generator double's responses


# --- test doubles -----------------------------------------------------------------------------


def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16)


class DoubleGenerator:
    """TEST DOUBLE for a generation backend: no model. Each request's response is a slice of a
    real response text (so Parquet compresses it like prose) chosen and cut by a hash of the
    prompt id, 200-600 characters, ending in the prompt id so that every response is distinct.
    Deterministic: the same request always gets the same text."""

    backend = "test-double"

    def __init__(self, pool: Sequence[str]):
        self.pool = [t for t in pool if len(t) >= TEXT_CHARS[1]] or ["lorem ipsum " * 60]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results = []
        for r in requests:
            h = _digest(f"{r.prompt_id}/{r.sample_index}")
            lo, hi = TEXT_CHARS
            length = lo + h % (hi - lo - 40)
            text = self.pool[(h >> 20) % len(self.pool)][:length] + f" [{r.prompt_id}]"
            prompt_chars = sum(len(m["content"]) for m in r.messages)
            results.append(
                GenerationResult(
                    "ok",
                    text=text,
                    prompt_tokens=max(1, prompt_chars // 4),
                    completion_tokens=max(1, len(text) // 4),
                    finish_reason="stop",
                )
            )
        return results


class DoubleRanker:
    """TEST DOUBLE for a ranker: no model. A candidate's score is a hash of its text mapped to
    [-5, 5), so scores are deterministic, distinct and in no relation to quality."""

    name = "test-double"
    version = "1"

    def score(self, requests: Sequence[RankRequest]) -> list[list[float]]:
        return [[(_digest(c) % 1_000_000) / 100_000 - 5.0 for c in r.candidates] for r in requests]


# --- data -------------------------------------------------------------------------------------


def write_source(rows: list[dict], n: int, path: Path) -> None:
    """`n` rows in the flat layout, cycling through `rows`; prompt i gets " (#i)" appended."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            row = rows[i % len(rows)]
            out = {
                "prompt": f"{row['prompt']} (#{i})",
                "chosen": row["chosen"],
                "rejected": row["rejected"],
                "metadata": row["metadata"],
            }
            f.write(json.dumps(out, ensure_ascii=False) + "\n")


def make_manifest(source: Path, store: Path, batch_size: int) -> Manifest:
    return Manifest.model_validate(
        {
            "name": "bench-overhead",
            "store": str(store),
            "source": {"path": str(source), "layout": "flat"},
            "policy": {"model": "bench/test-double-policy"},  # a Hub id: resolving never fetches
            "generation": {"batch_size": batch_size},
            "ranker": {"kind": "reward_model", "model": "bench/test-double-ranker"},  # unused
            "iterations": 1,
        }
    )


# --- timed steps ------------------------------------------------------------------------------


def run_build(
    manifest: Manifest, store_path: Path, pool: list[str], profile: cProfile.Profile | None = None
) -> tuple[float, BuildReport]:
    store = open_store(store_path, create=True, run=RunInfo.new("bench overhead"))
    gen, ranker = DoubleGenerator(pool), DoubleRanker()
    if profile is not None:
        profile.enable()
    t0 = time.perf_counter()
    report = build(manifest, 1, store, generator=gen, ranker=ranker)
    seconds = time.perf_counter() - t0
    if profile is not None:
        profile.disable()
    assert (
        report.generated == report.prompts and report.pairs + report.dropped_ties == report.prompts
    ), f"first build incomplete: {report}"
    return seconds, report


def run_rerun(manifest: Manifest, store_path: Path, pool: list[str]) -> float:
    t0 = time.perf_counter()
    store = open_store(store_path, run=RunInfo.new("bench overhead rerun"))
    report = build(manifest, 1, store, generator=DoubleGenerator(pool), ranker=DoubleRanker())
    seconds = time.perf_counter() - t0
    assert report.generated == 0 and report.ranked == 0, f"rerun redid work: {report}"
    assert report.already_paired == report.pairs, f"rerun paired anew: {report}"
    return seconds


def measure(
    n: int, batch_size: int, repeats: int, rows: list[dict], pool: list[str], root: Path
) -> dict:
    """Median build and rerun seconds of `repeats` runs, each on a fresh source file and store
    (a fresh file, so `datasets` converts it anew, as a first build does)."""
    builds, reruns, report = [], [], None
    for rep in range(repeats):
        folder = root / f"n{n}-b{batch_size}-r{rep}"
        folder.mkdir()
        source = folder / "source.jsonl"
        write_source(rows, n, source)
        manifest = make_manifest(source, folder / "store", batch_size)
        seconds, report = run_build(manifest, folder / "store", pool)
        builds.append(seconds)
        reruns.append(run_rerun(manifest, folder / "store", pool))
        shutil.rmtree(folder)
        print(
            f"  N={n:,} batch={batch_size} repeat {rep + 1}/{repeats}: build "
            f"{builds[-1]:.2f} s, rerun {reruns[-1]:.2f} s",
            flush=True,
        )
    assert report is not None
    return {
        "n": n,
        "batch": batch_size,
        "build": statistics.median(builds),
        "rerun": statistics.median(reruns),
        "builds": builds,
        "reruns": reruns,
        "prompts": report.prompts,
        "quarantined": report.quarantined,
        "commits": 3 * -(-report.prompts // batch_size),
    }


def profile_build(
    n: int, batch_size: int, rows: list[dict], pool: list[str], root: Path, top: int = 15
) -> None:
    folder = root / f"profile-n{n}"
    folder.mkdir()
    source = folder / "source.jsonl"
    write_source(rows, n, source)
    manifest = make_manifest(source, folder / "store", batch_size)
    profile = cProfile.Profile()
    seconds, _ = run_build(manifest, folder / "store", pool, profile)
    shutil.rmtree(folder)
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(top)
    print(
        f"\ncProfile of one build, N={n:,}, batch {batch_size} ({seconds:.2f} s under the "
        f"profiler), top {top} by cumulative time:"
    )
    print(out.getvalue())


# --- report -----------------------------------------------------------------------------------


def print_table(results: list[dict], repeats: int, big_repeats: int) -> None:
    for batch in sorted({r["batch"] for r in results}):
        rows = [r for r in results if r["batch"] == batch]
        base = rows[0]["build"] / rows[0]["n"] * 1000
        print(
            f"\ngeneration.batch_size {batch} (medians of {repeats} repeat(s), "
            f"{big_repeats} at the largest size); goal: ms/prompt <= {GOAL}x the smallest"
        )
        print(
            f"{'prompts':>9}{'commits':>9}{'build s':>9}{'ms/prompt':>11}{'ratio':>7}"
            f"{'rerun s':>9}{'rerun ms/p':>12}{'ratio':>7}  result"
        )
        rerun_base = rows[0]["rerun"] / rows[0]["n"] * 1000
        for r in rows:
            ms = r["build"] / r["n"] * 1000
            rerun_ms = r["rerun"] / r["n"] * 1000
            ratio, rerun_ratio = ms / base, rerun_ms / rerun_base
            ok = ratio <= GOAL and rerun_ratio <= GOAL
            print(
                f"{r['n']:>9,}{r['commits']:>9,}{r['build']:>9.2f}{ms:>11.3f}{ratio:>6.2f}x"
                f"{r['rerun']:>9.2f}{rerun_ms:>12.3f}{rerun_ratio:>6.2f}x  "
                f"{'PASS' if ok else 'FAIL'}"
            )
    print("\nall runs (s):")
    for r in results:
        print(
            f"  N={r['n']:<7} batch={r['batch']:<4} build "
            + " / ".join(f"{v:.2f}" for v in r["builds"])
            + "   rerun "
            + " / ".join(f"{v:.2f}" for v in r["reruns"])
            + f"   ({r['prompts']:,} prompts, {r['quarantined']} quarantined)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[32],
        help="generation.batch_size; several values run one table each",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-repeats", type=int, default=1, help="repeats of the largest size")
    parser.add_argument(
        "--profile",
        type=int,
        default=None,
        metavar="N",
        help="also profile one build of N prompts (first --batch-size)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir in /tmp")
    args = parser.parse_args()
    t0 = time.perf_counter()
    print(
        f"machine: {os.cpu_count()} cores, shared (single runs swing); model calls are test "
        "doubles, so this is selm's own time"
    )
    root = Path(tempfile.mkdtemp(prefix="selm-bench-overhead-", dir=args.workdir))
    # `datasets` reads these when first imported (inside the first build): cache in the temp dir.
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf-datasets-cache")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets  # noqa: F401  imported before any timing: a fixed cost, not a per-prompt one

    rows = [json.loads(line) for line in ROWS.read_text(encoding="utf-8").splitlines()]
    pool = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    sizes = sorted(args.sizes)
    results = []
    try:
        for batch in args.batch_size:
            for n in sizes:
                repeats = args.big_repeats if n == sizes[-1] and len(sizes) > 1 else args.repeats
                results.append(measure(n, batch, repeats, rows, pool, root))
        if args.profile:
            profile_build(args.profile, args.batch_size[0], rows, pool, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(results, args.repeats, args.big_repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\npeak RSS of this process: {peak:,.0f} MB; total run time "
        f"{time.perf_counter() - t0:,.1f} s"
    )


if __name__ == "__main__":
    main()
