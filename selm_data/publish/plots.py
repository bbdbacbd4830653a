"""Pictures of the store: score distributions and win rates per iteration (`inspect --plot`),
and the PNG plumbing every plot shares (`figure_class`, `save_png`), so that matplotlib stays an
optional extra and a plot never needs a display (the Agg canvas).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from selm_data.errors import SelmError
from selm_data.publish.stats import POLICY_PAIR, iteration_stats, triples
from selm_data.store.store import Store


def figure_class(path: str | os.PathLike[str]) -> tuple[Path, Any]:
    """`path` checked to be a *.png, and matplotlib's `Figure`.

    Raises:
        SelmError: `path` is not a *.png, or matplotlib is missing.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SelmError(f"the plot is a PNG: name the file *.png, not {path.name!r}")
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise SelmError(f"the plot needs matplotlib: pip install 'selm[plot]' ({e})") from e
    return path, Figure


def save_png(fig: Any, path: Path) -> Path:
    try:
        fig.savefig(path, format="png", dpi=110)
    except OSError as e:
        raise SelmError(f"cannot write the plot to {path}: {e}") from e
    return path



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
    refs = triples(scan).select("iteration", pl.lit("y_ref").alias("role"),
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
    path, Figure = figure_class(path)
    import numpy as np

    samples = score_samples(store, iterations=iterations)
    if samples.height == 0:
        which = "the store" if iterations is None else f"iteration(s) {list(iterations)}"
        pairs = store.scan("pairs")
        if iterations is not None:
            pairs = pairs.filter(pl.col("iteration").is_in(iterations))
        if pairs.select(pl.len()).collect().item():  # e.g. `pairs: original` of an unscored file
            raise SelmError(f"{which} has pairs but no scores to plot (the source has no "
                            "score columns); run `selm-data inspect` without --plot")
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
    return save_png(fig, path)


def _shared_bins(samples: pl.DataFrame, np: Any) -> dict[str, Any]:
    """Bin edges per ranker label, shared by the iterations that ranker scored."""
    bins = {}
    for (ranker,), group in samples.group_by("ranker"):
        largest = max(group.group_by("iteration", "role").len()["len"].to_list())
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


__all__ = ["figure_class", "plot", "save_png", "score_samples"]
