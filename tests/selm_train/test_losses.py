"""Losses against an independent float64 computation, and SELM's optimism term on a tiny model.

The expected values and gradients are written out here in plain `math` (float64), from the
equations of design.md §2, never by calling the functions under test.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from selm_train.losses import dpo_loss, ipo_loss, selm_loss, sequence_logps

BETAS = (0.01, 0.1, 0.5, 2.0)
ALPHAS = (0.0, 1e-4, 1e-3, 0.5, 3.0)


# ---- independent float64 reference ---------------------------------------------------------

def softplus(x: float) -> float:
    """log(1 + e^x) without overflow: -logsigmoid(z) = softplus(-z)."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def ref_dpo(pc, pr, rc, rr, beta, eps=0.0):
    """Loss and d loss / d (pc, pr, rc, rr) of (c)DPO for one example."""
    z = beta * ((pc - rc) - (pr - rr))
    loss = (1 - eps) * softplus(-z) + eps * softplus(z)
    dz = -(1 - eps) * sigmoid(-z) + eps * sigmoid(z)  # d loss / d z
    return loss, [beta * dz, -beta * dz, -beta * dz, beta * dz]


def ref_selm(pc, pr, py, rc, rr, ry, beta, alpha):
    """Loss and d loss / d (pc, pr, py, rc, rr, ry) of SELM for one example."""
    loss, (gpc, gpr, grc, grr) = ref_dpo(pc, pr, rc, rr, beta)
    return loss + alpha * beta * (py - ry), [gpc, gpr, alpha * beta, grc, grr, -alpha * beta]


def ref_ipo(pc, pr, rc, rr, beta, lc, lr):
    """Loss and d loss / d (pc, pr, rc, rr) of IPO with per-token averaged log-ratios."""
    lc, lr = max(lc, 1), max(lr, 1)
    u = (pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)
    return u * u, [2 * u / lc, -2 * u / lr, -2 * u / lc, 2 * u / lr]


def random_logps(rng: random.Random, n: int, k: int) -> list[list[float]]:
    """k columns of n summed log-probs, as a 100-token response might have."""
    return [[-rng.uniform(5.0, 300.0) for _ in range(n)] for _ in range(k)]


def leaves(cols: list[list[float]], dtype=torch.float64) -> list[torch.Tensor]:
    return [torch.tensor(c, dtype=dtype, requires_grad=True) for c in cols]


def grads_of(losses: torch.Tensor, xs: list[torch.Tensor]) -> list[list[float]]:
    return [g.tolist() for g in torch.autograd.grad(losses.sum(), xs)]


# ---- values and gradients ------------------------------------------------------------------

