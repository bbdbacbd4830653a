"""What changed between two iterations or snapshots: the library side of `selm-data diff`.

Both sides are reduced to a snapshot's rows, so an iteration and a snapshot compare too.
"""


from __future__ import annotations

from dataclasses import dataclass

import polars as pl
from rich.console import Group
from rich.table import Table

from selm_data.errors import SelmError
from selm_data.publish.snapshot import READS, Filters, local_folder, snapshot_row, snapshot_table
from selm_data.publish.stats import fmt_int, fmt_num, fmt_pct
from selm_data.store.store import Store


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
        folder = local_folder(store, row)  # a cached copy for an object-store store
        files = sorted((folder / "data").glob("*.parquet"))
        if not files:
            raise SelmError(f"snapshot {side!r} has no files under {folder}; "
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


def change(a: float | None, b: float | None, kind: str) -> str:
    """B - A as the diff table shows it: a signed count, percentage points or a score."""
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
    format_as = {"count": fmt_int, "share": fmt_pct, "score": fmt_num}
    summary = Table(title=f"{d.a.label} → {d.b.label}")
    summary.add_column("")
    for column in (d.a.label, d.b.label, "B − A"):
        summary.add_column(column, justify="right")
    for label, field, kind in DIFF_ROWS:
        va, vb = getattr(d.a, field), getattr(d.b, field)
        summary.add_row(label, format_as[kind](va), format_as[kind](vb), change(va, vb, kind))
    overlap = Table(title="overlap", caption=(
        "pairs match by (prompt, chosen text, rejected text)"
        + (f"; changed e.g. {', '.join(d.changed_examples)}" if d.changed_examples else "")))
    for column in ("", "only in A", "only in B", "in both"):
        overlap.add_column(column, justify="left" if not column else "right")
    overlap.add_row("prompts", fmt_int(d.prompts_only_a), fmt_int(d.prompts_only_b),
                    fmt_int(d.prompts_shared))
    overlap.add_row("pairs", fmt_int(d.pairs_only_a), fmt_int(d.pairs_only_b),
                    fmt_int(d.pairs_shared))
    overlap.add_section()
    overlap.add_row("shared prompts whose chosen changed", "", "", fmt_int(d.chosen_changed))
    overlap.add_row("shared prompts whose rejected changed", "", "", fmt_int(d.rejected_changed))
    return Group(summary, overlap)


__all__ = ["DIFF_ROWS", "Diff", "Side", "change", "diff", "render_diff"]
