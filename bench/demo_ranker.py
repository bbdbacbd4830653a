"""Benchmark: the demo ranker's held-out pairwise accuracy against baselines, in one run.

What is measured:

1. training, end to end: `load_demo_ranker` into an empty cache (load and verify the embedder,
   load the data, embed the training pairs, fit the head, score the held-out pairs, write the
   cache), then a second load from that cache. Wall and CPU seconds, since machines here are
   shared: CPU seconds well under 2x wall on 2 cores means other work took cores.
2. accuracy on the held-out pairs (rows 0-199 of the bundled UltraFeedback slice, ties skipped),
   which the head never trained on: the demo ranker, "the longer response wins" (characters; a
   tie in length counts half), and a constant score (every pair a tie: 0.5).
3. with `--variants`, two other feature recipes with the same head, fitted on the same training
   pairs: the text `prompt + "\\n" + response` (truncated to 256 tokens) and
   [e(prompt), e(response), e(prompt) * e(response)]. Slow: they embed ~4,400 more texts.

The 95% interval is the normal approximation, +-1.96 sqrt(p (1 - p) / n): with ~180 pairs,
differences under ~0.07 are noise.

Run: python bench/demo_ranker.py [--cache-dir DIR] [--variants]
(`--cache-dir` reuses a trained head there instead of training one into a temporary folder.)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from selm_data.rankers.demo import (
    RECIPE,
    Embedder,
    demo_pairs,
    fit_bradley_terry,
    load_demo_ranker,
    pairwise_accuracy,
    prompt_text,
)
from selm_data.sources.dataset import Example

Row = tuple[str, float, int]  # method, held-out accuracy, pairs


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def longer_wins(pairs: list[Example]) -> float:
    return sum(1.0 if len(e.chosen) > len(e.rejected) else 0.5 if len(e.chosen) == len(e.rejected)
               else 0.0 for e in pairs) / len(pairs)


def variant(embedder: Embedder, train: list[Example], held_out: list[Example],
            features: Callable[[Embedder, list[str], list[str]], Any]) -> float:
    """Held-out accuracy of a head with other features, fitted as the demo ranker's is."""

    def phi(pairs: list[Example], side: str) -> Any:
        return features(embedder, [prompt_text(e.messages) for e in pairs],
                        [getattr(e, side) for e in pairs])

    weight = fit_bradley_terry(phi(train, "chosen"), phi(train, "rejected"), l2=RECIPE["l2"])
    margin = (phi(held_out, "chosen") - phi(held_out, "rejected")).double() @ weight
    return float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())


def joint_text(embedder: Embedder, prompts: list[str], responses: list[str]) -> Any:
    return embedder.embed([p + "\n" + r for p, r in zip(prompts, responses, strict=True)])


def concat(embedder: Embedder, prompts: list[str], responses: list[str]) -> Any:
    p, r = embedder.embed(prompts), embedder.embed(responses)
    return torch.cat([p, r, p * r], dim=1)


def print_table(rows: list[Row]) -> None:
    print("| method | held-out accuracy | 95% interval | pairs |")
    print("|---|---|---|---|")
    for method, acc, n in rows:
        half = 1.96 * math.sqrt(acc * (1 - acc) / n)
        print(f"| {method} | {acc:.3f} | {acc - half:.3f}-{acc + half:.3f} | {n} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, help="reuse (or train into) this cache")
    parser.add_argument("--variants", action="store_true", help="also fit two other recipes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="selm-demo-ranker-") as tmp:
        cache = args.cache_dir or Path(tmp)
        ranker, wall, cpu = timed(lambda: load_demo_ranker(cache))
        _, wall2, _ = timed(lambda: load_demo_ranker(cache))
        folder = next((cache / "models").glob("demo-ranker-*"))
        size = sum(f.stat().st_size for f in folder.iterdir())
        train, held_out = demo_pairs()
        rows: list[Row] = [
            (f"{ranker.name} (ours)", pairwise_accuracy(ranker, held_out), len(held_out)),
            ("longer response wins", longer_wins(held_out), len(held_out)),
            ("constant score (chance)", 0.5, len(held_out)),
        ]
        if args.variants:
            for label, features in (("variant: text prompt + response", joint_text),
                                    ("variant: [e(p), e(r), e(p)*e(r)]", concat)):
                rows.append((label, variant(ranker.embedder, train, held_out, features),
                             len(held_out)))
    print_table(rows)
    print(f"\ntraining pairs {len(train)} (rows 200-999, ties skipped); version {ranker.version}")
    print(f"first load (training, end to end): {wall:.1f} s wall, {cpu:.1f} s CPU"
          + (" (head was already cached)" if args.cache_dir else ""))
    print(f"second load (cached): {wall2:.1f} s; cache folder {size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