@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_matches_float64(beta, eps):
    rng = random.Random(f"dpo{beta}{eps}")
    cols = random_logps(rng, 16, 4)
    xs = leaves(cols)
    out = dpo_loss(*xs, beta, label_smoothing=eps)
    got = grads_of(out.losses, xs)
    for i, row in enumerate(zip(*cols, strict=True)):
        loss, grad = ref_dpo(*row, beta, eps)
        assert out.losses[i].item() == pytest.approx(loss, rel=1e-12, abs=1e-12)
        assert [g[i] for g in got] == pytest.approx(grad, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_selm_matches_float64(beta, alpha):
    rng = random.Random(f"selm{beta}{alpha}")
    cols = random_logps(rng, 16, 6)
    xs = leaves(cols)
    out = selm_loss(*xs, beta, alpha)
    got = grads_of(out.losses, xs)
    for i, row in enumerate(zip(*cols, strict=True)):
        loss, grad = ref_selm(*row, beta, alpha)
        assert out.losses[i].item() == pytest.approx(loss, rel=1e-12, abs=1e-12)
        assert [g[i] for g in got] == pytest.approx(grad, rel=1e-12, abs=1e-15)


def test_selm_keywords_are_the_public_names():
    """The trainer calls selm_loss by these names; a swapped pair would change the sign."""
    rng = random.Random(3)
    pc, pr, py, rc, rr, ry = leaves(random_logps(rng, 5, 6))
    by_name = selm_loss(
        policy_chosen_logps=pc, policy_rejected_logps=pr, policy_ref_response_logps=py,
        reference_chosen_logps=rc, reference_rejected_logps=rr, reference_ref_response_logps=ry,
        beta=0.1, alpha=0.5)
    assert torch.equal(by_name.losses, selm_loss(pc, pr, py, rc, rr, ry, 0.1, 0.5).losses)
    # The optimism term raises the loss by alpha * beta * (py - ry) per example.
    term = by_name.losses - dpo_loss(pc, pr, rc, rr, 0.1).losses
    assert term.tolist() == pytest.approx((0.5 * 0.1 * (py - ry)).tolist(), rel=1e-12)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selm_with_alpha_zero_is_dpo_exactly(beta, dtype):
    rng = random.Random(f"zero{beta}")
    pc, pr, py, rc, rr, ry = leaves(random_logps(rng, 32, 6), dtype)
    selm = selm_loss(pc, pr, py, rc, rr, ry, beta, 0.0)
    dpo = dpo_loss(pc, pr, rc, rr, beta)
    assert torch.equal(selm.losses, dpo.losses)
    for name, value in dpo.metrics.items():
        assert torch.equal(selm.metrics[name], value)
    g_selm = torch.autograd.grad(selm.losses.sum(), [pc, pr, py, rc, rr, ry])
    g_dpo = torch.autograd.grad(dpo.losses.sum(), [pc, pr, rc, rr])
    for a, b in zip([g_selm[i] for i in (0, 1, 3, 4)], g_dpo, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(g_selm[2], torch.zeros_like(py))  # y_ref stays in the graph at alpha 0


@pytest.mark.parametrize("beta", BETAS)
def test_ipo_matches_float64(beta):
    rng = random.Random(f"ipo{beta}")
    cols = random_logps(rng, 16, 4)
    lc = [rng.randint(0, 400) for _ in range(16)]  # 0: an empty response, clamped to 1 token
    lr = [rng.randint(1, 400) for _ in range(16)]
    xs = leaves(cols)
    out = ipo_loss(*xs, beta, chosen_lengths=torch.tensor(lc), rejected_lengths=torch.tensor(lr))
    got = grads_of(out.losses, xs)
    for i, row in enumerate(zip(*cols, strict=True)):
        loss, grad = ref_ipo(*row, beta, lc[i], lr[i])
        assert out.losses[i].item() == pytest.approx(loss, rel=1e-12, abs=1e-12)
        assert [g[i] for g in got] == pytest.approx(grad, rel=1e-12, abs=1e-15)


def test_ipo_without_lengths_takes_the_logps_as_given():
    # Worked by hand: h = (-1 - -2) - (-3 - -3) = 1; beta 0.25 -> (1 - 2)**2 = 1.
    t = torch.tensor
    out = ipo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-3.0]), 0.25,
                   chosen_lengths=None, rejected_lengths=None)
    assert out.losses.tolist() == [1.0]
    with pytest.raises(ValueError, match="both"):
        ipo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-3.0]), 0.25,
                 chosen_lengths=t([2]), rejected_lengths=None)


def test_dpo_worked_by_hand():
    # h = 0 -> loss log 2, rewards 0, not an accurate pair (0 > 0 is false).
    t = torch.tensor
    out = dpo_loss(t([-5.0]), t([-7.0]), t([-5.0]), t([-7.0]), 0.1)
    assert out.losses.item() == pytest.approx(math.log(2))
    assert out.metrics["rewards/accuracies"].tolist() == [0.0]
    # chosen +2 over reference, rejected -1: rewards 0.2, -0.1, margin 0.3
    out = dpo_loss(t([-3.0]), t([-8.0]), t([-5.0]), t([-7.0]), 0.1)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.3)))
    m = out.metrics
    assert m["rewards/chosen"].item() == pytest.approx(0.2)
    assert m["rewards/rejected"].item() == pytest.approx(-0.1)
    assert m["rewards/margins"].item() == pytest.approx(0.3)
    assert m["rewards/accuracies"].tolist() == [1.0]


