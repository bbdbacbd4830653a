"""SAIL against an independent float64 computation, its routes and swaps, and its guard.

Expected values and gradients are written out here in plain `math` (float64) from design.md §2
and the reference code's hook (cdpo_trainer.py `dpo_loss`), never by calling the functions
under test; one test re-enacts the reference's `register_hook` mechanism with torch.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from selm_train.losses import (
    ROUTE_DP,
    ROUTE_DPO,
    ROUTE_NAMES,
    ROUTE_PP,
    ROUTE_PR,
    dpo_loss,
    sail_loss,
    sail_routes,
)

BETAS = (0.01, 0.1, 0.5, 2.0)
FORMS = ("score_function", "reference_hook")
COEFS = {"rho": 0.2, "pi": 0.25, "gamma": 0.3}  # pi != rho, so a swapped coefficient shows


# ---- independent float64 reference ---------------------------------------------------------

def softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def ref_sail(pc, pr, rc, rr, beta, route, draw, *, form, batch, rho, pi, gamma):
    """One example: (loss, d mean-loss / d (pc, pr, rc, rr), swapped, extra value).

    The gradient is that of the batch MEAN (the trainer's reduction), since the reference
    hook's addition is defined relative to it."""
    h = (pc - rc) - (pr - rr)
    swapped = route in (ROUTE_DP, ROUTE_PP) and draw >= sigmoid(beta * h)
    s = -1.0 if swapped else 1.0
    z = beta * s * h
    l = -softplus(-z)  # noqa: E741 logsigmoid(z)
    dl_dz = sigmoid(-z)
    square = {ROUTE_DP: rho, ROUTE_PP: pi}.get(route, 0.0)
    c = {ROUTE_PP: pi, ROUTE_PR: gamma}.get(route, 0.0)
    loss = -l - square / 2 * l * l
    dloss_dz = -(1 + square * l) * dl_dz
    grad = [dloss_dz * beta * s * d / batch for d in (1, -1, -1, 1)]
    extra = 0.0
    if form == "score_function":  # + -c * l * (pc + pr), l held constant
        extra = -c * l * (pc + pr)
        loss += extra
        grad[0] += -c * l / batch
        grad[1] += -c * l / batch
    else:  # the hook adds -c * l / logp to the gradient of the mean loss
        grad[0] += -c * l / pc
        grad[1] += -c * l / pr
    return loss, grad, swapped, extra


def mixed_batch(rng: random.Random, n: int, dtype=torch.float64):
    """Summed log-probs of 100-token-like responses whose margins h are a few nats, so that
    sigmoid(beta h) is spread over (0, 1) and both swaps and keeps occur; every route."""
    pc = [-rng.uniform(5.0, 300.0) for _ in range(n)]
    pr = [-rng.uniform(5.0, 300.0) for _ in range(n)]
    rc = [x + rng.gauss(0.0, 3.0) for x in pc]
    rr = [x + rng.gauss(0.0, 3.0) for x in pr]
    routes = [i % 4 for i in range(n)]
    draws = [rng.random() for _ in range(n)]
    xs = [torch.tensor(c, dtype=dtype, requires_grad=True) for c in (pc, pr, rc, rr)]
    return (pc, pr, rc, rr), xs, torch.tensor(routes), torch.tensor(draws, dtype=torch.float64)


# ---- values and gradients ------------------------------------------------------------------

@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("form", FORMS)
def test_sail_matches_float64(beta, form):
    rng = random.Random(f"sail{beta}{form}")
    n = 64
    cols, xs, routes, draws = mixed_batch(rng, n)
    out = sail_loss(*xs, beta, routes, draws=draws, extra_gradient=form, **COEFS)
    got = [g.tolist() for g in torch.autograd.grad(out.losses.mean(), xs)]
    swaps = {ROUTE_DP: set(), ROUTE_PP: set()}
    for i, row in enumerate(zip(*cols, strict=True)):
        route, draw = int(routes[i]), float(draws[i])
        loss, grad, swapped, extra = ref_sail(*row, beta, route, draw, form=form, batch=n,
                                              **COEFS)
        assert out.losses[i].item() == pytest.approx(loss, rel=1e-12, abs=1e-12), ROUTE_NAMES[route]
        assert [g[i] for g in got] == pytest.approx(grad, rel=1e-10, abs=1e-15), ROUTE_NAMES[route]
        m = {k: v[i].item() for k, v in out.metrics.items()}
        assert m["sail/route"] == route
        assert m["sail/flipped"] == float(swapped)
        assert m["sail/extra"] == pytest.approx(extra, rel=1e-12, abs=1e-12)
        assert m["sail/nonfinite"] == 0.0
        # rewards describe the pair as trained: its margin is the swapped one
        h = (row[0] - row[2]) - (row[1] - row[3])
        assert m["rewards/margins"] == pytest.approx(beta * (-h if swapped else h), rel=1e-12)
        if route in swaps:
            swaps[route].add(swapped)
    if beta < 2.0:  # at beta 2 most sigmoid(beta h) sit at 0 or 1
        assert swaps == {ROUTE_DP: {False, True}, ROUTE_PP: {False, True}}  # both cases seen


def test_reference_hook_equals_the_reference_codes_register_hook():
    """Re-enact cdpo_trainer.py: negate the logits of swapped pairs, the generalized_sigmoid
    loss with route masks, `.mean()`, and hooks adding `-c * l / logp` on both policy log-probs;
    then compare every gradient with the hook-free form."""
    rng = random.Random(11)
    beta, n = 0.1, 32
    _, xs, routes, draws = mixed_batch(rng, n)
    rho, pi, gamma = COEFS["rho"], COEFS["pi"], COEFS["gamma"]
    ours = sail_loss(*xs, beta, routes, draws=draws, extra_gradient="reference_hook", **COEFS)
    ours_grads = torch.autograd.grad(ours.losses.mean(), xs)

    pc, pr, rc, rr = (x.detach().clone().requires_grad_() for x in xs)
    ddp, dpp, dpr = (routes == ROUTE_DP).double(), (routes == ROUTE_PP).double(), \
        (routes == ROUTE_PR).double()
    logits = (pc - pr) - (rc - rr)
    switch = ours.metrics["sail/flipped"]  # the swap itself is checked in the float64 test
    logits = (1 - 2 * switch) * logits
    ls = F.logsigmoid(beta * logits)
    losses = -ls - 0.5 * rho * (ls * ddp) ** 2 - 0.5 * pi * (ls * dpp) ** 2
    dl = ls.detach()
    pc_d, pr_d = pc.detach(), pr.detach()
    pc.register_hook(lambda g: g - pi * dl / pc_d * dpp - gamma * dl / pc_d * dpr)
    pr.register_hook(lambda g: g - pi * dl / pr_d * dpp - gamma * dl / pr_d * dpr)
    losses.mean().backward()
    # the hook leaves values alone (h is summed in another order there, hence approx)
    assert ours.losses.tolist() == pytest.approx(losses.tolist(), rel=1e-12)
    for a, b in zip(ours_grads, (pc.grad, pr.grad, rc.grad, rr.grad), strict=True):
        assert a.tolist() == pytest.approx(b.tolist(), rel=1e-10, abs=1e-15)


def test_worked_by_hand():
    """h = 0: l = -log 2; PP keeps its order when draw < 1/2. pc = pr = -10.
    score function: -l - (pi/2) l^2 - pi * l * (pc + pr) = log2 - 0.1 log2^2 - 0.2*20*log2."""
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    args = (t(-10.0), t(-10.0), t(-10.0), t(-10.0), 0.1, torch.tensor([ROUTE_PP]))
    ln2 = math.log(2)
    out = sail_loss(*args, draws=t(0.49), pi=0.2)
    assert out.losses.item() == pytest.approx(ln2 - 0.1 * ln2**2 - 4 * ln2, rel=1e-12)
    assert out.metrics["sail/flipped"].item() == 0.0
    out = sail_loss(*args, draws=t(0.5), pi=0.2, extra_gradient="reference_hook")
    assert out.losses.item() == pytest.approx(ln2 - 0.1 * ln2**2, rel=1e-12)
    assert out.metrics["sail/flipped"].item() == 1.0


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", FORMS)
def test_no_routes_is_dpo_exactly(beta, dtype, form):
    """r = p = g = 0 routes everything to plain DPO, which equals dpo_loss bit for bit."""
    rng = random.Random(f"dpo{beta}")
    _, xs, _, _ = mixed_batch(rng, 32, dtype)
    gen = torch.Generator().manual_seed(0)
    routes = sail_routes(32, r=0.0, p=0.0, g=0.0, generator=gen)
    assert routes.tolist() == [ROUTE_DPO] * 32
    sail = sail_loss(*xs, beta, routes, draws=torch.rand(32, generator=gen), extra_gradient=form)
    dpo = dpo_loss(*xs, beta)
    assert torch.equal(sail.losses, dpo.losses)
    for name, value in dpo.metrics.items():
        assert torch.equal(sail.metrics[name], value)
    for a, b in zip(torch.autograd.grad(sail.losses.mean(), xs),
                    torch.autograd.grad(dpo.losses.mean(), xs), strict=True):
        assert torch.equal(a, b)


def test_keywords_are_the_public_names_and_dtype_follows_the_inputs():
    rng = random.Random(5)
    _, xs, routes, draws = mixed_batch(rng, 8)
    by_name = sail_loss(
        policy_chosen_logps=xs[0], policy_rejected_logps=xs[1], reference_chosen_logps=xs[2],
        reference_rejected_logps=xs[3], beta=0.1, routes=routes, draws=draws, rho=0.2, pi=0.2,
        gamma=0.3, extra_gradient="score_function")
    assert torch.equal(by_name.losses, sail_loss(*xs, 0.1, routes, draws=draws).losses)
    for dtype in (torch.float32, torch.bfloat16):
        ys = [x.detach().to(dtype) for x in xs]
        out = sail_loss(*ys, 0.1, routes, draws=draws.float())
        assert out.losses.dtype == dtype
        assert all(v.dtype == dtype and not v.requires_grad for v in out.metrics.values())


# ---- routes and swaps: reproducible, and at the asked rates ---------------------------------

def test_routes_repeat_with_the_seed():
    def draw(seed):
        return sail_routes(1000, r=0.4, p=0.3, g=0.2, generator=torch.Generator().manual_seed(seed))
    a, b, c = draw(7), draw(7), draw(8)
    assert a.dtype == torch.long and a.shape == (1000,)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.tolist()) == {ROUTE_DPO, ROUTE_DP, ROUTE_PP, ROUTE_PR}
    assert sail_routes(0, r=0.5, p=0.0, g=0.0, generator=torch.Generator()).shape == (0,)


