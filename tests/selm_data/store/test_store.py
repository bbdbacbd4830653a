from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from helpers import WRITE_ORDER, chain_rows, write_chain
from selm_data import StoreError, open_store
from selm_data.store.schema import TABLES
from selm_data.store.store import RunInfo


def test_round_trip_every_table(store):
    rows = chain_rows(iteration=1, n_prompts=4)
    write_chain(store, rows)
    for table in WRITE_ORDER:
        spec = TABLES[table]
        stored = store.scan(table).collect()
        assert stored.height == len(rows[table]), table
        by_id = {r[spec.id_column]: r for r in stored.to_dicts()}
        for given in rows[table]:
            # Every id, given or derived by the store, equals one computed independently.
            got = by_id[_derived_id(table, given)]
            for column, value in given.items():
                assert got[column] == value, (table, column)
            assert got["run_id"] == store.run.run_id
            assert isinstance(got["created_at"], datetime)
            assert got["created_at"].tzinfo is not None


def _derived_id(table: str, row: dict) -> str:
    """The id written out independently of selm_data.store.schema: sha256 over sorted-key JSON of
    the table's identity fields (every test row gives each of them explicitly)."""
    fields = {
        "prompts": ["messages"],
        "quarantine": ["source", "source_revision", "source_split", "source_row", "reason"],
        "responses": ["prompt_id", "origin", "policy_fingerprint", "sampling", "sample_index",
                      "status"],
        "judgments": ["ranking_id", "response_id"],
        "pairs": ["ranking_id", "rule", "chosen_id", "rejected_id"],
        "snapshots": ["name", "content_hash"],
        "checkpoints": ["path", "fingerprint"],
        "eval_answers": ["prompt_set_hash", "question_id", "turn", "messages",
                         "policy_fingerprint", "sampling", "status"],
        "eval_comparisons": ["answer_a_id", "answer_b_id", "ranker", "ranker_version"],
    }[table]
    payload = {"fields": {f: row[f] for f in fields}, "kind": table}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def test_store_records_its_run_once(store):
    write_chain(store, chain_rows(iteration=1, n_prompts=2))
    runs = store.scan("runs").collect()
    assert runs["run_id"].to_list() == [store.run.run_id]
    assert runs["command"].to_list() == ["pytest"]


def test_writing_the_same_batch_twice_adds_nothing(store):
    rows = chain_rows(iteration=1, n_prompts=5)
    first = write_chain(store, rows)
    versions = store.versions()
    second = write_chain(store, rows)
    for table in WRITE_ORDER:
        assert first[table].added == len(rows[table])
        assert second[table].added == 0
        assert second[table].skipped == len(rows[table])
        assert store.scan(table).select(pl.len()).collect().item() == len(rows[table])
    assert store.versions() == versions, "an append of nothing new must not commit"


def test_a_fresh_process_state_also_skips_stored_rows(store):
    rows = chain_rows(iteration=1, n_prompts=3)
    write_chain(store, rows)
    reopened = open_store(store.root, run=RunInfo.new("second run"))
    result = reopened.append("responses", rows["responses"])
    assert (result.added, result.skipped) == (0, len(rows["responses"]))


def test_repeated_rows_within_one_batch_are_written_once(store):
    rows = chain_rows(iteration=1, n_prompts=3)["prompts"]
    result = store.append("prompts", rows + rows[:2])
    assert (result.added, result.skipped) == (3, 2)
    assert store.scan("prompts").select(pl.len()).collect().item() == 3


def test_overlapping_batch_adds_only_new_rows(store):
    rows = chain_rows(iteration=1, n_prompts=6)["prompts"]
    store.append("prompts", rows[:4])
    result = store.append("prompts", rows[2:])
    assert (result.added, result.skipped) == (2, 2)
    ids = store.scan("prompts").select("prompt_id").collect()["prompt_id"]
    assert ids.n_unique() == ids.len() == 6


def test_reading_an_older_version_returns_the_older_rows(store):
    one = chain_rows(iteration=1, n_prompts=3)
    two = chain_rows(iteration=2, n_prompts=4)
    v1 = store.append("prompts", one["prompts"]).version
    v2 = store.append("prompts", two["prompts"]).version
    assert v2 == v1 + 1
    old = store.scan("prompts", version=v1).collect()
    assert sorted(old["source_row"].to_list()) == [0, 1, 2]
    assert set(old["iteration"].to_list()) == {1}
    assert store.scan("prompts", version=v2).collect().height == 7
    assert store.scan("prompts", version=0).collect().height == 0
    # The same version through delta-rs's own reader.
    direct = pl.from_arrow(pa.table(DeltaTable(str(store.path("prompts")), version=v1)
                                    .to_pyarrow_table()))
    assert direct.select(old.columns).sort("prompt_id").equals(old.sort("prompt_id"))


