"""inspect and diff: every statistic against a plain-Python computation over the rows written."""

from __future__ import annotations

import statistics
import struct
import sys
from collections import Counter, defaultdict

import polars as pl
import pytest
from rich.console import Console

from helpers import Rows, chain_rows, require, write_chain
from selm_data.builder.pairing import Candidate, best_worst, ranks
from selm_data.errors import SelmError
from selm_data.publish.diff import diff, render_diff
from selm_data.publish.plots import plot, score_samples
from selm_data.publish.snapshot import Filters, export
from selm_data.publish.stats import COLUMNS, iteration_stats, quarantine_stats, render_stats
from selm_data.store.schema import RESPONSES, content_id, row_id

FAILED = "failed"
ORIGINS = ("policy", "dataset_chosen", "dataset_rejected")

# (y_ref, y_w, y_l) scores of each prompt; FAILED: the generation failed (no ranking, no pair).
RANKED_1 = [
    (0.5, 0.9, -0.2),  # y_ref between
    (1.2, 0.3, 0.1),  # y_ref best
    (0.3, 0.3, -1.0),  # y_ref ties y_w (and wins the tie)
    (-0.5, 0.4, 0.2),  # y_ref worst
    (0.2, 0.7, 0.2),  # y_ref ties y_l
    (0.6, -0.1, 0.8),  # the ranker prefers y_l to y_w
    (0.4, 0.4, 0.4),  # all equal: a tied pair
    FAILED,
    (0.9, 0.8, 0.1),
]
RANKED_2 = [(1.5, 0.2, -0.3), (1.1, 1.3, 0.0), (0.8, 0.1, 0.1), (2.0, -0.4, 0.5)]
# The dataset's own (chosen, rejected) scores of a `pairs: original` iteration; None: unscored.
ORIGINAL_3 = [(7.0, 3.0), (5.0, 5.0), (None, None), (8.5, 2.0)]


def _texts(rows: Rows, i: int) -> list[dict]:
    """The three responses of prompt i, with distinct lengths and token counts."""
    policy, chosen, rejected = rows["responses"][3 * i:3 * i + 3]
    policy.update(text="p" * (5 + 3 * i), completion_tokens=None if i == 0 else i + 2)
    chosen.update(text="c" * (20 + i))
    rejected.update(text="r" * (8 + 2 * i))
    return [policy, chosen, rejected]


def ranked(iteration: int, scores: list, *, tag: str = "") -> Rows:
    """chain_rows with the given scores, the best-worst pair they make, and failures."""
    rows = chain_rows(iteration, len(scores), tag=tag)
    judgments, pairs = [], []
    for i, triple in enumerate(scores):
        responses = _texts(rows, i)
        if triple == FAILED:
            policy = responses[0]
            policy.update(status="failed", error="server timeout", text=None,
                          completion_tokens=None)
            policy["response_id"] = row_id(RESPONSES, policy)
            continue
        ranked_ = rows["judgments"][3 * i:3 * i + 3]
        for judgment, score, rank in zip(ranked_, triple, ranks(triple), strict=True):
            judgment.update(score=score, rank=rank)
        judgments += ranked_
        pair = best_worst([Candidate(r["response_id"], r["origin"], s)
                           for r, s in zip(responses, triple, strict=True)])
        pairs.append({**rows["pairs"][i], "chosen_id": pair.chosen.response_id,
                      "rejected_id": pair.rejected.response_id,
                      "chosen_origin": pair.chosen.origin,
                      "rejected_origin": pair.rejected.origin,
                      "chosen_score": pair.chosen.score, "rejected_score": pair.rejected.score,
                      "margin": pair.margin, "is_tie": pair.is_tie})
    rows["judgments"], rows["pairs"] = judgments, pairs
    return rows


def original(iteration: int, scores: list, *, tag: str = "") -> Rows:
    """A `pairs: original` iteration: no policy responses, the dataset's two scores."""
    rows = chain_rows(iteration, len(scores), tag=tag)
    for i in range(len(scores)):
        _texts(rows, i)
    rows["responses"] = [r for r in rows["responses"] if r["origin"] != "policy"]
    rows["judgments"], rows["pairs"] = [], []
    for i, (chosen_score, rejected_score) in enumerate(scores):
        chosen, rejected = rows["responses"][2 * i:2 * i + 2]
        prompt_id = chosen["prompt_id"]
        ranking = content_id("ranking", {"prompt_id": prompt_id, "ranker": "dataset"})
        for pos, (r, score) in enumerate(((chosen, chosen_score), (rejected, rejected_score))):
            rows["judgments"].append(
                {"ranking_id": ranking, "prompt_id": prompt_id, "iteration": iteration,
                 "response_id": r["response_id"], "position": pos, "n_candidates": 2,
                 "score": score, "rank": pos + 1, "ranker": "dataset"})
        unscored = chosen_score is None or rejected_score is None
        rows["pairs"].append(
            {"prompt_id": prompt_id, "iteration": iteration, "ranking_id": ranking,
             "rule": "original", "chosen_id": chosen["response_id"],
             "rejected_id": rejected["response_id"], "ref_id": None,
             "chosen_origin": "dataset_chosen", "rejected_origin": "dataset_rejected",
             "chosen_score": chosen_score, "rejected_score": rejected_score,
             "margin": None if unscored else chosen_score - rejected_score,
             "is_tie": not unscored and chosen_score == rejected_score})
    return rows


