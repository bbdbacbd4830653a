"""`selm-data build --iter N`: portion N of the dataset in, iteration N's pairs out.

SELM's Algorithm 1, one iteration, as data:

    source -> prompts (portion N, this shard) -> responses (y_ref from the policy; y_w, y_l from
    the dataset) -> judgments (the ranker's scores of the three) -> pairs (the rule's choice)

With `pairing.rule: sail` (SAIL, Ding et al. 2024) the policy gives two seeded samples y_0, y_1
instead of y_ref; one ranking scores (y_0, y_1, y_w, y_l), and each prompt gets two pairs of
that ranking: `sail_dataset` (y_w over y_l, as the dataset labelled them) and `sail_policy` (the
better sample over the worse; y_0 wins a tie). A prompt whose samples are not both generated
and scored gets neither pair, so every prompt of a SAIL iteration has both or none.

A build runs in two phases (design.md §7), so each model has the whole GPU in turn:

1. generate: every response the shard lacks goes through the engine as one stream (vLLM's
   continuous batching never drains between chunks), committed every `commit_every` results;
   then the engine is shut down and its memory freed.
2. rank and pair: the ranker is loaded only then, and ranks the shard's prompts in chunks of
   `commit_every`, sorted by length so its batches pad little; each chunk's judgments and pairs
   are committed before the next.

So a killed build loses at most one chunk of either phase. Chunks are large (256 by
default) because each Delta commit costs more as a table gathers files: at 32 prompts a chunk,
per-prompt overhead grew 3.2x from 1k to 100k prompts; at 256 it stayed flat
(bench/overhead.py). Everything has a content-derived id, and the build first
reads what the store already holds for its shard, so rerunning the same command redoes only
unfinished work: responses already generated are not generated again, rankings are not redone.
`--shard i/k` builds the prompts whose id hashes to i (mod k) under a lease, so k processes
(one per GPU or node) build one iteration into one store at once. Sharded and single-process
builds make the same pairs; their scores agree to float precision (a model's outputs move by
~1e-6 with the composition of its batch). A resumed build ranks the same batches as an
uninterrupted one, so its pairs are identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import polars as pl

from selm_data.builder.pairing import POLICY_SAMPLES, Candidate, make_pairs, ranks
from selm_data.errors import SelmError
from selm_data.generation.backends import (
    GenerationRequest,
    GenerationResult,
    Generator,
    close_generator,
    make_generator,
    requests_for,
    stream_results,
)
from selm_data.generation.devices import free_accelerator_memory
from selm_data.generation.models import ResolvedModel, resolve_policy
from selm_data.manifest import Manifest
from selm_data.rankers.base import Ranker, RankRequest
from selm_data.rankers.factory import make_ranker
from selm_data.sources.dataset import Example, LoadedSource, load_source
from selm_data.sources.portions import assign_portions
from selm_data.store.schema import PROMPTS, RESPONSES, content_id, row_id
from selm_data.store.store import Store

Progress = Callable[[str, int, int], None]  # (stage, done, total)
T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'i/k', 0 <= i < k."""
        try:
            i, k = (int(x) for x in text.split("/"))
        except ValueError:
            raise SelmError(f"--shard takes i/k (e.g. 0/4), not {text!r}") from None
        if not 0 <= i < k:
            raise SelmError(f"--shard {text}: i must be in 0..k-1")
        return cls(i, k)

    def take(self, items: Sequence[T]) -> list[T]:
        """This shard's items of a portion in source order: every k-th from the i-th, as
        `datasets.Dataset.shard(k, i, contiguous=False)` cuts. Shard sizes differ by at most
        one, so k ranks finish together; a hash of the prompt id (binomial sizes) left the
        largest of 8 shards of 1,024 prompts ~17% over the mean, and every rank waited for it.
        """
        return list(items[self.index::self.count])

    def __str__(self) -> str:
        return f"{self.index}-of-{self.count}"


@dataclass
class BuildReport:
    iteration: int
    shard: str
    policy: str
    source_rows: int = 0
    quarantined: int = 0
    duplicates: int = 0
    prompts: int = 0  # of this portion and shard
    already_paired: int = 0  # done by an earlier run
    generated: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (prompt_id, reason)
    ranked: int = 0
    unranked: list[tuple[str, str]] = field(default_factory=list)  # (prompt_id, reason)
    pairs: int = 0  # training pairs: all but SAIL's policy pairs
    ties: int = 0
    dropped_ties: int = 0
    ref_won: int = 0  # pairs whose chosen response is the policy's own
    policy_pairs: int = 0  # SAIL's policy pairs (rule sail), one per prompt beside its pair
    policy_ties: int = 0


