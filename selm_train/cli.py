"""`selm-train`: train a policy on a snapshot.

An entry point: it parses arguments and calls the library; nothing imports it. Training itself
arrives with the trainer; today this command shows the per-iteration plan a manifest resolves
to, validated the same way the trainer will read it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from selm_data.errors import SelmError
from selm_data.manifest import find_manifest, load_manifest

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
    fields = ("pairs", "loss", "beta", "alpha", "learning_rate", "global_batch_size",
              "max_length", "zero_stage", "precision")
    table = Table(title=f"{m.name}: {len(m.iterations)} iteration(s), manifest {m.hash()}")
    table.add_column("iter", justify="right")
    for f in fields:
        table.add_column(f, justify="right")
    for t in range(1, len(m.iterations) + 1):
        spec = m.train_for(t).model_dump()
        spec["pairs"] = m.iteration(t).pairs
        table.add_row(str(t), *(str(spec[f]) for f in fields))
    console.print(table)


def main() -> None:
    try:
        app()
    except SelmError as e:
        Console(stderr=True).print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(2)
