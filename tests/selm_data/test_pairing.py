"""Pairing rules against outcomes worked out by hand."""

from __future__ import annotations

import pytest

from selm_data.pairing import Candidate, make_pair, ranks


def cands(ref: float, w: float, l: float) -> list[Candidate]:  # noqa: E741
    return [Candidate("ref", "policy", ref), Candidate("w", "dataset_chosen", w),
            Candidate("l", "dataset_rejected", l)]


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ((0.1, 0.5, 0.9), [3, 2, 1]),
        ((2.0, 2.0, 1.0), [1, 2, 3]),  # tie: the earlier ranks better
        ((1.0, 3.0, 1.0), [2, 1, 3]),
        ((0.0, 0.0, 0.0), [1, 2, 3]),
    ],
)
def test_ranks_break_ties_by_position(scores, expected):
    assert ranks(scores) == expected


@pytest.mark.parametrize(
    ("scores", "chosen", "rejected", "tie", "margin"),
    [
        ((0.9, 0.5, 0.1), "ref", "l", False, 0.8),   # y_ref best
        ((0.2, 0.5, 0.1), "w", "l", False, 0.4),     # the original pair survives
        ((0.0, 0.5, 0.1), "w", "ref", False, 0.5),   # y_ref worst
        ((0.5, 0.5, 0.1), "ref", "l", False, 0.4),   # y_ref ties y_w: the new response wins
        ((0.9, 0.1, 0.1), "ref", "l", False, 0.8),   # worst tie: the later one loses
        ((0.3, 0.3, 0.3), "ref", "l", True, 0.0),    # all equal: a visible tie
    ],
)
def test_best_worst(scores, chosen, rejected, tie, margin):
    pair = make_pair("best_worst", cands(*scores), "keep")
    assert (pair.chosen.response_id, pair.rejected.response_id) == (chosen, rejected)
    assert pair.is_tie is tie
    assert pair.margin == pytest.approx(margin)
    assert pair.rule == "best_worst"


@pytest.mark.parametrize(
    ("scores", "chosen", "rejected"),
    [
        ((0.9, 0.5, 0.1), "ref", "l"),  # y_ref beats y_w: it replaces y_w
        ((0.5, 0.5, 0.1), "ref", "l"),  # tie goes to y_ref
        ((0.2, 0.5, 0.1), "w", "ref"),  # y_w beats y_ref: y_ref replaces y_l
        ((0.0, 0.5, 0.9), "w", "ref"),  # even when y_l scored higher than y_w
    ],
)
def test_replace(scores, chosen, rejected):
    pair = make_pair("replace", cands(*scores), "keep")
    assert (pair.chosen.response_id, pair.rejected.response_id) == (chosen, rejected)


def test_tie_policy():
    assert make_pair("best_worst", cands(1, 1, 1), "drop") is None
    assert make_pair("best_worst", cands(1, 1, 1), "keep").is_tie
    assert make_pair("best_worst", cands(2, 1, 1), "drop") is not None
    with pytest.raises(ValueError, match="got 2 candidates"):
        make_pair("best_worst", cands(1, 2, 3)[:2], "keep")