def build(
    manifest: Manifest,
    iteration: int,
    store: Store,
    *,
    shard: Shard = Shard(0, 1),
    policy: str | None = None,
    generator: Generator | None = None,
    ranker: Ranker | None = None,
    progress: Progress | None = None,
    generation_progress: Progress | None = None,
) -> BuildReport:
    """Build iteration `iteration` of `manifest` into `store`. `generator` and `ranker` default
    to the manifest's, loaded in turn (the generator is freed before the ranker loads);
    passing them lets a caller reuse loaded models across calls, and keeps them alive.
    `generation_progress` hears ("responses", done, total) as responses are committed,
    `progress` ("prompts", done, total) as pairs are."""
    spec = manifest.iteration(iteration)
    loaded = load_source(manifest.source)
    portion = portion_of(manifest, loaded, iteration)
    mine = shard.take(portion)
    with store.claim(f"build/iter={iteration}/shard={shard}"):
        _store_inputs(store, loaded, mine, iteration)
        if spec.pairs == "original":
            report = BuildReport(iteration, str(shard), policy="(none: original pairs)")
            _count_source(report, loaded, mine)
            _original_pairs(store, manifest, loaded, mine, iteration, report)
            return report
        model = resolve_policy(policy or policy_for(store, manifest, iteration),
                               revision=manifest.policy.revision if policy is None else None)
        report = BuildReport(iteration, str(shard), policy=model.reference)
        _count_source(report, loaded, mine)
        _ranked_pairs(store, manifest, mine, iteration, model, generator, ranker, report,
                      progress or (lambda *_: None), generation_progress or (lambda *_: None))
        return report


def portion_of(manifest: Manifest, loaded: LoadedSource, t: int) -> list[tuple[str, Example]]:
    """Iteration t's prompts, (prompt id, example) in source order: what shards are cut from."""
    ids = [row_id(PROMPTS, {"messages": ex.messages}) for ex in loaded.examples]
    portions = assign_portions(ids, manifest.num_portions, manifest.portions.split)
    return [(pid, ex) for pid, ex, p in zip(ids, loaded.examples, portions, strict=True) if p == t]


def _count_source(report: BuildReport, loaded: LoadedSource, mine: list) -> None:
    report.source_rows = loaded.rows_read
    report.quarantined = len(loaded.quarantined)
    report.duplicates = loaded.duplicates
    report.prompts = len(mine)


def policy_for(store: Store, manifest: Manifest, iteration: int) -> str:
    """Iteration 1 starts from the manifest's policy; iteration t from t-1's checkpoint."""
    if iteration == 1:
        return manifest.policy.model
    path = checkpoint_path(store, iteration - 1)
    if path is None:
        raise SelmError(
            f"iteration {iteration} generates with the policy trained in iteration "
            f"{iteration - 1}, and the store has no checkpoint for it. Train it with "
            f"{train_hint(store, iteration - 1)}, or pass --policy PATH to use another model."
        )
    return path


def train_hint(store: Store, iteration: int) -> str:
    """The command that trains `iteration`: on its latest snapshot when there is one."""
    snapshots = (store.scan("snapshots").filter(pl.col("iteration") == iteration)
                 .sort("created_at").select("name").collect())
    if snapshots.height:
        return f"`selm-train train --snapshot {store.uri}@{snapshots['name'][-1]}`"
    return (f"`selm-data export --iter {iteration}` and then `selm-train train --snapshot "
            f"{store.uri}@NAME` (NAME: the snapshot export prints), or `selm-train loop`")


def checkpoint_path(store: Store, iteration: int) -> str | None:
    """The folder of the checkpoint iteration `iteration` trained (the latest registered)."""
    found = (
        store.scan("checkpoints").filter(pl.col("iteration") == iteration)
        .sort("created_at").select("path").collect()
    )
    return found["path"][-1] if found.height else None


