"""`selm-train loop`: every iteration of a manifest, end to end, as phases, resumable at each.

For t = 1..T: build iteration t's pairs (generate with the policy of t, rank, pair), export
them as a snapshot, train the policy on it, register the checkpoint, which is the policy of
t + 1. Each phase is its own process (`selm-data build`, under `torchrun` with one rank per GPU
block when there are several, `selm-data export`, then `selm-train train` under the manifest's
launcher, `torchrun` or `deepspeed`, on `train.gpus` GPUs or all of
the machine's), so every phase starts with the GPUs free: vLLM refuses to start without the
memory it was promised, and a DeepSpeed engine is not freed by going out of scope. It also
gives training its process group of N processes, where ZeRO-3 shards and offload mean
something.

Each phase is idempotent on its own, so a rerun after a crash picks up where it stopped: the
build redoes only unfinished chunks, the export of unchanged pairs is the same snapshot, and a
registered checkpoint of iteration t means t is done. A checkpoint folder saved but not
registered (killed in between) is registered rather than retrained.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from selm_data.errors import SelmError
from selm_data.manifest import Manifest, TrainSpec, load_manifest
from selm_data.publish.snapshot import Filters
from selm_data.store.store import RunInfo, Store, open_store
from selm_train.checkpoint import LINEAGE_FILE, register_checkpoint

# `selm-data` without relying on its console script being installed (or installed from this
# checkout): the same interpreter, the same sys.path.
SELM_DATA = ("-c", "import sys; from selm_data.cli import main; sys.argv[0] = 'selm-data'; "
                   "main()")


@dataclass
class IterationDone:
    iteration: int
    built: bool  # False: the iteration was done before this run
    snapshot: str | None
    checkpoint: str  # path
    steps: int


def checkpoint_folder(store_root: Path, iteration: int, content_hash: str) -> Path:
    """Where a checkpoint goes by default: `models/` beside the store folder."""
    return Path(store_root).parent / "models" / f"iter{iteration}-{content_hash[:8]}"


def run_loop(manifest_path: Path, *, iterations: int | None = None,
             say: Callable[[str], None] = print) -> list[IterationDone]:
    """Run iterations 1..`iterations` (default: all of the manifest's), each phase a process;
    their output goes to `say` line by line."""
    manifest = load_manifest(manifest_path)
    manifest_path = Path(manifest_path).resolve()
    done = []
    for t in range(1, (iterations or len(manifest.iterations)) + 1):
        store = _store(manifest, t)
        registered = (store.scan("checkpoints").filter(pl.col("iteration") == t)
                      .sort("created_at").collect())
        if registered.height:
            say(f"iteration {t}: done before (checkpoint {registered['path'][-1]})")
            done.append(IterationDone(t, False, None, registered["path"][-1], 0))
            continue
        build = build_command(manifest, t, manifest_path)
        say(f"iteration {t}: build ({_ranks_said(build)})")
        _phase("build", t, build, say)
        say(f"iteration {t}: export")
        _phase("export", t, [sys.executable, *SELM_DATA, "export", "--iter", str(t),
                             "--manifest", str(manifest_path)], say)
        store = _store(manifest, t)
        name, content_hash = _latest_snapshot(store, t)
        folder = checkpoint_folder(store.root, t, content_hash)
        if (folder / LINEAGE_FILE).is_file() and \
                json.loads((folder / LINEAGE_FILE).read_text())["snapshot_hash"] == content_hash:
            register_checkpoint(store, folder)  # saved, then killed before registering
            done.append(IterationDone(t, True, name, str(folder), 0))
            continue
        spec = manifest.train_for(t)
        say(f"iteration {t}: snapshot {name}; train ({spec.launcher}, "
            f"{_processes(spec)} process(es))")
        lines = _phase("train", t, [
            *launcher_command(spec), "selm_train.cli", "train",
            "--snapshot", f"{store.root}@{name}", "--manifest", str(manifest_path),
            "--iter", str(t), "--output", str(folder), "--json-log"], say)
        steps = sum(1 for line in lines if line.startswith('{"') and '"step"' in line)
        done.append(IterationDone(t, True, name, str(folder), steps))
    return done


def build_command(manifest: Manifest, iteration: int, manifest_path: Path) -> list[str]:
    """The build phase on the GPUs training will use: one rank per GPU block (a GPU, or
    `generation.vllm.tensor_parallel_size` of them) under `torchrun`, each building its shard
    (`selm_data.builder.ranks`); one plain process on a machine without GPUs or with one block."""
    args = ["build", "--iter", str(iteration), "--manifest", str(manifest_path)]
    gpus = _processes(manifest.train_for(iteration))
    ranks = max(1, gpus // manifest.generation.gpus_per_rank())
    if ranks == 1:
        return [sys.executable, *SELM_DATA, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={ranks}", "-m", "selm_data.cli", *args]


def _ranks_said(command: Sequence[str]) -> str:
    ranks = next((a.split("=", 1)[1] for a in command if a.startswith("--nproc_per_node=")), "1")
    return f"torchrun, {ranks} ranks" if ranks != "1" else "1 process"


def launcher_command(spec: TrainSpec) -> list[str]:
    """The command that starts `-m`-style module training under the spec's launcher, up to
    the module name: `torchrun` (standalone) or the `deepspeed` launcher, one process per GPU
    (`train.gpus`, else every GPU of this machine; one process on a machine without)."""
    n = _processes(spec)
    if spec.launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={n}",
                f"--master_port={_free_port()}", "--module"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={n}", "-m"]


def _processes(spec: TrainSpec) -> int:
    if spec.gpus is not None:
        return spec.gpus
    import torch

    return max(1, torch.cuda.device_count())


def _phase(name: str, iteration: int, command: Sequence[str],
           say: Callable[[str], None]) -> list[str]:
    """Run one phase to its end, its output passed on to `say`; its lines."""
    env = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "120")}
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            say(lines[-1])
    if proc.returncode != 0:
        raise SelmError(f"iteration {iteration}: the {name} phase failed (exit "
                        f"{proc.returncode}; its output is above). Fix the cause and rerun "
                        "`selm-train loop`: it resumes from this phase.")
    return lines


def _store(manifest: Manifest, iteration: int) -> Store:
    """The store opened afresh: the phases, other processes, have written to it."""
    return open_store(manifest.store, create=True,
                      run=RunInfo.new(f"selm-train loop (iteration {iteration})"))


def _latest_snapshot(store: Store, iteration: int) -> tuple[str, str]:
    """Name and content hash of the newest unfiltered export of `iteration`: the export
    phase's."""
    rows = (store.scan("snapshots")
            .filter((pl.col("iteration") == iteration)
                    & (pl.col("format") == "parquet:ultrafeedback")
                    & (pl.col("filters") == Filters().as_json()))
            .sort("created_at").collect())
    if not rows.height:
        raise SelmError(f"iteration {iteration}: the export phase registered no snapshot")
    return rows["name"][-1], rows["content_hash"][-1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
