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
    sail/route                         (sail) the example's route: ROUTE_DPO, _DP, _PP or _PR
    sail/flipped                       (sail) 1.0 where the pair's order was swapped (DP, PP)
    sail/extra                         (sail) the value the extra-gradient term added to the loss
    sail/nonfinite                     (sail) 1.0 where the loss was not finite (it is set to 0)
For sail the rewards/* metrics describe the pair as trained, after any swap.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ROUTE_DP",
    "ROUTE_DPO",
    "ROUTE_NAMES",
    "ROUTE_PP",
    "ROUTE_PR",
    "ExtraGradient",
    "LossOutput",
    "dpo_loss",
    "ipo_loss",
    "sail_loss",
    "sail_routes",
    "selm_loss",
    "sequence_logps",
]

# SAIL routes (design.md §2). The reference code names them DDP, DPP and DPR and draws them in
# the order (DDP, DPP, DPR, DPO); here plain DPO is 0 so that a zero-filled tensor means DPO.
ROUTE_DPO = 0  # plain DPO on the dataset pair
ROUTE_DP = 1  # SAIL-DP (DDP): dataset pair, label relabelled by the policy's own preference
ROUTE_PP = 2  # SAIL-PP (DPP): two policy samples, ordered by the policy's own preference
ROUTE_PR = 3  # SAIL-PR (DPR): two policy samples, ordered by a ranker or reward model
ROUTE_NAMES: tuple[str, ...] = ("dpo", "dp", "pp", "pr")  # indexed by route

ExtraGradient = Literal["score_function", "reference_hook"]


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


def sail_routes(n: int, *, r: float, p: float, g: float, generator: torch.Generator) -> Tensor:
    """SAIL's route of each of `n` examples, drawn independently: ROUTE_DP with probability r,
    ROUTE_PP with p, ROUTE_PR with g, ROUTE_DPO otherwise (a long tensor of shape (n,) on the
    generator's device).

    The reference code draws the same distribution per batch with `torch.multinomial`; a
    caller-owned generator makes the routes of a run repeat exactly for a given seed. The
    reference recipes run one route next to plain DPO (r 0.4, or p 0.3, or g 0.3); all three
    together sum to 1, leaving no plain DPO.
    """
    _check_route_probs(r=r, p=p, g=g)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)
    edges = torch.tensor([r, r + p, r + p + g], dtype=torch.float64, device=generator.device)
    # bucket 0: u < r, 1: r <= u < r+p, 2: r+p <= u < r+p+g, 3: the rest
    by_bucket = torch.tensor([ROUTE_DP, ROUTE_PP, ROUTE_PR, ROUTE_DPO], device=generator.device)
    return by_bucket[torch.bucketize(u, edges, right=True)]


def sail_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    routes: Tensor,
    *,
    draws: Tensor,
    rho: float = 0.2,
    pi: float = 0.2,
    gamma: float = 0.3,
    extra_gradient: ExtraGradient = "score_function",
) -> LossOutput:
    """SAIL (Ding et al. 2024), per example by route (`sail_routes`), with
    `l = logsigmoid(beta * h')` and h' the margin of the pair as trained:

        ROUTE_DPO  dataset pair                      -l
        ROUTE_DP   dataset pair, maybe swapped        -l - (rho/2) l**2
        ROUTE_PP   two policy samples, maybe swapped  -l - (pi/2) l**2    + extra(pi)
        ROUTE_PR   two policy samples, ranker order   -l                  + extra(gamma)

    For DPO and DP the four log-prob tensors hold the dataset pair (chosen, rejected); for PP the
    two policy samples in their stored order; for PR the ranker's order (chosen = better).

    Swaps (the policy's own preference labels the pair, design.md §2). `draws` holds one uniform
    [0, 1) number per example, drawn by the caller from a seeded generator so that this function
    stays pure. With `q = sigmoid(beta * h)` from the detached log-probs of the pair as given, a
    DP or PP example keeps its order when `draw < q` and is swapped (h' = -h) when `draw >= q`,
    i.e. with probability 1 - q, the policy's probability that the pair is the other way round.
    This is the reference code's Bernoulli(1 - q) switch (cdpo_trainer.py: in `dpo_loss` for
    DDP, in `_label_generated_by_polcy` for DPP). Other routes ignore their draws.

    The squared terms are the gradient of the label's own dependence on the policy:
    d/dθ of log q(label) is ∇l, and `l ∇l = ∇(l**2 / 2)`. They have no lower bound.

    Extra gradient on PP and PR examples, for both sampled responses' summed policy log-prob
    `logp` (c = pi or gamma; l and logp detached):

    - "score_function" (default): `-c * l * logp` is added to the loss (this changes its value,
      reported as `sail/extra`), so d loss / d logp gains `-c * l`. This is the likelihood-ratio
      term of the gradient of an expectation over responses sampled from the policy itself,
      E[f ∇log pi(y)], the same identity that gives the squared terms. It is an ordinary loss
      term, so the trainer's mean, gradient accumulation and data parallelism weight it like
      the rest of the loss.
    - "reference_hook": the public code's backward hook on the policy log-probs, which adds
      `-c * l / logp` to the gradient of its batch-MEAN loss w.r.t. each `logp`, after the
      mean. Reproduced without hooks by a zero-valued term `k*logp - (k*logp).detach()` with
      `k = -batch * c * l / logp` (batch = this call's size), so the loss value is unchanged and
      after the trainer's mean each logp gets exactly `-c * l / logp` more, independent of the
      batch size as in the reference. It is `1/logp` times the score-function term: since
      logp < 0 it has the opposite sign (it raises the sampled responses' likelihood where the
      score function lowers it) and about 1/|logp| its size. One difference is left: the
      reference adds it after the trainer has divided the loss by the gradient-accumulation
      steps, so there it is that many times larger again; here that division applies to it too.

    The default is "score_function": it is the likelihood-ratio gradient that sampling the
    responses from the policy calls for (the identity the reference code itself uses for the
    squared terms), and it means the same at any batch size, accumulation or world size;
    "reference_hook" is there to reproduce the published code's runs.

    Non-finite guard: an example whose loss (or hook coefficient) is not finite, from non-finite
    log-probs (a token of probability 0), an overflow (the score-function term or l**2 in
    float16), or logp = 0 under "reference_hook", is flagged in `sail/nonfinite`, its loss is 0,
    and its gradient is exactly 0: its inputs are replaced by finite stand-ins before the
    differentiable computation, so no inf or nan reaches backward. Its `rewards/*` metrics may
    still be non-finite. (An overflowing l**2 from finite float32 log-probs needs a kept DP or
    PP pair with beta*h' < -1e19, which the swap keeps with probability sigmoid(beta*h'), 0 in
    float32: the guard is for non-finite inputs and half precision.)
    """
    logps = _check(policy_chosen_logps=policy_chosen_logps,
                   policy_rejected_logps=policy_rejected_logps,
                   reference_chosen_logps=reference_chosen_logps,
                   reference_rejected_logps=reference_rejected_logps)
    _check_beta(beta)
    for name, value in (("rho", rho), ("pi", pi), ("gamma", gamma)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if extra_gradient not in get_args(ExtraGradient):
        raise ValueError(
            f"extra_gradient must be one of {get_args(ExtraGradient)}, got {extra_gradient!r}")
    routes, draws = _check_routes(routes, draws, like=logps[0])

    def terms(four: list[Tensor], flipped: Tensor) -> tuple[Tensor, Tensor]:
        pc, pr, rc, rr = four
        return _sail_terms(pc, pr, rc, rr, routes, flipped, beta=beta, rho=rho, pi=pi,
                           gamma=gamma, extra_gradient=extra_gradient)

    with torch.no_grad():
        detached = [x.detach() for x in logps]
        h = _h(*detached)
        q = torch.sigmoid(beta * h.to(draws.dtype))
        flipped = ((routes == ROUTE_DP) | (routes == ROUTE_PP)) & (draws >= q)
        nonfinite = ~torch.isfinite(terms(detached, flipped)[0])
    safe = [torch.where(nonfinite, -1.0, x) for x in logps]  # -1: finite, and logp != 0
    losses, extra = terms(safe, flipped)
    losses = torch.where(nonfinite, 0.0, losses)
    pc, pr, rc, rr = detached
    metrics = _reward_metrics(torch.where(flipped, pr, pc), torch.where(flipped, pc, pr),
                              torch.where(flipped, rr, rc), torch.where(flipped, rc, rr),
                              beta=beta)
    dtype = pc.dtype
    metrics |= {
        "sail/route": routes.to(dtype),
        "sail/flipped": flipped.to(dtype),
        "sail/extra": torch.where(nonfinite, 0.0, extra.detach()),
        "sail/nonfinite": nonfinite.to(dtype),
    }
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


def _sail_terms(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, routes: Tensor, flipped: Tensor,
                *, beta: float, rho: float, pi: float, gamma: float,
                extra_gradient: ExtraGradient) -> tuple[Tensor, Tensor]:
    """Per-example SAIL losses and the value of their extra-gradient term (see `sail_loss`).
    Coefficients are looked up by route; zero-coefficient terms go through `torch.where`, not a
    multiplication by 0, so an inf elsewhere in the row cannot turn them into nan."""
    h = _h(pc, pr, rc, rr)
    l = F.logsigmoid(beta * torch.where(flipped, -h, h))  # noqa: E741 (the paper's name)
    square = pc.new_tensor([0.0, rho, pi, 0.0])[routes]  # by route: DPO, DP, PP, PR
    c = pc.new_tensor([0.0, 0.0, pi, gamma])[routes]
    losses = -l - torch.where(square > 0, square / 2 * l.square(), 0.0)
    with torch.no_grad():
        if extra_gradient == "score_function":
            k_c = k_r = torch.where(c > 0, -c * l, 0.0)
        else:
            n = pc.numel()
            k_c = torch.where(c > 0, -n * c * l / pc, 0.0)
            k_r = torch.where(c > 0, -n * c * l / pr, 0.0)
    extra = k_c * pc + k_r * pr
    if extra_gradient == "reference_hook":
        extra = extra - extra.detach()  # value 0, gradient k
    return losses + extra, extra


def _check_route_probs(*, r: float, p: float, g: float) -> None:
    for name, value in (("r", r), ("p", p), ("g", g)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"route probability {name} must be finite and >= 0, got {value}")
    if r + p + g > 1 + 1e-9:  # 1e-9: float sums such as 0.1 + 0.2 + 0.7
        raise ValueError(f"route probabilities must sum to at most 1, got r + p + g = {r + p + g}")


def _check_routes(routes: Tensor, draws: Tensor, *, like: Tensor) -> tuple[Tensor, Tensor]:
    """Routes (integers in 0..3) and draws (floats in [0, 1)) of shape (batch,), moved to the
    log-probs' device; draws at least float32 so that the swap test is not made in bfloat16."""
    for name, t in (("routes", routes), ("draws", draws)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(like.shape)}")
    if routes.is_floating_point() or routes.is_complex() or routes.dtype == torch.bool:
        raise ValueError(f"routes must be an integer tensor, got {routes.dtype}")
    if not draws.is_floating_point():
        raise ValueError(f"draws must be a floating tensor, got {draws.dtype}")
    if bool(((routes < 0) | (routes >= len(ROUTE_NAMES))).any()):
        raise ValueError(f"routes must be in 0..{len(ROUTE_NAMES) - 1} (ROUTE_DPO..ROUTE_PR)")
    if not bool(((draws >= 0) & (draws < 1)).all()):
        raise ValueError("draws must be uniform numbers in [0, 1)")
    dtype = torch.promote_types(torch.promote_types(like.dtype, draws.dtype), torch.float32)
    return routes.to(like.device, torch.long), draws.to(like.device, dtype)
