"""`selm-data lineage`: the whole chain of a row, upstream and downstream, on a two-iteration
store whose iteration-2 responses come from a checkpoint trained on iteration 1's snapshot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from helpers import chain_rows
from selm_data.errors import SelmError
from selm_data.publish.lineage import lineage
from selm_data.publish.snapshot import export

SELM_DATA = str(Path(sys.executable).parent / "selm-data")

TABLES = ("prompts", "quarantine", "responses", "judgments", "pairs")


@pytest.fixture
def loop(store):
    one = chain_rows(1, 3)
    for table in TABLES:
        store.append(table, one[table])
    snap = export(store, 1, name="it1")
    snapshot_id = (store.scan("snapshots").filter(pl.col("name") == "it1").collect()
                   ["snapshot_id"][0])
    store.append("checkpoints", [{"iteration": 1, "path": "ckpt/it1", "fingerprint": "fp-it1",
                                  "snapshot_id": snapshot_id, "base_model": "tiny-llama",
                                  "loss": "selm", "config": "{}"}])
    checkpoint_id = store.scan("checkpoints").collect()["checkpoint_id"][0]
    two = chain_rows(2, 2, policy_fingerprint="fp-it1")
    for table in TABLES:
        store.append(table, two[table])
    return store, one, two, snap, snapshot_id, checkpoint_id


def test_a_pair_upstream_to_the_source_and_downstream_to_the_next_iteration(loop):
    store, one, two, _, snapshot_id, checkpoint_id = loop
    pair_id = store.scan("pairs").filter(pl.col("iteration") == 1).collect()["pair_id"][0]
    pair = next(p for p in store.scan("pairs").collect().to_dicts() if p["pair_id"] == pair_id)
    prompt = next(p for p in one["prompts"] if p["prompt_id"] == pair["prompt_id"])
    texts = {r["response_id"]: r for r in one["responses"]}
    node = lineage(store, pair_id)
    assert node["kind"] == "pairs" and node["row"]["rule"] == "best_worst"
    up = node["upstream"]
    assert (up["prompt"]["source"], up["prompt"]["source_row"]) == ("tests",
                                                                    prompt["source_row"])
    assert up["ranking"]["ranker"] == "test-ranker" and up["ranking"]["scores"] == [0.5, 0.9, -0.2]
    assert up["chosen"]["text"] == texts[pair["chosen_id"]]["text"]
    assert up["ref"]["policy_fingerprint"] == "f00d"
    assert up["ref"]["sampling"]["temperature"] == 0.0
    assert up["ref"]["policy_checkpoint"] is None  # iteration 1: the base model
    assert up["run"]["command"] == "pytest"
    down = node["downstream"]
    assert [s["name"] for s in down["snapshots"]] == ["it1"]
    assert [c["checkpoint_id"] for c in down["checkpoints"]] == [checkpoint_id]
    generated = {r["response_id"] for r in two["responses"] if r["origin"] == "policy"}
    assert down["generated"][checkpoint_id]["count"] == 2
    assert set(down["generated"][checkpoint_id]["ids"]) == generated
    assert snapshot_id == down["snapshots"][0]["snapshot_id"]


def test_a_next_iteration_response_knows_its_checkpoint_and_snapshot(loop):
    store, _, two, _, snapshot_id, checkpoint_id = loop
    response = next(r for r in two["responses"] if r["origin"] == "policy")
    node = lineage(store, response["response_id"])
    checkpoint = node["upstream"]["policy_checkpoint"]
    assert checkpoint["checkpoint_id"] == checkpoint_id and checkpoint["fingerprint"] == "fp-it1"
    assert node["downstream"]["judgments"]["count"] == 1
    pairs = [p["pair_id"] for p in store.scan("pairs").collect().to_dicts()
             if response["response_id"] in (p["chosen_id"], p["rejected_id"], p["ref_id"])]
    assert node["downstream"]["pairs"] == {"count": 1, "ids": pairs}
    assert node["downstream"]["snapshots"] == []  # iteration 2 is not exported
    ckpt = lineage(store, checkpoint_id)
    assert ckpt["upstream"]["snapshot"]["snapshot_id"] == snapshot_id
    assert ckpt["downstream"]["generated"][checkpoint_id]["count"] == 2


def test_prompt_snapshot_and_ranking_ids(loop):
    store, one, _, snap, snapshot_id, checkpoint_id = loop
    prompt_id = one["prompts"][0]["prompt_id"]
    node = lineage(store, prompt_id)
    assert node["downstream"]["responses"]["count"] == 3
    assert node["downstream"]["pairs"]["count"] == 1
    assert [s["name"] for s in node["downstream"]["snapshots"]] == ["it1"]
    snapshot = lineage(store, snapshot_id)
    assert snapshot["upstream"]["tables"] == snap.table_versions
    assert [c["checkpoint_id"] for c in snapshot["downstream"]["checkpoints"]] == [checkpoint_id]
    ranking = lineage(store, one["judgments"][0]["ranking_id"])
    assert ranking["kind"] == "judgments" and ranking["downstream"]["pairs"]["count"] == 1
    with pytest.raises(SelmError, match=r"no row of .* has id 'nope'"):
        lineage(store, "nope")


def test_lineage_command_tree_and_json(loop):
    store, *_ = loop
    pair_id = store.scan("pairs").filter(pl.col("iteration") == 1).collect()["pair_id"][0]
    out = subprocess.run([SELM_DATA, "lineage", pair_id, "--store", str(store.root),
                          "--json"], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == json.loads(json.dumps(lineage(store, pair_id), default=str))
    tree = subprocess.run([SELM_DATA, "lineage", pair_id, "--store", str(store.root)],
                          capture_output=True, text=True, check=True).stdout
    assert "upstream" in tree and "downstream" in tree and "it1" in tree
