"""selm-train on a snapshot named by an object-store URI (`s3://bucket/store@NAME`), against
moto's S3 server on 127.0.0.1: the snapshot is read into a hash-checked local cache, the
checkpoint is written locally and registered in the store at the URI."""

from __future__ import annotations

import math

import pytest

from helpers import chain_rows, require
from selm_data import open_store
from selm_data.errors import SelmError
from selm_data.manifest import TrainSpec
from selm_data.publish.snapshot import export
from selm_data.store.store import RunInfo
from selm_train.data import read_examples, resolve_snapshot
from selm_train.train import train

pytestmark = pytest.mark.slow
SPEC = TrainSpec(loss="selm", beta=0.1, alpha=0.05, learning_rate=1e-3, global_batch_size=4,
                 micro_batch_size=1, max_length=64, max_prompt_length=32, warmup_ratio=0.0,
                 lr_scheduler="constant", zero_stage=0)


@pytest.fixture
def s3_snapshot(s3_uri, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("SELM_CACHE", str(tmp_path / "cache"))
    store = open_store(s3_uri, create=True, run=RunInfo.new("pytest s3 train"))
    rows = chain_rows(1, 8)
    for table in ("prompts", "responses", "judgments", "pairs"):
        store.append(table, rows[table])
    export(store, 1, name="it1")
    return f"{s3_uri}@it1"


def test_a_snapshot_uri_resolves_to_a_checked_local_copy(s3_snapshot, s3_uri, tmp_path):
    ref = resolve_snapshot(s3_snapshot)
    assert ref.store == s3_uri and ref.row_count == 8 and ref.name == "it1"
    assert ref.folder.is_relative_to(tmp_path / "cache")
    assert len(read_examples(ref)) == 8
    assert resolve_snapshot(s3_snapshot).folder == ref.folder  # the cache is reused
    with pytest.raises(SelmError, match="no snapshot named 'nope'"):
        resolve_snapshot(f"{s3_uri}@nope")


def test_train_from_a_snapshot_uri_registers_in_the_store(s3_snapshot, s3_uri, tiny_lm,
                                                          tmp_path):
    require("deepspeed", "'selm[train]'")
    out = train(s3_snapshot, str(tiny_lm), tmp_path / "ckpt", SPEC, iteration=1)
    assert out.steps == 2
    assert out.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert out.checkpoint == tmp_path / "ckpt"  # checkpoints stay on this machine
    row = open_store(s3_uri).scan("checkpoints").collect().row(0, named=True)
    assert row["checkpoint_id"] == out.checkpoint_id