def test_metrics_are_detached_and_selm_reports_the_ref_response_reward():
    pc, pr, py, rc, rr, ry = leaves([[-10.0, -4.0], [-12.0, -3.0], [-9.0, -6.0],
                                     [-11.0, -5.0], [-11.0, -5.0], [-8.0, -8.0]])
    out = selm_loss(pc, pr, py, rc, rr, ry, 0.5, 1e-3)
    assert out.losses.requires_grad and out.losses.shape == (2,)
    assert all(not v.requires_grad and v.shape == (2,) for v in out.metrics.values())
    assert out.metrics["rewards/ref_response"].tolist() == pytest.approx([-0.5, 1.0])
    assert out.metrics["rewards/accuracies"].tolist() == [1.0, 0.0]


# ---- numerics, dtypes and shapes -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h", [-1e4, -60.0, 60.0, 1e4])
def test_large_margins_stay_finite(dtype, h):
    """logsigmoid, not log(sigmoid): at beta*h = -1e4 the loss is 1e4, not inf, and the
    gradient is -beta, not nan; at +1e4 both are 0."""
    beta = 1.0
    pc = torch.tensor([h / 2], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-h / 2], dtype=dtype, requires_grad=True)
    zero = torch.zeros(1, dtype=dtype)
    out = selm_loss(pc, pr, zero, zero, zero, zero, beta, 0.1)
    assert out.losses.dtype == dtype
    (g,) = torch.autograd.grad(out.losses.sum(), [pc])
    loss, grad = ref_dpo(h / 2, -h / 2, 0.0, 0.0, beta)
    assert math.isfinite(out.losses.item()) and math.isfinite(g.item())
    assert out.losses.item() == pytest.approx(loss, rel=1e-2, abs=1e-6)
    assert g.item() == pytest.approx(grad[0], rel=1e-2, abs=1e-6)


def test_dtype_follows_the_inputs():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        xs = [torch.full((3,), -2.0, dtype=dtype) for _ in range(4)]
        assert dpo_loss(*xs, 0.1).losses.dtype == dtype
        out = ipo_loss(*xs, 0.1, chosen_lengths=torch.tensor([1, 2, 3]),
                       rejected_lengths=torch.tensor([1, 2, 3]))
        assert out.losses.dtype == dtype
        assert all(v.dtype == dtype for v in out.metrics.values())


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        ([(4,), (4,), (4,), (3,)], "reference_rejected_logps has shape \\(3,\\)"),
        ([(4,), (4, 1), (4,), (4,)], "policy_rejected_logps has shape \\(4, 1\\)"),
        ([(), (), (), ()], "1-D"),
        ([(2, 2)] * 4, "1-D"),
    ],
)
def test_shapes_are_checked(shapes, match):
    xs = [torch.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        dpo_loss(*xs, 0.1)


def test_bad_arguments_are_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="dtype"):
        dpo_loss(x, x.double(), x, x, 0.1)
    with pytest.raises(ValueError, match="dtype"):
        dpo_loss(x, x, x.long(), x, 0.1)
    with pytest.raises(ValueError, match=r"torch\.Tensor"):
        dpo_loss(x, x, x, [0.0, 0.0], 0.1)
    for beta in (0.0, -0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(x, x, x, x, beta)
    for alpha in (-1e-3, math.nan):
        with pytest.raises(ValueError, match="alpha"):
            selm_loss(x, x, x, x, x, x, 0.1, alpha)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, 0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="policy_ref_response_logps has shape"):
        selm_loss(x, x, torch.zeros(3), x, x, x, 0.1, 0.1)
    with pytest.raises(ValueError, match="chosen_lengths has shape"):
        ipo_loss(x, x, x, x, 0.1, chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(2))


# ---- sequence_logps ------------------------------------------------------------------------

def test_sequence_logps_matches_a_loop():
    torch.manual_seed(0)
    b, s, v = 3, 7, 11
    logits = torch.randn(b, s, v, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (b, s))
    mask = torch.zeros(b, s, dtype=torch.bool)
    mask[0, 3:] = True  # prompt of 3 tokens, response to the end
    mask[1, 2:5] = True  # response followed by padding
    mask[2, 6] = True  # a one-token response
    labels[1, 5:] = -100  # masked labels are never read
    expected = []
    for i in range(b):
        total = 0.0
        for t in range(1, s):
            if mask[i, t]:
                row = logits[i, t - 1].tolist()
                top = max(row)
                lse = top + math.log(sum(math.exp(x - top) for x in row))
                total += row[int(labels[i, t])] - lse
        expected.append(total)
    got = sequence_logps(logits, labels, mask)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    # bf16 logits are summed in float32
    got16 = sequence_logps(logits.bfloat16(), labels, mask.long())
    assert got16.dtype == torch.float32
    assert got16.tolist() == pytest.approx(expected, rel=0.05)