@pytest.fixture
def built(store):
    by_iteration = {1: ranked(1, RANKED_1), 2: ranked(2, RANKED_2), 3: original(3, ORIGINAL_3)}
    by_iteration[2]["quarantine"].append(
        {"source": "tests", "source_split": "train", "source_row": 7, "reason": "empty prompt"})
    for rows in by_iteration.values():
        write_chain(store, rows)
    return store, by_iteration


# --- the independent computation ----------------------------------------------------------


def deciles(values: list[float]) -> tuple[float, ...] | None:
    """p10, p50, p90 with linear interpolation (statistics' inclusive method)."""
    if not values:
        return None
    if len(values) == 1:
        return (values[0],) * 3
    cuts = statistics.quantiles(values, n=10, method="inclusive")
    return cuts[0], cuts[4], cuts[8]


def mean(values: list) -> float | None:
    return statistics.fmean(values) if values else None


def share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def expected_stats(iteration: int, rows: Rows) -> dict:
    by_ranking: defaultdict[str, dict] = defaultdict(dict)
    for j in rows["judgments"]:
        if j["n_candidates"] == 3:
            by_ranking[j["ranking_id"]][j["position"]] = j["score"]
    triples = [(s[0], s[1], s[2]) for s in by_ranking.values()
               if len(s) == 3 and None not in s.values()]
    pairs = [p for p in rows["pairs"] if p["rule"] != "sail_policy"]
    policy = [p for p in rows["pairs"] if p["rule"] == "sail_policy"]
    with_ref = [p for p in pairs if p["ref_id"] is not None]
    paired = {p["prompt_id"] for p in rows["pairs"]}
    ok = [r for r in rows["responses"] if r["status"] == "ok"]
    out = {
        "iteration": iteration,
        "prompts": len(rows["prompts"]),
        "generated": sum(r["origin"] == "policy" for r in ok),
        "failed": sum(r["status"] == "failed" for r in rows["responses"]),
        "rankings": len({j["ranking_id"] for j in rows["judgments"]}),
        "pairs": len(pairs),
        "ties": sum(p["is_tie"] for p in pairs),
        "policy_pairs": len(policy),
        "policy_ties": sum(p["is_tie"] for p in policy),
        "unpaired": sum(p["prompt_id"] not in paired for p in rows["prompts"]),
        "compared": len(triples),
        "ref_gt_yw": share([r > w for r, w, _ in triples]),
        "ref_eq_yw": share([r == w for r, w, _ in triples]),
        "ref_lt_yw": share([r < w for r, w, _ in triples]),
        "ref_gt_yl": share([r > lo for r, _, lo in triples]),
        "ref_eq_yl": share([r == lo for r, _, lo in triples]),
        "ref_lt_yl": share([r < lo for r, _, lo in triples]),
        "yw_gt_yl": share([w > lo for _, w, lo in triples]),
        "chosen_is_ref": share([p["chosen_origin"] == "policy" for p in with_ref]),
        "rejected_is_ref": share([p["rejected_origin"] == "policy" for p in with_ref]),
        "margin_mean": mean([p["margin"] for p in pairs if p["margin"] is not None]),
    }
    for name, values in (
        ("score_chosen", [p["chosen_score"] for p in pairs]),
        ("score_rejected", [p["rejected_score"] for p in pairs]),
        ("score_ref", [t[0] for t in triples]),
        ("margin", [p["margin"] for p in pairs]),
    ):
        q = deciles([v for v in values if v is not None]) or (None, None, None)
        out.update(zip((f"{name}_p10", f"{name}_p50", f"{name}_p90"), q, strict=True))
    for origin in ORIGINS:
        mine = [r for r in ok if r["origin"] == origin]
        out[f"chars_{origin}"] = mean([len(r["text"]) for r in mine])
        out[f"tokens_{origin}"] = mean([r["completion_tokens"] for r in mine
                                        if r.get("completion_tokens") is not None])
    return out


