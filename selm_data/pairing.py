"""Pairing rules: from the scores of {y_ref, y_w, y_l} to one preference pair.

Candidates come in SELM's order (y_ref, y_w, y_l): the policy's new response, then the
dataset's original chosen and rejected. Ranks follow llm-blender's convention, which the paper's
code relies on: rank 1 is best, and tied scores are ranked by position, earlier first, so the
new response wins ties and the best-worst pair is `argmin(rank)`, `argmax(rank)` as in
`online_feedback.py`. Ties stay visible: each pair says whether its two scores were equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Rule = Literal["best_worst", "replace"]
TiePolicy = Literal["keep", "drop"]


@dataclass(frozen=True)
class Candidate:
    response_id: str
    origin: str  # policy | dataset_chosen | dataset_rejected
    score: float


@dataclass(frozen=True)
class Pair:
    chosen: Candidate
    rejected: Candidate
    rule: Rule

    @property
    def margin(self) -> float:
        return self.chosen.score - self.rejected.score

    @property
    def is_tie(self) -> bool:
        return self.chosen.score == self.rejected.score


def ranks(scores: Sequence[float]) -> list[int]:
    """Rank 1 for the highest score; equal scores ranked by position, earlier first."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    out = [0] * len(scores)
    for rank, i in enumerate(order, start=1):
        out[i] = rank
    return out


def best_worst(candidates: Sequence[Candidate]) -> Pair:
    """SELM's default: the best and the worst of the three (Algorithm 1)."""
    r = ranks([c.score for c in candidates])
    return Pair(candidates[r.index(1)], candidates[r.index(len(r))], "best_worst")


def replace(candidates: Sequence[Candidate]) -> Pair:
    """SELM Appendix C: compare y_ref with y_w; if y_ref is at least as good it replaces y_w as
    the chosen response, otherwise it replaces y_l as the rejected one."""
    y_ref, y_w, y_l = candidates
    if y_ref.score >= y_w.score:  # the new response wins ties, as in the ranking
        return Pair(y_ref, y_l, "replace")
    return Pair(y_w, y_ref, "replace")


RULES: dict[Rule, Callable[[Sequence[Candidate]], Pair]] = {
    "best_worst": best_worst,
    "replace": replace,
}


def make_pair(rule: Rule, candidates: Sequence[Candidate], ties: TiePolicy) -> Pair | None:
    """The pair `rule` makes of (y_ref, y_w, y_l), or None when it is a tie and ties drop."""
    if len(candidates) != 3:
        raise ValueError(f"pairing takes (y_ref, y_w, y_l), got {len(candidates)} candidates")
    pair = RULES[rule](candidates)
    return None if ties == "drop" and pair.is_tie else pair
