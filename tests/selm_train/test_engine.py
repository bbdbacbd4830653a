"""The DeepSpeed engine: configs and schedules by hand, and real training runs in subprocesses.

The runs (engine_worker.py) train a tiny Llama with DPO for 4 optimizer steps of global batch 4:
once as a plain process through ZeRO stages 0-3 (4 accumulated micro-batches), and once under
torchrun with 2 processes through ZeRO-2 and ZeRO-3 (2 micro-batches each). Every run must log
the same losses and end with the same weights, within fp32 summation noise.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import require
from selm_data.errors import SelmError
from selm_data.manifest import TrainSpec
from selm_train.engine import GRADIENT_CLIPPING, ds_config, lr_lambda, num_warmup_steps

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("engine_worker.py")
RUN_TIMEOUT_S = 300  # measured: ~12 s for one process, ~20 s for two, on 2 shared cores
# The worker's schedule: peak 1e-3, 4 steps, warmup ceil(0.25 * 4) = 1 step, then cosine:
# 0, 1e-3, 1e-3 * 0.5 * (1 + cos(pi/3)) = 7.5e-4, 1e-3 * 0.5 * (1 + cos(2 pi/3)) = 2.5e-4.
WORKER_LRS = [0.0, 1e-3, 7.5e-4, 2.5e-4]


# ---- config ----------------------------------------------------------------------------------

def spec(**kw) -> TrainSpec:
    return TrainSpec(**{"global_batch_size": 16, "micro_batch_size": 2, **kw})


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_config_per_stage(stage):
    c = ds_config(spec(zero_stage=stage), world_size=2, device="cpu")
    assert c["zero_optimization"]["stage"] == stage
    assert c["train_batch_size"] == 16
    assert c["train_micro_batch_size_per_gpu"] == 2
    assert c["gradient_accumulation_steps"] == 4  # 16 / (2 x 2)
    assert c["gradient_clipping"] == GRADIENT_CLIPPING == 1.0
    gathers = c["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save")
    assert gathers is (True if stage == 3 else None)
    # torch's AdamW and LambdaLR are passed in; a DeepSpeed optimizer would compile ops
    assert "optimizer" not in c and "scheduler" not in c


@pytest.mark.parametrize(("world_size", "accum"), [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_accumulation_keeps_the_global_batch(world_size, accum):
    c = ds_config(spec(), world_size=world_size, device="cpu")
    assert c["gradient_accumulation_steps"] == accum
    assert accum * 2 * world_size == c["train_batch_size"] == 16


def test_batch_that_does_not_split_says_what_to_change():
    with pytest.raises(SelmError, match=r"global_batch_size 16 .*micro_batch_size 2 x 3 "
                                        r"processes \(= 6\): change .* multiple of 6"):
        ds_config(spec(), world_size=3, device="cpu")


@pytest.mark.parametrize(("device", "precision", "bf16"), [
    ("cuda", "auto", True), ("cuda", "bf16", True), ("cuda", "fp32", False),
    ("cpu", "auto", False), ("cpu", "fp32", False), ("cpu", "bf16", True)])
def test_precision(device, precision, bf16):
    c = ds_config(spec(precision=precision), world_size=1, device=device)
    assert c["bf16"] == {"enabled": bf16}
    assert c["fp16"] == {"enabled": False}


# ---- schedule --------------------------------------------------------------------------------

# 10 steps, 2 of warmup; decay over the 8 others, progress p = (k - 2) / 8.
# cos(pi/8) = 0.92387953, cos(pi/2) = 0, cos(7pi/8) = -0.92387953.
HAND = {
    "cosine": {0: 0.0, 1: 0.5, 2: 1.0, 3: 0.96193977, 6: 0.5, 9: 0.03806023, 10: 0.0},
    "linear": {0: 0.0, 1: 0.5, 2: 1.0, 3: 0.875, 6: 0.5, 9: 0.125, 10: 0.0},
    "constant": {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.0, 6: 1.0, 9: 1.0},
}


@pytest.mark.parametrize("kind", sorted(HAND))
def test_lr_lambda_by_hand(kind):
    f = lr_lambda(kind, 2, 10)
    for step, expected in HAND[kind].items():
        assert f(step) == pytest.approx(expected, abs=1e-8), step


def test_lr_lambda_without_warmup_starts_at_the_peak():
    assert [lr_lambda("cosine", 0, 4)(k) for k in range(4)] == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 1), (1, 3), (3, 30), (12, 120), (5, 5)])
def test_lr_lambda_matches_transformers(kind, warmup, total):
    """transformers' schedules (the paper's public code trained through HF Trainer) as an
    independent implementation, stepped through a real optimizer."""
    import transformers

    make = {"cosine": transformers.get_cosine_schedule_with_warmup,
            "linear": transformers.get_linear_schedule_with_warmup,
            "constant": transformers.get_constant_schedule_with_warmup}[kind]
    args = (warmup,) if kind == "constant" else (warmup, total)
    opt_hf = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    hf = make(opt_hf, *args)
    ours = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(kind, warmup, total))
    for _ in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(opt_hf.param_groups[0]["lr"], abs=1e-12)
        opt.step(), opt_hf.step(), ours.step(), hf.step()


@pytest.mark.parametrize(("total", "ratio", "warmup"),
                         [(3, 0.1, 1), (10, 0.1, 1), (100, 0.1, 10), (7, 0.0, 0), (4, 0.25, 1)])
def test_warmup_steps_round_up(total, ratio, warmup):
    assert num_warmup_steps(total, ratio) == warmup


@pytest.mark.parametrize(("args", "match"), [
    (("cosine", 0, 0), "total_steps"), (("cosine", 5, 4), "warmup_steps"),
    (("exponential", 0, 4), "unknown lr_scheduler")])
def test_lr_lambda_refuses(args, match):
    with pytest.raises(ValueError, match=match):
        lr_lambda(*args)


# ---- real runs -------------------------------------------------------------------------------

def run_worker(out: Path, stages: str, *, processes: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 shared cores
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node", str(processes)]
    out.mkdir(parents=True)
    proc = subprocess.run([*launcher, str(WORKER), "--out", str(out), "--stages", stages],
                          env=env, cwd=out, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[dict, Path]:
    require("deepspeed", "'selm[train]'")
    out = tmp_path_factory.mktemp("engine") / "one"
    return run_worker(out, "0,1,2,3", processes=1), out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[dict, Path]:
    require("deepspeed", "'selm[train]'")
    out = tmp_path_factory.mktemp("engine") / "two"
    return run_worker(out, "2,3", processes=2), out


def assert_same_run(a: dict, a_dir: Path, b: dict, b_dir: Path) -> None:
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]),
                               rtol=1e-5, atol=0.0)
    wa = load_file(a_dir / "model.safetensors")
    wb = load_file(b_dir / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_one_process_every_stage_trains_the_same(one_process):
    result, out = one_process
    base = result["stage0"]
    assert base["lrs"] == pytest.approx(WORKER_LRS, abs=1e-12)
    assert base["gradient_accumulation_steps"] == 4 and base["world_size"] == 1
    # the gathered weights are the trained ones: not the initial model's
    assert abs(base["weight_sum"] - base["initial_weight_sum"]) > 0.1
    for stage in (1, 2, 3):
        run = result[f"stage{stage}"]
        assert run["lrs"] == pytest.approx(WORKER_LRS, abs=1e-12)
        assert_same_run(base, out / "stage0", run, out / f"stage{stage}")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_match_one(one_process, two_processes, stage):
    (one, one_dir), (two, two_dir) = one_process, two_processes
    run = two[f"stage{stage}"]
    assert run["gradient_accumulation_steps"] == 2 and run["world_size"] == 2
    assert run["lrs"] == pytest.approx(WORKER_LRS, abs=1e-12)
    assert_same_run(one[f"stage{stage}"], one_dir / f"stage{stage}", run,
                    two_dir / f"stage{stage}")


@pytest.mark.parametrize(("offload", "stage", "optimizer", "params"), [
    ("none", 3, False, False), ("optimizer", 1, True, False), ("optimizer", 2, True, False),
    ("optimizer+params", 3, True, True)])
def test_offload_config(offload, stage, optimizer, params):
    for device in ("cpu", "cuda"):
        c = ds_config(spec(offload=offload, zero_stage=stage), world_size=2, device=device)
        zero = c["zero_optimization"]
        assert ("offload_optimizer" in zero) is optimizer
        assert ("offload_param" in zero) is params
        if optimizer:
            assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": device == "cuda"}
            assert c["zero_force_ds_cpu_optimizer"] is False  # torch's AdamW on the CPU


@pytest.mark.parametrize(("train", "field"), [
    ({"offload": "optimizer", "zero_stage": 0}, "zero_stage"),
    ({"offload": "optimizer+params", "zero_stage": 2}, "zero_stage: 3"),
    ({"offload": "cpu"}, "offload"),
    ({"lora": {"r": 4, "rank": 8}}, "lora.rank"),
    ({"lora": {"target_modules": []}}, "lora.target_modules"),
    ({"lora": {"r": 0}}, "lora.r")])
def test_offload_and_lora_settings_are_checked(train, field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field.replace("+", r"\+")):
        TrainSpec(**train)