def assert_row(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected) == set(COLUMNS)
    for column, want in expected.items():
        got = actual[column]
        if want is None:
            assert got is None, column
        else:
            assert got == pytest.approx(want, abs=1e-12), column


# --- iteration_stats ------------------------------------------------------------------------


def test_every_statistic_matches_a_plain_computation(built):
    store, by_iteration = built
    df = iteration_stats(store)
    assert df.columns == list(COLUMNS)
    assert df["iteration"].to_list() == [1, 2, 3]
    for row in df.iter_rows(named=True):
        assert_row(row, expected_stats(row["iteration"], by_iteration[row["iteration"]]))


def test_worked_by_hand(built):
    """A few numbers of iteration 1 worked out from RANKED_1 by hand."""
    store, _ = built
    row = iteration_stats(store, iteration=1).row(0, named=True)
    # 9 prompts, 1 failed generation: 8 rankings and 8 pairs, one of them all-equal.
    assert (row["prompts"], row["generated"], row["failed"]) == (9, 8, 1)
    assert (row["rankings"], row["compared"], row["pairs"], row["ties"], row["unpaired"]) == (
        8, 8, 8, 1, 1)
    # y_ref vs y_w: above in prompts 1, 5, 8; equal in 2, 6; below in 0, 3, 4.
    assert (row["ref_gt_yw"], row["ref_eq_yw"], row["ref_lt_yw"]) == (3 / 8, 2 / 8, 3 / 8)
    # y_ref is chosen (best, ties won) in prompts 1, 2, 6, 8; rejected (worst) in 3 only.
    assert (row["chosen_is_ref"], row["rejected_is_ref"]) == (4 / 8, 1 / 8)
    assert row["tokens_policy"] == pytest.approx(statistics.fmean([3, 4, 5, 6, 7, 8, 10]))
    assert row["tokens_dataset_chosen"] is None  # no token counts recorded for the dataset's


def test_original_pairs_have_null_y_ref_columns(built):
    store, _ = built
    row = iteration_stats(store, iteration=3).row(0, named=True)
    nulls = ["ref_gt_yw", "ref_eq_yw", "ref_lt_yw", "ref_gt_yl", "ref_eq_yl", "ref_lt_yl",
             "yw_gt_yl", "chosen_is_ref", "rejected_is_ref", "score_ref_p50", "chars_policy"]
    assert all(row[c] is None for c in nulls)
    assert (row["pairs"], row["ties"], row["compared"], row["generated"]) == (4, 1, 0, 0)
    assert row["score_chosen_p50"] == pytest.approx(7.0)  # of 5, 7, 8.5: the unscored left out


def test_one_iteration_and_nothing_to_inspect(built, tmp_path):
    store, _ = built
    everything = iteration_stats(store)
    assert iteration_stats(store, iteration=2).to_dicts() == everything.filter(
        pl.col("iteration") == 2).to_dicts()
    with pytest.raises(SelmError, match=r"iteration 7 has nothing.*build --iter 7"):
        iteration_stats(store, iteration=7)
    from selm_data import open_store

    empty = open_store(tmp_path / "empty", create=True)
    with pytest.raises(SelmError, match="no iteration yet"):
        iteration_stats(empty)


def test_quarantine_per_source_and_reason(built):
    store, by_iteration = built
    want = Counter((q["source"], q["source_split"], q["reason"])
                   for rows in by_iteration.values() for q in rows["quarantine"])
    got = quarantine_stats(store)
    assert {(r["source"], r["source_split"], r["reason"]): r["rows"]
            for r in got.iter_rows(named=True)} == dict(want)
    assert got["rows"].sum() == 4


def render(renderable) -> str:
    console = Console(record=True, width=220)
    console.print(renderable)
    return console.export_text()


def test_render_stats(built):
    store, _ = built
    text = render(render_stats(iteration_stats(store), quarantine=quarantine_stats(store)))
    assert "iter 1" in text and "iter 3" in text
    cells = [c.strip() for c in next(t for t in text.splitlines() if "y_ref vs y_w" in t)
             .split("│")[1:-1]]
    assert cells[1:] == ["37.5% / 25.0% / 37.5%", "75.0% / 0.0% / 25.0%", "n/a"]
    assert "quarantined source rows" in text and "4 in all" in text
    assert "empty prompt" in text