def _store_inputs(store: Store, loaded: LoadedSource, mine: list, iteration: int) -> None:
    """Quarantined source rows, this shard's prompts and the dataset's own two responses."""
    where = {"source": loaded.source, "source_revision": loaded.revision,
             "source_split": loaded.split}
    store.append("quarantine", [
        {**where, "source_row": q.source_row, "reason": q.reason, "detail": q.detail}
        for q in loaded.quarantined
    ])
    store.append("prompts", [
        {**where, "prompt_id": pid, "iteration": iteration, "messages": ex.messages,
         "source_row": ex.source_row}
        for pid, ex in mine
    ])
    store.append("responses", [
        row for pid, ex in mine for row in _dataset_responses(pid, ex, iteration)
    ])


def _dataset_responses(pid: str, ex: Example, iteration: int) -> list[dict]:
    return [
        {"prompt_id": pid, "iteration": iteration, "origin": origin, "sample_index": 0,
         "status": "ok", "text": text, "source_score": score}
        for origin, text, score in (("dataset_chosen", ex.chosen, ex.score_chosen),
                                    ("dataset_rejected", ex.rejected, ex.score_rejected))
    ]


def _dataset_ids(pid: str, ex: Example, iteration: int) -> tuple[str, str]:
    chosen, rejected = _dataset_responses(pid, ex, iteration)
    return row_id(RESPONSES, chosen), row_id(RESPONSES, rejected)


def _original_pairs(store: Store, manifest: Manifest, loaded: LoadedSource, mine: list,
                    iteration: int, report: BuildReport) -> None:
    """A plain-DPO iteration on the dataset's own pairs: the dataset's scores are the ranking."""
    judgments, pairs = [], []
    ranker, version = "dataset", f"{loaded.source}@{loaded.revision or ''}:{loaded.split}"
    for pid, ex in mine:
        ids = list(_dataset_ids(pid, ex, iteration))
        ranking = content_id("ranking", {"prompt_id": pid, "ranker": ranker, "version": version,
                                         "candidates": ids})
        for pos, (rid, score) in enumerate(zip(ids, (ex.score_chosen, ex.score_rejected),
                                               strict=True)):
            judgments.append(_judgment(ranking, pid, iteration, rid, pos, 2, score, pos + 1,
                                       ranker, version))
        tie = ex.score_chosen is not None and ex.score_chosen == ex.score_rejected
        margin = (None if ex.score_chosen is None or ex.score_rejected is None
                  else ex.score_chosen - ex.score_rejected)
        pairs.append({"prompt_id": pid, "iteration": iteration, "ranking_id": ranking,
                      "rule": "original", "chosen_id": ids[0], "rejected_id": ids[1],
                      "chosen_score": ex.score_chosen, "rejected_score": ex.score_rejected,
                      "margin": margin, "is_tie": tie, "chosen_origin": "dataset_chosen",
                      "rejected_origin": "dataset_rejected"})
        report.ties += tie
    store.append("judgments", judgments)
    if pairs:
        store.append("pairs", pairs)
    report.pairs = len(pairs)


def _judgment(ranking: str, pid: str, iteration: int, rid: str, pos: int, n: int,
              score: float | None, rank: int, ranker: str, version: str) -> dict:
    return {"ranking_id": ranking, "prompt_id": pid, "iteration": iteration,
            "response_id": rid, "position": pos, "n_candidates": n, "score": score,
            "rank": rank, "ranker": ranker, "ranker_version": version}


@dataclass
class _Done:
    """What the store already holds for this iteration, read once at the start of a build."""

    texts: dict[str, str]  # ok response id -> text
    rankings: dict[str, list[float]]  # ranking id -> scores by position
    pairs: set[str]  # ranking ids that have a pair


def _done(store: Store, iteration: int) -> _Done:
    it = pl.col("iteration") == iteration
    ok = (store.scan("responses").filter(it & (pl.col("status") == "ok"))
          .select("response_id", "text").collect())
    judged = (store.scan("judgments").filter(it).sort("position")
              .group_by("ranking_id", maintain_order=True).agg("score").collect())
    paired = store.scan("pairs").filter(it).select("ranking_id").collect()
    return _Done(
        texts=dict(zip(ok["response_id"].to_list(), ok["text"].to_list(), strict=True)),
        rankings={r: s for r, s in judged.iter_rows()},
        pairs=set(paired["ranking_id"].to_list()),
    )


