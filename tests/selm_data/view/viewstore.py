"""A small two-iteration store for the viewer, built as `selm-data build` writes one: prompts,
(y_ref, y_w, y_l) responses, their ranking and the best-worst pair (the real pairing rule),
then a real snapshot of iteration 1 (`export`), a checkpoint trained on it whose fingerprint
generated iteration 2, and stored evaluation answers and comparisons (`helpers.chain_rows`).

Planted in it: responses that carry a `<script>` and an `<img onerror>` payload (each would
set `document.title` and `window.__pwned` if it ran), markdown with a code block, a tie, a failed
generation, and one prompt built in both iterations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl
import pytest

from helpers import chain_rows
from selm_data.builder.pairing import Candidate, best_worst, ranks
from selm_data.publish.snapshot import export
from selm_data.store.schema import RESPONSES, content_id, row_id
from selm_data.store.store import RunInfo, Store, open_store

SCRIPT = '<script>document.title="pwned-script";window.__pwned=1;</script>'
ONERROR = '<img src=x onerror="document.title=\'pwned-img\';window.__pwned=2">'
MARKDOWN = ("Use **bold** and this:\n\n```python\nprint('hello')\n```\n\n"
            "[a link](javascript:alert(1))")
SHARED = "What is the capital of France?"
CHECKPOINT = {"iteration": 1, "path": "ckpt/iter1", "fingerprint": "w1", "base_model": "tiny",
              "loss": "selm", "config": "{}"}
Rows = dict[str, list[dict]]


def prompt_rows(iteration: int, question: str, texts: tuple[str, str, str],
                scores: tuple[float, float, float], *, fingerprint: str,
                failed_first: bool = False) -> Rows:
    """One prompt of a build: its three candidates, ranking and best-worst pair."""
    messages = [{"role": "user", "content": question}]
    prompt_id = content_id("prompts", {"messages": messages})
    sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": 64, "seed": None}
    rows: Rows = {"prompts": [{"prompt_id": prompt_id, "iteration": iteration,
                               "messages": messages, "source": "tests", "source_split": "train",
                               "source_row": abs(hash(question)) % 10_000}],
                  "responses": [], "judgments": [], "pairs": []}
    if failed_first:
        failed = {"prompt_id": prompt_id, "iteration": iteration, "origin": "policy",
                  "sample_index": 0, "status": "failed", "error": "server timed out <b>x</b>",
                  "text": None, "policy": "tiny-llama", "policy_fingerprint": fingerprint,
                  "sampling": sampling, "backend": "openai"}
        rows["responses"].append({**failed, "response_id": row_id(RESPONSES, failed)})
    candidates = []
    for origin, text, score in zip(("policy", "dataset_chosen", "dataset_rejected"), texts,
                                   scores, strict=True):
        policy = origin == "policy"
        response: dict[str, Any] = {
            "prompt_id": prompt_id, "iteration": iteration, "origin": origin,
            "sample_index": 0, "status": "ok", "text": text,
            "policy": "tiny-llama" if policy else None,
            "policy_fingerprint": fingerprint if policy else None,
            "sampling": sampling if policy else None,
            "backend": "transformers" if policy else None,
            "completion_tokens": len(text.split()) if policy else None,
            "finish_reason": "stop" if policy else None}
        response_id = response["response_id"] = row_id(RESPONSES, response)
        rows["responses"].append(response)
        candidates.append(Candidate(response_id, origin, score))
    ranking_id = content_id("ranking", {"candidates": [c.response_id for c in candidates]})
    for pos, (c, rank) in enumerate(zip(candidates, ranks(scores), strict=True)):
        rows["judgments"].append({"ranking_id": ranking_id, "prompt_id": prompt_id,
                                  "iteration": iteration, "response_id": c.response_id,
                                  "position": pos, "n_candidates": 3, "score": c.score,
                                  "rank": rank, "ranker": "test-ranker", "ranker_version": "7"})
    pair = best_worst(candidates)
    rows["pairs"].append({"prompt_id": prompt_id, "iteration": iteration,
                          "ranking_id": ranking_id, "rule": pair.rule,
                          "chosen_id": pair.chosen.response_id,
                          "rejected_id": pair.rejected.response_id,
                          "ref_id": candidates[0].response_id, "chosen_score": pair.chosen.score,
                          "rejected_score": pair.rejected.score, "margin": pair.margin,
                          "is_tie": pair.is_tie, "chosen_origin": pair.chosen.origin,
                          "rejected_origin": pair.rejected.origin})
    return rows


def iteration_one() -> list[Rows]:
    out = [
        prompt_rows(1, SHARED, ("Paris, said the policy.", "Paris.", "Lyon."), (0.9, 0.5, -1.0),
                    fingerprint="base"),
        prompt_rows(1, "Say something dangerous", (SCRIPT, ONERROR, "I refuse."),
                    (0.2, 0.8, -0.4), fingerprint="base"),
        prompt_rows(1, "Show me code", (MARKDOWN, "no code", "wrong code"), (0.3, 0.3, 0.1),
                    fingerprint="base"),  # y_ref ties y_w and wins the tie
        prompt_rows(1, "Count to three", ("1 2 3", "one two three", "3 2 1"), (0.1, 0.7, -0.2),
                    fingerprint="base", failed_first=True),
        prompt_rows(1, "All the same", ("same", "same too", "also same"), (0.2, 0.2, 0.2),
                    fingerprint="base"),  # a tie: y_ref chosen, y_l rejected, margin 0
    ]
    out += [prompt_rows(1, f"filler question {i}", (f"policy {i}", f"good {i}", f"bad {i}"),
                        (0.1 * i - 0.6, 0.5, -0.5), fingerprint="base") for i in range(8)]
    return out


def iteration_two() -> list[Rows]:
    out = [prompt_rows(2, SHARED, ("Paris is the capital.", "Paris.", "Lyon."),
                       (0.4, 0.5, -1.0), fingerprint="w1")]
    out += [prompt_rows(2, f"second question {i}", (f"new {i}", f"good {i}", f"bad {i}"),
                        (0.7, 0.2 * i, -0.1), fingerprint="w1") for i in range(3)]
    return out


def write(store: Store, parts: list[Rows]) -> None:
    for table in ("prompts", "responses", "judgments", "pairs"):
        store.append(table, [r for part in parts for r in part[table]])


@dataclass(frozen=True)
class Built:
    store: Store
    snapshot: str
    snapshot_id: str
    checkpoint_id: str


def build_store(store: Store) -> Built:
    write(store, iteration_one())
    export(store, 1, name="it1")
    snapshot_id = (store.scan("snapshots").filter(pl.col("name") == "it1").collect()
                   ["snapshot_id"][0])
    store.append("checkpoints", [{**CHECKPOINT, "snapshot_id": snapshot_id}])
    checkpoint_id = store.scan("checkpoints").collect()["checkpoint_id"][0]
    write(store, iteration_two())
    # Evaluation answers of the base policy and of this checkpoint (same path and
    # fingerprint: the same checkpoint id), and their comparisons.
    evals = chain_rows(1, 3, policy_fingerprint="base")
    store.append("eval_answers", evals["eval_answers"])
    store.append("eval_comparisons", evals["eval_comparisons"])
    return Built(store, "it1", snapshot_id, checkpoint_id)


def built_store(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The store of this module, in a fresh folder (each test module's `built` fixture)."""
    store = open_store(tmp_path_factory.mktemp("view") / "store", create=True,
                       run=RunInfo.new("pytest"))
    return build_store(store)
