"""selm-train end to end on a tiny model: one process, two under torchrun or deepspeed, the
checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import chain_rows, require
from selm_data.generation.models import resolve_policy
from selm_data.manifest import TrainSpec
from selm_data.publish.snapshot import export
from selm_train.logps import SequenceLogps
from selm_train.train import REFERENCE_DIR, train

pytestmark = pytest.mark.slow
SPEC = TrainSpec(loss="selm", beta=0.1, alpha=0.05, learning_rate=1e-3, global_batch_size=4,
                 micro_batch_size=1, max_length=64, max_prompt_length=32, warmup_ratio=0.0,
                 lr_scheduler="constant", zero_stage=0)


@pytest.fixture
def snapshot(store):
    require("deepspeed", "'selm[train]'")
    rows = chain_rows(1, 8)
    for table in ("prompts", "responses", "judgments", "pairs"):
        store.append(table, rows[table])
    export(store, 1, name="it1")
    return f"{store.root}@it1"


def test_one_process_trains_saves_and_registers(snapshot, store, tiny_lm, tmp_path):
    out = train(snapshot, str(tiny_lm), tmp_path / "ckpt", SPEC, iteration=1)
    assert out.steps == 2 and len(out.history) == 2
    # Step 1's micro-batches all run before the first update: policy == reference, so every
    # log-ratio is 0 and the loss is -log(sigmoid(0)) = log 2 exactly, for DPO and SELM alike.
    assert out.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert out.history[1]["loss"] < math.log(2), "the first update lowered the loss"
    assert [r["lr"] for r in out.history] == [pytest.approx(1e-3)] * 2  # constant schedule
    row = store.scan("checkpoints").collect().row(0, named=True)
    assert row["checkpoint_id"] == out.checkpoint_id and row["path"] == str(out.checkpoint)
    assert row["fingerprint"] == resolve_policy(str(out.checkpoint)).fingerprint
    trained = AutoModelForCausalLM.from_pretrained(out.checkpoint, use_safetensors=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    changed = [n for (n, a), (_, b) in zip(trained.state_dict().items(),
                                          base.state_dict().items(), strict=True)
               if not torch.equal(a, b)]
    assert changed, "training changed the weights"
    config = json.loads(row["config"])
    assert (config["loss"], config["alpha"], config["optimizer_steps"]) == ("selm", 0.05, 2)

    cache = list((store.root / "exports" / "it1" / REFERENCE_DIR).glob("*.parquet"))
    assert len(cache) == 1
    mtime = cache[0].stat().st_mtime_ns
    again = train(snapshot, str(tiny_lm), tmp_path / "ckpt2", SPEC, iteration=1, register=False)
    assert cache[0].stat().st_mtime_ns == mtime, "reference log-probs came from the cache"
    assert [r["loss"] for r in again.history] == [r["loss"] for r in out.history]
    assert store.scan("checkpoints").select(pl.len()).collect().item() == 1


@pytest.mark.parametrize(("launcher", "stage"), [("torchrun", 2), ("torchrun", 3),
                                               ("deepspeed", 2)])
def test_two_processes_equal_one(snapshot, tiny_lm, tmp_path, launcher, stage):
    """The same global batches, split over two processes (under torchrun, or the deepspeed
    launcher, which passes --local_rank before the subcommand), give the same losses."""
    def run(nproc: int, out: Path) -> list[dict]:
        manifest = tmp_path / f"m{nproc}.yaml"
        manifest.write_text(json.dumps({
            "name": "t", "store": snapshot.split("@")[0], "source": {"path": "x.jsonl"},
            "policy": {"model": str(tiny_lm)}, "iterations": 1,
            "train": {**SPEC.model_dump(), "zero_stage": stage}}))
        if launcher == "torchrun" or nproc == 1:
            start = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                     "--standalone", "-m"]
        else:
            start = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}",
                     f"--master_port={_free_port()}", "--module"]
        cmd = [*start, "selm_train.cli", "train", "--snapshot", snapshot,
               "--manifest", str(manifest), "--policy", str(tiny_lm), "--output", str(out),
               "--no-register", "--json-log"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    one = run(1, tmp_path / "one")
    [cache] = (Path(snapshot.split("@")[0]) / "exports/it1" / REFERENCE_DIR).glob("*.parquet")
    cached_by_one = pl.read_parquet(cache).sort("pair_id")
    cache.unlink()  # the two processes compute it again, each its half
    two = run(2, tmp_path / "two")
    cached_by_two = pl.read_parquet(cache).sort("pair_id")
    assert cached_by_one["pair_id"].to_list() == cached_by_two["pair_id"].to_list()
    assert cached_by_two["rank"].value_counts()["count"].to_list() == [4, 4], "split in halves"
    np.testing.assert_allclose(np.array(cached_by_two["logps"].to_list()),
                               np.array(cached_by_one["logps"].to_list()), rtol=1e-6)
    assert not list(cache.parent.glob("*.part*")), "the parts were joined and removed"
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    w1 = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    w2 = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_forward_equals_the_full_logits(tiny_lm):
    """`_forward` (logits of the response tokens only, in chunks) equals the log-probs computed
    from every position's logits."""
    from transformers import AutoTokenizer

    from selm_train.data import PreferenceExample, collate, tokenize
    from selm_train.losses import sequence_logps
    from selm_train.train import _forward

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    examples = [PreferenceExample(f"p{i}", [{"role": "user", "content": "hello " * (3 + 5 * i)}],
                                  "yes " * (2 + i), "no", "maybe so " * i or "ok")
                for i in range(3)]
    batch = collate(tokenize(examples, tok, max_length=128, max_prompt_length=64),
                    tok.pad_token_id, with_reference=True)
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        expected = sequence_logps(full, batch.input_ids, batch.loss_mask)
        got = _forward(SequenceLogps(model), batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_shared_y_ref_row_gives_the_same_selm_loss_and_gradients(tiny_lm):
    """y_ref equal to chosen (pair 0) or rejected (pair 1) runs once in the batch; the SELM loss
    and every weight's gradient equal those of each sequence run alone (float64, by hand)."""
    from transformers import AutoTokenizer

    from selm_train.data import PreferenceExample, collate, tokenize
    from selm_train.losses import selm_loss
    from selm_train.train import _forward

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).double()
    prompts = [[{"role": "user", "content": "hello " * (2 + 3 * i)}] for i in range(3)]
    answers = [("yes yes", "no", "yes yes"), ("fine", "bad bad", "bad bad"),
               ("good", "meh", "so so so")]
    examples = tokenize([PreferenceExample(f"p{i}", prompts[i], *answers[i]) for i in range(3)],
                        tok, max_length=128, max_prompt_length=64)
    batch = collate(examples, tok.pad_token_id, with_reference=True)
    assert batch.input_ids.shape[0] == 7
    reference = torch.tensor([[-3.0, -4.0, -3.5], [-2.0, -6.0, -6.5], [-1.0, -2.0, -3.0]],
                             dtype=torch.float64)
    beta, alpha = 0.1, 0.5

    policy = batch.split(_forward(SequenceLogps(model), batch))
    selm_loss(*policy, *reference.T, beta=beta, alpha=alpha).losses.mean().backward()
    shared = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # By hand, each distinct sequence once: two forward passes of one sequence differ from one
    # pass with summed weights by ~1e-5 in the embedding gradient even in float64 (measured,
    # torch 2.13 CPU), which would hide what this test checks.
    total = torch.zeros((), dtype=torch.float64)
    for ex, ref in zip(examples, reference, strict=True):
        logps = {}
        for response in {ex.chosen_ids, ex.rejected_ids, ex.ref_ids}:
            ids = torch.tensor([ex.prompt_ids + response])
            logits = model(input_ids=ids).logits[0, len(ex.prompt_ids) - 1:-1]
            logps[response] = torch.log_softmax(logits, -1).gather(
                1, torch.tensor(response)[:, None]).sum()
        pc, pr, py = logps[ex.chosen_ids], logps[ex.rejected_ids], logps[ex.ref_ids]
        h = (pc - ref[0]) - (pr - ref[1])
        total = total + (-torch.log(torch.sigmoid(beta * h))
                         + alpha * beta * (py - ref[2])) / len(examples)
    total.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(shared[name], param.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_gradient_checkpointing_checkpoints_every_layer(snapshot, tiny_lm, tmp_path,
                                                        monkeypatch):
    """With train.gradient_checkpointing, every decoder layer of every micro-batch's forward
    runs under torch's checkpoint (transformers checkpoints only in training mode), with no KV
    cache; the saved config keeps use_cache for generation."""
    import transformers.modeling_utils as modeling_utils

    real, calls = modeling_utils.checkpoint, []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting)
    spec = SPEC.model_copy(update={"gradient_checkpointing": True})
    out = train(snapshot, str(tiny_lm), tmp_path / "ckpt", spec, iteration=1, register=False)
    layers = AutoModelForCausalLM.from_pretrained(tiny_lm).config.num_hidden_layers
    assert calls == [False] * (out.steps * 4 * layers)  # 2 steps x 4 micro-batches x 2 layers
    saved = json.loads((out.checkpoint / "config.json").read_text())
    assert saved["use_cache"] is True