def _ranked_pairs(store: Store, manifest: Manifest, mine: list, iteration: int,
                  model: ResolvedModel, generator: Generator | None, ranker: Ranker | None,
                  report: BuildReport, progress: Progress, generation_progress: Progress) -> None:
    """Two phases: generate the whole shard, free the engine, then rank and pair with the whole
    GPU. The ranker is loaded only after the generator this build loaded has been freed."""
    done = _done(store, iteration)
    _generate_shard(store, manifest, mine, iteration, model, generator, done, report,
                    generation_progress)
    items = _rankable(manifest, mine, iteration, model, done)
    if not items:
        return
    ranker = ranker or make_ranker(manifest.ranker)
    chunk = manifest.commit_every
    for start in range(0, len(items), chunk):
        _rank_and_pair(store, manifest, items[start:start + chunk], iteration, ranker, done,
                       report)
        progress("prompts", min(start + chunk, len(items)), len(items))


def _generate_shard(store: Store, manifest: Manifest, mine: list, iteration: int,
                    model: ResolvedModel, generator: Generator | None, done: _Done,
                    report: BuildReport, progress: Progress) -> None:
    """Phase 1: every missing or failed response of the shard through one stream, committed
    every `commit_every` results, so a kill loses at most that many. A generator this build
    loads is closed (engine shut down, memory freed) before it returns; one passed in is the
    caller's to keep."""
    requests = requests_for(manifest.generation, [(pid, ex.messages) for pid, ex in mine])
    todo = [r for r in requests if _response_id(r, model, "ok") not in done.texts]
    if not todo:
        return
    owned = generator is None
    engine = generator or make_generator(manifest.generation, manifest.policy, model.path,
                                         model.revision, seed=manifest.seed)
    try:
        _stream_into(store, manifest, engine, todo, iteration, model, done, report, progress)
    finally:
        if owned:
            close_generator(engine)
            del engine  # the last reference: what only it held (cycles too) is collected now
            free_accelerator_memory()


def _stream_into(store: Store, manifest: Manifest, engine: Generator,
                 todo: list[GenerationRequest], iteration: int, model: ResolvedModel,
                 done: _Done, report: BuildReport, progress: Progress) -> None:
    rows: list[dict] = []
    finished = 0
    for i, result in stream_results(engine, todo):
        rows.append(_record(todo[i], result, engine, iteration, model, done, report))
        finished += 1
        if len(rows) >= manifest.commit_every:
            store.append("responses", rows)
            rows = []
            progress("responses", finished, len(todo))
    if rows:
        store.append("responses", rows)
        progress("responses", finished, len(todo))


def _response_id(r: GenerationRequest, model: ResolvedModel, status: str) -> str:
    return row_id(RESPONSES, {"prompt_id": r.prompt_id, "origin": "policy",
                              "policy_fingerprint": model.fingerprint,
                              "sampling": r.sampling.as_row(), "sample_index": r.sample_index,
                              "status": status})


def _record(r: GenerationRequest, result: GenerationResult, generator: Generator,
            iteration: int, model: ResolvedModel, done: _Done, report: BuildReport) -> dict:
    """One generated response as its `responses` row; an ok one joins `done`."""
    if result.status == "ok":
        done.texts[_response_id(r, model, "ok")] = result.text or ""
        report.generated += 1
    else:
        report.failed.append((r.prompt_id, result.error or "unknown error"))
    return {
        "prompt_id": r.prompt_id, "iteration": iteration, "origin": "policy",
        "sample_index": r.sample_index, "status": result.status, "error": result.error,
        "text": result.text, "policy": model.reference,
        "policy_fingerprint": model.fingerprint, "backend": generator.backend,
        "sampling": r.sampling.as_row(), "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "finish_reason": result.finish_reason,
    }


@dataclass(frozen=True)
class _Item:
    """One prompt ready to rank: its candidates' response ids and texts, in ranking order."""

    pid: str
    messages: list
    ids: list[str]
    texts: list[str]

    @property
    def size(self) -> int:
        return sum(len(m["content"]) for m in self.messages) + sum(len(t) for t in self.texts)


