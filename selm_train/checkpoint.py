"""Checkpoints: the trained policy as a plain transformers folder that knows its snapshot.

A checkpoint folder holds safetensors weights, the config, the tokenizer (with its chat
template) and `selm_checkpoint.json`: the snapshot it trained on (name, id, content hash), the
model it started from, the loss and hyperparameters, and the package version. Registering it
adds a row to the store's `checkpoints` table whose `fingerprint` is the folder's
(`selm_data.models.fingerprint_folder`): the same fingerprint the next `selm-data build` records
on every response it generates with it, which is how lineage joins the two.

The folder is written to a staging name and renamed into place, so a killed save leaves no
half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from selm_data.errors import SelmError
from selm_data.generation.models import fingerprint_folder
from selm_data.store.schema import CHECKPOINTS, canonical_json, row_id
from selm_data.store.store import Store, package_version

LINEAGE_FILE = "selm_checkpoint.json"
ADAPTER_DIR = "adapter"  # a LoRA run's adapter (PEFT folder), beside the merged weights


@dataclass(frozen=True)
class CheckpointInfo:
    iteration: int
    snapshot_name: str
    snapshot_id: str | None
    snapshot_hash: str
    base_model: str  # the policy this training started from (path or Hub id)
    parent_id: str | None  # its checkpoint id, when it was itself a registered checkpoint
    loss: str
    config: dict[str, Any]  # the training settings as run (TrainSpec + world size etc.)
    adapter: str | None = None  # LoRA: the adapter's folder inside the checkpoint (the
    # weights are the base model, `base_model`, with it merged)


def save_checkpoint(model: Any, tokenizer: Any, folder: Path, info: CheckpointInfo,
                    state_dict: dict[str, Any] | None = None,
                    adapter: Path | None = None) -> Path:
    """Write `model` (with `state_dict` when given: gathered ZeRO weights) and `tokenizer` to
    `folder` with the lineage file, and move a saved LoRA `adapter` folder into it (as
    `info.adapter`). Refuses an existing folder: checkpoints are not overwritten."""
    folder = Path(folder)
    if folder.exists():
        raise SelmError(f"checkpoint folder {folder} exists; checkpoints are never overwritten: "
                        "remove it or pick another --output")
    staging = folder.with_name(f".{folder.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if adapter is not None:
            shutil.move(adapter, staging / (info.adapter or ADAPTER_DIR))
        payload = {**asdict(info), "selm_version": package_version()}
        (staging / LINEAGE_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        if any(staging.glob("*.bin")) or not any(staging.glob("*.safetensors")):
            raise SelmError(f"saving {folder} did not give safetensors weights")
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if adapter is not None:
            shutil.rmtree(adapter, ignore_errors=True)
    return folder


def register_checkpoint(store: Store, folder: Path) -> dict[str, Any]:
    """Add the checkpoint in `folder` to the store (idempotent); returns its row."""
    folder = Path(folder).resolve()
    lineage_path = folder / LINEAGE_FILE
    if not lineage_path.is_file():
        raise SelmError(f"{folder} has no {LINEAGE_FILE}: it was not written by selm-train")
    info = json.loads(lineage_path.read_text())
    row = {
        "iteration": info["iteration"], "path": str(folder),
        "fingerprint": fingerprint_folder(folder), "snapshot_id": info["snapshot_id"],
        "parent_id": info["parent_id"], "base_model": info["base_model"],
        "loss": info["loss"], "config": canonical_json(info["config"]),
    }
    store.append("checkpoints", [row])
    return {**row, "checkpoint_id": row_id(CHECKPOINTS, row)}


def parent_checkpoint(store: Store, model_path: str) -> str | None:
    """The id of the registered checkpoint at `model_path`, if it is one."""
    resolved = str(Path(model_path).resolve()) if Path(model_path).exists() else model_path
    found = store.scan("checkpoints").filter(pl.col("path") == resolved).collect()
    return found["checkpoint_id"][-1] if found.height else None
