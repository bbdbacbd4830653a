"""One iteration's training: a snapshot in, a registered checkpoint out.

The recipe, top to bottom (torchtune-style: one readable function, no trainer class):

1. join the process group (a plain process, `torchrun` or `deepspeed` alike);
2. resolve and verify the snapshot, load the starting policy (the reference: SELM's reference
   for iteration t is the policy that generated iteration t's data);
3. tokenise with the policy's chat template;
4. reference log-probs, once per snapshot and reference model, cached beside the snapshot, so
   a training step runs only the policy (the paper's code recomputed them every step);
5. DeepSpeed engine (ZeRO 0-3), then global batches of chosen, rejected and y_ref in one
   forward each micro-batch, the loss of the manifest (dpo, ipo or selm; or sail, where each
   example's seeded route picks the pair it trains on: the dataset pair or the policy pair);
6. the gathered weights saved as a checkpoint with its lineage, registered in the store.

Global batch g of epoch e is the same pairs whatever the number of processes: the epoch's
order is a seeded permutation, and process r takes micro-batches r, r + W, ... of each global
batch, so one process and two give the same losses (tests/selm_train/test_train.py).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl
import torch

from selm_data.errors import SelmError
from selm_data.generation.models import ResolvedModel, resolve_policy
from selm_data.manifest import LoraSpec, TrainSpec
from selm_data.store.progress import steps
from selm_data.store.schema import canonical_json
from selm_data.store.store import open_store
from selm_train.checkpoint import (
    ADAPTER_DIR,
    CheckpointInfo,
    parent_checkpoint,
    register_checkpoint,
    save_checkpoint,
)
from selm_train.data import (
    Batch,
    SnapshotRef,
    TokenizedExample,
    collate,
    read_examples,
    resolve_snapshot,
    tokenize,
)
from selm_train.engine import (
    DistInfo,
    ds_config,
    gather_state_dict,
    init_distributed,
    make_engine,
)
from selm_train.logps import SequenceLogps
from selm_train.losses import (
    ROUTE_NAMES,
    ROUTE_PP,
    ROUTE_PR,
    LossOutput,
    dpo_loss,
    ipo_loss,
    sail_loss,
    sail_routes,
    selm_loss,
)

Progress = Callable[[dict[str, float]], None]  # called on rank 0 after each optimizer step
REFERENCE_DIR = "reference"


@dataclass
class TrainResult:
    checkpoint: Path | None  # None on ranks other than 0
    checkpoint_id: str | None
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    nonfinite: int = 0  # sail: examples whose loss was not finite, zeroed and left out


def train(snapshot: str, policy: str, output: Path, spec: TrainSpec, *, iteration: int,
          register: bool = True, progress: Progress | None = None) -> TrainResult:
    """Train `policy` on `snapshot` (a folder, or STORE@NAME) with `spec`; save to `output`.

    With `register` and a snapshot named through its store, the checkpoint is added to that
    store's `checkpoints` table, where `selm-data build --iter {iteration + 1}` finds it.
    """
    dist = init_distributed()
    torch.manual_seed(spec.seed)
    snap = resolve_snapshot(snapshot)
    model_ref = resolve_policy(policy)
    tokenizer, model = _load(model_ref, dist.device, spec)
    policy_logps = SequenceLogps(model)
    examples = tokenize(read_examples(snap), tokenizer, max_length=spec.max_length,
                        max_prompt_length=spec.max_prompt_length)
    with_ref = spec.loss == "selm"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    if spec.loss == "sail" and (spec.sail.p > 0 or spec.sail.g > 0) and not snap.policy_pair:
        raise SelmError(f"snapshot {snap.name} has no policy pair, which SAIL-PP and SAIL-PR "
                        "(train.sail.p, .g) train on: build the iteration with pairing.rule "
                        "sail and export it again, or train SAIL-DP alone (train.sail.r)")
    reference = reference_logps(policy_logps, examples, snap, model_ref, spec, pad, dist)

    config = ds_config(spec, world_size=dist.world_size,
                       device="cuda" if dist.device.type == "cuda" else "cpu")
    steps_per_epoch = len(examples) // spec.global_batch_size
    if steps_per_epoch == 0:
        raise SelmError(f"snapshot {snap.name} has {len(examples)} pairs, fewer than one global "
                        f"batch ({spec.global_batch_size}): lower train.global_batch_size")
    total = steps_per_epoch * spec.epochs
    use_cache = model.config.use_cache
    prepare_for_training(policy_logps, spec)
    if spec.lora is not None:  # after the reference pass, which so ran the base model alone
        policy_logps.lm = with_lora(model, spec.lora)
    engine = make_engine(policy_logps, config, learning_rate=spec.learning_rate, total_steps=total,
                         lr_scheduler=spec.lr_scheduler, warmup_ratio=spec.warmup_ratio)
    micro, accum = spec.micro_batch_size, config["gradient_accumulation_steps"]
    history: list[dict[str, float]] = []
    nonfinite = 0
    clock = time.perf_counter()
    for epoch in range(spec.epochs):
        order = torch.randperm(len(examples),
                               generator=torch.Generator().manual_seed(spec.seed + epoch))
        routes = sail_plan(examples, spec, epoch) if spec.loss == "sail" else None
        for step in range(steps_per_epoch):
            start = step * spec.global_batch_size
            mine = [order[start + m * micro:start + (m + 1) * micro].tolist()
                    for m in range(dist.rank, spec.global_batch_size // micro, dist.world_size)]
            assert len(mine) == accum
            sums: dict[str, float] = {}
            lr = engine.get_lr()[0]  # this step's rate: the scheduler moves after the step
            for indices in mine:
                if routes is None:
                    batch = collate([examples[i] for i in indices], pad, with_reference=with_ref)
                    out = _step_loss(engine, batch.to(dist.device), reference, spec)
                else:
                    out = _sail_step(engine, [examples[i] for i in indices],
                                     routes[0][indices], routes[1][indices], reference, spec,
                                     pad, dist.device)
                _stop_if_nonfinite(out, len(history) + 1, dist)
                engine.backward(out.losses.mean())
                engine.step()
                for key, value in _metrics(out).items():
                    sums[key] = sums.get(key, 0.0) + value / accum
            row = _all_mean(sums, dist)
            row.update(step=len(history) + 1, epoch=epoch, lr=lr)
            row["time/step_s"], clock = time.perf_counter() - clock, time.perf_counter()
            if dist.device.type == "cuda":  # this rank's peak since the start, in GiB
                row["memory/peak_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
            nonfinite += round(row.get("sail/nonfinite", 0.0) * spec.global_batch_size)
            history.append(row)
            if progress is not None and dist.rank == 0:
                progress(row)
    state = gather_state_dict(engine)
    if dist.rank != 0:  # no barrier: rank 0's save may take longer than a collective's timeout
        return TrainResult(None, None, total, history, nonfinite)
    assert state is not None
    state = {name.removeprefix("lm."): t for name, t in state.items()}
    store = open_store(snap.store) if snap.store is not None else None
    info = CheckpointInfo(
        iteration=iteration, snapshot_name=snap.name, snapshot_id=snap.snapshot_id,
        snapshot_hash=snap.content_hash, base_model=model_ref.reference,
        parent_id=parent_checkpoint(store, model_ref.path) if store else None,
        loss=spec.loss, config={**spec.model_dump(), "world_size": dist.world_size,
                                "gradient_accumulation_steps": accum, "optimizer_steps": total},
    )
    model.config.use_cache = use_cache  # off for training only: generation wants its cache
    if spec.lora is None:
        folder = save_checkpoint(model, tokenizer, output, info, state_dict=state)
    else:
        merged, adapter = merge_lora(model_ref, spec.lora, state, output)
        merged.config.use_cache = use_cache
        folder = save_checkpoint(merged, tokenizer, output, replace(info, adapter=ADAPTER_DIR),
                                 adapter=adapter)
    checkpoint_id = None
    if register and store is not None:
        checkpoint_id = register_checkpoint(store, folder)["checkpoint_id"]
    return TrainResult(folder, checkpoint_id, total, history, nonfinite)


def _load(model: ResolvedModel, device: torch.device, spec: TrainSpec) -> tuple[Any, Any]:
    """The tokenizer and the model, its weights read straight onto `device` (`device_map`):
    not first into this process's CPU memory, which on 8 ranks is 8 full copies at once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = spec.precision == "bf16" or (spec.precision == "auto" and device.type == "cuda")
    tokenizer = AutoTokenizer.from_pretrained(model.path, revision=model.revision)
    policy = AutoModelForCausalLM.from_pretrained(
        model.path, revision=model.revision, use_safetensors=True,
        dtype=torch.bfloat16 if bf16 else torch.float32, device_map={"": device},
    )
    return tokenizer, policy


