"""What the viewer's pages show, as lazy polars queries over the store.

A page of pairs filters, counts, sorts and slices the pairs' short columns (ids, origins,
scores, margin, tie) before anything is collected, then reads the texts of the rows shown only.

A text search has to read every text of the source, and decoding them is what costs (a
100k-pair UltraFeedback iteration holds ~370 MB of text: ~0.5 s to read from the store, ~40 ms
to search in memory). So the first search of an iteration reads its pairs' texts once into a
`TextIndex` (the prompt and the three answers per pair, in memory) that later searches and pages
reuse until the store changes: the key holds the tables' versions, so it is never stale. A
snapshot's texts are nested conversations that cost as much to read for 50 rows as for all, so
a snapshot's pages always go through the index (its files never change). The user's text is
matched case-insensitively as a literal, never as a regex they wrote.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl

from selm_data.errors import SelmError
from selm_data.publish.lineage import downstream
from selm_data.publish.snapshot import local_folder, snapshot_row
from selm_data.publish.stats import eval_stats, policy_label
from selm_data.store.schema import RESPONSE_ORIGINS
from selm_data.store.store import Store

PER_PAGE = 50
SNIPPET = 280  # characters of a text shown in a table cell
# name in the URL: (column, descending)
SORTS: dict[str, tuple[str, bool]] = {
    "pair": ("pair_id", False),
    "margin": ("margin", False), "-margin": ("margin", True),
    "chosen": ("chosen_score", False), "-chosen": ("chosen_score", True),
    "rejected": ("rejected_score", False), "-rejected": ("rejected_score", True),
}
# Where y_ref ended up: chosen, rejected, neither (between: ranked between the two), or no
# y_ref at all (`pairs: original`, SAIL).
REF_ROLES = ("chosen", "rejected", "between", "none")
TIES = ("only", "none")
PAIR_COLUMNS = ("pair_id", "prompt_id", "iteration", "rule", "chosen_id", "rejected_id",
                "ref_id", "chosen_origin", "rejected_origin", "chosen_score", "rejected_score",
                "margin", "is_tie")
Row = dict[str, Any]


@dataclass(frozen=True)
class PairQuery:
    """One page of the pairs table: the source (an iteration or a snapshot), filters, order."""

    iteration: int | None = None
    snapshot: str | None = None
    ref: str = ""  # one of REF_ROLES, or "" for any
    ties: str = ""  # one of TIES, or ""
    margin_min: float | None = None
    margin_max: float | None = None
    chosen_origin: str = ""
    rejected_origin: str = ""
    text: str = ""
    sort: str = "pair"
    page: int = 1
    per_page: int = PER_PAGE

    def __post_init__(self) -> None:
        choices = {"ref": ("", *REF_ROLES), "ties": ("", *TIES), "sort": tuple(SORTS),
                   "chosen_origin": ("", *RESPONSE_ORIGINS),
                   "rejected_origin": ("", *RESPONSE_ORIGINS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SelmError(f"{name} is one of {', '.join(a or '(any)' for a in allowed)}, "
                                f"not {getattr(self, name)!r}")
        if self.page < 1 or not 1 <= self.per_page <= 500:
            raise SelmError("page starts at 1 and per_page is 1 to 500")
        if (self.iteration is None) == (self.snapshot is None):
            raise SelmError("pairs come from one iteration or one snapshot")

    def at(self, page: int) -> PairQuery:
        return replace(self, page=page)


@dataclass(frozen=True)
class PairPage:
    rows: list[Row]  # PAIR_COLUMNS and the texts (SNIPPET characters): prompt, chosen, ...
    total: int  # rows that pass the filters, over all pages
    query: PairQuery

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.query.per_page))


def contains(text: str) -> str:
    """A case-insensitive regex matching `text` literally."""
    return "(?i)" + re.escape(text)


def pair_filters(q: PairQuery) -> list[pl.Expr]:
    """The filters of `q` on the pairs' short columns (both sources have them)."""
    ref, chosen, rejected = pl.col("ref_id"), pl.col("chosen_id"), pl.col("rejected_id")
    by_ref = {"chosen": ref.is_not_null() & (chosen == ref),
              "rejected": ref.is_not_null() & (rejected == ref),
              "between": ref.is_not_null() & (chosen != ref) & (rejected != ref),
              "none": ref.is_null()}
    out = []
    if q.ref:
        out.append(by_ref[q.ref])
    if q.ties:
        out.append(pl.col("is_tie") if q.ties == "only" else ~pl.col("is_tie"))
    if q.margin_min is not None:
        out.append(pl.col("margin") >= q.margin_min)
    if q.margin_max is not None:
        out.append(pl.col("margin") <= q.margin_max)
    if q.chosen_origin:
        out.append(pl.col("chosen_origin") == q.chosen_origin)
    if q.rejected_origin:
        out.append(pl.col("rejected_origin") == q.rejected_origin)
    return out


