"""`selm-train`: train a policy on a snapshot, or run a manifest's whole loop.

An entry point: it parses arguments and calls the library; nothing imports it.
`selm-train train` runs as one process, under `torchrun --nproc_per_node N -m selm_train.cli
train ...` or under the `deepspeed` launcher alike.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from selm_data.errors import SelmError
from selm_data.generation.launcher import without_local_rank
from selm_data.manifest import find_manifest, load_manifest
from selm_data.store.progress import quiet_libraries

app = typer.Typer(
    help="Train a policy on selm snapshots with DPO, IPO or SELM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _root() -> None:
    """Train a policy on selm snapshots with DPO, IPO or SELM."""


@app.command()
def plan(
    manifest: Annotated[
        Path | None, typer.Option("--manifest", "-m", help="Manifest YAML (default as selm-data).")
    ] = None,
) -> None:
    """Show each iteration's training settings after the iteration's overrides."""
    m = load_manifest(find_manifest(manifest))
    specs = [m.train_for(t) for t in range(1, len(m.iterations) + 1)]
    fields: tuple[str, ...] = ("pairs", "loss", "beta", "alpha", "learning_rate",
                               "global_batch_size", "max_length", "zero_stage", "precision")
    if any(s.loss == "sail" for s in specs):
        fields = (*fields[:4], "routes", *fields[4:])
    table = Table(title=f"{m.name}: {len(m.iterations)} iteration(s), manifest {m.hash()}")
    table.add_column("iter", justify="right")
    for f in fields:
        table.add_column(f, justify="right")
    for t, spec in enumerate(specs, start=1):
        row = spec.model_dump()
        row["pairs"] = m.iteration(t).pairs
        s = spec.sail
        row["routes"] = (f"dp {s.r} pp {s.p} pr {s.g}" if spec.loss == "sail" else "")
        table.add_row(str(t), *(str(row[f]) for f in fields))
    console.print(table)


def _progress(total_hint: str = "") -> Callable[[dict[str, float]], None]:
    def show(row: dict[str, float]) -> None:
        extra = "".join(f"  {short}={row[key]:.3f}" for key, short in (
            ("rewards/accuracies", "acc"), ("rewards/margins", "margin"),
            ("rewards/ref_response", "ref_reward"), ("sail/flipped", "swapped"),
            ("sail/nonfinite", "nonfinite")) if key in row)
        console.print(f"step {int(row['step'])}{total_hint}  loss={row['loss']:.4f}{extra}  "
                      f"lr={row['lr']:.2e}", highlight=False)
    return show


@app.command("train")
def train_cmd(
    snapshot: Annotated[str, typer.Option(help="STORE@NAME, or a snapshot folder.")],
    manifest: Annotated[Path | None, typer.Option(
        "--manifest", "-m", help="Manifest YAML: the training settings (default as selm-data).")
    ] = None,
    iteration: Annotated[int | None, typer.Option(
        "--iter", help="Whose settings to use (default: the snapshot's iteration).")] = None,
    policy: Annotated[str | None, typer.Option(
        help="Start from this model (default: the policy that generated the iteration's data: "
        "the manifest's model for iteration 1, else iteration N-1's checkpoint).")] = None,
    output: Annotated[Path | None, typer.Option(
        help="Checkpoint folder (default: models/iterN-<snapshot hash> beside the store).")
    ] = None,
    register: Annotated[bool, typer.Option(
        help="Register the checkpoint in the snapshot's store.")] = True,
    json_log: Annotated[bool, typer.Option(
        "--json-log", help="Print each step's metrics as one JSON line.")] = False,
) -> None:
    """Train on a snapshot with the manifest's loss (dpo, ipo, selm or sail); write and
    register a checkpoint that records the snapshot."""
    from selm_data.builder.iteration import policy_for
    from selm_data.store.store import open_store
    from selm_train.data import resolve_snapshot
    from selm_train.train import train

    m = load_manifest(find_manifest(manifest))
    snap = resolve_snapshot(snapshot)
    t = iteration or snap.iteration
    if policy is None:
        if snap.store is None:
            raise SelmError("a snapshot given by folder has no store to find its policy in: "
                            "pass --policy, or name it as STORE@NAME")
        policy = policy_for(open_store(snap.store), m, t)
    if output is None:
        from selm_train.loop import checkpoint_folder

        # beside a local store; for an object-store URI, under ./models on this machine
        # (checkpoints are written by DeepSpeed/torch to a filesystem, never to the store)
        beside = Path.cwd() / "store" if isinstance(snap.store, str) else snap.store
        output = checkpoint_folder(beside or snap.folder.parent.parent, t,
                                   snap.content_hash)
    show = (lambda row: print(json.dumps(row), flush=True)) if json_log else _progress()
    result = train(snapshot, policy, output, m.train_for(t), iteration=t, register=register,
                   progress=show)
    if result.nonfinite:
        console.print(f"[yellow]{result.nonfinite} SAIL example(s) had a non-finite loss; they "
                      "were left out of their steps (sail/nonfinite in the step log)[/]")
    if result.checkpoint is not None:
        console.print(f"checkpoint {result.checkpoint} ({result.steps} steps)"
                      + (f", registered as {result.checkpoint_id}" if result.checkpoint_id
                         else ""), highlight=False, soft_wrap=True)


@app.command("loop")
def loop_cmd(
    manifest: Annotated[Path | None, typer.Option(
        "--manifest", "-m", help="Manifest YAML (default as selm-data).")] = None,
    iterations: Annotated[int | None, typer.Option(
        help="Run iterations 1..N (default: all of the manifest's).")] = None,
) -> None:
    """Build, export and train every iteration of a manifest in turn, each phase its own
    process (training under train.launcher on train.gpus GPUs); rerun to resume."""
    from selm_train.loop import run_loop

    done = run_loop(find_manifest(manifest), iterations=iterations,
                    say=lambda text: console.print(text, highlight=False, markup=False,
                                                   soft_wrap=True))
    for it in done:
        console.print(f"iteration {it.iteration}: checkpoint {it.checkpoint}"
                      + (f" ({it.steps} steps)" if it.steps else ""), highlight=False,
                      soft_wrap=True)


def main() -> None:
    quiet_libraries()  # before anything imports huggingface_hub
    sys.argv[1:] = without_local_rank(sys.argv[1:])
    try:
        app()
    except SelmError as e:
        Console(stderr=True).print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":  # python -m selm_train.cli (torchrun -m needs a module)
    main()
