"""The DeepSpeed engine: config, process group, optimizer and schedule, and full weights back.

    ds_config(spec, world_size=, device=)   -> dict   the DeepSpeed JSON config, ZeRO stage 0-3
    lr_lambda(kind, warmup_steps, total_steps) -> f   the learning-rate factor of optimizer step k
    init_distributed()                      -> DistInfo  gloo on CPU, nccl on GPU
    make_engine(model, config, ...)         -> engine     torch AdamW + LambdaLR under DeepSpeed
    gather_state_dict(engine)               -> {name: tensor} on rank 0, None elsewhere

One trainer runs as a plain single process (`python -m ...`), under `torchrun`, or under the
`deepspeed` launcher: `init_distributed` fills in a one-process world when no launcher did.
DeepSpeed's own optimizers and schedulers are not used: torch's AdamW needs no compiled ops
(DeepSpeed's fused and CPU Adam are C++/CUDA extensions built at first use), and the schedule is
a plain `LambdaLR` whose factors match transformers' `get_*_schedule_with_warmup`, which the
paper's public code (HF Trainer) used.

Precision: bf16 on GPU (`precision` auto or bf16), fp32 on CPU unless bf16 is asked for (slow,
for tests of the mixed-precision branches). DeepSpeed keeps fp32 master
weights and gradient accumulation for bf16 (its BF16 optimizer at stage 0, ZeRO's fp32
partitions at stages 1-3), so only forward and backward run in bf16.

deepspeed is imported inside the functions that need it, so configs and schedules can be built
and checked (and a manifest refused) on a machine without it.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import Tensor

from selm_data.errors import SelmError

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

__all__ = [
    "DistInfo",
    "ds_config",
    "gather_state_dict",
    "init_distributed",
    "lr_lambda",
    "make_engine",
    "num_warmup_steps",
]

Device = Literal["cpu", "cuda"]
Schedule = Literal["cosine", "linear", "constant"]

# Gradient-norm clipping at 1.0, as transformers' TrainingArguments (max_grad_norm) in the
# paper's public code and TRL's DPO recipes: DPO at lr 5e-7 rarely reaches it, so it changes
# nothing on a healthy run and bounds the one step after a batch with an outlier margin (SELM's
# y_ref term and SAIL's squared terms have no lower bound).
GRADIENT_CLIPPING = 1.0


class BatchSpec(Protocol):
    """The fields of `selm_data.manifest.TrainSpec` that shape the engine."""

    # properties: read-only members, so TrainSpec's Literal-typed fields fit them
    @property
    def zero_stage(self) -> int: ...
    @property
    def precision(self) -> str: ...
    @property
    def micro_batch_size(self) -> int: ...
    @property
    def global_batch_size(self) -> int: ...
    @property
    def offload(self) -> str: ...


def ds_config(spec: BatchSpec, *, world_size: int, device: str) -> dict[str, Any]:
    """The DeepSpeed config for `spec` on `world_size` processes of `device` (a
    `torch.device.type`: "cpu" or "cuda", anything else is a ValueError).

    gradient_accumulation_steps = global_batch_size / (micro_batch_size * world_size), so the
    global batch of the manifest is the same on 1 process or 64: the manifest's learning rate
    and schedule then mean the same thing everywhere.

    Raises:
        SelmError: the global batch does not split evenly over the processes.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if spec.zero_stage not in (0, 1, 2, 3):
        raise SelmError(f"train.zero_stage must be 0, 1, 2 or 3, got {spec.zero_stage}")
    per_step = spec.micro_batch_size * world_size
    if spec.global_batch_size % per_step:
        raise SelmError(
            f"train.global_batch_size {spec.global_batch_size} is not a multiple of "
            f"train.micro_batch_size {spec.micro_batch_size} x {world_size} processes "
            f"(= {per_step}): change global_batch_size to a multiple of {per_step}, or "
            f"micro_batch_size or the number of processes so that their product divides "
            f"{spec.global_batch_size}")
    # bf16 on CPU is slow but runs the same mixed-precision branches (DeepSpeed's BF16 optimizer,
    # ZeRO's fp32 partitions), so the tests exercise them without a GPU.
    bf16 = spec.precision == "bf16" or (device == "cuda" and spec.precision == "auto")
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    if spec.zero_stage == 3:
        # Gather the partitioned weights layer by layer onto rank 0 when saving, so a ZeRO-3
        # checkpoint is a plain transformers folder (gather_state_dict relies on it).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    extra: dict[str, Any] = {}
    if spec.offload in ("optimizer", "optimizer+params"):
        # ZeRO-Offload: the fp32 master weights and Adam state in CPU memory, the update on the
        # CPU by torch's AdamW (DeepSpeed's CPUAdam is faster but a C++ op compiled at first
        # use; DeepSpeed insists on it unless zero_force_ds_cpu_optimizer is off).
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device == "cuda"}
        extra["zero_force_ds_cpu_optimizer"] = False
    if spec.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": device == "cuda"}
    return {
        **extra,
        "train_batch_size": spec.global_batch_size,
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.global_batch_size // per_step,
        "gradient_clipping": GRADIENT_CLIPPING,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        # The trainer logs its own metrics; DeepSpeed's periodic prints would duplicate them.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def num_warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """ceil(warmup_ratio * total_steps), as transformers' TrainingArguments.get_warmup_steps."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    return math.ceil(warmup_ratio * total_steps)


def lr_lambda(kind: Schedule, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The factor of the peak learning rate at optimizer step `k` (0-based), for `LambdaLR`.

    Linear warmup from 0 over `warmup_steps` (step k of the warmup uses k / warmup_steps, so
    the first step's factor is 0 when there is a warmup), then
        cosine:   0.5 * (1 + cos(pi * p))   with p = (k - warmup) / (total - warmup)
        linear:   (total - k) / (total - warmup)
        constant: 1
    These are transformers' get_{cosine,linear,constant}_schedule_with_warmup, so the paper's
    recipes (cosine, warmup 0.1) give the same learning rate per step as its public code.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps], got {warmup_steps}")
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown lr_scheduler {kind!r}: use cosine, linear or constant")
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / decay_steps
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device  # where this process's model and batches go


_alone = False  # this process made its own world of one (never inherited by a child process)


def init_distributed(*, device: Device | None = None) -> DistInfo:
    """Join (or make) the process group: gloo on CPU, nccl on GPU.

    Under `torchrun` or the `deepspeed` launcher their RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT are used as they are. A plain single process (no RANK, and no
    MPI launcher's OMPI_COMM_WORLD_RANK) gets a world of one in an in-memory store, and the
    variables set (without them DeepSpeed goes looking for mpi4py).

    On CPU, DeepSpeed's shared-memory all-reduce (`deepspeed_shm_comm`, a C++ extension
    compiled at first use: about a minute on 2 cores) is switched off before the process group
    starts. DeepSpeed uses it only for inference tensor parallelism (`inference_all_reduce`);
    training collectives go through torch.distributed (gloo) either way.
    """
    import deepspeed

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = "gloo" if device == "cpu" else "nccl"
    global _alone
    # alone: a world of one, set up here (no launcher's variables), or inherited from a parent
    # that set them up so (its MASTER_PORT may be long gone), or a launcher's world of one
    _alone = _alone or ("RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ)
    alone = _alone or os.environ.get("WORLD_SIZE") == "1"
    if alone:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if device == "cpu":
        _skip_shm_comm()
    if alone and not torch.distributed.is_initialized():
        # A world of one meets in an in-memory store, not on a TCP port: two plain processes
        # starting at once could otherwise pick the same free port (EADDRINUSE). DeepSpeed
        # adopts a process group that exists.
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(),
                                             rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend)
    rank = torch.distributed.get_rank()
    world_size = torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        return DistInfo(rank, local_rank, world_size, torch.device("cuda", local_rank))
    return DistInfo(rank, local_rank, world_size, torch.device("cpu"))


def make_engine(
    model: torch.nn.Module,
    config: dict[str, Any],
    *,
    learning_rate: float,
    total_steps: int,
    lr_scheduler: Schedule,
    warmup_ratio: float,
    weight_decay: float = 0.0,
) -> DeepSpeedEngine:
    """Wrap `model` in a DeepSpeed engine with torch's AdamW and a warmup schedule.

    `total_steps` counts optimizer steps (global batches), not micro-batches: DeepSpeed steps
    the scheduler once per optimizer step, so step k trains at
    `learning_rate * lr_lambda(lr_scheduler, warmup, total_steps)(k)`. AdamW keeps torch's
    defaults (betas 0.9, 0.999, eps 1e-8), which are transformers'; weight decay applies to
    matrices only (not to norms and biases), as in transformers and nanoGPT. Call
    `init_distributed` first.
    """
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate)
    factor = lr_lambda(lr_scheduler, num_warmup_steps(total_steps, warmup_ratio), total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=config)
    return engine


def gather_state_dict(engine: DeepSpeedEngine) -> dict[str, Tensor] | None:
    """The full model weights on rank 0 (None on other ranks), on CPU, for `save_pretrained`.

    Every rank must call it: at ZeRO-3 the weights are partitioned and are gathered one layer at
    a time (DeepSpeed's `_zero3_consolidated_16bit_state_dict`, which HF accelerate uses too).
    The dtype is the model's: bf16 on GPU, fp32 on CPU. Tensors are copies, so training on
    afterwards does not change them; tied weights stay tied (one tensor under both names).
    """
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if torch.distributed.get_rank() == 0 else None
    if state is None:
        return None
    copies: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], Tensor] = {}
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key not in copies:
            copies[key] = t.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out


def _skip_shm_comm() -> None:
    """Mark `deepspeed_shm_comm` incompatible so DeepSpeed does not compile it (see
    init_distributed). DeepSpeed probes op compatibility once per process into this dict and
    reads it back before building the op; it keeps the dict so that edits persist."""
    import deepspeed.ops

    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(ops, dict):
        ops["deepspeed_shm_comm"] = False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
