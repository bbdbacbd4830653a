"""Preference losses as small pure functions on per-example response log-probabilities.

Every loss takes 1-D tensors of shape (batch,) holding each response's log-probability given
its prompt, summed over the response tokens only (`sequence_logps` computes them), for the
policy and for the frozen reference model. It returns a `LossOutput`: the per-example losses
(the trainer takes their mean, so that gradient accumulation and data parallelism can weight
examples as they need) and per-example metrics, all detached. Results have the inputs' dtype.

Notation (design.md §2): `h = (pc - rc) - (pr - rr)`, the policy's log-ratio margin of chosen
over rejected minus the reference's. Implicit rewards are `beta * (policy - reference)` of the
log-probs passed in.

Metrics (each a detached tensor of shape (batch,)):
    rewards/chosen, rewards/rejected   beta * (policy - reference) log-prob of y_w, y_l
    rewards/margins                    rewards/chosen - rewards/rejected (= beta * h)
    rewards/accuracies                 1.0 where rewards/chosen > rewards/rejected, else 0.0
    rewards/ref_response               (selm) beta * (policy - reference) log-prob of y_ref
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossOutput", "dpo_loss", "ipo_loss", "selm_loss", "sequence_logps"]


class LossOutput(NamedTuple):
    losses: Tensor  # (batch,), differentiable
    metrics: dict[str, Tensor]  # name -> (batch,), detached


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    *,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Sigmoid DPO (Rafailov et al. 2023, Eq. 7): `-logsigmoid(beta * h)`.

    `label_smoothing` eps > 0 gives conservative DPO (cDPO, as TRL's sigmoid loss): the label is
    taken as wrong with probability eps, `-(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h)`.
    logsigmoid keeps large margins finite in either direction.
    """
    logps = _check(policy_chosen_logps=policy_chosen_logps,
                   policy_rejected_logps=policy_rejected_logps,
                   reference_chosen_logps=reference_chosen_logps,
                   reference_rejected_logps=reference_rejected_logps)
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    margin = beta * _h(*logps)
    losses = -F.logsigmoid(margin)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-margin)
    return LossOutput(losses, _reward_metrics(*logps, beta=beta))


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    *,
    chosen_lengths: Tensor | None,
    rejected_lengths: Tensor | None,
) -> LossOutput:
    """IPO (Azar et al. 2023, Eq. 17, beta is the paper's tau): `(h_avg - 1/(2 beta))**2`.

    `h_avg` uses per-token averaged log-ratios: each response's (policy - reference) summed
    log-prob is divided by its number of response tokens (`chosen_lengths`, `rejected_lengths`,
    clamped to at least 1). This is TRL's IPO (`loss_type="ipo"`), which its authors confirmed
    with the IPO authors; on sums the squared loss would grow with response length. Pass `None`
    for both lengths when the log-probs given are already per-token averages. Required keywords,
    so that an un-normalised IPO is never chosen by omission.
    """
    logps = _check(policy_chosen_logps=policy_chosen_logps,
                   policy_rejected_logps=policy_rejected_logps,
                   reference_chosen_logps=reference_chosen_logps,
                   reference_rejected_logps=reference_rejected_logps)
    _check_beta(beta)
    pc, pr, rc, rr = logps
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None and rejected_lengths is not None:
        _check(policy_chosen_logps=pc, chosen_lengths=chosen_lengths,
               rejected_lengths=rejected_lengths)
        chosen_ratio = chosen_ratio / chosen_lengths.to(pc.dtype).clamp(min=1)
        rejected_ratio = rejected_ratio / rejected_lengths.to(pc.dtype).clamp(min=1)
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return LossOutput(losses, _reward_metrics(*logps, beta=beta))


def selm_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    policy_ref_response_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    reference_ref_response_logps: Tensor,
    beta: float,
    alpha: float,
) -> LossOutput:
    """SELM (Zhang et al. 2024): DPO plus the optimism term on y_ref, the reference model's own
    response: `-logsigmoid(beta h) + alpha * beta * (py - ry)`.

    `alpha` follows the public code (shenao-zhang/SELM, scripts/selm_trainer.py,
    `optimistic_dpo_loss`), where it multiplies beta; the paper's coefficient is alpha * beta,
    so the published recipes (beta 0.01, alpha 1e-3 or 1e-4) carry over unchanged. The term is
    added per example. Minimising it lowers the policy's likelihood of y_ref relative to the
    reference, which pushes exploration away from what the reference already says. With
    alpha = 0 the losses equal `dpo_loss` exactly (iterative DPO).
    """
    pc, pr, py, rc, rr, ry = _check(
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        policy_ref_response_logps=policy_ref_response_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        reference_ref_response_logps=reference_ref_response_logps)
    _check_beta(beta)
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    losses, metrics = dpo_loss(pc, pr, rc, rr, beta)
    # Always added, so y_ref stays in the graph (a zero gradient at alpha = 0, not a missing
    # one); x + 0.0 == x, so alpha = 0 still equals DPO bit for bit on finite log-probs.
    losses = losses + alpha * beta * (py - ry)
    metrics["rewards/ref_response"] = (beta * (py - ry)).detach()
    return LossOutput(losses, metrics)


def sequence_logps(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """Summed log-probabilities of the masked tokens of each sequence under a causal LM.

    `logits` (batch, seq, vocab) come from a forward pass on `labels` (batch, seq), the input
    ids; position t predicts token t+1, so token t counts where `loss_mask[:, t]` is true
    (response tokens only; prompt and padding are masked out). Labels under the mask are never
    read, so they may be -100 or padding. Half-precision logits are upcast to float32: a sum
    over hundreds of tokens in bfloat16 loses the differences DPO feeds on.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
        raise ValueError(
            f"expected logits (batch, seq, vocab) with labels and loss_mask (batch, seq); got "
            f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits, labels, mask = logits[:, :-1], labels[:, 1:], loss_mask[:, 1:].bool()
    targets = torch.where(mask, labels, 0).unsqueeze(-1)
    # gather minus logsumexp: the log-softmax of the target alone, without a (b, s, v) copy
    token_logps = logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(-1)
    return torch.where(mask, token_logps, 0.0).sum(-1)


def _h(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
    return (pc - rc) - (pr - rr)


def _reward_metrics(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float
                    ) -> dict[str, Tensor]:
    with torch.no_grad():
        chosen, rejected = beta * (pc - rc), beta * (pr - rr)
        return {
            "rewards/chosen": chosen.detach(),
            "rewards/rejected": rejected.detach(),
            "rewards/margins": (chosen - rejected).detach(),
            "rewards/accuracies": (chosen > rejected).to(pc.dtype),
        }


def _check_beta(beta: float) -> None:
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be finite and > 0, got {beta}")


def _check(**tensors: Tensor) -> tuple[Tensor, ...]:
    """All 1-D, one batch size, one floating dtype (lengths may be integers): a stray (batch, 1)
    would broadcast against (batch,) into a (batch, batch) loss without complaint."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; every input must be 1-D of shape (batch,) "
                f"like {first_name} {tuple(first.shape)}")
        if name.endswith("_lengths"):
            continue
        if not t.is_floating_point() or t.dtype != first.dtype:
            raise ValueError(
                f"{name} has dtype {t.dtype}; log-probs must share one floating dtype "
                f"({first_name} is {first.dtype})")
    return tuple(tensors.values())