def prompt_text(messages: str = "messages") -> pl.Expr:
    """The last user turn of a prompt's messages."""
    return (pl.col(messages).list.eval(
        pl.element().filter(pl.element().struct.field("role") == "user"))
        .list.last().struct.field("content"))


def pair_page(store: Store, q: PairQuery, index: TextIndex | None = None) -> PairPage:
    """One page of pairs: filtered, counted, sorted and sliced lazily, then its texts added
    (from `index` where it holds them, else read for these rows only)."""
    index = index or TextIndex()
    frame = _snapshot_pairs(store, q.snapshot) if q.snapshot else (
        store.scan("pairs").filter(pl.col("iteration") == q.iteration).select(PAIR_COLUMNS))
    for f in pair_filters(q):
        frame = frame.filter(f)
    if q.text:
        pattern = contains(q.text)
        texts = index.texts(store, q)
        hits = texts.filter(pl.col("searched").str.contains(pattern))["pair_id"]
        frame = frame.filter(pl.col("pair_id").is_in(hits.implode()))
    column, descending = SORTS[q.sort]
    page = (frame.sort([column, "pair_id"], descending=[descending, False], nulls_last=True)
            .slice((q.page - 1) * q.per_page, q.per_page))
    total, rows = pl.collect_all([frame.select(pl.len()), page])
    held = index.texts(store, q) if q.snapshot else index.held(store, q)
    if held is not None:
        rows = rows.join(held.select("pair_id", *SHOWN), on="pair_id", how="left",
                         maintain_order="left")
    else:
        rows = _with_texts(store, rows)
    short = [pl.col(c).str.slice(0, SNIPPET) for c in SHOWN]
    return PairPage(rows.with_columns(short).to_dicts(), int(total.item()), q)


SHOWN = ("prompt_text", "chosen_text", "rejected_text", "ref_text")


class TextIndex:
    """The texts of a source's pairs, in memory: per pair, `searched` (every prompt turn and
    the chosen, rejected and y_ref texts in one string: one pass of the matcher, ~20 ms over a
    100k-pair iteration, where four columns took ten times longer) and the SHOWN snippets.

    Holds the `capacity` most recently used sources (an iteration at its tables' versions, or
    a snapshot); each is read whole once, when first searched. Thread-safe: the server answers
    requests from a thread pool.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._held: OrderedDict[tuple[Any, ...], pl.DataFrame] = OrderedDict()

    def _key(self, store: Store, q: PairQuery) -> tuple[Any, ...]:
        if q.snapshot is not None:
            return ("snapshot", q.snapshot)
        return ("iteration", q.iteration,
                *(store.version(t) for t in ("pairs", "responses", "prompts")))

    def held(self, store: Store, q: PairQuery) -> pl.DataFrame | None:
        """The source's texts if they are in memory already (never reads them)."""
        with self._lock:
            return self._held.get(self._key(store, q))

    def texts(self, store: Store, q: PairQuery) -> pl.DataFrame:
        """The source's texts, read now if they are not in memory."""
        with self._lock:
            key = self._key(store, q)
            if key not in self._held:
                while len(self._held) >= self.capacity:
                    self._held.popitem(last=False)
                stale = [k for k in self._held if k[:2] == key[:2]]
                for k in stale:  # an older version of the same iteration
                    del self._held[k]
                self._held[key] = (_snapshot_texts(store, q.snapshot) if q.snapshot
                                   else _iteration_texts(store, q.iteration))
            self._held.move_to_end(key)
            return self._held[key]


def _prompt_columns() -> list[pl.Expr]:
    return [pl.col("messages").list.eval(pl.element().struct.field("content"))
            .list.join("\n").alias("prompt_all"), prompt_text().alias("prompt_text")]


