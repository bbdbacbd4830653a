"""Pairwise win rates between policies, offline, through the build's rankers.

The SELM paper compares iterations by pairwise length-controlled win rates (its Figure 2). Here
any ranker of the build (PairRM, a reward model, a judge server, the demo ranker) compares two
policies' stored answers (`selm-data eval`) question by question, and every comparison is
stored in `eval_comparisons` with the ranker, its version and all four scores.

- Both orders. The ranker scores the candidates [a, b] and again [b, a]; the margin is the mean
  of score(a) - score(b) over the two orders, so a constant advantage of the first (or second)
  position cancels. A pointwise ranker (reward model, demo) scores a text the same in either
  place; PairRM and a judge need not. a wins when the margin is above 0; a tie counts 0.5; two
  identical answers are a tie whatever the ranker's float noise says (an answer cannot beat
  itself, and a reward model's score moves by ~1e-6 with its batch).
- Win rate: the mean outcome over questions, with a percentile bootstrap interval over
  questions (seeded: the same numbers every run).
- Length control, in the spirit of AlpacaEval 2.0 (alpaca_eval/metrics/glm_winrate.py): a
  logistic regression of the outcome (a soft label: a tie is 0.5) on tanh(d / sd(d)) with an
  intercept, d = characters of a minus characters of b, as AlpacaEval's `std_delta_len`; the
  length-controlled win rate is the fit's prediction at equal length, sigmoid(intercept). Unlike
  AlpacaEval it has no per-instruction difficulty term (estimated from AlpacaEval's own GPT-4
  annotations of many models, a Hub download) and it uses a fixed small L2 penalty (sklearn's
  C = 100 scale, on both coefficients) instead of a cross-validated L1 one: the penalty keeps the
  fit finite when one policy wins every question. Its interval refits on every bootstrap
  resample (the resample's own sd).
- MT-Bench: the first turns are compared (both policies answer the same user turn); second turns
  follow each policy's own first answer, so their context differs: judge them with FastChat.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from rich.console import Group
from rich.table import Table

from selm_data.errors import SelmError
from selm_data.evaluate.answers import EvalPolicy, PromptSet, conversation, stored_answers
from selm_data.generation.backends import Sampling
from selm_data.publish.plots import figure_class, save_png
from selm_data.rankers.base import Ranker, RankRequest
from selm_data.store.progress import steps
from selm_data.store.schema import EVAL_COMPARISONS, row_id
from selm_data.store.store import Store

RESAMPLES = 2000
CONFIDENCE = 0.95
SCORE_CHUNK = 256  # requests per ranker call (see _score)
L2 = 0.01  # 1 / C with sklearn's C = 100, the C AlpacaEval's logistic fits default to
TURN = 1  # the turn compared: the one both policies answer from the same context


# --- comparing two policies -----------------------------------------------------------------


@dataclass(frozen=True)
class Outcomes:
    """Per question, from a's side: what `win_rate` summarises."""

    question_ids: tuple[str, ...]
    win: np.ndarray  # 1: a won, 0.5: tie, 0: b won (both orders)
    a_first: np.ndarray  # the outcome of the order [a, b] alone
    b_first: np.ndarray  # the outcome of the order [b, a] alone (still a's side)
    chars_a: np.ndarray
    chars_b: np.ndarray

    def flipped(self) -> Outcomes:
        """The same comparisons from b's side."""
        return Outcomes(self.question_ids, 1.0 - self.win, 1.0 - self.b_first,
                        1.0 - self.a_first, self.chars_b, self.chars_a)


@dataclass(frozen=True)
class Compared:
    outcomes: Outcomes
    scored: int  # comparisons the ranker made in this call (the rest were stored before)
    unscored: list[str]  # questions the ranker gave no score: not stored, retried next run
    only_one: int  # questions only one of the two policies answered


def outcome(difference: float, same_text: bool) -> float:
    """1 when a scored higher, 0 when lower, 0.5 for equal scores or identical answers."""
    if same_text or difference == 0:
        return 0.5
    return 1.0 if difference > 0 else 0.0


