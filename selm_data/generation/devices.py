"""Where a model runs and in what precision: one small function each, shared by every model.

`device` in the manifest is `auto`, `cpu`, `cuda` or `cuda:N`. `auto` is this process's GPU when
torch sees one, else the CPU. "This process's GPU" is its local rank's when a launcher (torchrun,
deepspeed, srun, mpirun; see `launcher`) sets one, else GPU 0; after `launcher.bind_gpus` has
narrowed CUDA_VISIBLE_DEVICES to the rank's own block, GPU 0 of that block. `cuda` alone
means the same GPU as `auto` would pick.

`dtype` is `auto`, `float32`, `bfloat16` or `float16`. `auto` is bf16 on a GPU that supports it
(fp16 on one that does not), fp32 on the CPU: CPU kernels of bf16 are slow, and bf16 greedy text
on vLLM CPU differed between two identical runs (design.md §6), while fp32 repeated exactly.
"""

from __future__ import annotations

from typing import Any

from selm_data.errors import SelmError
from selm_data.generation import launcher

DTYPES = ("float32", "bfloat16", "float16")


def local_rank() -> int:
    """This process's rank on its node, as its launcher set it (LOCAL_RANK, SLURM_LOCALID,
    OMPI_COMM_WORLD_LOCAL_RANK; see `launcher`); 0 for a plain process."""
    return launcher.local_rank()


def resolve_device(requested: str = "auto") -> Any:
    """The torch.device a model and its inputs go to.

    Raises:
        SelmError: a GPU is asked for and torch sees none, or a GPU index that does not exist.
    """
    import torch

    if requested == "cpu":
        return torch.device("cpu")
    if requested == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if requested not in ("auto", "cuda") and not (requested.startswith("cuda:")
                                                  and requested[5:].isdigit()):
        raise SelmError(f"device {requested!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise SelmError(f"device {requested!r} asks for a GPU, but torch {torch.__version__} "
                        "sees none (a CPU build of torch, or no visible GPU): set the device "
                        "to auto or cpu, or install torch with CUDA")
    count = torch.cuda.device_count()
    mine = requested in ("auto", "cuda")
    index = launcher.gpu_index() if mine else int(requested.split(":", 1)[1])
    if index >= count:
        where = "LOCAL_RANK" if mine else f"device {requested!r}"
        raise SelmError(f"{where} names GPU {index}, but this process sees {count} GPU(s) "
                        "(CUDA_VISIBLE_DEVICES narrows them): give an index below "
                        f"{count}")
    return torch.device(f"cuda:{index}")


def resolve_dtype(requested: str, device: Any) -> Any:
    """The torch dtype of a model's weights on `device` (see the module docstring for auto)."""
    import torch

    if requested != "auto":
        if requested not in DTYPES:
            raise SelmError(f"dtype {requested!r}: use auto or one of {', '.join(DTYPES)}")
        return getattr(torch, requested)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def free_accelerator_memory() -> None:
    """Give the memory of models just dropped back: collect their cycles, then empty torch's
    CUDA cache so the next model (or another process) can have it. Harmless on CPU."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
