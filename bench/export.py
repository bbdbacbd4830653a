"""Benchmark: `selm-data export` of a 100k-pair iteration against `datasets`.

Setup (untimed): a store with one iteration of N prompts, each with the three candidate
responses (texts from the bundled UltraFeedback rows, made distinct per prompt), a ranking of
three judgments and one pair, written through `Store.append` as the builder writes them.

Timed, alternating, `--repeats` each:
- selm: `export(store, 1, name=...)`: reads the pairs, prompts, responses and judgments at
  pinned versions, joins them, writes sorted zstd Parquet shards, hashes them, makes them
  read-only and commits the snapshot row.
- baseline: `datasets.Dataset.from_list(rows).to_parquet(path)` with `rows` the very same
  snapshot rows as Python dicts, built before the timer (so the baseline does no joins at all).

Goal: selm at most 1.5x the baseline's time.

Run: python bench/export.py [--pairs 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl

from selm_data.manifest import BUNDLED_DATA
from selm_data.publish.snapshot import export
from selm_data.store.schema import RESPONSES, content_id, row_id
from selm_data.store.store import RunInfo, Store, open_store

GOAL = 1.5


def fill(store: Store, n: int) -> None:
    source = [json.loads(line) for line in
              (BUNDLED_DATA / "ultrafeedback_binarized_1000.jsonl").read_text().splitlines()]
    sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": 1024, "seed": None}
    batch = 20_000
    for start in range(0, n, batch):
        prompts, responses, judgments, pairs = [], [], [], []
        for i in range(start, min(n, start + batch)):
            row = source[i % len(source)]
            messages = [{"role": "user", "content": f"{row['prompt']} (#{i})"}]
            pid = content_id("prompts", {"messages": messages})
            prompts.append({"prompt_id": pid, "iteration": 1, "messages": messages,
                            "source": "bench", "source_split": "train", "source_row": i})
            ids = []
            candidates = (("policy", row["chosen"][::-1]), ("dataset_chosen", row["chosen"]),
                          ("dataset_rejected", row["rejected"]))
            for origin, text in candidates:
                policy = origin == "policy"
                r = {"prompt_id": pid, "iteration": 1, "origin": origin, "sample_index": 0,
                     "status": "ok", "text": f"{text} [{i}]",
                     "policy_fingerprint": "bench" if policy else None,
                     "sampling": sampling if policy else None,
                     "policy": "bench" if policy else None}
                r["response_id"] = row_id(RESPONSES, r)
                responses.append(r)
                ids.append(r["response_id"])
            ranking = content_id("ranking", {"candidates": ids})
            scores = [(i % 7) / 3, (i % 5) / 2, -(i % 3) / 4]
            order = sorted(range(3), key=lambda k: -scores[k])
            for pos, (rid, score) in enumerate(zip(ids, scores, strict=True)):
                judgments.append({"ranking_id": ranking, "prompt_id": pid, "iteration": 1,
                                  "response_id": rid, "position": pos, "n_candidates": 3,
                                  "score": score, "rank": order.index(pos) + 1, "ranker": "bench"})
            best, worst = order[0], order[-1]
            origins = ("policy", "dataset_chosen", "dataset_rejected")
            pairs.append({"prompt_id": pid, "iteration": 1, "ranking_id": ranking,
                          "rule": "best_worst", "chosen_id": ids[best], "rejected_id": ids[worst],
                          "ref_id": ids[0], "chosen_score": scores[best],
                          "rejected_score": scores[worst],
                          "margin": scores[best] - scores[worst],
                          "is_tie": scores[best] == scores[worst],
                          "chosen_origin": origins[best], "rejected_origin": origins[worst]})
        for table, rows in (("prompts", prompts), ("responses", responses),
                            ("judgments", judgments), ("pairs", pairs)):
            store.append(table, rows)
        print(f"  filled {min(n, start + batch):,} / {n:,}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="selm-bench-export-"))
    try:
        store = open_store(root / "store", create=True, run=RunInfo.new("bench export"))
        t0 = time.perf_counter()
        fill(store, args.pairs)
        print(f"store filled in {time.perf_counter() - t0:.1f} s")
        first = export(store, 1, name="warm")  # also gives the baseline its rows
        folder = Path(first.path)  # a local store: the snapshot is a folder
        rows = pl.read_parquet(folder / "data").to_dicts()
        ours, theirs = [], []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            snap = export(store, 1, name=f"run{rep}")
            ours.append(time.perf_counter() - t0)
            assert snap.content_hash == first.content_hash, "export is deterministic"
            assert snap.row_count == args.pairs, (snap.row_count, args.pairs)
            from datasets import Dataset

            out = root / f"baseline{rep}.parquet"
            t0 = time.perf_counter()
            Dataset.from_list(rows).to_parquet(str(out))
            theirs.append(time.perf_counter() - t0)
            print(f"  repeat {rep + 1}/{args.repeats}: selm export {ours[-1]:.2f} s, "
                  f"datasets {theirs[-1]:.2f} s", flush=True)
        size = sum((folder / f).stat().st_size for f in first.files) / 2**20
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(f"\n{args.pairs:,} pairs; snapshot {size:.1f} MiB (zstd), baseline "
              f"{out.stat().st_size / 2**20:.1f} MiB")
        print("| path | median s |\n|---|---|")
        baseline = statistics.median(theirs)
        print(f"| `datasets.Dataset.from_list(rows).to_parquet` | {baseline:.2f} |")
        print(f"| `selm-data export` (read store, join, write, hash, commit) | "
              f"{statistics.median(ours):.2f} |")
        print(f"ratio {ratio:.2f}x (goal at most {GOAL}x): {'pass' if ratio <= GOAL else 'FAIL'}")
        print(f"all runs, s: selm {[round(s, 2) for s in ours]}, "
              f"datasets {[round(s, 2) for s in theirs]}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
