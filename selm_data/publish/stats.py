"""What an iteration's data looks like: the library side of `selm-data inspect`.

 Everything is a lazy polars scan
of the store's tables (or a snapshot's Parquet files): the numbers are those a user gets by
hand with `pl.scan_delta`, nothing is cached.

Two populations, on purpose:
- ranking columns (`compared`, `ref_*`, `yw_gt_yl`, `score_ref_*`) count every complete
  ranking of (y_ref, y_w, y_l) (judgments at positions 0, 1, 2 with scores): how the policy's
  response fared against the dataset's pair, whether or not a pair was kept (a tie dropped
  by `pairing.ties: drop` still says how the policy did);
- pair columns (`pairs`, `ties`, `chosen_is_ref`, `score_chosen_*`, `margin_*`) count the
  pairs: the training data.
Iterations built from the dataset's own pairs (`pairs: original`) rank two candidates and
have no y_ref: their ranking columns and `chosen_is_ref` are null, never 0, so they cannot be
read as a policy that never wins. Neither have SAIL iterations (`pairing.rule: sail`), which
rank (y_0, y_1, y_w, y_l): their pair columns describe the dataset pairs, and their policy
pairs (rule `sail_policy`) are counted apart, in `policy_pairs` and `policy_ties`.
Scores are compared exactly (`==` is a tie), as the pairing rules do. Quantiles interpolate
linearly (numpy's default), so they match a hand computation.

Quarantined rows are refused while a source is read, before its rows are cut into iterations,
so they belong to no iteration: `quarantine_stats` counts them per source and reason (the
reason says what to fix), once, beside the per-iteration table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl
from rich.console import Group
from rich.markup import escape
from rich.table import Table

from selm_data.errors import SelmError
from selm_data.publish.snapshot import POLICY_RULE
from selm_data.store.schema import RESPONSE_ORIGINS
from selm_data.store.store import Store

QUANTILES = (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))
COUNTS = ("prompts", "generated", "failed", "rankings", "pairs", "ties", "policy_pairs",
          "policy_ties", "unpaired", "compared")
# (y_ref, y_w, y_l): the order in which the build hands candidates to the ranker.
TRIPLE = ("ref", "yw", "yl")
POLICY_PAIR = pl.col("rule") == POLICY_RULE  # SAIL's second pair of a ranking

Scan = Callable[[str], pl.LazyFrame]


def _quantile_names(prefix: str) -> list[str]:
    return [f"{prefix}_{name}" for name, _ in QUANTILES]


COLUMNS = (
    "iteration", *COUNTS,
    "ref_gt_yw", "ref_eq_yw", "ref_lt_yw", "ref_gt_yl", "ref_eq_yl", "ref_lt_yl", "yw_gt_yl",
    "chosen_is_ref", "rejected_is_ref",
    *_quantile_names("score_chosen"), *_quantile_names("score_rejected"),
    *_quantile_names("score_ref"), "margin_mean", *_quantile_names("margin"),
    *(f"chars_{o}" for o in RESPONSE_ORIGINS), *(f"tokens_{o}" for o in RESPONSE_ORIGINS),
)


# --- per-iteration statistics -------------------------------------------------------------


def iteration_stats(store: Store, *, iteration: int | None = None) -> pl.DataFrame:
    """One row per iteration (or only `iteration`), with the columns of `COLUMNS`.

    Counts: `prompts`; `generated` (the policy's ok responses) and `failed` (failed ones, each
    attempt); `rankings`; `pairs` and `ties`; SAIL's `policy_pairs` and their `policy_ties`
    (0 for other rules; not in `pairs`); `unpaired` (prompts without a pair: failed
    generation, unscored, or a dropped tie); `compared` (complete (y_ref, y_w, y_l) rankings).
    Fractions of `compared`: `ref_{gt,eq,lt}_{yw,yl}` (y_ref scored above, equal to, below
    y_w or y_l) and `yw_gt_yl` (the ranker agrees with the dataset's label). Fractions of
    pairs that have a y_ref: `chosen_is_ref`, `rejected_is_ref`. Score and margin quantiles,
    `margin_mean`; mean `chars_<origin>` of ok responses and mean `tokens_<origin>` where
    completion tokens were recorded (null otherwise).

    Raises:
        SelmError: the store (or `iteration`) holds nothing yet.
    """
    def scan(table: str) -> pl.LazyFrame:
        lf = store.scan(table)
        return lf if iteration is None else lf.filter(pl.col("iteration") == iteration)

    parts = [_counts(scan), _ranking_stats(scan), _pair_stats(scan), _length_stats(scan)]
    frame = parts[0]
    for part in parts[1:]:
        frame = frame.join(part, on="iteration", how="full", coalesce=True)
    df = frame.with_columns(pl.col(COUNTS).fill_null(0)).sort("iteration").collect()
    if df.height == 0:
        where = "the store holds no iteration" if iteration is None else (
            f"iteration {iteration} has nothing in the store")
        raise SelmError(f"{where} yet; build one with `selm-data build --iter "
                        f"{iteration or 1}`")
    return df.select(COLUMNS)


def _count(scan: Scan, table: str, *filters: pl.Expr, name: str) -> pl.LazyFrame:
    lf = scan(table)
    for f in filters:
        lf = lf.filter(f)
    return lf.group_by("iteration").agg(pl.len().cast(pl.Int64).alias(name))


def _counts(scan: Scan) -> pl.LazyFrame:
    keys = ["iteration", "prompt_id"]
    unpaired = (
        scan("prompts").select(keys).unique()
        .join(scan("pairs").select(keys).unique(), on=keys, how="anti")
        .group_by("iteration").agg(pl.len().cast(pl.Int64).alias("unpaired"))
    )
    rankings = scan("judgments").group_by("iteration").agg(
        pl.col("ranking_id").n_unique().cast(pl.Int64).alias("rankings"))
    parts = [
        _count(scan, "prompts", name="prompts"),
        _count(scan, "responses", pl.col("origin") == "policy", pl.col("status") == "ok",
               name="generated"),
        _count(scan, "responses", pl.col("status") == "failed", name="failed"),
        rankings,
        _count(scan, "pairs", ~POLICY_PAIR, name="pairs"),
        _count(scan, "pairs", ~POLICY_PAIR, pl.col("is_tie"), name="ties"),
        _count(scan, "pairs", POLICY_PAIR, name="policy_pairs"),
        _count(scan, "pairs", POLICY_PAIR, pl.col("is_tie"), name="policy_ties"),
        unpaired,
    ]
    frame = parts[0]
    for part in parts[1:]:
        frame = frame.join(part, on="iteration", how="full", coalesce=True)
    return frame


def triples(scan: Scan) -> pl.LazyFrame:
    """Complete rankings of (y_ref, y_w, y_l): iteration, ranking_id, ref, yw, yl scores."""
    return (
        scan("judgments").filter(pl.col("n_candidates") == len(TRIPLE))
        .group_by("iteration", "ranking_id")
        .agg(pl.col("score").filter(pl.col("position") == pos).first().alias(name)
             for pos, name in enumerate(TRIPLE))
        .drop_nulls(list(TRIPLE))
    )


def _quantiles(column: str, prefix: str) -> list[pl.Expr]:
    return [pl.col(column).quantile(q, interpolation="linear").alias(f"{prefix}_{name}")
            for name, q in QUANTILES]


def _ranking_stats(scan: Scan) -> pl.LazyFrame:
    ref, yw, yl = (pl.col(c) for c in TRIPLE)
    return triples(scan).group_by("iteration").agg(
        pl.len().cast(pl.Int64).alias("compared"),
        (ref > yw).mean().alias("ref_gt_yw"),
        (ref == yw).mean().alias("ref_eq_yw"),
        (ref < yw).mean().alias("ref_lt_yw"),
        (ref > yl).mean().alias("ref_gt_yl"),
        (ref == yl).mean().alias("ref_eq_yl"),
        (ref < yl).mean().alias("ref_lt_yl"),
        (yw > yl).mean().alias("yw_gt_yl"),
        *_quantiles("ref", "score_ref"),
    )


def _pair_stats(scan: Scan) -> pl.LazyFrame:
    has_ref = pl.col("ref_id").is_not_null()
    return scan("pairs").filter(~POLICY_PAIR).group_by("iteration").agg(
        (pl.col("chosen_origin") == "policy").filter(has_ref).mean().alias("chosen_is_ref"),
        (pl.col("rejected_origin") == "policy").filter(has_ref).mean().alias("rejected_is_ref"),
        *_quantiles("chosen_score", "score_chosen"),
        *_quantiles("rejected_score", "score_rejected"),
        pl.col("margin").mean().alias("margin_mean"),
        *_quantiles("margin", "margin"),
    )


def _length_stats(scan: Scan) -> pl.LazyFrame:
    ok = scan("responses").filter(pl.col("status") == "ok").with_columns(
        chars=pl.col("text").str.len_chars())
    by_origin = [
        pl.col(column).filter(pl.col("origin") == origin).mean().alias(f"{prefix}_{origin}")
        for prefix, column in (("chars", "chars"), ("tokens", "completion_tokens"))
        for origin in RESPONSE_ORIGINS
    ]
    return ok.group_by("iteration").agg(by_origin)


def quarantine_stats(store: Store) -> pl.DataFrame:
    """Quarantined source rows per source, split and reason (they belong to no iteration)."""
    return (
        store.scan("quarantine").group_by("source", "source_split", "reason")
        .agg(pl.len().cast(pl.Int64).alias("rows"))
        .sort("source", "source_split", "reason", nulls_last=True).collect()
    )


# --- evaluations ----------------------------------------------------------------------------


def policy_label() -> pl.Expr:
    """base, iterN, or the model's name: how `inspect`, `winrates` and the viewer name a
    policy's evaluation answers."""
    return (pl.when(pl.col("iteration") == 0).then(pl.lit("base"))
            .when(pl.col("iteration").is_not_null())
            .then(pl.format("iter{}", pl.col("iteration")))
            .otherwise(pl.col("policy")))


def eval_stats(store: Store, *, iteration: int | None = None
               ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """What `selm-data eval` and `compare`/`winrates` stored (of one iteration's policy, when
    given). Answers: per prompt set, policy, max_tokens and turn, the ok and failed answers,
    their mean characters and tokens and the share cut at max_tokens. Comparisons: per prompt
    set, pair of policies (a, b: in answer-id order, as stored) and ranker, the questions
    compared and a's win rate over both orders (intervals: `selm-data compare A B`)."""
    answers = store.scan("eval_answers")
    if iteration is not None:
        answers = answers.filter(pl.col("iteration") == iteration)
    answers = answers.with_columns(
        label=policy_label(), max_tokens=pl.col("sampling").struct.field("max_tokens"),
        # iterations in their order (base first), then other models by name
        order=pl.when(pl.col("iteration").is_not_null())
        .then(pl.format("{}", pl.col("iteration").cast(pl.String).str.zfill(6)))
        .otherwise(pl.format("~{}", pl.col("policy"))))
    ok = pl.col("status") == "ok"
    per_policy = (
        answers.group_by("prompt_set", "label", "order", "policy_fingerprint", "max_tokens",
                         "turn")
        .agg(ok.sum().cast(pl.Int64).alias("answers"),
             (~ok).sum().cast(pl.Int64).alias("failed"),
             pl.col("text").str.len_chars().filter(ok).mean().alias("chars"),
             pl.col("completion_tokens").filter(ok).mean().alias("tokens"),
             (pl.col("finish_reason") == "length").filter(ok).mean().alias("cut"))
        .sort("prompt_set", "order", "max_tokens", "turn").collect()
    )
    if per_policy.height == 0:
        empty = pl.DataFrame(schema={"prompt_set": pl.String, "a": pl.String, "b": pl.String,
                                     "ranker": pl.String, "compared": pl.Int64,
                                     "win_a": pl.Float64})
        return per_policy.drop("policy_fingerprint", "order"), empty
    labels = dict(zip(per_policy["policy_fingerprint"].to_list(), per_policy["label"].to_list(),
                      strict=True))
    comparisons = store.scan("eval_comparisons")
    if iteration is not None:
        mine = list(labels)
        comparisons = comparisons.filter(pl.col("policy_a_fingerprint").is_in(mine)
                                         | pl.col("policy_b_fingerprint").is_in(mine))
    # A stored comparison's a and b are in answer-id order; shown here with the earlier
    # iteration (base first) as a, so each pair of policies is one row.
    order = dict(zip(per_policy["policy_fingerprint"].to_list(), per_policy["order"].to_list(),
                     strict=True))

    def named(column: str) -> pl.Expr:
        return (pl.col(column).replace_strict(labels, default=None)
                .fill_null(pl.col(column).str.slice(0, 12)))

    def rank(column: str) -> pl.Expr:
        return pl.col(column).replace_strict(order, default=None).fill_null(named(column))

    swap = rank("policy_a_fingerprint") > rank("policy_b_fingerprint")
    compared = (
        comparisons.collect()
        .with_columns(a=pl.when(swap).then(named("policy_b_fingerprint"))
                      .otherwise(named("policy_a_fingerprint")),
                      b=pl.when(swap).then(named("policy_a_fingerprint"))
                      .otherwise(named("policy_b_fingerprint")),
                      win_a=pl.when(swap).then(1.0 - pl.col("win_a")).otherwise(pl.col("win_a")))
        .group_by("prompt_set", "a", "b", "ranker")
        .agg(pl.len().cast(pl.Int64).alias("compared"), pl.col("win_a").mean())
        .sort("prompt_set", "a", "b", "ranker")
    )
    return per_policy.drop("policy_fingerprint", "order"), compared


def render_eval_stats(answers: pl.DataFrame, compared: pl.DataFrame) -> Group:
    """`eval_stats` as two tables."""
    table = Table(title="evaluation answers")
    for column in ("prompt set", "policy", "max tokens", "turn", "answers", "failed",
                   "mean chars (tokens)", "cut at max tokens"):
        table.add_column(column, justify="left" if column in ("prompt set", "policy")
                         else "right")
    for row in answers.iter_rows(named=True):
        length = fmt_num(row["chars"], 0) + ("" if row["tokens"] is None
                                          else f" ({fmt_num(row['tokens'], 0)})")
        table.add_row(escape(row["prompt_set"]), escape(row["label"]), fmt_int(row["max_tokens"]),
                      str(row["turn"]), fmt_int(row["answers"]), fmt_int(row["failed"]), length,
                      fmt_pct(row["cut"]))
    parts: list[Table] = [table]
    if compared.height:
        pairs = Table(title="evaluation comparisons (both orders)")
        for column in ("prompt set", "a", "b", "ranker", "questions", "a's win rate"):
            pairs.add_column(column, justify="right" if column in ("questions", "a's win rate")
                             else "left")
        for row in compared.iter_rows(named=True):
            pairs.add_row(escape(row["prompt_set"]), escape(row["a"]), escape(row["b"]),
                          escape(row["ranker"]), fmt_int(row["compared"]), fmt_pct(row["win_a"]))
        parts.append(pairs)
    return Group(*parts)


# --- rendering ----------------------------------------------------------------------------

Cell = Callable[[dict[str, Any]], str]
NA = "n/a"


def fmt_int(value: int | None) -> str:
    return NA if value is None else f"{value:,}"


def fmt_pct(value: float | None) -> str:
    return NA if value is None else f"{value:.1%}"


def fmt_num(value: float | None, digits: int = 3) -> str:
    return NA if value is None else f"{value:.{digits}f}"


def _counted(column: str) -> Cell:
    return lambda row: fmt_int(row[column])


def _shares(*columns: str) -> Cell:
    def cell(row: dict[str, Any]) -> str:
        values = [row[c] for c in columns]
        return NA if all(v is None for v in values) else " / ".join(fmt_pct(v) for v in values)
    return cell


def _spread(prefix: str, mean: str | None = None) -> Cell:
    def cell(row: dict[str, Any]) -> str:
        values = [row[c] for c in _quantile_names(prefix)]
        if all(v is None for v in values):
            return NA
        text = " / ".join(fmt_num(v) for v in values)
        return text if mean is None else f"{text} (mean {fmt_num(row[mean])})"
    return cell


def _length(origin: str) -> Cell:
    def cell(row: dict[str, Any]) -> str:
        chars, tokens = row[f"chars_{origin}"], row[f"tokens_{origin}"]
        return fmt_num(chars, 0) + ("" if tokens is None else f" ({fmt_num(tokens, 0)} tokens)")
    return cell


SECTIONS: tuple[tuple[str, tuple[tuple[str, Cell], ...]], ...] = (
    ("counts", (
        ("prompts", _counted("prompts")),
        ("policy responses generated", _counted("generated")),
        ("failed generations", _counted("failed")),
        ("rankings", _counted("rankings")),
        ("pairs", _counted("pairs")),
        ("ties", _counted("ties")),
        ("SAIL policy pairs (ties)", lambda row: f"{fmt_int(row['policy_pairs'])} "
                                                 f"({fmt_int(row['policy_ties'])})"),
        ("prompts without a pair", _counted("unpaired")),
    )),
    ("y_ref against the dataset's pair (rankings)", (
        ("rankings of (y_ref, y_w, y_l)", _counted("compared")),
        ("y_ref vs y_w: above / equal / below", _shares("ref_gt_yw", "ref_eq_yw", "ref_lt_yw")),
        ("y_ref vs y_l: above / equal / below", _shares("ref_gt_yl", "ref_eq_yl", "ref_lt_yl")),
        ("y_w above y_l (ranker agrees with dataset)", _shares("yw_gt_yl")),
    )),
    ("pairs", (
        ("chosen is y_ref", _shares("chosen_is_ref")),
        ("rejected is y_ref", _shares("rejected_is_ref")),
    )),
    ("scores p10 / p50 / p90", (
        ("chosen", _spread("score_chosen")),
        ("rejected", _spread("score_rejected")),
        ("y_ref", _spread("score_ref")),
        ("margin", _spread("margin", mean="margin_mean")),
    )),
    ("mean length, characters (tokens)", tuple(
        (origin, _length(origin)) for origin in RESPONSE_ORIGINS)),
)


def render_stats(stats: pl.DataFrame, *, quarantine: pl.DataFrame | None = None) -> Group:
    """`iteration_stats` as a table with a column per iteration (the metrics are too many to
    fit across a terminal), and `quarantine_stats` below it when there is any."""
    rows = stats.to_dicts()
    table = Table(title="per iteration")
    table.add_column("")
    for row in rows:
        table.add_column(f"iter {row['iteration']}", justify="right")
    for n, (title, metrics) in enumerate(SECTIONS):
        if n:
            table.add_section()
        table.add_row(f"[bold]{title}[/]", *("" for _ in rows))
        for label, cell in metrics:
            table.add_row(f"  {label}", *(cell(row) for row in rows))
    parts: list[Table] = [table]
    if quarantine is not None and quarantine.height:
        q = Table(title="quarantined source rows (in no iteration)",
                  caption=f"{quarantine['rows'].sum():,} in all")
        for column in ("source", "split", "reason", "rows"):
            q.add_column(column, justify="right" if column == "rows" else "left")
        for row in quarantine.iter_rows(named=True):
            # Sources and reasons are the user's text: "[...]" in them is not rich markup.
            q.add_row(escape(row["source"]), escape(row["source_split"] or ""),
                      escape(row["reason"]), fmt_int(row["rows"]))
        parts.append(q)
    return Group(*parts)


__all__ = ["COLUMNS", "eval_stats", "iteration_stats", "policy_label", "quarantine_stats",
           "render_eval_stats", "render_stats"]
