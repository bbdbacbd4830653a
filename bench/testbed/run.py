"""The testbed: SELM vs iterative DPO vs SAIL against a known true reward, on a CPU.

    python bench/testbed/run.py [--quick] [--seeds 5] [--methods dpo,selm-0.01,...]
                                [--regimes self,stronger] [--jobs 2] [--out DIR] [--work DIR]

1. Per seed: fit a base policy (tiny Llama) to a broad answer distribution; draw one initial
   preference dataset per regime, labelled by Bradley-Terry on r* (policy.py): `self`, pairs
   of two base-policy samples; `stronger`, pairs from a mixture of stronger policies (the
   paper's regime: the offline data is better than the policy). Score the base policy's
   greedy answers on the held-out prompts (iteration 0).
2. Per regime, method and seed, in a fresh store: T iterations of build -> export ->
   selm-train with the oracle ranker (pipeline.py), each checkpoint scored on the held-out
   prompts.
3. Tables and figures over seeds, per regime (report.py): `results.md`, `results.json` and
   PNGs in --out.

Every (regime, method, seed) runs in its own process (--jobs at once, one torch thread each) and
store; a finished one is not run again (its result file is kept under --work), so a rerun
resumes, and one killed half-way starts again in a fresh store. The wall time, the CPU time of
all processes and the machine's load average are written to results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `testbed` from bench/

FULL_SEEDS = 5
QUICK_METHODS = ("dpo", "selm-0.1", "sail-pr")
REGIMES = {  # where the initial preference dataset's answers come from
    "self": "two samples of the base policy (the policy is as good as its offline data)",
    "stronger": "a mixture of four stronger policies (the offline data is better than the "
                "policy, as UltraFeedback's is for a 7B SFT model)",
}


def settings_for(quick: bool):
    from testbed.pipeline import Settings

    if quick:  # the test suite's smoke run: the same code, tiny sizes
        return Settings(iterations=2, prompts_per_iteration=24, eval_prompts=16, beta=0.5,
                        learning_rate=5e-4, epochs=1, global_batch=8, sft_steps=60)
    return Settings()


def child(args: argparse.Namespace) -> None:
    """One unit of work in this process: a seed's base policy and dataset, or one run."""
    import torch

    torch.set_num_threads(1)  # --jobs processes share the cores
    from testbed import pipeline, policy
    from testbed.task import TrueReward, split_prompts

    settings = settings_for(args.quick)
    reward = TrueReward.make()
    train, held_out = split_prompts(settings.iterations * settings.prompts_per_iteration,
                                    settings.eval_prompts)
    seed_dir = args.work / f"seed-{args.seed}"
    base = seed_dir / "base"
    if args.child == "prepare":
        seed_dir.mkdir(parents=True, exist_ok=True)
        clock = time.perf_counter()
        fit = policy.fit_base(base, train, reward, seed=args.seed, steps=settings.sft_steps)
        datasets = {
            "self": policy.preference_dataset(base, train, reward, seed_dir / "data-self.jsonl",
                                              seed=args.seed),
            "stronger": policy.stronger_dataset(train, reward,
                                                seed_dir / "data-stronger.jsonl",
                                                seed=args.seed),
        }
        result = {"sft": fit, "datasets": datasets,
                  **pipeline.evaluate(base, held_out, reward, seed=args.seed),
                  "seconds": time.perf_counter() - clock}
        out = seed_dir / "base.json"
    else:
        folder = unit_folder(args.work, args.regime, args.child, args.seed)
        result = pipeline.run_method(pipeline.METHODS[args.child], settings, seed=args.seed,
                                     base=base, data=seed_dir / f"data-{args.regime}.jsonl",
                                     folder=folder, eval_prompts=held_out, reward=reward)
        out = folder / "result.json"
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # this process, start to end
    out.write_text(json.dumps(result) + "\n")


def unit_folder(work: Path, regime: str, method: str, seed: int) -> Path:
    return work / "runs" / regime / f"{method}-s{seed}"


