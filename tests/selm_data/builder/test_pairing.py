"""Pairing rules against outcomes worked out by hand."""

from __future__ import annotations

import pytest

from selm_data.builder.pairing import Candidate, make_pairs, ranks


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
    [pair] = make_pairs("best_worst", cands(*scores), "keep")
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
    [pair] = make_pairs("replace", cands(*scores), "keep")
    assert (pair.chosen.response_id, pair.rejected.response_id) == (chosen, rejected)


def test_tie_policy():
    assert make_pairs("best_worst", cands(1, 1, 1), "drop") == []
    assert make_pairs("best_worst", cands(1, 1, 1), "keep")[0].is_tie
    assert len(make_pairs("best_worst", cands(2, 1, 1), "drop")) == 1
    with pytest.raises(ValueError, match="got 2 candidates"):
        make_pairs("best_worst", cands(1, 2, 3)[:2], "keep")
    with pytest.raises(ValueError, match="'sail' takes 4 candidates, got 3"):
        make_pairs("sail", cands(1, 2, 3), "keep")


def sail_cands(y0: float, y1: float, w: float, l: float) -> list[Candidate]:  # noqa: E741
    return [Candidate("y0", "policy", y0), Candidate("y1", "policy", y1),
            Candidate("w", "dataset_chosen", w), Candidate("l", "dataset_rejected", l)]


@pytest.mark.parametrize(
    ("scores", "chosen", "rejected", "tie"),
    [
        ((0.9, 0.1, 0.5, 0.2), "y0", "y1", False),
        ((0.1, 0.9, 0.5, 0.2), "y1", "y0", False),  # the ranker swaps the samples
        ((0.4, 0.4, 0.5, 0.2), "y0", "y1", True),   # tie: the earlier sample first, flagged
        ((0.9, 0.1, 0.2, 0.5), "y0", "y1", False),  # whatever the dataset pair's scores
    ],
)
def test_sail_keeps_the_dataset_pair_and_orders_the_samples(scores, chosen, rejected, tie):
    dataset, policy = make_pairs("sail", sail_cands(*scores), "keep")
    # The dataset pair keeps its label even where the ranker disagrees (negative margin).
    assert (dataset.chosen.response_id, dataset.rejected.response_id) == ("w", "l")
    assert dataset.rule == "sail_dataset"
    assert dataset.margin == pytest.approx(scores[2] - scores[3])
    assert (policy.chosen.response_id, policy.rejected.response_id) == (chosen, rejected)
    assert (policy.rule, policy.is_tie) == ("sail_policy", tie)
    assert policy.margin == pytest.approx(abs(scores[0] - scores[1]))