def _iteration_texts(store: Store, iteration: int | None) -> pl.DataFrame:
    pairs = (store.scan("pairs").filter(pl.col("iteration") == iteration)
             .select("pair_id", "prompt_id", "chosen_id", "rejected_id", "ref_id"))
    # The build writes a pair's responses under its iteration (partition pruning); any that
    # live elsewhere (a dataset response first stored by an earlier iteration) are fetched by id.
    texts = (store.scan("responses").filter(pl.col("iteration") == iteration)
             .select("response_id", "text").collect())
    ids = pairs.select(pl.concat([pl.col(c) for c in ("chosen_id", "rejected_id", "ref_id")])
                       .drop_nulls().unique().alias("response_id"))
    missing = ids.join(texts.lazy(), on="response_id", how="anti").collect()["response_id"]
    if missing.len():
        texts = pl.concat([texts, store.scan("responses").filter(
            pl.col("response_id").is_in(missing.implode())).select("response_id", "text")
            .collect()]).unique("response_id")
    prompts = (store.scan("prompts")
               .join(pairs.select("prompt_id").unique(), on="prompt_id", how="semi")
               .unique("prompt_id").select("prompt_id", *_prompt_columns()))
    frame = pairs.join(prompts, on="prompt_id", how="left")
    for role in ("chosen", "rejected", "ref"):
        frame = frame.join(texts.lazy().rename({"response_id": f"{role}_id",
                                                "text": f"{role}_text"}),
                           on=f"{role}_id", how="left")
    return _indexed(frame)


def _indexed(frame: pl.LazyFrame) -> pl.DataFrame:
    """Full texts (pair_id, prompt_all and SHOWN) as the index holds them: one searched string
    (y_ref only where its text is neither the chosen nor the rejected one) and snippets; one
    plan, so the joined full texts are never all held at once."""
    ref = pl.col("ref_text")
    distinct = ((ref != pl.col("chosen_text")).fill_null(True)
                & (ref != pl.col("rejected_text")).fill_null(True))
    parts = [pl.col("prompt_all"), pl.col("chosen_text"), pl.col("rejected_text"),
             pl.when(distinct).then(ref)]
    return frame.select(
        "pair_id", pl.concat_str(parts, separator="\x00", ignore_nulls=True).alias("searched"),
        *(pl.col(c).str.slice(0, SNIPPET) for c in SHOWN)).collect().rechunk()


def _snapshot_texts(store: Store, name: str | None) -> pl.DataFrame:
    files = _snapshot_files(store, name)
    if not files:
        return _indexed(pl.LazyFrame(schema={c: pl.String for c in
                                             ("pair_id", "prompt_all", *SHOWN)}))
    frame = pl.scan_parquet(files)

    def last(column: str) -> pl.Expr:
        return pl.col(column).list.last().struct.field("content")

    if frame.collect_schema()["prompt"] == pl.String:  # ultrafeedback: the last user turn
        prompt = [pl.col("messages").list.slice(0, pl.col("messages").list.len() - 1)
                  .list.eval(pl.element().struct.field("content")).list.join("\n")
                  .alias("prompt_all"), pl.col("prompt").alias("prompt_text")]
    else:  # trl: the prompt's messages
        prompt = [
            pl.col("prompt").list.eval(pl.element().struct.field("content")).list.join("\n")
            .alias("prompt_all"), prompt_text("prompt").alias("prompt_text")]
    return _indexed(frame.select("pair_id", *prompt, last("chosen").alias("chosen_text"),
                                 last("rejected").alias("rejected_text"),
                                 last("reference").alias("ref_text")))


def _with_texts(store: Store, rows: pl.DataFrame) -> pl.DataFrame:
    """The page's rows with their prompt and the three texts (only these rows' are read)."""
    ids = pl.concat([rows[c] for c in ("chosen_id", "rejected_id", "ref_id")]).drop_nulls()
    texts = (store.scan("responses").filter(pl.col("response_id").is_in(ids.implode()))
             .select("response_id", pl.col("text").str.slice(0, SNIPPET)).unique("response_id"))
    prompts = (store.scan("prompts").filter(pl.col("prompt_id").is_in(rows["prompt_id"].implode()))
               .select("prompt_id", prompt_text().str.slice(0, SNIPPET).alias("prompt_text"))
               .unique("prompt_id"))
    texts_df, prompts_df = pl.collect_all([texts, prompts])
    out = rows.join(prompts_df, on="prompt_id", how="left", maintain_order="left")
    for role in ("chosen", "rejected", "ref"):
        named = texts_df.rename({"response_id": f"{role}_id", "text": f"{role}_text"})
        out = out.join(named, on=f"{role}_id", how="left", maintain_order="left")
    return out