def launch(args: argparse.Namespace, what: str, seed: int, regime: str = "") -> dict:
    """Run one unit in a child process (skipped when its result exists); return its result."""
    out = (args.work / f"seed-{seed}" / "base.json" if what == "prepare" else
           unit_folder(args.work, regime, what, seed) / "result.json")
    reused = out.is_file()
    if not reused:
        if what != "prepare":  # a unit killed half-way starts again from a fresh store
            shutil.rmtree(out.parent, ignore_errors=True)
        command = [sys.executable, __file__, "--child", what, "--seed", str(seed),
                   "--regime", regime, "--work", str(args.work)] + (
                       ["--quick"] if args.quick else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        clock = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{what} seed {seed} failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        print(f"  {regime + ' ' if regime else ''}{what} seed {seed}: "
              f"{time.perf_counter() - clock:.0f} s", flush=True)
    return {**json.loads(out.read_text()), "reused": reused}


def rounded(value):
    """`value` with every float cut to 6 significant digits (results.json stays small)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test sizes: 1 seed, 2 iterations, 3 methods, tiny data")
    parser.add_argument("--seeds", type=int, help=f"seeds 0..N-1 (default {FULL_SEEDS}; "
                        "quick: 1)")
    parser.add_argument("--methods", help="comma-separated (default: all; quick: "
                        f"{','.join(QUICK_METHODS)})")
    parser.add_argument("--regimes", help=f"comma-separated (default: {','.join(REGIMES)})")
    parser.add_argument("--jobs", type=int, default=2, help="processes at once (default 2)")
    parser.add_argument("--out", type=Path, default=Path("runs/testbed"),
                        help="where results.json, results.md and the PNGs go")
    parser.add_argument("--work", type=Path, help="stores, models, per-run results "
                        "(default: OUT/work)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--regime", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = (args.work or args.out / "work").absolute()
    if args.child:
        child(args)
        return

    from testbed import report
    from testbed.pipeline import METHODS
    from testbed.task import TrueReward, split_prompts

    clock, load = time.perf_counter(), os.getloadavg()[0]
    settings = settings_for(args.quick)
    seeds = list(range(args.seeds or (1 if args.quick else FULL_SEEDS)))
    methods = (args.methods.split(",") if args.methods else
               list(QUICK_METHODS if args.quick else METHODS))
    regimes = args.regimes.split(",") if args.regimes else list(REGIMES)
    unknown = [m for m in methods if m not in METHODS] + [r for r in regimes if r not in REGIMES]
    if unknown:
        parser.error(f"unknown {unknown}; methods: {', '.join(METHODS)}; regimes: "
                     f"{', '.join(REGIMES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"testbed: {len(regimes)} regimes x {len(methods)} methods x {len(seeds)} seeds x "
          f"{settings.iterations} iterations, {args.jobs} jobs; work in {args.work}", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        bases = dict(zip(seeds, pool.map(lambda s: launch(args, "prepare", s), seeds),
                         strict=True))
        prepared = time.perf_counter()
        # SAIL's sampling builds take longest: start them first
        units = sorted(((m, s, r) for r in regimes for s in seeds for m in methods),
                       key=lambda u: (METHODS[u[0]].rule != "sail", u[1]))
        done = list(pool.map(lambda u: launch(args, *u), units))
    bases_measured, bases_run = split({str(s): b for s, b in bases.items()})
    runs: dict[str, dict[str, dict[str, dict]]] = {r: {m: {} for m in methods} for r in regimes}
    where: dict[str, dict[str, dict[str, dict]]] = {r: {m: {} for m in methods} for r in regimes}
    for (m, s, r), result in zip(units, done, strict=True):
        runs[r][m][str(s)], where[r][m][str(s)] = split(result)

    reward = TrueReward.make()
    _, held_out = split_prompts(settings.iterations * settings.prompts_per_iteration,
                                settings.eval_prompts)
    # results.json, results.md and the figures hold measurements only, so the same command
    # writes them again byte for byte; paths, ids and times go to provenance.json
    results = {
        "settings": asdict(settings), "seeds": [str(s) for s in seeds], "methods": methods,
        "regimes": {r: {"description": REGIMES[r], "runs": runs[r]} for r in regimes},
        "method_specs": {m: asdict(METHODS[m]) for m in methods},
        "reward": {"version": reward.version, "definition": reward.definition()},
        "eval_best_mean": sum(reward.best(p) for p in held_out) / len(held_out),
        "base": bases_measured,
    }
    results = rounded(results)  # the tables and figures are made from what results.json says
    markdown = report.table(results)
    pictures = report.figures(results, args.out)
    (args.out / "results.json").write_text(json.dumps(results) + "\n")
    (args.out / "results.md").write_text(
        markdown + f"\nFigures: {', '.join(p.name for p in pictures)}.\n")
    units_all = [*bases.values(), *done]
    provenance = {
        "work": str(args.work), "base": bases_run, "regimes": where,
        "seconds": {"prepare": prepared - clock, "runs": time.perf_counter() - prepared,
                    "total": time.perf_counter() - clock},
        # CPU time of every unit's process: what the run costs on dedicated cores, whatever
        # else the machine was doing (a resumed run counts the units it reused too)
        "cpu_seconds": sum(r.get("cpu_seconds", 0.0) for r in units_all),
        # units whose results an earlier run left: their time is not in this run's wall time
        "reused_units": sum(r["reused"] for r in units_all),
        "jobs": args.jobs, "cpus": os.cpu_count(),
        "load_average": {"start": load, "end": os.getloadavg()[0]},
    }
    timing = (f"Wall time {provenance['seconds']['total']:.0f} s ({args.jobs} jobs on "
              f"{os.cpu_count()} CPUs; load average {load:.1f} at the start, "
              f"{provenance['load_average']['end']:.1f} at the end); CPU time of all processes "
              f"{provenance['cpu_seconds']:.0f} s.")
    if provenance["reused_units"]:
        timing += (f" {provenance['reused_units']} of {len(units_all)} units were reused "
                   "from an earlier run, so the wall time covers the rest only.")
    provenance["timing"] = timing
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    print("\n" + markdown + "\n" + timing + f" Results in {args.out}")


# Where a unit ran and how long it took, not what it measured (provenance.json); also every
# "time/..." key of the training history
PROVENANCE = frozenset({"store", "snapshot", "policy", "checkpoint", "checkpoint_id",
                        "manifest_hash", "seconds", "cpu_seconds", "reused"})


def split(value):
    """(measurements, provenance) of a unit's result: the keys in PROVENANCE, at any depth,
    go to the second; both keep the nesting (lists of dicts stay lists)."""
    if isinstance(value, dict):
        kept, moved = {}, {}
        for k, v in value.items():
            if k in PROVENANCE or k.startswith("time/"):
                moved[k] = v
                continue
            kept[k], inner = split(v)
            if inner:
                moved[k] = inner
        return kept, moved
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        pairs = [split(v) for v in value]
        return [a for a, _ in pairs], [b for _, b in pairs]
    return value, {}

if __name__ == "__main__":
    main()