def test_every_commit_carries_run_metadata(tmp_path):
    run = RunInfo.new("selm-data build --iter 1", manifest_hash="abc123")
    s = open_store(tmp_path / "s", create=True, run=run)
    s.append("prompts", chain_rows(iteration=1, n_prompts=2)["prompts"])
    for table in ("prompts", "runs"):
        history = DeltaTable(str(s.path(table))).history()
        for entry in history:  # the raw Delta log, read without selm
            assert entry["selm.run_id"] == run.run_id
            assert entry["selm.command"] == "selm-data build --iter 1"
            assert entry["selm.manifest_hash"] == "abc123"
            assert entry["selm.version"]
    commits = s.history("prompts")
    assert [c.operation for c in commits] == ["WRITE", "CREATE TABLE"]
    assert commits[0].rows_added == 2


def test_tables_are_partitioned_by_iteration(store):
    store.append("prompts", chain_rows(iteration=1, n_prompts=2)["prompts"])
    store.append("prompts", chain_rows(iteration=3, n_prompts=2)["prompts"])
    assert (store.path("prompts") / "iteration=3").is_dir()
    assert DeltaTable(str(store.path("prompts"))).metadata().partition_columns == ["iteration"]


def test_unknown_column_is_refused_naming_it(store):
    row = chain_rows(iteration=1, n_prompts=1)["prompts"][0]
    with pytest.raises(StoreError, match=r"prompts: unknown column\(s\) \['colour'\]"):
        store.append("prompts", [{**row, "colour": "red"}])


def test_missing_required_column_is_refused_naming_it(store):
    row = chain_rows(iteration=1, n_prompts=1)["prompts"][0]
    del row["source"]
    with pytest.raises(StoreError, match=r"prompts\.source: 1 of 1 rows are null"):
        store.append("prompts", [row])


def test_wrong_type_is_refused_naming_the_column(store):
    row = chain_rows(iteration=1, n_prompts=1)["prompts"][0]
    with pytest.raises(StoreError, match=r"prompts\.iteration"):
        store.append("prompts", [{**row, "iteration": "first"}])
    arrow = pa.table({"iteration": pa.array(["x"]), "source": ["s"], "messages": [[]]})
    with pytest.raises(StoreError, match=r"prompts\.iteration: cannot convert string"):
        store.append("prompts", arrow)
    assert store.version("prompts") == 0, "a refused batch writes nothing"


def test_accepts_arrow_and_polars(store):
    rows = chain_rows(iteration=1, n_prompts=3)["prompts"]
    df = pl.DataFrame(rows[:2])
    assert store.append("prompts", df).added == 2
    arrow = pa.Table.from_pylist(rows[1:])
    assert store.append("prompts", arrow).added == 1


def test_open_without_store_says_how_to_create_one(tmp_path):
    with pytest.raises(StoreError, match="selm-data init --store"):
        open_store(tmp_path / "nothing")


def test_time_travel_by_timestamp(store):
    store.append("prompts", chain_rows(iteration=1, n_prompts=2)["prompts"])
    moment = datetime.now(UTC)
    store.append("prompts", chain_rows(iteration=2, n_prompts=2)["prompts"])
    assert store.scan("prompts", version=moment).collect().height == 2


def test_bad_version_names_the_log_command(store):
    with pytest.raises(StoreError, match="selm-data log"):
        store.scan("prompts", version=99).collect()


def test_delta_readers_see_the_same_rows_and_file_statistics(store):
    """selm writes the Parquet files itself and commits them with delta-rs: check that
    delta-rs's own reader, its file statistics and partition pruning agree with polars."""
    one, two = chain_rows(iteration=1, n_prompts=3), chain_rows(iteration=2, n_prompts=4)
    mixed = one["responses"] + two["responses"]  # one batch, two partitions
    for table in WRITE_ORDER:
        store.append(table, mixed if table == "responses" else one[table] + two[table])
    for table in WRITE_ORDER:
        spec = TABLES[table]
        dt = DeltaTable(str(store.path(table)))
        theirs = pl.from_arrow(pa.table(dt.to_pyarrow_table())).sort(spec.id_column)
        ours = store.scan(table).collect().sort(spec.id_column)
        assert theirs.select(ours.columns).equals(ours), table
    actions = pa.table(DeltaTable(str(store.path("responses"))).get_add_actions(flatten=True))
    assert sorted(actions.column("partition.iteration").to_pylist()) == [1, 2]
    assert sorted(actions.column("num_records").to_pylist()) == [9, 12]
    for row in actions.to_pylist():
        ids = store.scan("responses").filter(pl.col("iteration") == row["partition.iteration"])
        ids = ids.select("response_id").collect()["response_id"]
        assert (row["min.response_id"], row["max.response_id"]) == (ids.min(), ids.max())
        assert row["null_count.response_id"] == 0
    dataset = DeltaTable(str(store.path("pairs"))).to_pyarrow_dataset()
    assert dataset.to_table(filter=pc.field("iteration") == 2).num_rows == 4


@pytest.mark.parametrize("name", ["with space", "p%41", "ünï"])
def test_paths_delta_readers_cannot_read_are_refused_up_front(tmp_path, name):
    with pytest.raises(StoreError, match="percent-encode"):
        open_store(tmp_path / name / "store", create=True)
    assert not (tmp_path / name).exists(), "nothing is created for a refused path"
