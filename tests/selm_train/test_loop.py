"""The loop: build, export, train for two iterations on tiny models, each phase a process
(training under torchrun); iteration 2 generates with iteration 1's checkpoint; a rerun does
nothing."""

from __future__ import annotations

import json

import polars as pl
import pytest

from helpers import manifest_dict, require
from selm_data.manifest import Manifest
from selm_data.publish.lineage import lineage
from selm_data.store.store import RunInfo, open_store
from selm_train.loop import SELM_DATA, build_command, run_loop

pytestmark = pytest.mark.slow


def test_two_iterations_end_to_end_and_resume(tmp_path, tiny_lm, tiny_rm):
    require("deepspeed", "'selm[train]'")
    raw = manifest_dict(
        tmp_path, tiny_lm, tiny_rm,
        train={"loss": "selm", "beta": 0.1, "alpha": 0.01, "learning_rate": 1e-3,
               "global_batch_size": 4, "micro_batch_size": 2, "max_length": 96,
               "max_prompt_length": 48, "warmup_ratio": 0.0})
    m = Manifest.model_validate(raw)
    path = tmp_path / "manifest.yaml"
    path.write_text(json.dumps(raw))
    said: list[str] = []
    done = run_loop(path, say=said.append)
    assert [d.iteration for d in done] == [1, 2] and [d.steps for d in done] == [3, 3]
    assert any("torch.distributed" in line or "train (torchrun, 1 process" in line
               for line in said)
    store = open_store(m.store, run=RunInfo.new("pytest loop check"))
    checkpoints = store.scan("checkpoints").sort("iteration").collect()
    assert checkpoints["iteration"].to_list() == [1, 2]
    first, second = checkpoints.row(0, named=True), checkpoints.row(1, named=True)
    assert second["parent_id"] == first["checkpoint_id"]
    # Iteration 2 generated with iteration 1's checkpoint, and lineage says so.
    policy = store.scan("responses").filter(
        (pl.col("iteration") == 2) & (pl.col("origin") == "policy")).collect()
    assert set(policy["policy_fingerprint"].to_list()) == {first["fingerprint"]}
    assert set(policy["policy"].to_list()) == {first["path"]}
    node = lineage(store, policy["response_id"][0])
    assert node["upstream"]["policy_checkpoint"]["checkpoint_id"] == first["checkpoint_id"]
    ckpt = lineage(store, first["checkpoint_id"])
    assert ckpt["downstream"]["generated"][first["checkpoint_id"]]["count"] == 12
    assert [c["checkpoint_id"] for c in ckpt["downstream"]["children"]] == [
        second["checkpoint_id"]]

    versions = store.versions()
    again = run_loop(path, say=said.append)
    assert [d.built for d in again] == [False, False]
    assert store.versions() == versions, "a finished loop writes nothing on rerun"


def test_the_build_phase_uses_every_gpu_block_under_torchrun(tmp_path, monkeypatch):
    """On a node the loop builds with one rank per GPU block, the GPUs training will use:
    8 GPUs of tensor-parallel 2 are 4 ranks; a machine without GPUs builds in one process."""
    def manifest(**overrides) -> Manifest:
        return Manifest.model_validate(manifest_dict(tmp_path, tmp_path / "lm", tmp_path / "rm",
                                                     **overrides))

    tp2 = {"backend": "vllm", "vllm": {"tensor_parallel_size": 2}}
    cmd = build_command(manifest(train={"gpus": 8}, generation=tp2), 2, tmp_path / "m.yaml")
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                        "-m"]
    assert cmd[6:] == ["selm_data.cli", "build", "--iter", "2", "--manifest",
                       str(tmp_path / "m.yaml")]
    one = build_command(manifest(train={"gpus": 1}), 1, tmp_path / "m.yaml")
    assert one[1:3] == list(SELM_DATA)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    assert build_command(manifest(), 1, tmp_path / "m.yaml")[1:3] == list(SELM_DATA)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    assert "--nproc_per_node=4" in build_command(manifest(), 1, tmp_path / "m.yaml")
