"""`selm-train loop`: every iteration of a manifest, end to end, resumable at each step.

For t = 1..T: build iteration t's pairs (generate with the policy of t, rank, pair), export
them as a snapshot, train the policy on it, register the checkpoint, which is the policy of
t + 1. Each step is already idempotent on its own, so a rerun after a crash picks up where it
stopped: the build redoes only unfinished chunks, the export of unchanged pairs is the same
snapshot, and a registered checkpoint of iteration t means t is done. A checkpoint folder saved
but not registered (killed in between) is registered rather than retrained.

One process: the loop is for a single machine. Across GPUs, run `selm-data build --shard`,
`selm-data export` and `torchrun ... selm_train.cli train` as separate steps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from selm_data.builder.iteration import BuildReport, Progress, build, policy_for
from selm_data.manifest import Manifest
from selm_data.publish.snapshot import export
from selm_data.store.store import Store
from selm_train.checkpoint import LINEAGE_FILE, register_checkpoint
from selm_train.train import Progress as TrainProgress
from selm_train.train import train


@dataclass
class IterationDone:
    iteration: int
    build: BuildReport | None  # None: the iteration was done before this run
    snapshot: str | None
    checkpoint: str  # path
    steps: int


def checkpoint_folder(store_root: Path, iteration: int, content_hash: str) -> Path:
    """Where a checkpoint goes by default: `models/` beside the store folder."""
    return Path(store_root).parent / "models" / f"iter{iteration}-{content_hash[:8]}"


def run_loop(manifest: Manifest, store: Store, *, iterations: int | None = None,
             on_build: Progress | None = None, on_step: TrainProgress | None = None,
             say: Callable[[str], None] = print) -> list[IterationDone]:
    """Run iterations 1..`iterations` (default: all of the manifest's) into `store`."""
    done = []
    last = iterations or len(manifest.iterations)
    for t in range(1, last + 1):
        registered = (store.scan("checkpoints").filter(pl.col("iteration") == t)
                      .sort("created_at").collect())
        if registered.height:
            say(f"iteration {t}: done before (checkpoint {registered['path'][-1]})")
            done.append(IterationDone(t, None, None, registered["path"][-1], 0))
            continue
        say(f"iteration {t}: build")
        report = build(manifest, t, store, progress=on_build)
        snap = export(store, t)
        say(f"iteration {t}: snapshot {snap.name} ({snap.row_count} pairs); train")
        folder = checkpoint_folder(store.root, t, snap.content_hash)
        if (folder / LINEAGE_FILE).is_file() and \
                json.loads((folder / LINEAGE_FILE).read_text())["snapshot_hash"] == \
                snap.content_hash:
            register_checkpoint(store, folder)  # saved, then killed before registering
            done.append(IterationDone(t, report, snap.name, str(folder), 0))
            continue
        result = train(f"{store.root}@{snap.name}", policy_for(store, manifest, t), folder,
                       manifest.train_for(t), iteration=t, progress=on_step)
        done.append(IterationDone(t, report, snap.name, str(folder), result.steps))
    return done