def _snapshot_files(store: Store, name: str | None) -> list[Path]:
    folder = local_folder(store, snapshot_row(store, str(name))) / "data"
    return sorted(folder.glob("*.parquet"))


def _snapshot_pairs(store: Store, name: str) -> pl.LazyFrame:
    """A snapshot's rows in the short columns of the store's pairs (scores renamed)."""
    files = _snapshot_files(store, name)
    if not files:
        return pl.LazyFrame(schema={c: pl.String for c in PAIR_COLUMNS}).cast(
            {"iteration": pl.Int32, "chosen_score": pl.Float64, "rejected_score": pl.Float64,
             "margin": pl.Float64, "is_tie": pl.Boolean})
    return pl.scan_parquet(files).select(
        *(c for c in PAIR_COLUMNS if c not in ("chosen_score", "rejected_score")),
        pl.col("score_chosen").alias("chosen_score"),
        pl.col("score_rejected").alias("rejected_score"))


def failed_page(store: Store, iteration: int, page: int, per_page: int = PER_PAGE
                ) -> tuple[list[Row], int]:
    """Failed generations of an iteration (they have no pair), with their prompt and whether
    the prompt got a pair after all (a retry that succeeded)."""
    failed = (store.scan("responses")
              .filter((pl.col("iteration") == iteration) & (pl.col("status") == "failed"))
              .select("response_id", "prompt_id", "origin", "sample_index", "error", "policy",
                      "backend", "finish_reason", "created_at"))
    rows = failed.sort("created_at", "response_id").slice((page - 1) * per_page, per_page)
    total, rows_df = pl.collect_all([failed.select(pl.len()), rows])
    prompts = (store.scan("prompts")
               .filter(pl.col("prompt_id").is_in(rows_df["prompt_id"].implode()))
               .select("prompt_id", prompt_text().str.slice(0, SNIPPET).alias("prompt_text")))
    paired = (store.scan("pairs")
              .filter((pl.col("iteration") == iteration)
                      & pl.col("prompt_id").is_in(rows_df["prompt_id"].implode()))
              .group_by("prompt_id").agg(pl.col("pair_id").first()))
    prompts_df, paired_df = pl.collect_all([prompts.unique("prompt_id"), paired])
    out = (rows_df.join(prompts_df, on="prompt_id", how="left", maintain_order="left")
           .join(paired_df, on="prompt_id", how="left", maintain_order="left"))
    return out.to_dicts(), int(total.item())


# --- one pair -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairView:
    pair: Row
    prompt: Row | None  # the prompts row (messages, source, source row)
    candidates: list[Row]  # the ranking's judgments with their responses, by position
    responses: dict[str, Row]  # by response_id: chosen, rejected, y_ref and every candidate
    checkpoints: dict[str, Row]  # registered checkpoints by fingerprint (the policies)
    run: Row | None  # the command that wrote the pair
    downstream: dict[str, Any]  # lineage's downstream: snapshots, checkpoints, generated


def pair_view(store: Store, pair_id: str) -> PairView:
    """Everything the pair page shows, full texts included.

    Raises:
        SelmError: no pair has this id.
    """
    found = store.scan("pairs").filter(pl.col("pair_id") == pair_id).collect()
    if found.height == 0:
        raise SelmError(f"no pair has id {pair_id!r}")
    pair = found.row(0, named=True)
    judgments = (store.scan("judgments").filter(pl.col("ranking_id") == pair["ranking_id"])
                 .sort("position").collect())
    ids = {*judgments["response_id"].to_list(), pair["chosen_id"], pair["rejected_id"],
           pair["ref_id"]} - {None}
    responses = store.scan("responses").filter(pl.col("response_id").is_in(list(ids))).collect()
    by_id = {r["response_id"]: r for r in responses.iter_rows(named=True)}
    prompt = store.scan("prompts").filter(pl.col("prompt_id") == pair["prompt_id"]).collect()
    fingerprints = [f for f in responses["policy_fingerprint"].unique().to_list() if f]
    checkpoints = (store.scan("checkpoints").filter(pl.col("fingerprint").is_in(fingerprints))
                   .collect())
    run = store.scan("runs").filter(pl.col("run_id") == pair["run_id"]).collect()
    candidates = [{**j, "response": by_id.get(j["response_id"])}
                  for j in judgments.iter_rows(named=True)]
    return PairView(pair, prompt.row(0, named=True) if prompt.height else None, candidates,
                    by_id, {c["fingerprint"]: c for c in checkpoints.iter_rows(named=True)},
                    run.row(0, named=True) if run.height else None,
                    downstream(store, "pairs", pair))


