"""What an iteration's data looks like, and what changed between two of them.

The library side of `selm-data inspect` and `selm-data diff`. Everything is a lazy polars scan
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

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Group
from rich.markup import escape
from rich.table import Table

from selm_data.errors import SelmError
from selm_data.schema import RESPONSE_ORIGINS
from selm_data.snapshot import POLICY_RULE, READS, Filters, snapshot_row, snapshot_table
from selm_data.store import Store

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


def _triples(scan: Scan) -> pl.LazyFrame:
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
    return _triples(scan).group_by("iteration").agg(
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


def _policy_label() -> pl.Expr:
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
        label=_policy_label(), max_tokens=pl.col("sampling").struct.field("max_tokens"),
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
        length = _num(row["chars"], 0) + ("" if row["tokens"] is None
                                          else f" ({_num(row['tokens'], 0)})")
        table.add_row(escape(row["prompt_set"]), escape(row["label"]), _int(row["max_tokens"]),
                      str(row["turn"]), _int(row["answers"]), _int(row["failed"]), length,
                      _pct(row["cut"]))
    parts: list[Table] = [table]
    if compared.height:
        pairs = Table(title="evaluation comparisons (both orders)")
        for column in ("prompt set", "a", "b", "ranker", "questions", "a's win rate"):
            pairs.add_column(column, justify="right" if column in ("questions", "a's win rate")
                             else "left")
        for row in compared.iter_rows(named=True):
            pairs.add_row(escape(row["prompt_set"]), escape(row["a"]), escape(row["b"]),
                          escape(row["ranker"]), _int(row["compared"]), _pct(row["win_a"]))
        parts.append(pairs)
    return Group(*parts)


# --- rendering ----------------------------------------------------------------------------

Cell = Callable[[dict[str, Any]], str]
NA = "n/a"


def _int(value: int | None) -> str:
    return NA if value is None else f"{value:,}"


def _pct(value: float | None) -> str:
    return NA if value is None else f"{value:.1%}"


def _num(value: float | None, digits: int = 3) -> str:
    return NA if value is None else f"{value:.{digits}f}"


def _counted(column: str) -> Cell:
    return lambda row: _int(row[column])


def _shares(*columns: str) -> Cell:
    def cell(row: dict[str, Any]) -> str:
        values = [row[c] for c in columns]
        return NA if all(v is None for v in values) else " / ".join(_pct(v) for v in values)
    return cell


def _spread(prefix: str, mean: str | None = None) -> Cell:
    def cell(row: dict[str, Any]) -> str:
        values = [row[c] for c in _quantile_names(prefix)]
        if all(v is None for v in values):
            return NA
        text = " / ".join(_num(v) for v in values)
        return text if mean is None else f"{text} (mean {_num(row[mean])})"
    return cell


def _length(origin: str) -> Cell:
    def cell(row: dict[str, Any]) -> str:
        chars, tokens = row[f"chars_{origin}"], row[f"tokens_{origin}"]
        return _num(chars, 0) + ("" if tokens is None else f" ({_num(tokens, 0)} tokens)")
    return cell


SECTIONS: tuple[tuple[str, tuple[tuple[str, Cell], ...]], ...] = (
    ("counts", (
        ("prompts", _counted("prompts")),
        ("policy responses generated", _counted("generated")),
        ("failed generations", _counted("failed")),
        ("rankings", _counted("rankings")),
        ("pairs", _counted("pairs")),
        ("ties", _counted("ties")),
        ("SAIL policy pairs (ties)", lambda row: f"{_int(row['policy_pairs'])} "
                                                 f"({_int(row['policy_ties'])})"),
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
                      escape(row["reason"]), _int(row["rows"]))
        parts.append(q)
    return Group(*parts)


# --- plot -----------------------------------------------------------------------------------

# Role, colour, line width: thinner lines drawn over thicker ones, so that where y_ref is the
# chosen response (identical steps) both colours still show.
ROLES = (("chosen", "tab:green", 2.4), ("rejected", "tab:red", 2.0), ("y_ref", "tab:blue", 1.3))
WIN_RATES = (("y_ref > y_w", "ref_gt_yw", "tab:purple"),
             ("y_ref > y_l", "ref_gt_yl", "tab:orange"),
             ("chosen is y_ref", "chosen_is_ref", "tab:blue"))


def score_samples(store: Store, *, iterations: Sequence[int] | None = None) -> pl.DataFrame:
    """Every score the plot draws, long: iteration, role (chosen, rejected, y_ref), score,
    ranker. Chosen and rejected come from the pairs, y_ref from complete rankings (the same
    populations as `iteration_stats`)."""
    def scan(table: str) -> pl.LazyFrame:
        lf = store.scan(table)
        return lf if iterations is None else lf.filter(pl.col("iteration").is_in(iterations))

    pairs = scan("pairs").filter(~POLICY_PAIR).select(
        "iteration", pl.col("chosen_score").alias("chosen"),
        pl.col("rejected_score").alias("rejected"),
    ).unpivot(index="iteration", variable_name="role", value_name="score")
    refs = _triples(scan).select("iteration", pl.lit("y_ref").alias("role"),
                                 pl.col("ref").alias("score"))
    rankers = scan("judgments").group_by("iteration").agg(
        pl.col("ranker").unique().sort().str.join(", ").alias("ranker"))
    return (
        pl.concat([pairs, refs]).drop_nulls("score")
        .join(rankers, on="iteration", how="left")
        .sort("iteration", "role").collect()
    )


def plot(store: Store, path: str | os.PathLike[str], *,
         iterations: Sequence[int] | None = None) -> Path:
    """Write a PNG: per iteration, step histograms (densities) of the chosen, rejected and
    y_ref scores, as in the SELM paper's Figure 3, and a panel of win rates per iteration.

    Iterations scored by the same ranker(s) share their bins, so a shift across iterations is
    visible; a different ranker (the dataset's own scores of `pairs: original`) is on another
    scale and gets its own. Drawn with matplotlib's Agg canvas: no display is ever needed.

    Raises:
        SelmError: matplotlib is missing, `path` is not a writable *.png, or there is no
            score to draw.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SelmError(f"the plot is a PNG: name the file *.png, not {path.name!r}")
    try:
        import numpy as np
        from matplotlib.figure import Figure
    except ImportError as e:
        raise SelmError(f"the plot needs matplotlib: pip install 'selm[plot]' ({e})") from e
    samples = score_samples(store, iterations=iterations)
    if samples.height == 0:
        which = "the store" if iterations is None else f"iteration(s) {list(iterations)}"
        raise SelmError(f"{which} has no judgments with scores to plot; build an iteration "
                        "first: `selm-data build --iter N`")
    shown = samples["iteration"].unique().sort().to_list()
    rates = iteration_stats(store).filter(pl.col("iteration").is_in(shown)
                                          & (pl.col("compared") > 0))
    panels = len(shown) + 1
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    bins = _shared_bins(samples, np)
    for ax, it in zip(axes, shown, strict=False):
        _score_panel(ax, samples.filter(pl.col("iteration") == it), it, bins)
    _win_panel(axes[len(shown)], rates, np)
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle("reward scores per iteration: pairs' chosen and rejected, and y_ref")
    try:
        fig.savefig(path, format="png", dpi=110)
    except OSError as e:
        raise SelmError(f"cannot write the plot to {path}: {e}") from e
    return path


def _shared_bins(samples: pl.DataFrame, np: Any) -> dict[str, Any]:
    """Bin edges per ranker label, shared by the iterations that ranker scored."""
    bins = {}
    for (ranker,), group in samples.group_by("ranker"):
        largest = group.group_by("iteration", "role").len()["len"].max()
        # About 2 sqrt(n) bins: smooth enough for a few dozen pairs, detailed for 60k.
        count = min(60, max(10, round(2 * math.sqrt(largest))))
        bins[ranker] = np.histogram_bin_edges(group["score"].to_numpy(), bins=count)
    return bins


def _score_panel(ax: Any, samples: pl.DataFrame, iteration: int, bins: dict[str, Any]) -> None:
    ranker = samples["ranker"][0]
    for role, color, width in ROLES:
        scores = samples.filter(pl.col("role") == role)["score"]
        if scores.len() == 0:
            continue
        ax.hist(scores.to_numpy(), bins=bins[ranker], density=True, histtype="step",
                linewidth=width, color=color, label=f"{role} (n={scores.len()})")
        ax.axvline(scores.median(), color=color, linestyle="--", linewidth=0.8)
    ax.set_title(f"iteration {iteration}  ·  {ranker}", fontsize=10)
    ax.set_xlabel("score (dashed: median)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)


def _win_panel(ax: Any, rates: pl.DataFrame, np: Any) -> None:
    ax.set_title("y_ref against the dataset's pair", fontsize=10)
    if rates.height == 0:
        ax.text(0.5, 0.5, "no ranking of (y_ref, y_w, y_l):\noriginal pairs only",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    x = np.arange(rates.height)
    width = 0.8 / len(WIN_RATES)
    for k, (label, column, color) in enumerate(WIN_RATES):
        values = rates[column].fill_null(0.0).to_numpy()
        bars = ax.bar(x + (k - 1) * width, values, width, label=label, color=color, alpha=0.8)
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in values], fontsize=7)
    ax.set_xticks(x, [f"iter {i}" for i in rates["iteration"]])
    ax.set_ylim(0, 1.1)  # room above a 100% bar for its label
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_ylabel("fraction of rankings / pairs")
    # Below the axes: inside, it would hide the labels of bars near 100%.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=3)


# --- diff ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """One side of a diff: an iteration as the store holds it now, or a snapshot."""

    label: str  # "iteration 2" or "snapshot iter2-1a2b3c4d"
    iteration: int | None
    pairs: int
    prompts: int
    tie_rate: float | None
    margin_mean: float | None
    score_chosen_mean: float | None
    score_rejected_mean: float | None
    score_ref_mean: float | None
    chosen_is_ref: float | None  # of the pairs that have a y_ref
    rejected_is_ref: float | None


@dataclass(frozen=True)
class Diff:
    a: Side
    b: Side
    prompts_only_a: int
    prompts_only_b: int
    prompts_shared: int
    pairs_only_a: int  # by content: (prompt, chosen text, rejected text)
    pairs_only_b: int
    pairs_shared: int
    chosen_changed: int  # shared prompts whose set of chosen texts differs
    rejected_changed: int
    changed_examples: tuple[str, ...]  # a few prompt ids of shared prompts that changed


def diff(store: Store, a: int | str, b: int | str) -> Diff:
    """What changed from `a` to `b`: each an iteration (an int, or a string of digits, as the
    command line passes it) or a snapshot name.

    Both sides are reduced to a snapshot's rows (an iteration is read as `export` would read
    it now, unfiltered), so an iteration and a snapshot can be compared too: "what changed
    since I exported". Pairs are matched by prompt and compared by text, not response id,
    because the text is what a trainer sees: a regenerated response with the same text is no
    change. A prompt may hold several pairs (a second ranker, a rebuilt iteration), so its
    chosen "changed" when the set of its chosen texts differs. Win rates are read from the
    pairs' origins (`chosen_is_ref`), since a snapshot does not keep the third candidate's
    score that `ref_gt_yw` needs.

    Raises:
        SelmError: an unknown snapshot, or an iteration without pairs.
    """
    (label_a, it_a, frame_a), (label_b, it_b, frame_b) = _side(store, a), _side(store, b)
    prompts_a, prompts_b = (f.select("prompt_id").unique() for f in (frame_a, frame_b))
    key = ["prompt_id", "chosen_text", "rejected_text"]
    pairs_a, pairs_b = (f.select(key).unique() for f in (frame_a, frame_b))
    changed = _changed(frame_a, frame_b)
    examples = changed.filter(pl.col("chosen") | pl.col("rejected"))["prompt_id"].sort()
    return Diff(
        a=_summary(label_a, it_a, frame_a),
        b=_summary(label_b, it_b, frame_b),
        prompts_only_a=prompts_a.join(prompts_b, on="prompt_id", how="anti").height,
        prompts_only_b=prompts_b.join(prompts_a, on="prompt_id", how="anti").height,
        prompts_shared=prompts_a.join(prompts_b, on="prompt_id", how="semi").height,
        pairs_only_a=pairs_a.join(pairs_b, on=key, how="anti").height,
        pairs_only_b=pairs_b.join(pairs_a, on=key, how="anti").height,
        pairs_shared=pairs_a.join(pairs_b, on=key, how="semi").height,
        chosen_changed=int(changed["chosen"].sum()),
        rejected_changed=int(changed["rejected"].sum()),
        changed_examples=tuple(examples.head(5).to_list()),
    )


def _side(store: Store, side: int | str) -> tuple[str, int | None, pl.DataFrame]:
    if isinstance(side, str) and not side.isdigit():
        row = snapshot_row(store, side)
        files = sorted((store.root / row["path"] / "data").glob("*.parquet"))
        if not files:
            raise SelmError(f"snapshot {side!r} has no files under {store.root / row['path']}; "
                            "run `selm-data verify`")
        return f"snapshot {side}", row["iteration"], _texts(pl.read_parquet(files))
    iteration = int(side)
    versions = {t: store.version(t) for t in READS}
    frame = pl.from_arrow(snapshot_table(store, iteration, versions, Filters()))
    assert isinstance(frame, pl.DataFrame)
    if frame.height == 0:
        raise SelmError(f"iteration {iteration} has no pairs; build them first: "
                        f"`selm-data build --iter {iteration}`")
    return f"iteration {iteration}", iteration, _texts(frame)


def _texts(frame: pl.DataFrame) -> pl.DataFrame:
    """A snapshot's rows with the chosen and rejected texts (the conversations' last turns)."""
    def last(column: str) -> pl.Expr:
        return pl.col(column).list.last().struct.field("content").alias(f"{column}_text")

    return frame.with_columns(last("chosen"), last("rejected"))


def _changed(a: pl.DataFrame, b: pl.DataFrame) -> pl.DataFrame:
    """Per shared prompt: did its set of chosen / rejected texts change?"""
    def sets(frame: pl.DataFrame) -> pl.DataFrame:
        return frame.group_by("prompt_id").agg(
            pl.col("chosen_text").unique().sort(), pl.col("rejected_text").unique().sort())

    joined = sets(a).join(sets(b), on="prompt_id", suffix="_b")
    return joined.select(
        "prompt_id",
        chosen=pl.col("chosen_text") != pl.col("chosen_text_b"),
        rejected=pl.col("rejected_text") != pl.col("rejected_text_b"),
    )


def _summary(label: str, iteration: int | None, frame: pl.DataFrame) -> Side:
    has_ref = pl.col("ref_id").is_not_null()
    row = frame.select(
        pairs=pl.len(),
        prompts=pl.col("prompt_id").n_unique(),
        tie_rate=pl.col("is_tie").mean(),
        margin_mean=pl.col("margin").mean(),
        score_chosen_mean=pl.col("score_chosen").mean(),
        score_rejected_mean=pl.col("score_rejected").mean(),
        score_ref_mean=pl.col("score_reference").mean(),
        chosen_is_ref=(pl.col("chosen_origin") == "policy").filter(has_ref).mean(),
        rejected_is_ref=(pl.col("rejected_origin") == "policy").filter(has_ref).mean(),
    ).row(0, named=True)
    return Side(label=label, iteration=iteration, **row)


def _change(a: float | None, b: float | None, kind: str) -> str:
    if a is None or b is None:
        return ""
    delta = b - a
    if kind == "count":
        return f"{delta:+,}"
    if kind == "share":
        return f"{100 * delta:+.1f} pp"
    return f"{delta:+.3f}"


DIFF_ROWS = (
    ("pairs", "pairs", "count"),
    ("prompts", "prompts", "count"),
    ("tie rate", "tie_rate", "share"),
    ("mean margin", "margin_mean", "score"),
    ("mean chosen score", "score_chosen_mean", "score"),
    ("mean rejected score", "score_rejected_mean", "score"),
    ("mean y_ref score", "score_ref_mean", "score"),
    ("chosen is y_ref", "chosen_is_ref", "share"),
    ("rejected is y_ref", "rejected_is_ref", "share"),
)


def render_diff(d: Diff) -> Group:
    """Two tables: each side's summary with the change, and what the sides share."""
    format_as = {"count": _int, "share": _pct, "score": _num}
    summary = Table(title=f"{d.a.label} → {d.b.label}")
    summary.add_column("")
    for column in (d.a.label, d.b.label, "B − A"):
        summary.add_column(column, justify="right")
    for label, field, kind in DIFF_ROWS:
        va, vb = getattr(d.a, field), getattr(d.b, field)
        summary.add_row(label, format_as[kind](va), format_as[kind](vb), _change(va, vb, kind))
    overlap = Table(title="overlap", caption=(
        "pairs match by (prompt, chosen text, rejected text)"
        + (f"; changed e.g. {', '.join(d.changed_examples)}" if d.changed_examples else "")))
    for column in ("", "only in A", "only in B", "in both"):
        overlap.add_column(column, justify="left" if not column else "right")
    overlap.add_row("prompts", _int(d.prompts_only_a), _int(d.prompts_only_b),
                    _int(d.prompts_shared))
    overlap.add_row("pairs", _int(d.pairs_only_a), _int(d.pairs_only_b), _int(d.pairs_shared))
    overlap.add_section()
    overlap.add_row("shared prompts whose chosen changed", "", "", _int(d.chosen_changed))
    overlap.add_row("shared prompts whose rejected changed", "", "", _int(d.rejected_changed))
    return Group(summary, overlap)


__all__ = [
    "COLUMNS", "Diff", "Side", "diff", "eval_stats", "iteration_stats", "plot",
    "quarantine_stats", "render_diff", "render_eval_stats", "render_stats", "score_samples",
]