def _rankable(manifest: Manifest, mine: list, iteration: int, model: ResolvedModel,
              done: _Done) -> list[_Item]:
    """The shard's prompts whose policy samples all exist, sorted by length (characters of
    prompt and candidates, then prompt id), so a ranker's batches pad little. The order is a
    function of the texts alone: a resumed build cuts the same chunks as an uninterrupted one
    and ranks the same batches, so its pairs are identical."""
    k = POLICY_SAMPLES[manifest.pairing.rule]  # samples 0..k-1; with n > k the rest are unused
    items = []
    for pid, ex in mine:
        requests = requests_for(manifest.generation, [(pid, ex.messages)])[:k]
        samples = [_response_id(r, model, "ok") for r in requests]
        if any(s not in done.texts for s in samples):
            continue  # generation failed: recorded, reported, not ranked
        items.append(_Item(pid, ex.messages, [*samples, *_dataset_ids(pid, ex, iteration)],
                           [*(done.texts[s] for s in samples), ex.chosen, ex.rejected]))
    return sorted(items, key=lambda it: (it.size, it.pid))


def _rank_and_pair(store: Store, manifest: Manifest, chunk: list[_Item], iteration: int,
                   ranker: Ranker, done: _Done, report: BuildReport) -> None:
    """Phase 2, one chunk: rank the policy's samples with the dataset's pair, (y_ref, y_w, y_l)
    or for SAIL (y_0, y_1, y_w, y_l), of each prompt; then pair by the rule."""
    rule = manifest.pairing.rule
    k = POLICY_SAMPLES[rule]
    names = ("y_ref",) if k == 1 else tuple(f"y_{i}" for i in range(k))
    names = (*names, "y_w", "y_l")
    items = [(it.pid, it.messages, it.ids,
              content_id("ranking", {"prompt_id": it.pid, "ranker": ranker.name,
                                     "version": ranker.version, "candidates": it.ids}),
              it.texts) for it in chunk]
    report.already_paired += sum(1 for *_, ranking, _ in items if ranking in done.pairs)
    new = [it for it in items if it[3] not in done.rankings]
    if new:
        scores = ranker.score([RankRequest(messages, texts) for _, messages, _, _, texts in new])
        judgments = []
        for (pid, _, ids, ranking, _), row in zip(new, scores, strict=True):
            unscored = [pos for pos, score in enumerate(row) if not math.isfinite(score)]
            if unscored:  # not stored: a later run asks the ranker again
                report.unranked.append((pid, f"{ranker.name} gave no score to candidate(s) "
                                             f"{unscored} of ({', '.join(names)})"))
                continue
            done.rankings[ranking] = row
            for pos, (rid, score, rank) in enumerate(zip(ids, row, ranks(row), strict=True)):
                judgments.append(_judgment(ranking, pid, iteration, rid, pos, len(ids), score,
                                           rank, ranker.name, ranker.version))
            report.ranked += 1
        store.append("judgments", judgments)
    pairs = []
    origins = ("policy",) * k + ("dataset_chosen", "dataset_rejected")
    for pid, _, ids, ranking, _ in items:
        if ranking not in done.rankings:
            continue  # unranked: reported above
        candidates = [Candidate(i, o, s) for i, o, s in
                      zip(ids, origins, done.rankings[ranking], strict=True)]
        made = make_pairs(rule, candidates, manifest.pairing.ties)
        if not made:  # a SELM rule's one pair, a tie, and ties drop (sail keeps ties)
            report.dropped_ties += 1
            continue
        for pair in made:
            if pair.rule == "sail_policy":
                report.policy_pairs += 1
                report.policy_ties += pair.is_tie
            else:
                report.pairs += 1
                report.ties += pair.is_tie
                report.ref_won += pair.chosen.origin == "policy"
            pairs.append({
                "prompt_id": pid, "iteration": iteration, "ranking_id": ranking,
                "rule": pair.rule, "chosen_id": pair.chosen.response_id,
                "rejected_id": pair.rejected.response_id,
                # y_ref for SELM's term; SAIL has none (its samples are the policy pair's)
                "ref_id": ids[0] if k == 1 else None, "chosen_score": pair.chosen.score,
                "rejected_score": pair.rejected.score, "margin": pair.margin,
                "is_tie": pair.is_tie, "chosen_origin": pair.chosen.origin,
                "rejected_origin": pair.rejected.origin,
            })
        done.pairs.add(ranking)
    if pairs:
        store.append("pairs", pairs)