def test_collectives_get_tensors_on_the_group_device(monkeypatch):
    """Every tensor the trainer hands to a collective is on the process group's device (NCCL
    takes CUDA tensors only): the step metrics' mean, the non-finite count, the any-rank flag.
    The device here is `meta`, standing in for a GPU on a machine without one."""
    from selm_train.engine import DistInfo
    from selm_train.losses import LossOutput
    from selm_train.train import _all_mean, _any_rank, _stop_if_nonfinite

    class Reached(Exception):
        pass

    devices = []

    def all_reduce(tensor, *args, **kwargs):
        devices.append(tensor.device)
        raise Reached

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    dist = DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("meta"))
    out = LossOutput(torch.zeros(2), {})
    for call in (lambda: _all_mean({"loss": 1.0}, dist), lambda: _any_rank(True, dist),
                 lambda: _stop_if_nonfinite(out, 1, dist)):
        with pytest.raises(Reached):
            call()
    assert devices == [torch.device("meta")] * 3


NONFINITE_WORKER = """
import sys
from pathlib import Path

import torch
from selm_data.errors import SelmError
from selm_train.engine import init_distributed
from selm_train.losses import LossOutput
from selm_train.train import _stop_if_nonfinite

dist = init_distributed(device="cpu")
loss = float("nan") if dist.rank == 1 else 0.5
try:
    _stop_if_nonfinite(LossOutput(torch.tensor([loss, 0.25]), {}), 3, dist)
    outcome = "went on"
except SelmError as e:
    outcome = f"stopped: {e}"
# one file a rank: two ranks printing to one pipe can interleave their lines
Path(sys.argv[1], f"rank{dist.rank}.txt").write_text(f"rank {dist.rank} {outcome}")
torch.distributed.destroy_process_group()
"""