def compare_policies(store: Store, ranker: Ranker, prompt_set: PromptSet, a: EvalPolicy,
                     b: EvalPolicy, sampling: Sampling, *,
                     limit: int | None = None) -> Compared:
    """Compare the stored answers of `a` and `b` to the first `limit` questions that both
    answered: stored comparisons are read, missing ones scored (both orders) and stored.

    Raises:
        SelmError: the same policy twice, or no question that both answered.
    """
    if a.model.fingerprint == b.model.fingerprint:
        raise SelmError(f"{a.label} and {b.label} are the same model (fingerprint "
                        f"{a.model.fingerprint[:12]}); compare two different policies")
    questions = prompt_set.questions[:limit]
    answers = {side: stored_answers(store, prompt_set, p, sampling, questions)
               for side, p in (("a", a), ("b", b))}
    shared = [q for q in questions if (q.key, TURN) in answers["a"]
              and (q.key, TURN) in answers["b"]]
    only_one = sum(((q.key, TURN) in answers["a"]) != ((q.key, TURN) in answers["b"])
                   for q in questions)
    if not shared:
        missing = [p.label for side, p in (("a", a), ("b", b)) if not answers[side]]
        what = f"no answers of {', '.join(missing)}" if missing else "no question both answered"
        raise SelmError(
            f"{prompt_set.name}: {what} (greedy, {sampling.max_tokens} new tokens) in the store; "
            f"run `selm-data eval --prompts {prompt_set.name}` with --iter N or --policy PATH "
            "for each policy first (with the same --max-tokens)")
    items = []
    for q in shared:
        ra, rb = answers["a"][(q.key, TURN)], answers["b"][(q.key, TURN)]
        first, second = sorted((ra, rb), key=lambda r: r["answer_id"])
        items.append((q, first, second, first is rb))
    ids = [row_id(EVAL_COMPARISONS, {"answer_a_id": x["answer_id"], "answer_b_id": y["answer_id"],
                                     "ranker": ranker.name, "ranker_version": ranker.version})
           for _, x, y, _ in items]
    stored = _stored_comparisons(store, ids)
    todo = [item for cid, item in zip(ids, items, strict=True) if cid not in stored]
    rows: list[dict[str, Any]] = []
    unscored: list[str] = []
    if todo:
        rows, unscored = _score(ranker, prompt_set, a, b, todo)
        store.append("eval_comparisons", rows)
        stored = _stored_comparisons(store, ids)
    kept = [(cid, item) for cid, item in zip(ids, items, strict=True) if cid in stored]
    outcomes = _orient([stored[cid] for cid, _ in kept], [item for _, item in kept])
    return Compared(outcomes, len(rows), unscored, only_one)