def prepare_for_training(model: SequenceLogps, spec: TrainSpec) -> None:
    """Put the loaded model (eval mode, as `from_pretrained` leaves it) in training mode.

    transformers checkpoints a layer only when the layer is in training mode, and keeps a KV
    cache unless `use_cache` is off; without both, `gradient_checkpointing` is a flag that saves
    nothing (a 7B model at the recipes' micro-batch runs out of memory on the first backward).
    Dropout is switched off, as TRL's DPO does by default: the policy's log-probs must be the
    same function as the cached reference's, or the first step's log-ratios are noise.
    """
    model.lm.config.use_cache = False
    if spec.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()


def with_lora(model: Any, lora: LoraSpec) -> Any:
    """`model` with LoRA adapters (PEFT) on `lora.target_modules`: the base weights frozen,
    the adapters' B matrices zero, so step 1's policy is the base model exactly."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise SelmError("train.lora needs peft: pip install 'selm[train]'") from e
    targets = lora.target_modules if isinstance(lora.target_modules, str) else \
        list(lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merge_lora(model_ref: ResolvedModel, lora: LoraSpec, state: dict[str, torch.Tensor],
               output: Path) -> tuple[Any, Path]:
    """The trained adapters merged into a fresh CPU copy of the base model (a plain model,
    which the next build's vLLM loads as any other), and the adapter saved on its own beside
    `output` (save_checkpoint moves it into the checkpoint). Rank 0 only: under ZeRO-3 its own
    copy holds a shard of the weights, so the gathered `state` is loaded into a new one."""
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    dtype = next(iter(state.values())).dtype
    base = AutoModelForCausalLM.from_pretrained(model_ref.path, revision=model_ref.revision,
                                                use_safetensors=True, dtype=dtype)
    peft_model = with_lora(base, lora)
    missing, unexpected = peft_model.load_state_dict(state, strict=False)
    if unexpected or any("lora_" in name for name in missing):
        raise SelmError(f"the trained LoRA weights do not fit a fresh copy of {model_ref.path}: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    adapter = output.with_name(f".{output.name}.adapter")
    peft_model.save_pretrained(adapter, state_dict=get_peft_model_state_dict(peft_model),
                               safe_serialization=True)
    return peft_model.merge_and_unload(), adapter


def _forward(model: Any, batch: Batch) -> torch.Tensor:
    """Summed response log-probs of every row of `batch`, in one forward pass of `model` (a
    `SequenceLogps`, or the DeepSpeed engine around one): the full logits never exist."""
    return model(batch.input_ids, batch.attention_mask, batch.loss_mask)


def _step_loss(engine: Any, batch: Batch, reference: dict[str, tuple[float, ...]],
               spec: TrainSpec) -> LossOutput:
    policy = batch.split(_forward(engine, batch))
    ref = torch.tensor([reference[p] for p in batch.pair_ids], dtype=policy[0].dtype,
                       device=policy[0].device).T
    if spec.loss == "selm":
        return selm_loss(policy[0], policy[1], policy[2], ref[0], ref[1], ref[2],
                         beta=spec.beta, alpha=spec.alpha)
    if spec.loss == "ipo":
        lengths = batch.split(batch.loss_mask.sum(dim=1))
        return ipo_loss(policy[0], policy[1], ref[0], ref[1], spec.beta,
                        chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    return dpo_loss(policy[0], policy[1], ref[0], ref[1], spec.beta)


def _stop_if_nonfinite(out: LossOutput, step: int, dist: DistInfo) -> None:
    """Stop before a non-finite loss reaches the weights, on every rank at once: the count of
    non-finite losses is summed over the processes, so all raise the same error (one rank
    raising alone leaves the others waiting in the next collective until it times out).
    (sail_loss zeroes its own non-finite examples and reports them in `sail/nonfinite`, so a
    SAIL run goes on.)"""
    counts = torch.tensor([int((~torch.isfinite(out.losses.detach())).sum()),
                           out.losses.numel()], dtype=torch.int64, device=dist.device)
    if dist.world_size > 1:
        torch.distributed.all_reduce(counts)
    bad, total = counts.tolist()
    if bad:
        raise SelmError(f"step {step}: {bad} of {total} losses are not finite, "
                        "so training stopped before they reached the weights; lower "
                        "train.learning_rate or train.beta, or train in fp32 "
                        "(train.precision: fp32)")


# --- SAIL ---------------------------------------------------------------------------------------


def sail_plan(examples: Sequence[TokenizedExample], spec: TrainSpec,
              epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's SAIL route and its uniform draw (the DP / PP swap) in this epoch, by
    example index: seeded by the run's seed and the epoch alone, so one process and many draw
    the same. An example without a policy pair (a sample failed, or a snapshot not built with
    `pairing.rule: sail`) takes plain DPO where it drew SAIL-PP or SAIL-PR."""
    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch)
    routes = sail_routes(len(examples), r=spec.sail.r, p=spec.sail.p, g=spec.sail.g,
                         generator=generator)
    draws = torch.rand(len(examples), generator=generator, dtype=torch.float64)
    lacking = torch.tensor([ex.policy_chosen_ids is None for ex in examples])
    routes[lacking & ((routes == ROUTE_PP) | (routes == ROUTE_PR))] = 0
    return routes, draws


