from __future__ import annotations

import shutil
from datetime import UTC, datetime

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from helpers import chain_rows
from helpers import write_chain as write_rows
from selm_data.store.schema import PROMPTS, conform
from selm_data.verify import verify


def write_chain(store, iteration=1, n=3):
    rows = chain_rows(iteration=iteration, n_prompts=n)
    write_rows(store, rows)
    return rows


def test_consistent_store_has_no_problem(store):
    write_chain(store, 1)
    write_chain(store, 2)
    assert verify(store) == []


def test_dangling_reference_is_reported(store):
    rows = write_chain(store)
    bad = {**rows["pairs"][0], "rule": "replace", "chosen_id": "f" * 32}
    store.append("pairs", [bad])
    problems = verify(store)
    assert [(p.table, p.check) for p in problems] == [("pairs", "references")]
    assert "chosen_id" in problems[0].detail and "f" * 32 in problems[0].detail


def test_missing_and_truncated_data_files_are_reported(store):
    write_chain(store)
    files = sorted((store.root / "responses").rglob("*.parquet"))
    files[0].unlink()
    judgment_file = next((store.root / "judgments").rglob("*.parquet"))
    judgment_file.write_bytes(judgment_file.read_bytes()[:100])
    checks = {(p.table, p.check, p.detail.split(":")[0]) for p in verify(store)}
    assert ("responses", "files", "data file missing") in checks
    assert any(t == "judgments" and c == "files" and "bytes" in d for t, c, d in checks)
    skipped = {p.table for p in verify(store) if p.check == "skipped"}
    assert skipped == {"responses", "judgments", "pairs"}  # they, or what they name, are broken


def test_duplicate_ids_written_around_the_store_are_reported(store):
    rows = chain_rows(iteration=1, n_prompts=2)["prompts"]
    batch = conform(PROMPTS, rows, {"run_id": store.run.run_id, "created_at": datetime.now(UTC)})
    store.record_run()
    for _ in range(2):  # a foreign writer that does not deduplicate
        write_deltalake(str(store.path("prompts")), batch, mode="append")
    problems = verify(store)
    assert [(p.table, p.check) for p in problems] == [("prompts", "unique ids")]
    assert problems[0].detail.startswith("2 prompt_id value(s) occur more than once")


def test_schema_drift_is_reported(store):
    shutil.rmtree(store.path("checkpoints"))
    other = pa.schema([pa.field("checkpoint_id", pa.string(), False), ("path", pa.int64())])
    DeltaTable.create(str(store.path("checkpoints")), other)
    details = {p.detail for p in verify(store) if p.table == "checkpoints" and p.check == "schema"}
    assert "column path is int64 (nullable=True), expected string (nullable=False)" in details
    assert "missing column fingerprint" in details
