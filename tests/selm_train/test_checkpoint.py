"""Checkpoints: safetensors + tokenizer + lineage, registered so the next build uses them."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import chain_rows, write_chain
from selm_data.builder.iteration import policy_for
from selm_data.errors import SelmError
from selm_data.generation.models import resolve_policy
from selm_data.manifest import Manifest
from selm_data.publish.lineage import lineage
from selm_data.publish.snapshot import export
from selm_train.checkpoint import (
    LINEAGE_FILE,
    CheckpointInfo,
    parent_checkpoint,
    register_checkpoint,
    save_checkpoint,
)


def test_save_reload_register_and_the_next_build_uses_it(store, tiny_lm, tmp_path):
    write_chain(store, chain_rows(1, 3))
    snap = export(store, 1, name="it1")
    snapshot_id = store.scan("snapshots").filter(pl.col("name") == "it1").collect()[
        "snapshot_id"][0]
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1.5)  # "trained": differs from tiny_lm
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    info = CheckpointInfo(iteration=1, snapshot_name="it1", snapshot_id=snapshot_id,
                          snapshot_hash=snap.content_hash, base_model=str(tiny_lm),
                          parent_id=None, loss="selm",
                          config={"beta": 0.01, "alpha": 0.001, "learning_rate": 5e-7})
    folder = save_checkpoint(model, tokenizer, tmp_path / "ckpt1", info)
    assert not any(folder.glob("*.bin")) and any(folder.glob("*.safetensors"))
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]

    reloaded = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(folder).chat_template == tokenizer.chat_template
    meta = json.loads((folder / LINEAGE_FILE).read_text())
    assert meta["snapshot_hash"] == snap.content_hash and meta["loss"] == "selm"

    row = register_checkpoint(store, folder)
    version = store.version("checkpoints")
    assert register_checkpoint(store, folder) == row and store.version("checkpoints") == version
    assert row["fingerprint"] == resolve_policy(str(folder)).fingerprint
    assert parent_checkpoint(store, str(folder)) == row["checkpoint_id"]
    assert parent_checkpoint(store, str(tiny_lm)) is None

    manifest = Manifest.model_validate({
        "name": "t", "store": str(store.root), "source": {"path": "x.jsonl"},
        "policy": {"model": str(tiny_lm)}, "iterations": 2})
    assert policy_for(store, manifest, 2) == str(folder)
    node = lineage(store, row["checkpoint_id"])
    assert node["upstream"]["snapshot"]["name"] == "it1"
    with pytest.raises(SelmError, match="never overwritten"):
        save_checkpoint(model, tokenizer, folder, info)