def _sail_view(ex: TokenizedExample, route: int) -> tuple[TokenizedExample, tuple[int, int]]:
    """The pair `route` trains on, as (chosen, rejected) of an example, and where its reference
    log-probs are in the cached tuple (chosen, rejected, y_ref, policy chosen, policy rejected):
    the dataset pair for DPO and SAIL-DP, the policy pair in the ranker's order for SAIL-PR
    and in the samples' order for SAIL-PP (which the policy's own preference orders)."""
    if route not in (ROUTE_PP, ROUTE_PR):
        return replace(ex, ref_ids=None), (0, 1)
    assert ex.policy_chosen_ids is not None and ex.policy_rejected_ids is not None
    pair, where = (ex.policy_chosen_ids, ex.policy_rejected_ids), (3, 4)
    if route == ROUTE_PP and ex.policy_swapped:
        pair, where = pair[::-1], where[::-1]
    return replace(ex, chosen_ids=pair[0], rejected_ids=pair[1], ref_ids=None), where


def _sail_step(engine: Any, examples: list[TokenizedExample], routes: torch.Tensor,
               draws: torch.Tensor, reference: dict[str, tuple[float, ...]], spec: TrainSpec,
               pad: int, device: torch.device) -> LossOutput:
    views = [_sail_view(ex, int(route)) for ex, route in zip(examples, routes, strict=True)]
    batch = collate([v for v, _ in views], pad, with_reference=False).to(device)
    policy_chosen, policy_rejected = batch.split(_forward(engine, batch))
    ref = torch.tensor([[reference[ex.pair_id][i] for i in where]
                        for ex, (_, where) in zip(examples, views, strict=True)],
                       dtype=policy_chosen.dtype, device=device).T
    out = sail_loss(policy_chosen, policy_rejected, ref[0], ref[1], spec.beta,
                    routes.to(device), draws=draws.to(device), rho=spec.sail.rho,
                    pi=spec.sail.pi, gamma=spec.sail.gamma,
                    extra_gradient=spec.sail.extra_gradient)
    del out.metrics["sail/route"]  # its mean means nothing; the shares below do
    for route, name in enumerate(ROUTE_NAMES):  # each route's share of the step's examples
        out.metrics[f"sail/{name}"] = (routes == route).to(policy_chosen.dtype).to(device)
    return out