# --- one prompt across iterations -----------------------------------------------------------


@dataclass(frozen=True)
class PromptAcross:
    prompt: Row
    iterations: list[Row]  # iteration, policy responses (with score), pairs


def prompt_across(store: Store, prompt_id: str) -> PromptAcross:
    """A prompt in every iteration that holds it: what the policy answered there, how the
    ranker scored it, and the pair it got.

    Raises:
        SelmError: no prompt has this id.
    """
    prompt = store.scan("prompts").filter(pl.col("prompt_id") == prompt_id).collect()
    if prompt.height == 0:
        raise SelmError(f"no prompt has id {prompt_id!r}")
    mine = pl.col("prompt_id") == prompt_id
    responses, judgments, pairs = pl.collect_all([
        store.scan("responses").filter(mine & (pl.col("origin") == "policy")),
        store.scan("judgments").filter(mine).select("response_id", "ranking_id", "score",
                                                    "rank", "ranker"),
        store.scan("pairs").filter(mine).select(PAIR_COLUMNS)])
    scored = responses.join(judgments, on="response_id", how="left")
    iterations = sorted({*responses["iteration"].to_list(), *pairs["iteration"].to_list()})
    return PromptAcross(prompt.row(0, named=True), [
        {"iteration": it,
         "responses": scored.filter(pl.col("iteration") == it)
         .sort("sample_index", "created_at").to_dicts(),
         "pairs": pairs.filter(pl.col("iteration") == it).sort("pair_id").to_dicts()}
        for it in iterations])


# --- one evaluation question across policies ------------------------------------------------


def eval_questions(store: Store, page: int, per_page: int = PER_PAGE) -> tuple[list[Row], int]:
    """The evaluation questions answered (`selm-data eval`), with how many policies answered
    each: the entries of the question pages."""
    first = (store.scan("eval_answers").filter(pl.col("turn") == 1)
             .group_by("prompt_set", "question_id")
             .agg(pl.col("messages").first().list.last().struct.field("content")
                  .str.slice(0, SNIPPET).alias("question"),
                  pl.col("policy_fingerprint").n_unique().alias("policies")))
    rows = first.sort("prompt_set", "question_id").slice((page - 1) * per_page, per_page)
    total, rows_df = pl.collect_all([first.select(pl.len()), rows])
    return rows_df.to_dicts(), int(total.item())


@dataclass(frozen=True)
class QuestionAcross:
    prompt_set: str
    question_id: str
    messages: list[Row]  # turn 1's messages: the question
    policies: list[Row]  # label, iteration, checkpoint_id, answers (by turn)
    comparisons: list[Row]  # the stored comparisons of turn-1 answers, a and b labelled