# --- plot -----------------------------------------------------------------------------------


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_score_samples_are_the_pairs_and_y_refs(built):
    store, by_iteration = built
    samples = score_samples(store)
    got = Counter(zip(samples["iteration"], samples["role"], strict=True))
    want = Counter()
    for it, rows in by_iteration.items():
        for p in rows["pairs"]:
            want[(it, "chosen")] += p["chosen_score"] is not None
            want[(it, "rejected")] += p["rejected_score"] is not None
        want[(it, "y_ref")] += expected_stats(it, rows)["compared"]
    assert got == +want
    assert set(samples.filter(pl.col("iteration") == 3)["ranker"]) == {"dataset"}


def test_plot_writes_a_png(built, tmp_path):
    require("matplotlib", "'selm[plot]'")
    store, _ = built
    out = plot(store, tmp_path / "scores.png")
    width, height = png_size(out)
    # 3 iterations + the win-rate panel: 3 columns by 2 rows of about 5 x 3.8 inches at 110 dpi.
    assert 1400 <= width <= 1800 and 700 <= height <= 900
    assert out.stat().st_size > 20_000  # drawn, not blank
    one = plot(store, tmp_path / "one.png", iterations=[2])
    assert png_size(one)[0] < width  # two panels side by side


def test_plot_errors(built, tmp_path, monkeypatch):
    store, _ = built
    with pytest.raises(SelmError, match=r"\*\.png"):
        plot(store, tmp_path / "scores.svg")
    from selm_data import open_store

    empty = open_store(tmp_path / "empty", create=True)
    require("matplotlib", "'selm[plot]'")
    with pytest.raises(SelmError, match="no judgments"):
        plot(empty, tmp_path / "x.png")
    with pytest.raises(SelmError, match="no judgments"):
        plot(store, tmp_path / "x.png", iterations=[9])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SelmError, match=r"pip install 'selm\[plot\]'"):
        plot(store, tmp_path / "x.png")


# --- diff -----------------------------------------------------------------------------------


def expected_side(pairs: list[dict], ref_scores: dict) -> dict:
    with_ref = [p for p in pairs if p["ref_id"] is not None]
    return {
        "pairs": len(pairs),
        "prompts": len({p["prompt_id"] for p in pairs}),
        "tie_rate": share([p["is_tie"] for p in pairs]),
        "margin_mean": mean([p["margin"] for p in pairs if p["margin"] is not None]),
        "score_chosen_mean": mean([p["chosen_score"] for p in pairs]),
        "score_rejected_mean": mean([p["rejected_score"] for p in pairs]),
        "score_ref_mean": mean([ref_scores[(p["ranking_id"], p["ref_id"])] for p in with_ref]),
        "chosen_is_ref": share([p["chosen_origin"] == "policy" for p in with_ref]),
        "rejected_is_ref": share([p["rejected_origin"] == "policy" for p in with_ref]),
    }


def expected_overlap(a: list[dict], b: list[dict], texts: dict) -> dict:
    def content(pairs):
        return {(p["prompt_id"], texts[p["chosen_id"]], texts[p["rejected_id"]]) for p in pairs}

    def texts_of(pairs, column):
        out = defaultdict(set)
        for p in pairs:
            out[p["prompt_id"]].add(texts[p[column]])
        return out

    pa_, pb = {p["prompt_id"] for p in a}, {p["prompt_id"] for p in b}
    ca, cb = content(a), content(b)
    shared = pa_ & pb
    return {
        "prompts_only_a": len(pa_ - pb), "prompts_only_b": len(pb - pa_),
        "prompts_shared": len(shared),
        "pairs_only_a": len(ca - cb), "pairs_only_b": len(cb - ca), "pairs_shared": len(ca & cb),
        "chosen_changed": sum(texts_of(a, "chosen_id")[p] != texts_of(b, "chosen_id")[p]
                              for p in shared),
        "rejected_changed": sum(texts_of(a, "rejected_id")[p] != texts_of(b, "rejected_id")[p]
                                for p in shared),
    }


def index(by_iteration: dict) -> tuple[dict, dict]:
    texts = {r["response_id"]: r["text"] for rows in by_iteration.values()
             for r in rows["responses"]}
    scores = {(j["ranking_id"], j["response_id"]): j["score"] for rows in by_iteration.values()
              for j in rows["judgments"]}
    return texts, scores


def assert_diff(d, a: list[dict], b: list[dict], by_iteration: dict) -> None:
    texts, scores = index(by_iteration)
    for side, pairs in ((d.a, a), (d.b, b)):
        for field, want in expected_side(pairs, scores).items():
            got = getattr(side, field)
            assert got == (None if want is None else pytest.approx(want)), field
    for field, want in expected_overlap(a, b, texts).items():
        assert getattr(d, field) == want, field