def _metrics(out: LossOutput) -> dict[str, float]:
    row = {"loss": float(out.losses.detach().mean())}
    for key, value in out.metrics.items():
        row[key] = float(value.float().mean())
    return row


def _all_mean(values: dict[str, float], dist: DistInfo) -> dict[str, float]:
    """Each process's micro-batch means, averaged over processes (equal shares). The tensor is
    made on the process group's device: NCCL takes CUDA tensors only."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=dist.device)
    if dist.world_size > 1:
        torch.distributed.all_reduce(t)
        t /= dist.world_size
    return dict(zip(keys, t.tolist(), strict=True))


# --- reference log-probs ----------------------------------------------------------------------


def reference_logps(model: Any, examples: Sequence[TokenizedExample], snap: SnapshotRef,
                    model_ref: ResolvedModel, spec: TrainSpec, pad: int,
                    dist: DistInfo) -> dict[str, tuple[float, ...]]:
    """Summed log-probs of chosen, rejected (and y_ref; and for SAIL the policy pair, nan where
    a pair has none) under the reference model, by pair id.

    Computed once and kept in `<snapshot>/reference/<key>.parquet`, the key naming the model's
    fingerprint, the dtype and the truncation: the reference is fixed within an iteration, so
    every later run on this snapshot (another loss, a restart) skips the pass.

    Every process computes its share (examples r, r + W, ...) and writes it to a part file;
    rank 0 joins the parts into the cache, whose `rank` column says who computed each pair. So
    8 processes take an eighth of one's time (one process computing all while 7 wait in a
    barrier passes the collective timeout on a large snapshot), and a run killed midway keeps
    the parts it finished (parts are per world size).
    """
    with_ref = spec.loss == "selm" or all(ex.ref_ids is not None for ex in examples)
    described = {
        "model": model_ref.fingerprint, "dtype": str(next(model.parameters()).dtype),
        "max_length": spec.max_length, "max_prompt_length": spec.max_prompt_length,
        "with_ref": with_ref, "snapshot": snap.content_hash,
    }
    if snap.policy_pair:
        described["policy_pair"] = True
    key = hashlib.sha256(canonical_json(described).encode()).hexdigest()[:24]
    path = snap.folder / REFERENCE_DIR / f"{key}.parquet"
    if _any_rank(not path.is_file(), dist):
        parts = [path.with_name(f"{key}.part{r}-of-{dist.world_size}.parquet")
                 for r in range(dist.world_size)]
        if not parts[dist.rank].is_file():
            mine = examples[dist.rank::dist.world_size]
            batch_size = spec.micro_batch_size * 2
            policy = sum(ex.policy_chosen_ids is not None for ex in mine) if snap.policy_pair \
                else 0
            share = f" (rank 0's 1/{dist.world_size})" if dist.world_size > 1 else ""
            with steps(f"reference log-probs{share}", len(mine) + policy, unit="pairs",
                       show=dist.rank == 0) as bar:
                values = _compute_reference(model, mine, pad, with_ref, batch_size, bar.update)
                if snap.policy_pair:  # (chosen, rejected, y_ref or nan, policy chosen, rejected)
                    values = _with_policy_pairs(model, mine, values, pad, batch_size,
                                                bar.update)
            _write_parquet(parts[dist.rank], pl.DataFrame(
                [{"pair_id": k, "logps": list(v), "rank": dist.rank} for k, v in values.items()],
                schema={"pair_id": pl.String, "logps": pl.List(pl.Float64), "rank": pl.Int64}))
        if dist.world_size > 1:
            torch.distributed.barrier()
        if dist.rank == 0:
            _write_parquet(path, pl.concat([pl.read_parquet(part) for part in parts]))
            for part in parts:
                part.unlink()
        if dist.world_size > 1:
            torch.distributed.barrier()
    frame = pl.read_parquet(path)
    return {p: tuple(v) for p, v in zip(frame["pair_id"], frame["logps"].to_list(), strict=True)}


def _any_rank(flag: bool, dist: DistInfo) -> bool:
    """True on every rank when `flag` is true on any (so all take the same branch)."""
    t = torch.tensor([int(flag)], device=dist.device)
    if dist.world_size > 1:
        torch.distributed.all_reduce(t)
    return bool(t.item())


def _write_parquet(path: Path, frame: pl.DataFrame) -> None:
    """Write through a staging name, so a killed run leaves no half-written file."""
    path.parent.mkdir(exist_ok=True)
    staging = path.with_suffix(".tmp")
    frame.write_parquet(staging)
    staging.replace(path)


@torch.no_grad()
def _compute_reference(model: Any, examples: Sequence[TokenizedExample], pad: int,
                       with_ref: bool, batch_size: int,
                       advance: Callable[[int], None] = lambda n: None,
                       ) -> dict[str, tuple[float, ...]]:
    was_training = model.training
    model.eval()
    out = {}
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad, with_reference=with_ref)
        batch = batch.to(next(model.parameters()).device)
        parts = batch.split(_forward(model, batch).double())
        for i, pair_id in enumerate(batch.pair_ids):
            out[pair_id] = tuple(float(p[i]) for p in parts)
        advance(len(batch.pair_ids))
    model.train(was_training)
    return out


def _with_policy_pairs(model: Any, examples: Sequence[TokenizedExample],
                       values: dict[str, tuple[float, ...]], pad: int, batch_size: int,
                       advance: Callable[[int], None] = lambda n: None,
                       ) -> dict[str, tuple[float, ...]]:
    """`values` widened to (chosen, rejected, y_ref, policy chosen, policy rejected)."""
    views = [_sail_view(ex, ROUTE_PR)[0] for ex in examples if ex.policy_chosen_ids is not None]
    policy = _compute_reference(model, views, pad, False, batch_size, advance)
    nan = float("nan")
    return {p: (v[0], v[1], v[2] if len(v) > 2 else nan, *policy.get(p, (nan, nan)))
            for p, v in values.items()}
