"""Pairing rules: from the scores of one ranking to preference pairs.

SELM's rules rank (y_ref, y_w, y_l): the policy's new response, then the dataset's original
chosen and rejected. Ranks follow llm-blender's convention, which the paper's code relies on:
rank 1 is best, and tied scores are ranked by position, earlier first, so the new response wins
ties and the best-worst pair is `argmin(rank)`, `argmax(rank)` as in `online_feedback.py`. Ties
stay visible: each pair says whether its two scores were equal.

SAIL's rule (Ding et al. 2024) ranks (y_0, y_1, y_w, y_l): two seeded samples of the policy,
then the dataset's pair, and keeps two pairs of one ranking: the dataset pair as labelled (for
plain DPO and SAIL-DP) and the policy pair ordered by score (for SAIL-PR; SAIL-PP ignores the
order and the trainer orders it by the policy's own preference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Rule = Literal["best_worst", "replace", "sail"]
# What the `pairs.rule` column says: the rule, or for SAIL which of its two pairs a row is.
PairRule = Literal["best_worst", "replace", "sail_dataset", "sail_policy"]
TiePolicy = Literal["keep", "drop"]

# The policy samples each rule ranks beside the dataset's pair (the build's `sample_index`es).
POLICY_SAMPLES: dict[Rule, int] = {"best_worst": 1, "replace": 1, "sail": 2}


@dataclass(frozen=True)
class Candidate:
    response_id: str
    origin: str  # policy | dataset_chosen | dataset_rejected
    score: float


@dataclass(frozen=True)
class Pair:
    chosen: Candidate
    rejected: Candidate
    rule: PairRule

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


def sail(candidates: Sequence[Candidate]) -> tuple[Pair, Pair]:
    """SAIL: the dataset pair (y_w, y_l) as the dataset labelled it, whatever the ranker thinks
    (its margin may be negative), and the policy pair (y_0, y_1) ordered by score; on a tie the
    earlier sample, y_0, is chosen (rank order), and the pair is flagged is_tie."""
    y_0, y_1, y_w, y_l = candidates
    better, worse = (y_0, y_1) if y_0.score >= y_1.score else (y_1, y_0)
    return Pair(y_w, y_l, "sail_dataset"), Pair(better, worse, "sail_policy")


RULES: dict[Rule, Callable[[Sequence[Candidate]], Sequence[Pair]]] = {
    "best_worst": lambda c: (best_worst(c),),
    "replace": lambda c: (replace(c),),
    "sail": sail,
}


def make_pairs(rule: Rule, candidates: Sequence[Candidate], ties: TiePolicy) -> list[Pair]:
    """The pairs `rule` makes of its ranked candidates (the policy's samples, then y_w, y_l),
    without the tied ones when ties drop."""
    expected = POLICY_SAMPLES[rule] + 2
    if len(candidates) != expected:
        raise ValueError(f"rule {rule!r} takes {expected} candidates, got {len(candidates)} "
                         "candidates")
    return [p for p in RULES[rule](candidates) if not (ties == "drop" and p.is_tie)]

