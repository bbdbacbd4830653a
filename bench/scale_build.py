"""Benchmark: a build over k ranks (ranks are shards), against k times one rank.

Each rank is a real process started with the variables torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, TORCHELASTIC_RUN_ID), so `launcher.detect`, `ranks.shard_for`, the shard's lease,
the real store (Delta tables on this machine's disk), `ranks.build_rank` and rank 0's
`wait_for_ranks` all run as in `torchrun -m selm_data.cli build`. The models are test doubles
that take a fixed time per prompt by sleeping, as a GPU would (the CPU stays free):
`SleepGenerator` streams one result every `--gen-ms`, `SleepRanker` takes `--rank-ms` per
prompt. So one rank's prompts/s is what one GPU gives, and k ranks should give k times that;
what is lost is selm's: commits, lease checks, reading what is done, rank 0's wait.

For k in `--ranks` (1 2 4 8) and N in `--prompts`: k processes start, import, and wait at a
line; the clock starts when all are released and stops when rank 0 has every shard's record
(the merged report). baseline = k x (N / seconds of k = 1), selm = N / seconds of k ranks,
ratio = selm / baseline (the scaling efficiency; goal >= 0.9 at k = 8). Medians over
`--repeats`, each into a fresh store. The second table splits the busiest rank's time: model
(sleeping), commits (`Store.append`), lease (`Store.claim`), done (reading what the iteration
holds), source (loading and cutting the dataset), wait (rank 0 for the others), other.

On a machine with fewer cores than ranks the ranks' commits and Parquet encoding share the
cores, which a node of 8 GPUs (and 8+ cores) does not: read the ratio with `nproc` beside it.

Run: python bench/scale_build.py [--ranks 1 2 4 8] [--prompts 1024] [--gen-ms 50]
     [--rank-ms 2] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOAL = 0.9  # efficiency at k = 8


def worker(args: argparse.Namespace) -> None:
    """One rank: wait for the start line, build its shard with the sleeping doubles, time it."""
    sys.path.insert(0, str(HERE))
    from overhead import DoubleGenerator, DoubleRanker, make_manifest

    import selm_data.builder.iteration as iteration
    from selm_data.builder.ranks import build_rank, shard_for, wait_for_ranks
    from selm_data.generation.backends import GenerationResult
    from selm_data.generation.launcher import detect
    from selm_data.store.store import RunInfo, Store, open_store

    inside: set[str] = set()
    spent = {"model": 0.0, "commits": 0.0, "lease": 0.0, "done": 0.0, "source": 0.0}

    def timed(name: str, fn):
        def wrapper(*a, **kw):
            if name in inside:  # a nested call (append recording the run) counts once
                return fn(*a, **kw)
            inside.add(name)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
                inside.discard(name)
        return wrapper

    class SleepGenerator(DoubleGenerator):
        """TEST DOUBLE: the overhead double's texts, one result every `gen_ms`, streamed."""

        def stream(self, requests: Sequence):
            for i, r in enumerate(requests):
                t0 = time.perf_counter()
                time.sleep(args.gen_ms / 1000)
                result: GenerationResult = self.generate([r])[0]
                spent["model"] += time.perf_counter() - t0
                yield i, result

    class SleepRanker(DoubleRanker):
        """TEST DOUBLE: the overhead double's scores after `rank_ms` per prompt."""

        def score(self, requests: Sequence) -> list[list[float]]:
            t0 = time.perf_counter()
            time.sleep(args.rank_ms / 1000 * len(requests))
            spent["model"] += time.perf_counter() - t0
            return super().score(requests)

    iteration._done = timed("done", iteration._done)
    iteration.load_source = timed("source", iteration.load_source)
    Store.append = timed("commits", Store.append)  # type: ignore[method-assign]
    Store.claim = timed("lease", Store.claim)  # type: ignore[method-assign]
    manifest = make_manifest(Path(args.source), Path(args.store), 32)
    manifest = manifest.model_copy(update={"commit_every": args.commit_every})
    launch = detect()
    shard = shard_for(None, launch)
    pool = [json.loads(line)["chosen"] for line in Path(args.source).read_text().splitlines()[:50]]
    store = open_store(args.store, run=RunInfo.new(f"bench scale rank {launch.rank}"))
    import datasets  # noqa: F401  # imported before the clock: process start, not build work

    go = Path(args.go)
    (go.parent / f"ready-{launch.rank}").touch()
    while not go.exists():
        time.sleep(0.005)
    t0 = time.perf_counter()
    report = build_rank(store, 1, shard, launch, lambda: iteration.build(
        manifest, 1, store, shard=shard, generator=SleepGenerator(pool), ranker=SleepRanker()))
    built = time.perf_counter() - t0
    wait = 0.0
    if launch.rank == 0:
        t1 = time.perf_counter()
        records = wait_for_ranks(store, 1, launch, poll=0.05)
        wait = time.perf_counter() - t1
        assert all(r.error is None for r in records), records
    print(json.dumps({"rank": launch.rank, "end": time.time(), "built": built, "wait": wait,
                      "prompts": report.prompts, "paired": report.pairs + report.dropped_ties,
                      **spent}), flush=True)