def test_a_nonfinite_loss_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1 alone has a NaN loss: both ranks raise the same error at the same step (one rank
    raising alone would leave the other in its next collective until the timeout)."""
    script = tmp_path / "worker.py"
    script.write_text(NONFINITE_WORKER)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = sorted(p.read_text() for p in tmp_path.glob("rank*.txt"))
    message = "stopped: step 3: 1 of 4 losses are not finite"
    assert len(lines) == 2 and all(message in x for x in lines), lines
    assert lines[0].split(": ", 1)[1] == lines[1].split(": ", 1)[1]


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_on_cpu_runs_the_mixed_precision_branches(snapshot, tiny_lm, tmp_path, stage):
    """train.precision bf16 on CPU: the model runs in bf16 under DeepSpeed's bf16 branches
    (BF16 optimizer at stage 0, ZeRO-3's fp32 partitions), the log-probs in fp32: step 1 is
    log 2 (policy == reference, the same bf16 function), the update lowers the loss, and the
    checkpoint is bf16 safetensors."""
    from safetensors import safe_open

    spec = SPEC.model_copy(update={"precision": "bf16", "zero_stage": stage,
                                   "gradient_checkpointing": True})
    out = train(snapshot, str(tiny_lm), tmp_path / "ckpt", spec, iteration=1, register=False)
    assert out.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert out.history[1]["loss"] < math.log(2)
    [weights] = out.checkpoint.glob("*.safetensors")
    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    cache = next((Path(snapshot.split("@")[0]) / "exports/it1" / REFERENCE_DIR).glob("*"))
    assert cache.is_file()


@pytest.mark.parametrize("stage", [0, 3])
def test_lora_trains_adapters_and_saves_the_merged_model_with_the_adapter(
        snapshot, store, tiny_lm, tmp_path, stage):
    """train.lora: the base frozen, adapters on q_proj and v_proj; step 1 is log 2 (B = 0, so
    the policy is the base model, which the reference pass ran); the checkpoint is a plain
    model (no adapter keys) equal to base + adapter merged by PEFT, the adapter is in
    `adapter/`, and the lineage records both."""
    require("peft", "'selm[train]'")
    from peft import PeftModel
    from safetensors.torch import load_file

    spec = SPEC.model_copy(update={
        "zero_stage": stage, "gradient_checkpointing": True,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ("q_proj", "v_proj")}})
    spec = TrainSpec.model_validate(spec.model_dump())
    out = train(snapshot, str(tiny_lm), tmp_path / "ckpt", spec, iteration=1)
    assert out.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert out.history[1]["loss"] < math.log(2)

    merged = load_file(out.checkpoint / "model.safetensors")
    base = load_file(tiny_lm / "model.safetensors")
    assert set(merged) == set(base), "a plain model: no adapter keys"
    changed = {n for n in base if not torch.equal(merged[n], base[n])}
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed), changed

    lineage = json.loads((out.checkpoint / "selm_checkpoint.json").read_text())
    assert lineage["adapter"] == "adapter" and lineage["base_model"] == str(tiny_lm)
    assert lineage["config"]["lora"]["r"] == 4
    by_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm),
                                        out.checkpoint / "adapter").merge_and_unload()
    expected = by_peft.state_dict()
    for name, value in merged.items():  # (lm_head is tied to the embedding: saved once)
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7, msg=name)
    row = store.scan("checkpoints").collect().row(0, named=True)
    assert row["base_model"] == str(tiny_lm) and json.loads(row["config"])["lora"]["r"] == 4


@pytest.mark.parametrize(("offload", "stage"), [("optimizer", 2), ("optimizer+params", 3)])
def test_offload_trains_as_without(snapshot, tiny_lm, tmp_path, offload, stage):
    """ZeRO offload of the optimizer (and the parameters) gives the losses and weights of the
    same stage without it."""
    def run(name: str, **update):
        spec = TrainSpec.model_validate({**SPEC.model_dump(), "zero_stage": stage, **update})
        return train(snapshot, str(tiny_lm), tmp_path / name, spec, iteration=1, register=False)

    plain, offloaded = run("plain"), run("offloaded", offload=offload)
    assert [r["loss"] for r in offloaded.history] == pytest.approx(
        [r["loss"] for r in plain.history], rel=1e-5, abs=1e-6)
    a = AutoModelForCausalLM.from_pretrained(plain.checkpoint).state_dict()
    b = AutoModelForCausalLM.from_pretrained(offloaded.checkpoint).state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


def test_weights_are_read_straight_onto_the_device(tiny_lm, monkeypatch):
    """Blocker 6a: each rank reads the weights onto its device (`device_map`), never a whole
    CPU copy first that is then moved (8 ranks: 8 full copies in host memory at once). The
    `meta` device stands in for a GPU; moving a loaded model is made to fail."""
    from selm_train.train import _load

    def no_move(self, *args, **kwargs):
        raise AssertionError("the model was loaded elsewhere and then moved")

    monkeypatch.setattr(torch.nn.Module, "to", no_move)
    _, model = _load(resolve_policy(str(tiny_lm)), torch.device("meta"), TrainSpec())
    assert {p.device.type for p in model.parameters()} == {"meta"}


SAVE_WORKER = """
import json, sys
from pathlib import Path
import torch
import selm_train.train as trainer
from selm_data.manifest import TrainSpec

snapshot, policy, out, spec = sys.argv[1:5]
gathered = []
real_gather, real_barrier = trainer.gather_state_dict, torch.distributed.barrier

def gather(engine):
    state = real_gather(engine)
    gathered.append(True)
    return state

def barrier(*args, **kwargs):
    if gathered and torch.distributed.get_rank() != 0:
        print("rank 1 waited for rank 0's save", flush=True)
    return real_barrier(*args, **kwargs)

trainer.gather_state_dict, torch.distributed.barrier = gather, barrier
result = trainer.train(snapshot, policy, Path(out), TrainSpec.model_validate(json.loads(spec)),
                       iteration=1, register=False)
print(f"rank {torch.distributed.get_rank()} returned, checkpoint {result.checkpoint}", flush=True)
"""


def test_no_rank_waits_for_rank_0s_save(snapshot, tiny_lm, tmp_path):
    """Blocker 6c: once the weights are gathered, the other ranks return; they do not wait in
    a barrier while rank 0 writes the checkpoint (a large save outlasts a collective's
    timeout). Rank 1's barrier calls after the gather are reported by the worker."""
    script = tmp_path / "worker.py"
    script.write_text(SAVE_WORKER)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    spec = SPEC.model_copy(update={"zero_stage": 2}).model_dump_json()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", str(script), snapshot, str(tiny_lm),
                           str(tmp_path / "out"), spec],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 1 returned, checkpoint None" in proc.stdout
    assert "rank 0 returned, checkpoint" in proc.stdout and (tmp_path / "out").is_dir()
    assert "waited for rank 0's save" not in proc.stdout