def test_sequence_logps_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_logps(torch.zeros(2, 5, 4), torch.zeros(2, 5, dtype=torch.long),
                       torch.ones(2, 4))


# ---- the optimism term acts on a tiny model ------------------------------------------------

PROMPT, RESPONSE, VOCAB = 6, 6, 48


def tiny_causal_lm() -> torch.nn.Module:
    """A 1-layer Llama with random weights: enough for log-probs that training moves.
    head_dim 16 is fine here (no vLLM)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()  # eval: no dropout, so runs repeat exactly


def preference_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of n prompts each followed by three responses (chosen, rejected, y_ref),
    stacked as (3n, seq), and the response mask."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, VOCAB, (n, PROMPT), generator=g)
    ids = torch.cat([torch.cat([prompts, torch.randint(0, VOCAB, (n, RESPONSE), generator=g)], 1)
                     for _ in range(3)])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, PROMPT:] = True
    return ids, mask


def train(reference: torch.nn.Module, loss: str, *, beta: float, alpha: float, steps: int
          ) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A few AdamW steps from the reference; returns the policy and its final (policy -
    reference) log-ratios of y_ref and DPO margins h, per prompt."""
    ids, mask = preference_batch()
    with torch.no_grad():
        rc, rr, ry = sequence_logps(reference(ids).logits, ids, mask).chunk(3)
    policy = copy.deepcopy(reference)
    torch.manual_seed(2)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for _ in range(steps):
        pc, pr, py = sequence_logps(policy(ids).logits, ids, mask).chunk(3)
        if loss == "dpo":
            out = dpo_loss(pc, pr, rc, rr, beta)
        else:
            out = selm_loss(pc, pr, py, rc, rr, ry, beta, alpha)
        opt.zero_grad()
        out.losses.mean().backward()
        opt.step()
    with torch.no_grad():
        pc, pr, py = sequence_logps(policy(ids).logits, ids, mask).chunk(3)
    return policy, py - ry, (pc - rc) - (pr - rr)


def test_selm_lowers_the_ref_response_likelihood_relative_to_dpo():
    """Same model, data, seed and steps; only the loss differs. Measured here (15 steps, beta
    0.1): mean log pi(y_ref) - log pi_ref(y_ref) about -0.02 under DPO, -3.9 under SELM with
    alpha 0.1 and -9.5 with alpha 1, while the DPO margin h still grows (16.5, 16.1, 11.3)."""
    reference = tiny_causal_lm()
    beta, steps = 0.1, 15
    dpo_policy, dpo_yref, dpo_h = train(reference, "dpo", beta=beta, alpha=0.0, steps=steps)
    runs = {alpha: train(reference, "selm", beta=beta, alpha=alpha, steps=steps)
            for alpha in (0.0, 0.1, 1.0)}
    print(f"\nDPO: y_ref log-ratio {dpo_yref.mean():+.3f}, margin h {dpo_h.mean():+.3f}")
    for alpha, (_, yref, h) in runs.items():
        print(f"SELM alpha {alpha}: y_ref log-ratio {yref.mean():+.3f}, margin h {h.mean():+.3f}")
    assert any(not torch.equal(p, q) for p, q in
               zip(dpo_policy.parameters(), reference.parameters(), strict=True))
    # alpha = 0 trains exactly as DPO does
    assert torch.equal(runs[0.0][1], dpo_yref) and torch.equal(runs[0.0][2], dpo_h)
    # the optimism term pushes y_ref down, more with a larger alpha, on every prompt
    yref_01, yref_1 = runs[0.1][1], runs[1.0][1]
    assert dpo_yref.mean() - 1.0 > yref_01.mean() > yref_1.mean() + 1.0
    assert bool((yref_1 < dpo_yref).all())
    # while every run still learns the preferences
    assert dpo_h.mean() > 5 and all(h.mean() > 5 for _, _, h in runs.values())