def test_diff_two_iterations(built):
    store, by_iteration = built
    d = diff(store, 1, 2)
    assert (d.a.label, d.b.label, d.a.iteration) == ("iteration 1", "iteration 2", 1)
    assert_diff(d, by_iteration[1]["pairs"], by_iteration[2]["pairs"], by_iteration)
    # Portions are disjoint: nothing shared.
    assert (d.prompts_only_a, d.prompts_only_b, d.prompts_shared) == (8, 4, 0)
    assert diff(store, "1", "2") == d  # as the command line passes them
    original_side = diff(store, 2, 3).b
    assert original_side.chosen_is_ref is None and original_side.score_ref_mean is None
    text = render(render_diff(d))
    assert "iteration 1 → iteration 2" in text and "-4" in text


def second_ranking(rows: Rows, prompts: list[int]) -> Rows:
    """For some prompts of a ranked iteration: a new policy's response that beats both."""
    new: Rows = {"responses": [], "judgments": [], "pairs": []}
    for i in prompts:
        policy, chosen, rejected = rows["responses"][3 * i:3 * i + 3]
        old = {j["response_id"]: j["score"] for j in rows["judgments"]}
        response = {**policy, "policy_fingerprint": "beef", "text": f"a better answer {i}"}
        response["response_id"] = row_id(RESPONSES, response)
        triple = (2.0, old[chosen["response_id"]], old[rejected["response_id"]])
        ids = [response["response_id"], chosen["response_id"], rejected["response_id"]]
        ranking = content_id("ranking", {"candidates": ids, "ranker": "v2"})
        for pos, (rid, score, rank) in enumerate(zip(ids, triple, ranks(triple), strict=True)):
            new["judgments"].append(
                {"ranking_id": ranking, "prompt_id": policy["prompt_id"],
                 "iteration": policy["iteration"], "response_id": rid, "position": pos,
                 "n_candidates": 3, "score": score, "rank": rank, "ranker": "v2"})
        pair = best_worst([Candidate(r, o, s) for r, o, s in zip(ids, ORIGINS, triple,
                                                                   strict=True)])
        new["responses"].append(response)
        new["pairs"].append(
            {"prompt_id": policy["prompt_id"], "iteration": policy["iteration"],
             "ranking_id": ranking, "rule": "best_worst", "chosen_id": pair.chosen.response_id,
             "rejected_id": pair.rejected.response_id, "ref_id": ids[0],
             "chosen_origin": pair.chosen.origin, "rejected_origin": pair.rejected.origin,
             "chosen_score": pair.chosen.score, "rejected_score": pair.rejected.score,
             "margin": pair.margin, "is_tie": pair.is_tie})
    return new


def test_diff_two_snapshots(built):
    store, by_iteration = built
    before = export(store, 1, name="before")
    extra = second_ranking(by_iteration[1], [0, 1])
    for table in ("responses", "judgments", "pairs"):
        store.append(table, extra[table])
    after = export(store, 1, name="after", filters=Filters(drop_ties=True))
    assert (before.row_count, after.row_count) == (8, 9)  # 8 + 2 new - 1 tie
    everything = {**by_iteration, "extra": extra}
    old, new = by_iteration[1]["pairs"], extra["pairs"]
    d = diff(store, "before", "after")
    assert (d.a.label, d.b.label) == ("snapshot before", "snapshot after")
    assert_diff(d, old, [p for p in old + new if not p["is_tie"]], everything)
    # Worked by hand: the tied prompt 6 left; prompts 0 and 1 gained a chosen (the better
    # answer) and kept their rejected y_l.
    assert (d.prompts_only_a, d.prompts_only_b, d.prompts_shared) == (1, 0, 7)
    assert (d.chosen_changed, d.rejected_changed, d.pairs_only_b) == (2, 0, 2)
    assert len(d.changed_examples) == 2
    # A snapshot against the iteration as it is now: the two new pairs, nothing else.
    now = diff(store, "before", 1)
    assert_diff(now, old, old + new, everything)
    assert (now.pairs_only_a, now.pairs_only_b, now.b.label) == (0, 2, "iteration 1")


def test_diff_errors(built):
    store, _ = built
    with pytest.raises(SelmError, match=r"no snapshot named 'nope'.*iter1"):
        diff(store, "nope", 1)
    with pytest.raises(SelmError, match=r"iteration 9 has no pairs.*build --iter 9"):
        diff(store, 1, 9)
    with pytest.raises(SelmError, match="has no files"):
        diff(store, "iter1", 1)  # write_chain's stand-in snapshot has no data files