def test_same_draws_give_the_same_swaps():
    rng = random.Random(9)
    _, xs, routes, _ = mixed_batch(rng, 64)

    def swaps(seed):
        draws = torch.rand(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        out = sail_loss(*xs, 0.1, routes, draws=draws)
        return out.metrics["sail/flipped"], out.losses

    (f1, l1), (f2, l2), (f3, _) = swaps(1), swaps(1), swaps(2)
    assert torch.equal(f1, f2) and torch.equal(l1, l2)
    assert not torch.equal(f1, f3)
    assert f1[(routes == ROUTE_DPO) | (routes == ROUTE_PR)].sum() == 0  # only DP, PP swap


def within_4_sigma(count: int, n: int, prob: float) -> bool:
    """Binomial count within 4 standard deviations (seeded, so it cannot flake; 4 sigma so a
    correct implementation passes with any seed but for a 6e-5 chance)."""
    return abs(count - n * prob) <= 4 * math.sqrt(n * prob * (1 - prob)) + 1e-9


@pytest.mark.parametrize(("r", "p", "g"), [(0.4, 0.3, 0.2), (0.4, 0.0, 0.0), (0.0, 0.3, 0.7),
                                           (0.1, 0.2, 0.7), (1.0, 0.0, 0.0)])
def test_route_frequencies(r, p, g):
    n = 20_000
    routes = sail_routes(n, r=r, p=p, g=g, generator=torch.Generator().manual_seed(3))
    for route, prob in ((ROUTE_DP, r), (ROUTE_PP, p), (ROUTE_PR, g), (ROUTE_DPO, 1 - r - p - g)):
        count = int((routes == route).sum())
        if prob <= 1e-12:
            assert count == 0, ROUTE_NAMES[route]
        else:
            assert within_4_sigma(count, n, prob), (ROUTE_NAMES[route], count, n * prob)


@pytest.mark.parametrize("route", [ROUTE_DP, ROUTE_PP])
@pytest.mark.parametrize("h", [-8.0, 0.0, 3.0])
def test_swap_rate_is_one_minus_the_policy_preference(route, h):
    """With beta h fixed, the pair is swapped with probability 1 - sigmoid(beta h)."""
    n, beta = 20_000, 0.25
    zeros = torch.zeros(n, dtype=torch.float64)
    draws = torch.rand(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = sail_loss(zeros + h, zeros, zeros, zeros, beta, torch.full((n,), route), draws=draws)
    count = int(out.metrics["sail/flipped"].sum())
    assert within_4_sigma(count, n, 1 - sigmoid(beta * h))


# ---- the non-finite guard ------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
def test_non_finite_rows_are_flagged_zeroed_and_get_no_gradient(form):
    rng = random.Random(13)
    cols, _, routes, draws = mixed_batch(rng, 16)
    pc, pr, rc, rr = (list(c) for c in cols)
    pc[0] = -math.inf  # a token of probability 0
    rr[5] = math.nan
    # finite but huge on a PR row: l = -1e299, so the score term -c l (pc + pr) overflows;
    # the hook's coefficient -c l / logp stays finite, and its value term is 0
    pc[6], pr[6], rc[6] = -1e300, -1e300, 1e300
    routes[6] = ROUTE_PR
    bad = {0, 5, 6} if form == "score_function" else {0, 5}
    xs = [torch.tensor(c, dtype=torch.float64, requires_grad=True) for c in (pc, pr, rc, rr)]
    out = sail_loss(*xs, 0.1, routes, draws=draws, extra_gradient=form)
    assert [i for i, v in enumerate(out.metrics["sail/nonfinite"].tolist()) if v] == sorted(bad)
    assert bool(torch.isfinite(out.losses).all())
    assert all(out.losses[i].item() == 0.0 for i in bad)
    grads = torch.autograd.grad(out.losses.mean(), xs)
    for g in grads:
        assert bool(torch.isfinite(g).all())
        assert all(g[i].item() == 0.0 for i in bad)
    assert all(out.metrics["sail/extra"][i].item() == 0.0 for i in bad)
    if form == "score_function":  # the other rows are untouched by their neighbours
        good = [i for i in range(16) if i not in bad]
        ys = [torch.tensor([c[i] for i in good], dtype=torch.float64, requires_grad=True)
              for c in (pc, pr, rc, rr)]
        alone = sail_loss(*ys, 0.1, routes[good], draws=draws[good])
        assert torch.equal(out.losses[good], alone.losses)
        for g, a in zip(grads, torch.autograd.grad(alone.losses.sum(), ys), strict=True):
            assert torch.equal(g[good] * 16, a)


def test_reference_hook_flags_a_zero_log_prob():
    """The hook divides by logp: a sampled response of probability 1 (logp = 0) has no finite
    gradient there, while the score-function form handles it."""
    t = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=True)  # noqa: E731
    xs = [t([0.0, -3.0]), t([-4.0, -3.0]), t([-1.0, -2.0]), t([-4.0, -3.0])]
    routes, draws = torch.tensor([ROUTE_PR, ROUTE_PR]), torch.tensor([0.5, 0.5])
    hook = sail_loss(*xs, 0.1, routes, draws=draws, extra_gradient="reference_hook")
    assert hook.metrics["sail/nonfinite"].tolist() == [1.0, 0.0]
    assert all(bool(torch.isfinite(g).all()) for g in torch.autograd.grad(hook.losses.sum(), xs))
    score = sail_loss(*xs, 0.1, routes, draws=draws)
    assert score.metrics["sail/nonfinite"].tolist() == [0.0, 0.0]


def test_half_precision_overflow_is_caught_only_where_it_happens():
    """float16 tops out at 65504. Row 0, DPO with beta h = -300: loss 300, while its unused
    l**2 (9e4) would overflow; it must not be flagged. Row 1, PR with l = -100 and
    pc + pr = -4000: the score term -0.3 * l * (pc + pr) = -1.2e5 overflows and is flagged;
    the hook form adds no value there, so it stays finite."""
    t = lambda v: torch.tensor(v, dtype=torch.float16, requires_grad=True)  # noqa: E731
    xs = [t([-300.0, -2000.0]), t([0.0, -2000.0]), t([0.0, -1900.0]), t([0.0, -2000.0])]
    routes, draws = torch.tensor([ROUTE_DPO, ROUTE_PR]), torch.tensor([0.0, 0.0])
    out = sail_loss(*xs, 1.0, routes, draws=draws)
    assert out.metrics["sail/nonfinite"].tolist() == [0.0, 1.0]
    assert out.losses.tolist() == [300.0, 0.0]
    g = torch.autograd.grad(out.losses.sum(), xs)
    assert [x.tolist() for x in g] == [[-1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]
    hook = sail_loss(*xs, 1.0, routes, draws=draws, extra_gradient="reference_hook")
    assert hook.metrics["sail/nonfinite"].tolist() == [0.0, 0.0]
    assert hook.losses.tolist() == [300.0, 100.0]


# ---- arguments -----------------------------------------------------------------------------

def test_bad_arguments_are_refused():
    gen = torch.Generator()
    for kw, match in [({"r": -0.1, "p": 0.0, "g": 0.0}, "r must"),
                      ({"r": math.nan, "p": 0.0, "g": 0.0}, "r must"),
                      ({"r": 0.5, "p": 0.4, "g": 0.2}, "sum to at most 1"),
                      ({"r": 0.0, "p": 0.0, "g": math.inf}, "g must")]:
        with pytest.raises(ValueError, match=match):
            sail_routes(4, generator=gen, **kw)
    with pytest.raises(ValueError, match="n must"):
        sail_routes(-1, r=0.1, p=0.1, g=0.1, generator=gen)
    sail_routes(4, r=0.1, p=0.2, g=0.7, generator=gen)  # sums to 1 up to rounding: accepted

    x, routes, draws = torch.zeros(3), torch.tensor([0, 1, 2]), torch.tensor([0.1, 0.5, 0.9])
    cases = [
        ({"beta": 0.0}, "beta"),
        ({"rho": -0.1}, "rho"),
        ({"pi": math.nan}, "pi"),
        ({"gamma": -1.0}, "gamma"),
        ({"extra_gradient": "hook"}, "extra_gradient"),
        ({"routes": routes.float()}, "integer"),
        ({"routes": torch.tensor([0, 1])}, "routes has shape"),
        ({"routes": torch.tensor([0, 4, 1])}, r"0\.\.3"),
        ({"routes": torch.tensor([0, -1, 1])}, r"0\.\.3"),
        ({"routes": [0, 1, 2]}, r"routes must be a torch\.Tensor"),
        ({"draws": torch.tensor([0, 0, 0])}, "floating"),
        ({"draws": torch.tensor([0.1, 1.0, 0.2])}, r"\[0, 1\)"),
        ({"draws": torch.tensor([-0.1, 0.0, 0.2])}, r"\[0, 1\)"),
        ({"draws": torch.tensor([0.1, 0.2])}, "draws has shape"),
    ]
    for override, match in cases:
        kw = {"beta": 0.1, "routes": routes, "draws": draws} | override
        with pytest.raises(ValueError, match=match):
            sail_loss(x, x, x, x, **kw)
    with pytest.raises(ValueError, match="reference_rejected_logps has shape"):
        sail_loss(x, x, x, torch.zeros(2), 0.1, routes, draws=draws)