def _stored_comparisons(store: Store, ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = store.scan("eval_comparisons").filter(pl.col("comparison_id").is_in(ids)).collect()
    return {row["comparison_id"]: row for row in rows.iter_rows(named=True)}


def _score(ranker: Ranker, prompt_set: PromptSet, a: EvalPolicy, b: EvalPolicy,
           items: list[tuple[Any, dict, dict, bool]]) -> tuple[list[dict], list[str]]:
    """One ranker call: every item in the order [x, y], then every item in [y, x]. Returns
    the rows to store and the questions left unscored (a NaN from the ranker)."""
    requests = []
    for order in (0, 1):
        for q, x, y, _ in items:
            messages = conversation(q, TURN, {})
            assert messages is not None  # the first turn needs no earlier answer
            pair = [x["text"], y["text"]] if order == 0 else [y["text"], x["text"]]
            requests.append(RankRequest(messages, pair))
    scores = []
    # In chunks, for progress only. SCORE_CHUNK is a multiple of the rankers' default batch (8),
    # so each batch holds the same requests as in one call; another ranker.batch_size may
    # group them otherwise, which moves a reward model's scores by float noise (~1e-6) only.
    with steps(f"ranking {a.label} vs {b.label}", len(requests), unit="answers") as bar:
        for start in range(0, len(requests), SCORE_CHUNK):
            chunk = requests[start:start + SCORE_CHUNK]
            scores.extend(ranker.score(chunk))
            bar.update(len(chunk))
    n = len(items)
    rows, unscored = [], []
    for k, (q, x, y, x_is_b) in enumerate(items):
        (sx1, sy1), (sy2, sx2) = scores[k], scores[n + k]
        if not all(math.isfinite(s) for s in (sx1, sy1, sy2, sx2)):
            unscored.append(q.key)
            continue
        margin = ((sx1 - sy1) + (sx2 - sy2)) / 2
        policy_x, policy_y = (b, a) if x_is_b else (a, b)
        rows.append({
            "prompt_set": prompt_set.name, "prompt_set_hash": prompt_set.hash,
            "question_id": q.key, "turn": TURN,
            "answer_a_id": x["answer_id"], "answer_b_id": y["answer_id"],
            "policy_a_fingerprint": policy_x.model.fingerprint,
            "policy_b_fingerprint": policy_y.model.fingerprint,
            "ranker": ranker.name, "ranker_version": ranker.version,
            "a_first_score_a": sx1, "a_first_score_b": sy1,
            "b_first_score_a": sx2, "b_first_score_b": sy2,
            "margin": margin, "win_a": outcome(margin, x["text"] == y["text"]),
            "chars_a": len(x["text"]), "chars_b": len(y["text"]),
        })
    return rows, unscored


def _orient(rows: list[dict[str, Any]], items: list[tuple[Any, dict, dict, bool]]) -> Outcomes:
    """Stored rows (a, b in answer-id order) as outcomes of the asked-for a over b."""
    win, a_first, b_first, chars_a, chars_b, keys = [], [], [], [], [], []
    for row, (q, x, y, x_is_b) in zip(rows, items, strict=True):
        same = x["text"] == y["text"]
        w = row["win_a"]
        first = outcome(row["a_first_score_a"] - row["a_first_score_b"], same)  # [x, y]
        second = outcome(row["b_first_score_a"] - row["b_first_score_b"], same)  # [y, x]
        cx, cy = row["chars_a"], row["chars_b"]
        if x_is_b:  # the asked-for a is the row's b
            w, first, second, cx, cy = 1.0 - w, 1.0 - second, 1.0 - first, cy, cx
        win.append(w)
        a_first.append(first)
        b_first.append(second)
        chars_a.append(cx)
        chars_b.append(cy)
        keys.append(q.key)
    return Outcomes(tuple(keys), *(np.asarray(v, dtype=np.float64)
                                   for v in (win, a_first, b_first, chars_a, chars_b)))


# --- statistics -----------------------------------------------------------------------------


@dataclass(frozen=True)
class WinRate:
    n: int
    wins: int
    ties: int
    losses: int
    win_rate: float
    ci: tuple[float, float]
    lc_win_rate: float  # at equal length
    lc_ci: tuple[float, float]
    order_agreement: float  # questions whose two orders alone give the same outcome
    first_position: float  # single-order decisions won by the first candidate: 0.5 = no bias
    mean_chars_a: float
    mean_chars_b: float


def win_rate(o: Outcomes, *, resamples: int = RESAMPLES, seed: int = 0,
             confidence: float = CONFIDENCE) -> WinRate:
    """The win rate of a over b, its length-controlled variant, and their bootstrap intervals
    (percentile, `resamples` resamples of the questions drawn with `seed`)."""
    n = len(o.win)
    if n == 0:
        raise SelmError("no compared question: nothing to summarise")
    delta = o.chars_a - o.chars_b
    tail = (1 - confidence) / 2
    rates, lcs = [], []
    for idx in _blocks(bootstrap_indices(n, resamples, seed)):
        rates.append(o.win[idx].mean(axis=-1))
        lcs.append(lc_win_rate(o.win[idx], delta[idx]))
    rate_draws, lc_draws = np.concatenate(rates), np.concatenate(lcs)
    return WinRate(
        n=n, wins=int((o.win == 1).sum()), ties=int((o.win == 0.5).sum()),
        losses=int((o.win == 0).sum()), win_rate=float(o.win.mean()),
        ci=_interval(rate_draws, tail), lc_win_rate=float(lc_win_rate(o.win, delta)),
        lc_ci=_interval(lc_draws, tail),
        order_agreement=float((o.a_first == o.b_first).mean()),
        first_position=float(np.concatenate([o.a_first, 1.0 - o.b_first]).mean()),
        mean_chars_a=float(o.chars_a.mean()), mean_chars_b=float(o.chars_b.mean()),
    )


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) question indices drawn with replacement: row r is resample r."""
    if resamples < 1:
        raise SelmError(f"--resamples must be at least 1, not {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _blocks(idx: np.ndarray, rows: int = 250) -> list[np.ndarray]:
    """Resamples a block at a time: 250 x 805 questions keeps each array near 1.6 MB."""
    return [idx[k:k + rows] for k in range(0, len(idx), rows)]


def _interval(draws: np.ndarray, tail: float) -> tuple[float, float]:
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(low), float(high)


def length_feature(delta: np.ndarray) -> np.ndarray:
    """tanh(d / sd(d)) along the last axis (AlpacaEval's std_delta_len through np.tanh);
    0 where d does not vary (sd 0 or a single question)."""
    delta = np.asarray(delta, dtype=np.float64)
    if delta.shape[-1] < 2:
        return np.zeros_like(delta)
    sd = delta.std(axis=-1, ddof=1, keepdims=True)
    scaled = np.divide(delta, sd, out=np.zeros_like(delta), where=sd > 0)
    return np.tanh(scaled)


def lc_win_rate(win: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """sigmoid(intercept) of `fit_logistic(win, length_feature(delta))`, per leading index."""
    w = fit_logistic(win, length_feature(delta))
    return _sigmoid(w[..., 0])


def fit_logistic(y: np.ndarray, x: np.ndarray, *, l2: float = L2,
                 tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """Minimise sum_i [log(1 + e^z_i) - y_i z_i] + l2/2 (w0^2 + w1^2), z = w0 + w1 x, with soft
    labels y in [0, 1]; every leading index of y and x is its own fit (bootstrap resamples run
    as one batch). Newton's method with step halving: the objective is convex (strictly, with
    l2 > 0), so it converges from 0. Returns (..., 2): intercept, slope."""
    y, x = np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)
    w = np.zeros((*y.shape[:-1], 2))
    loss = _objective(w, y, x, l2)
    for _ in range(max_iter):
        p = _sigmoid(w[..., :1] + w[..., 1:] * x)
        r, s = p - y, p * (1 - p)
        g0, g1 = r.sum(-1) + l2 * w[..., 0], (r * x).sum(-1) + l2 * w[..., 1]
        h00, h01, h11 = s.sum(-1) + l2, (s * x).sum(-1), (s * x * x).sum(-1) + l2
        det = h00 * h11 - h01 * h01
        det = np.where(det > 0, det, np.finfo(np.float64).tiny)  # l2 = 0 with x constant
        step = np.stack([(h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det], axis=-1)
        t = np.ones(w.shape[:-1])
        for _ in range(40):  # halve each fit's step until its objective does not rise
            trial = w - t[..., None] * step
            trial_loss = _objective(trial, y, x, l2)
            worse = trial_loss > loss + 1e-12 * np.abs(loss)
            if not worse.any():
                break
            t = np.where(worse, t / 2, t)
        w, loss = trial, trial_loss
        if np.max(np.abs(t[..., None] * step), initial=0.0) < tol:
            break
    return w


def _objective(w: np.ndarray, y: np.ndarray, x: np.ndarray, l2: float) -> np.ndarray:
    z = w[..., :1] + w[..., 1:] * x
    return (np.logaddexp(0.0, z) - y * z).sum(-1) + l2 / 2 * (w * w).sum(-1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z)))  # no overflow for any z


# --- the matrix across policies -------------------------------------------------------------


@dataclass(frozen=True)
class Matrix:
    prompt_set: str
    ranker: str
    labels: tuple[str, ...]
    rates: dict[tuple[int, int], WinRate]  # (row, column): the row policy's rate over the column
    notes: tuple[str, ...] = ()  # unscored or one-sided questions, per pair


def win_matrix(store: Store, ranker: Ranker, prompt_set: PromptSet,
               policies: Sequence[EvalPolicy], sampling: Sampling, *, limit: int | None = None,
               resamples: int = RESAMPLES, seed: int = 0) -> Matrix:
    """Every pair of `policies` compared (stored comparisons reused), both directions."""
    if len(policies) < 2:
        raise SelmError("a win-rate matrix needs at least two policies")
    labels = [p.label for p in policies]
    if len(set(labels)) != len(labels):
        raise SelmError(f"policies given twice: {labels}")
    rates: dict[tuple[int, int], WinRate] = {}
    notes = []
    for i in range(len(policies)):
        for j in range(i + 1, len(policies)):
            c = compare_policies(store, ranker, prompt_set, policies[i], policies[j], sampling,
                                 limit=limit)
            rates[(i, j)] = win_rate(c.outcomes, resamples=resamples, seed=seed)
            rates[(j, i)] = win_rate(c.outcomes.flipped(), resamples=resamples, seed=seed)
            if c.unscored or c.only_one:
                notes.append(f"{labels[i]} vs {labels[j]}: {len(c.unscored)} unscored (rerun to "
                             f"retry), {c.only_one} answered by one side only")
    return Matrix(prompt_set.name, f"{ranker.name} ({ranker.version})", tuple(labels), rates,
                  tuple(notes))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _with_ci(value: float, ci: tuple[float, float]) -> str:
    return f"{_pct(value)} [{_pct(ci[0])}, {_pct(ci[1])}]"


def render_pair(a: str, b: str, r: WinRate) -> Table:
    """One comparison: a over b."""
    table = Table(title=f"{a} over {b}")
    table.add_column("")
    table.add_column("value", justify="right")
    for label, value in (
        ("questions compared", f"{r.n}"),
        (f"{a} wins / ties / {b} wins", f"{r.wins} / {r.ties} / {r.losses}"),
        ("win rate % [95% CI]", _with_ci(r.win_rate, r.ci)),
        ("length-controlled win rate % [95% CI]", _with_ci(r.lc_win_rate, r.lc_ci)),
        ("both orders agree", f"{_pct(r.order_agreement)}%"),
        ("first position wins (50: no position bias)", f"{_pct(r.first_position)}%"),
        ("mean characters a / b", f"{r.mean_chars_a:.0f} / {r.mean_chars_b:.0f}"),
    ):
        table.add_row(label, value)
    return table


def render_matrix(m: Matrix) -> Group:
    """The length-controlled and raw win rates of each row over each column, with intervals,
    and a row per pair with its counts."""
    k = len(m.labels)
    grid = Table(title=f"{m.prompt_set}: win rate % of row over column [95% CI]",
                 caption=f"ranker {m.ranker}; LC: length-controlled; both orders", show_lines=True)
    grid.add_column("")
    for label in m.labels:
        grid.add_column(label, justify="center")
    for i in range(k):
        cells = []
        for j in range(k):
            r = m.rates.get((i, j))
            cells.append("—" if r is None else
                         f"LC {_with_ci(r.lc_win_rate, r.lc_ci)}\nWR {_with_ci(r.win_rate, r.ci)}")
        grid.add_row(m.labels[i], *cells)
    pairs = Table(title="pairs")
    for column in ("row over column", "n", "W / T / L", "WR %", "LC WR %", "orders agree",
                   "first pos.", "chars row / col"):
        pairs.add_column(column, justify="left" if column == "row over column" else "right")
    for (i, j), r in sorted(m.rates.items()):
        if i < j:
            pairs.add_row(f"{m.labels[i]} over {m.labels[j]}", str(r.n),
                          f"{r.wins} / {r.ties} / {r.losses}", _with_ci(r.win_rate, r.ci),
                          _with_ci(r.lc_win_rate, r.lc_ci), f"{_pct(r.order_agreement)}%",
                          f"{_pct(r.first_position)}%",
                          f"{r.mean_chars_a:.0f} / {r.mean_chars_b:.0f}")
    parts: list[Any] = [grid, pairs, *m.notes]
    return Group(*parts)


def plot_matrix(m: Matrix, path: str | os.PathLike[str]) -> Path:
    """A heat-map PNG of the length-controlled win rate of each row over each column (as the
    SELM paper's Figure 2), each cell annotated with its interval and the raw win rate.

    Raises:
        SelmError: matplotlib is missing or `path` is not a writable *.png.
    """
    path, Figure = figure_class(path)
    from matplotlib import colormaps

    k = len(m.labels)
    values = np.full((k, k), np.nan)
    for (i, j), r in m.rates.items():
        values[i, j] = r.lc_win_rate
    size = 1.9 * k + 2.4
    fig = Figure(figsize=(size, size * 0.85), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["RdBu"].with_extremes(bad="0.85")  # the diagonal: grey
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0)
    for (i, j), r in m.rates.items():
        ax.text(j, i, f"{_pct(r.lc_win_rate)}\n[{_pct(r.lc_ci[0])}, {_pct(r.lc_ci[1])}]\n"
                      f"raw {_pct(r.win_rate)}", ha="center", va="center", fontsize=8,
                color="white" if abs(r.lc_win_rate - 0.5) > 0.3 else "black")
    for i in range(k):
        ax.text(i, i, "—", ha="center", va="center", fontsize=10, color="0.4")
    ax.set_xticks(range(k), m.labels)
    ax.set_yticks(range(k), m.labels)
    ax.set_xlabel("column policy")
    ax.set_ylabel("row policy")
    n = max((r.n for r in m.rates.values()), default=0)
    ax.set_title(f"{m.prompt_set}: length-controlled win rate (%) of row over column\n"
                 f"{m.ranker}, both orders, n = {n}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="LC win rate")
    return save_png(fig, path)


__all__ = [
    "Compared", "Matrix", "Outcomes", "WinRate", "bootstrap_indices", "compare_policies",
    "fit_logistic", "lc_win_rate", "length_feature", "outcome", "plot_matrix", "render_matrix",
    "render_pair", "win_matrix", "win_rate",
]