def run_once(k: int, n: int, args: argparse.Namespace, root: Path) -> dict:
    """k ranks building N prompts into a fresh store: seconds and rank timings."""
    sys.path.insert(0, str(HERE))
    from overhead import ROWS, make_manifest, write_source

    from selm_data.sources.dataset import load_source
    from selm_data.store.store import RunInfo, open_store

    folder = Path(tempfile.mkdtemp(dir=root))
    source, store, go = folder / "source.jsonl", folder / "store", folder / "go"
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()]
    write_source(rows, n, source)
    open_store(store, create=True, run=RunInfo.new("bench scale"))
    # Warm: `datasets` converts a new file once (into its cache, HF_DATASETS_CACHE set by
    # `main` before `datasets` is imported, so the ranks find what this process wrote) and
    # reads it after; a build of iteration 2 or later, or after `sources check`, finds it
    # converted.
    load_source(make_manifest(source, store, 32).source)
    env_base = {**os.environ, "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    launch_id = f"bench-{folder.name}"
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--worker", "--source", str(source), "--store", str(store),
         "--go", str(go), "--gen-ms", str(args.gen_ms), "--rank-ms", str(args.rank_ms),
         "--commit-every", str(args.commit_every)],
        stdout=subprocess.PIPE, text=True,
        env={**env_base, "RANK": str(r), "WORLD_SIZE": str(k), "LOCAL_RANK": str(r),
             "TORCHELASTIC_RUN_ID": launch_id}) for r in range(k)]
    while len(list(folder.glob("ready-*"))) < k:
        if any(p.poll() not in (None, 0) for p in procs):
            raise SystemExit(f"a rank failed to start: {[p.communicate() for p in procs]}")
        time.sleep(0.01)
    start = time.time()
    go.touch()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=3600)
        assert p.returncode == 0, out
        results.append(json.loads(out.strip().splitlines()[-1]))
    rank0 = next(r for r in results if r["rank"] == 0)
    prompts = sum(r["prompts"] for r in results)  # the source rows less those quarantined
    paired = sum(r["paired"] for r in results)
    assert paired == prompts, f"{paired} prompts paired of {prompts}"
    shutil.rmtree(folder)
    busiest = max(results, key=lambda r: r["built"])
    return {"seconds": rank0["end"] - start, "busiest": busiest, "wait": rank0["wait"],
            "prompts": prompts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1024])
    parser.add_argument("--gen-ms", type=float, default=50.0, help="generator's ms per prompt")
    parser.add_argument("--rank-ms", type=float, default=2.0, help="ranker's ms per prompt")
    parser.add_argument("--commit-every", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--go", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    root = Path(tempfile.mkdtemp(prefix="selm-scale-", dir=args.workdir))
    # Read by `datasets` once, at import: set before it is imported here or in any rank.
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf")
    print(f"{os.cpu_count()} cores; generator {args.gen_ms} ms/prompt, ranker {args.rank_ms} "
          f"ms/prompt (sleeping), commit_every {args.commit_every}, {args.repeats} repeats",
          flush=True)
    rows = []
    try:
        for n in args.prompts:
            one = None
            for k in args.ranks:
                runs = [run_once(k, n, args, root) for _ in range(args.repeats)]
                seconds = statistics.median(r["seconds"] for r in runs)
                if k == 1 or one is None:
                    one = seconds * k  # k = 1 is in --ranks first by default
                built = runs[0]["prompts"]
                baseline = k * built / one
                selm = built / seconds
                mid = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
                rows.append((n, k, baseline, selm, selm / baseline, mid))
                print(f"  N={n} k={k}: {seconds:.2f} s ({[round(r['seconds'], 2) for r in runs]})",
                      flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\nprompts/s: k ranks (selm) against k x one rank (baseline); medians")
    print(f"{'prompts':>8} {'k':>3} {'baseline':>10} {'selm':>10} {'ratio':>7}")
    for n, k, baseline, selm, ratio, _ in rows:
        print(f"{n:>8} {k:>3} {baseline:>10.1f} {selm:>10.1f} {ratio:>7.2f}")
    print("\nwhere the busiest rank's time goes (s; the median run)")
    cols = ("built", "model", "commits", "lease", "done", "source")
    print(f"{'prompts':>8} {'k':>3} " + " ".join(f"{c:>8}" for c in (*cols, "other", "wait0")))
    for n, k, *_, mid in rows:
        b = mid["busiest"]
        other = b["built"] - sum(b[c] for c in cols[1:])
        print(f"{n:>8} {k:>3} " + " ".join(f"{b[c]:>8.2f}" for c in cols)
              + f" {other:>8.2f} {mid['wait']:>8.2f}")
    at8 = [ratio for n, k, _, _, ratio, _ in rows if k == 8]
    if at8:
        verdict = "meets" if min(at8) >= GOAL else "misses"
        print(f"\nefficiency at k = 8: {min(at8):.2f} ({verdict} the goal of {GOAL})")


if __name__ == "__main__":
    main()
