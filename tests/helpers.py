"""Rows for tests: a consistent chain through every table of the store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selm_data.publish.snapshot import files_hash
from selm_data.store.schema import (
    CHECKPOINTS,
    EVAL_ANSWERS,
    EVAL_COMPARISONS,
    RESPONSES,
    SNAPSHOTS,
    content_id,
    row_id,
)
from selm_data.store.store import Store

Rows = dict[str, list[dict]]

# Order in which a chain is written so every reference resolves.
WRITE_ORDER = (
    "prompts", "quarantine", "responses", "judgments", "pairs", "snapshots", "checkpoints",
    "eval_answers", "eval_comparisons",
)


def chain_rows(iteration: int, n_prompts: int, *, tag: str = "", policy_fingerprint: str = "f00d"
               ) -> Rows:
    """One iteration's worth of consistent rows in every table: prompts, the three candidate
    responses of each prompt, their ranking, the best-worst pair, a snapshot and a checkpoint;
    then the base policy's and the checkpoint's answers to one evaluation question per prompt,
    and their comparison."""
    rows: Rows = {t: [] for t in ("prompts", "responses", "judgments", "pairs")}
    rows["quarantine"] = [
        {"source": "tests", "source_revision": None, "source_split": "train",
         "source_row": 10_000 + iteration,
         "reason": "chosen equals rejected", "detail": f"row of {tag}{iteration}"}
    ]
    sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": 64, "seed": None}
    for i in range(n_prompts):
        messages = [{"role": "user", "content": f"question {tag}{iteration}-{i}"}]
        prompt_id = content_id("prompts", {"messages": messages})
        rows["prompts"].append(
            {"prompt_id": prompt_id, "iteration": iteration, "messages": messages,
             "source": "tests", "source_split": "train", "source_row": i}
        )
        candidates = []
        for origin, text, policy in (
            ("policy", f"new answer {i}", "tiny-llama"),
            ("dataset_chosen", f"good answer {i}", None),
            ("dataset_rejected", f"bad answer {i}", None),
        ):
            response = {
                "prompt_id": prompt_id, "iteration": iteration, "origin": origin,
                "sample_index": 0, "status": "ok", "text": text, "policy": policy,
                "policy_fingerprint": policy_fingerprint if policy else None,
                "sampling": sampling if policy else None,
            }
            response["response_id"] = row_id(RESPONSES, response)
            rows["responses"].append(response)
            candidates.append(response["response_id"])
        ranking_id = content_id("ranking", {"candidates": candidates})
        scores = [0.5, 0.9, -0.2]
        for pos, (rid, score) in enumerate(zip(candidates, scores, strict=True)):
            rows["judgments"].append(
                {"ranking_id": ranking_id, "prompt_id": prompt_id, "iteration": iteration,
                 "response_id": rid, "position": pos, "n_candidates": 3, "score": score,
                 "rank": sorted(scores, reverse=True).index(score) + 1, "ranker": "test-ranker"}
            )
        rows["pairs"].append(
            {"prompt_id": prompt_id, "iteration": iteration, "ranking_id": ranking_id,
             "rule": "best_worst", "chosen_id": candidates[1], "rejected_id": candidates[2],
             "ref_id": candidates[0], "chosen_score": 0.9, "rejected_score": -0.2,
             "margin": 1.1, "is_tie": False, "chosen_origin": "dataset_chosen",
             "rejected_origin": "dataset_rejected"}
        )
    # A snapshot row whose folder `write_chain` makes: no data files, so its hash is that of
    # an empty file list.
    snapshot = {"name": f"iter{iteration}{tag}", "iteration": iteration,
                "path": f"exports/iter{iteration}{tag}", "format": "parquet",
                "row_count": n_prompts, "content_hash": files_hash(Path("."), []),
                "table_versions": [{"table": "pairs", "version": 1}], "filters": "{}"}
    snapshot_id = row_id(SNAPSHOTS, snapshot)
    rows["snapshots"] = [{**snapshot, "snapshot_id": snapshot_id}]
    rows["checkpoints"] = [
        {"iteration": iteration, "path": f"ckpt/iter{iteration}{tag}",
         "fingerprint": f"w{iteration}{tag}", "snapshot_id": snapshot_id,
         "base_model": "tiny-llama", "loss": "selm", "config": "{}"}
    ]
    rows["eval_answers"], rows["eval_comparisons"] = _eval_rows(
        iteration, n_prompts, tag, policy_fingerprint, rows["checkpoints"][0], sampling)
    return rows


def _eval_rows(iteration: int, n: int, tag: str, base_fingerprint: str, checkpoint: dict,
               sampling: dict) -> tuple[list[dict], list[dict]]:
    checkpoint_id = row_id(CHECKPOINTS, checkpoint)
    answers, comparisons = [], []
    for i in range(n):
        question = f"{tag}{iteration}-{i}"
        messages = [{"role": "user", "content": f"eval question {question}"}]
        pair = []
        policies = ((base_fingerprint, 0, None),
                    (checkpoint["fingerprint"], iteration, checkpoint_id))
        for k, (fingerprint, it, ckpt) in enumerate(policies):
            answer = {
                "prompt_set": "tests", "prompt_set_hash": f"set-{tag}", "question_id": question,
                "category": "writing", "turn": 1, "messages": messages, "iteration": it,
                "policy": "tiny-llama" if ckpt is None else checkpoint["path"],
                "policy_fingerprint": fingerprint, "checkpoint_id": ckpt,
                "backend": "transformers", "sampling": sampling, "status": "ok",
                "text": f"answer {k} to {question}", "completion_tokens": 4,
                "finish_reason": "stop",
            }
            answer["answer_id"] = row_id(EVAL_ANSWERS, answer)
            answers.append(answer)
            pair.append(answer)
        a, b = sorted(pair, key=lambda r: r["answer_id"])
        comparison = {
            "prompt_set": "tests", "prompt_set_hash": f"set-{tag}", "question_id": question,
            "turn": 1, "answer_a_id": a["answer_id"], "answer_b_id": b["answer_id"],
            "policy_a_fingerprint": a["policy_fingerprint"],
            "policy_b_fingerprint": b["policy_fingerprint"], "ranker": "test-ranker",
            "ranker_version": "1", "a_first_score_a": 0.5, "a_first_score_b": 0.25,
            "b_first_score_a": 0.75, "b_first_score_b": 0.0, "margin": 0.5, "win_a": 1.0,
            "chars_a": len(a["text"]), "chars_b": len(b["text"]),
        }
        comparison["comparison_id"] = row_id(EVAL_COMPARISONS, comparison)
        comparisons.append(comparison)
    return answers, comparisons


def write_chain(store: Store, rows: Rows) -> dict:
    """Append every table of `rows` in WRITE_ORDER, with the snapshot's (empty) folder."""
    for snapshot in rows["snapshots"]:
        folder = store.root / snapshot["path"]
        (folder / "data").mkdir(parents=True, exist_ok=True)
        (folder / "snapshot.json").write_text(json.dumps({"files": []}))
    return {table: store.append(table, rows[table]) for table in WRITE_ORDER}


