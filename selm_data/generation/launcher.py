"""Which rank of which launcher this process is, and which GPUs are its own.

selm has no cluster software: the launchers users already train with place the processes, and
each process learns its place from the variables they set (design.md §7, "ranks are shards"):

    launcher             rank / world size / local rank, and the launch's one id
    torchrun, deepspeed  RANK / WORLD_SIZE / LOCAL_RANK;
                         TORCHELASTIC_RUN_ID (else MASTER_ADDR, MASTER_PORT), restart count
    mpirun (Open MPI)    OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK; OMPI_MCA_ess_base_jobid
    srun (SLURM)         SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; SLURM_JOB_ID, SLURM_STEP_ID

The innermost launcher wins: torchrun started by srun (one agent per node) sets RANK for its
workers, and those are the ranks that build. No collective is ever set up: the store is where
ranks meet.

A rank's GPUs are a block of `gpus_per_rank` (the policy's tensor-parallel size) of the node's
visible GPUs, starting at local rank x block size. `bind_gpus` narrows CUDA_VISIBLE_DEVICES to
that block before any model loads, so vLLM (which takes the first visible GPUs), PairRM and
every `device: auto` model land on this rank's GPUs, not all on GPU 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from selm_data.errors import SelmError

# Set by bind_gpus to the block it chose: CUDA_VISIBLE_DEVICES equal to it means "this process
# sees only its own GPUs", so `device: auto` is GPU 0 of them, not GPU LOCAL_RANK.
BOUND = "SELM_RANK_GPUS"
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one folder per GPU; reading it starts no CUDA

# (launcher, rank, world size, local rank, launch id variables), innermost launcher first.
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK",
     ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")),
    ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     ("OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE")),
    ("srun", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
     ("SLURM_JOB_ID", "SLURM_STEP_ID")),
)


@dataclass(frozen=True)
class Launch:
    """This process's place: rank `rank` of `world` (0 of 1 for a plain process)."""

    launcher: str  # torchrun (also deepspeed), mpirun, srun, or "none"
    rank: int
    world: int
    local_rank: int
    launch_id: str  # the same in every rank of one launch; differs between launches

    @property
    def launched(self) -> bool:
        return self.launcher != "none"

    def prefix(self) -> str:
        """The start of each of this rank's log lines."""
        return f"[rank {self.rank}/{self.world}]" if self.launched else ""


def _number(name: str, env: dict[str, str]) -> int:
    text = env[name]
    try:
        value = int(text)
    except ValueError:
        raise SelmError(f"{name} is {text!r}, not a number: fix the launcher's environment "
                        "or unset it") from None
    if value < 0:
        raise SelmError(f"{name} is {value}; it must be 0 or more")
    return value


def detect(env: dict[str, str] | None = None) -> Launch:
    """The launcher that started this process, from its variables (see the module table).

    Raises:
        SelmError: a launcher's variables are partly set or contradict each other.
    """
    env = dict(os.environ) if env is None else env
    for name, rank_var, world_var, local_var, id_vars in _LAUNCHERS:
        present = [v for v in (rank_var, world_var) if v in env]
        if not present:
            continue
        if len(present) == 1:
            missing = world_var if rank_var in env else rank_var
            raise SelmError(f"{present[0]} is set but {missing} is not: {name} sets both. "
                            "Set the other, or unset it to run as one process")
        rank, world = _number(rank_var, env), _number(world_var, env)
        if not rank < world:
            raise SelmError(f"{rank_var}={rank} but {world_var}={world}: a rank must be below "
                            "the world size")
        local = _number(local_var, env) if local_var in env else rank
        launch_id = "/".join(f"{v}={env[v]}" for v in id_vars if v in env and env[v] != "none")
        return Launch(name, rank, world, local, f"{name}:{launch_id}")
    local = _number("LOCAL_RANK", env) if "LOCAL_RANK" in env else 0
    return Launch("none", 0, 1, local, "none")


def local_rank() -> int:
    """This process's rank on its node: LOCAL_RANK, SLURM_LOCALID or Open MPI's; 0 alone."""
    return detect().local_rank


def gpu_index() -> int:
    """The GPU `device: auto` means, among those this process sees: 0 after `bind_gpus` (the
    process sees only its own), else its local rank's."""
    bound = os.environ.get(BOUND)
    if bound is not None and bound == os.environ.get("CUDA_VISIBLE_DEVICES"):
        return 0
    return local_rank()


def node_gpus(env: dict[str, str] | None = None) -> list[str] | None:
    """The GPUs this node lets the process see, as CUDA_VISIBLE_DEVICES entries; None when it
    has none that we can tell (a CPU machine). Never initialises CUDA: a process that did could
    no longer narrow its GPUs."""
    env = dict(os.environ) if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g for g in (x.strip() for x in env["CUDA_VISIBLE_DEVICES"].split(",")) if g]
    if NVIDIA_GPUS.is_dir():
        return [str(i) for i in range(len(list(NVIDIA_GPUS.iterdir())))]
    return None


def gpu_block(launch: Launch, gpus_per_rank: int, gpus: list[str]) -> list[str]:
    """The `gpus_per_rank` GPUs of this rank: a block at local rank x block size.

    Raises:
        SelmError: the node has too few GPUs for its ranks; says how many ranks fit.
    """
    if len(gpus) == gpus_per_rank:  # the launcher narrowed them already (srun --gpus-per-task)
        return list(gpus)
    start = launch.local_rank * gpus_per_rank
    if start + gpus_per_rank > len(gpus):
        fit = len(gpus) // gpus_per_rank
        raise SelmError(
            f"rank {launch.rank} (local rank {launch.local_rank} on this node) needs GPUs "
            f"{start}..{start + gpus_per_rank - 1} ({gpus_per_rank} per rank: "
            f"generation.vllm.tensor_parallel_size), but this node shows {len(gpus)} "
            f"(CUDA_VISIBLE_DEVICES={','.join(gpus) or '(empty)'}): start at most {fit} "
            "processes per node (torchrun --nproc_per_node, srun --ntasks-per-node)")
    return gpus[start:start + gpus_per_rank]


def bind_gpus(launch: Launch, gpus_per_rank: int = 1) -> list[str] | None:
    """Narrow CUDA_VISIBLE_DEVICES to this rank's block (call before anything touches CUDA);
    the block chosen, or None when there is nothing to bind (one plain process, or no GPU).
    Binding twice keeps the first block: a child of a bound process is already narrowed."""
    if not launch.launched:
        return None
    if os.environ.get(BOUND) is not None and os.environ.get(BOUND) == os.environ.get(
            "CUDA_VISIBLE_DEVICES"):
        return os.environ[BOUND].split(",")
    gpus = node_gpus()
    if not gpus:
        return None
    block = gpu_block(launch, gpus_per_rank, gpus)
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ[BOUND] = ",".join(block)
    return block


def without_local_rank(args: list[str]) -> list[str]:
    """The `deepspeed` launcher passes `--local_rank=N` before the subcommand, where no option
    of ours can take it; the same number is in LOCAL_RANK, which `detect` (and
    selm_train's init_distributed) read."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg.split("=")[0] in ("--local_rank", "--local-rank"):
            if "=" not in arg:
                skip = True
                value = args[i + 1] if i + 1 < len(args) else ""
            else:
                value = arg.split("=", 1)[1]
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(arg)
    return out