def question_across(store: Store, prompt_set: str, question_id: str) -> QuestionAcross:
    """What each policy (the base model, each iteration's checkpoint, other models) answered to
    one evaluation question, and how the ranker compared the answers.

    Raises:
        SelmError: no answer to this question is stored.
    """
    mine = (pl.col("prompt_set") == prompt_set) & (pl.col("question_id") == question_id)
    answers = (store.scan("eval_answers").filter(mine)
               .with_columns(label=policy_label()).sort("iteration", "policy", "turn")
               .collect())
    if answers.height == 0:
        raise SelmError(f"no stored answer to question {question_id!r} of {prompt_set!r}")
    comparisons = store.scan("eval_comparisons").filter(mine).collect()
    labels = dict(zip(answers["answer_id"].to_list(), answers["label"].to_list(), strict=True))
    policies = []
    for (fingerprint,), group in answers.group_by("policy_fingerprint", maintain_order=True):
        head = group.row(0, named=True)
        policies.append({"label": head["label"], "iteration": head["iteration"],
                         "policy": head["policy"], "fingerprint": fingerprint,
                         "checkpoint_id": head["checkpoint_id"], "answers": group.to_dicts()})
    turn_one = answers.filter(pl.col("turn") == 1)
    return QuestionAcross(
        prompt_set, question_id, turn_one.row(0, named=True)["messages"] if turn_one.height
        else answers.row(0, named=True)["messages"], policies,
        [{**c, "a": labels.get(c["answer_a_id"], c["answer_a_id"][:12]),
          "b": labels.get(c["answer_b_id"], c["answer_b_id"][:12])}
         for c in comparisons.iter_rows(named=True)])


# --- the overview ---------------------------------------------------------------------------


def sources(store: Store) -> tuple[list[int], list[str]]:
    """The iterations that hold pairs, and the snapshots' names: what the pairs page lists."""
    iterations = (store.scan("pairs").select("iteration").unique().collect()["iteration"]
                  .sort().to_list())
    names = store.scan("snapshots").select("name").collect()["name"].sort().to_list()
    return iterations, names


def snapshots_and_checkpoints(store: Store) -> tuple[list[Row], list[Row]]:
    """Both small tables, each row with its lineage neighbours: the checkpoints trained on a
    snapshot, and a checkpoint's snapshot name and the iteration its responses fed."""
    snapshots, checkpoints, generated = pl.collect_all([
        store.scan("snapshots").sort("iteration", "created_at"),
        store.scan("checkpoints").sort("iteration", "created_at"),
        store.scan("responses").filter(pl.col("origin") == "policy")
        .group_by("policy_fingerprint").agg(pl.col("iteration").unique().sort())])
    names = dict(zip(snapshots["snapshot_id"].to_list(), snapshots["name"].to_list(),
                     strict=True))
    fed = dict(zip(generated["policy_fingerprint"].to_list(), generated["iteration"].to_list(),
                   strict=True))
    ckpts = [{**c, "snapshot_name": names.get(c["snapshot_id"]),
              "generated_in": fed.get(c["fingerprint"], [])}
             for c in checkpoints.iter_rows(named=True)]
    snaps = [{**s, "checkpoints": [c for c in ckpts if c["snapshot_id"] == s["snapshot_id"]]}
             for s in snapshots.iter_rows(named=True)]
    return snaps, ckpts


@dataclass(frozen=True)
class WinMatrix:
    """Stored evaluation comparisons as a matrix: the raw win rate of row over column."""

    prompt_set: str
    ranker: str
    labels: list[str]
    cells: list[list[tuple[float, int] | None]]  # (win rate, questions) or None


def win_matrices(store: Store) -> tuple[pl.DataFrame, list[WinMatrix]]:
    """`inspect`'s evaluation tables (`eval_stats`) and one matrix per prompt set and ranker.
    Only what is stored: the viewer loads no ranker (`selm-data winrates` scores and adds the
    length-controlled rates and intervals)."""
    answers, compared = eval_stats(store)
    matrices = []
    for (prompt_set, ranker), group in compared.group_by("prompt_set", "ranker",
                                                         maintain_order=True):
        labels = list(dict.fromkeys([*group["a"].to_list(), *group["b"].to_list()]))
        cells: list[list[tuple[float, int] | None]] = [[None] * len(labels) for _ in labels]
        for row in group.iter_rows(named=True):
            i, j = labels.index(row["a"]), labels.index(row["b"])
            cells[i][j] = (row["win_a"], row["compared"])
            cells[j][i] = (1.0 - row["win_a"], row["compared"])
        matrices.append(WinMatrix(str(prompt_set), str(ranker), labels, cells))
    return answers, matrices


__all__ = ["PER_PAGE", "REF_ROLES", "SORTS", "TIES", "PairPage", "PairQuery", "PairView",
           "PromptAcross", "QuestionAcross", "TextIndex", "WinMatrix", "eval_questions",
           "failed_page", "pair_page", "pair_view", "prompt_across", "question_across",
           "snapshots_and_checkpoints", "sources", "win_matrices"]