def require(module: str, install: str):
    """Import an optional dependency (vLLM, llm-blender, openai) for a test, or skip.

    `make test` installs them all and sets SELM_REQUIRE_OPTIONAL=1, so there a missing one
    fails instead: CI cannot pass by skipping the real backends.
    """
    import importlib
    import os

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("SELM_REQUIRE_OPTIONAL") == "1":
            pytest.fail(f"{module} is required here (SELM_REQUIRE_OPTIONAL=1): {e}")
        pytest.skip(f"needs {module}: pip install {install}")


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def manifest_dict(tmp_path: Path, tiny_lm: Path, tiny_rm: Path, **overrides) -> dict:
    rows = (SHARED / "ultrafeedback_binarized_1000.jsonl").read_text().splitlines()[:24]
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(rows) + "\n")
    m: dict[str, Any] = {
        "name": "test", "store": str(tmp_path / "store"),
        "source": {"path": str(data)},
        "policy": {"model": str(tiny_lm), "dtype": "float32"},
        "generation": {"backend": "transformers", "max_tokens": 8, "batch_size": 4},
        "ranker": {"kind": "reward_model", "model": str(tiny_rm), "batch_size": 6},
        "train": {"alpha": 0.001},
        "iterations": 2,
        "commit_every": 4,  # three commits for the 12 prompts of a portion
    }
    for key, value in overrides.items():
        m[key] = {**m[key], **value} if isinstance(m.get(key), dict) else value
    return m
