"""Snapshots: deterministic, immutable exports that datasets and polars read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from helpers import chain_rows
from selm_data import open_store
from selm_data.errors import SelmError
from selm_data.publish.snapshot import Filters, check_snapshot, export
from selm_data.store.store import RunInfo

SELM_DATA = str(Path(sys.executable).parent / "selm-data")

TABLES = ("prompts", "quarantine", "responses", "judgments", "pairs")


def iteration_rows(iteration: int, n: int) -> dict:
    """chain_rows, with margins 0, 0.5, 1.0, ... and the first pair a tie."""
    rows = chain_rows(iteration, n)
    for k, pair in enumerate(rows["pairs"]):
        pair.update(margin=0.5 * k, is_tie=k == 0)
    return rows


@pytest.fixture
def built(store):
    for iteration, n in ((1, 5), (2, 7)):
        rows = iteration_rows(iteration, n)
        for table in TABLES:
            store.append(table, rows[table])
    return store, iteration_rows(2, 7), None


def test_export_joins_prompt_texts_and_scores(built):
    store, rows, _ = built
    snap = export(store, 2, layout="ultrafeedback")
    assert snap.created and snap.row_count == 7 and snap.name == f"iter2-{snap.content_hash[:8]}"
    frame = pl.read_parquet(snap.path / "data")
    assert frame["pair_id"].to_list() == sorted(frame["pair_id"].to_list())
    texts = {r["response_id"]: r["text"] for r in rows["responses"]}
    messages = {r["prompt_id"]: r["messages"] for r in rows["prompts"]}
    pairs = {p["prompt_id"]: p for p in rows["pairs"]}
    for row in frame.iter_rows(named=True):
        pair, prompt = pairs[row["prompt_id"]], messages[row["prompt_id"]]

        def conversation(response_id: str, prompt=prompt) -> list[dict]:
            return [*prompt, {"role": "assistant", "content": texts[response_id]}]

        assert row["prompt"] == prompt[-1]["content"]
        assert row["chosen"] == conversation(pair["chosen_id"]) == row["messages"]
        assert row["rejected"] == conversation(pair["rejected_id"])
        assert row["reference"] == conversation(pair["ref_id"])
        assert (row["score_chosen"], row["score_rejected"], row["score_reference"]) == (
            0.9, -0.2, 0.5)
        assert (row["margin"], row["is_tie"]) == (pair["margin"], pair["is_tie"])
    assert snap.table_versions == {t: store.version(t) for t in
                                   ("prompts", "responses", "judgments", "pairs")}


def test_same_inputs_same_hash_and_nothing_added(built):
    store, _, _ = built
    first = export(store, 2)
    version = store.version("snapshots")
    again = export(open_store(store.root, run=RunInfo.new("pytest again")), 2)
    assert (again.content_hash, again.name, again.created) == (first.content_hash, first.name,
                                                               False)
    assert store.version("snapshots") == version
    named = export(store, 2, name="mine")
    assert named.content_hash == first.content_hash and named.created


def test_a_name_is_never_reused_for_other_content(built):
    store, _, _ = built
    export(store, 1, name="taken")
    with pytest.raises(SelmError, match=r"exists with other content.*pick another --name"):
        export(store, 2, name="taken")
    with pytest.raises(SelmError, match="snapshot name"):
        export(store, 2, name="../escape")


def test_filters_and_empty_results(built, tmp_path):
    store, _, _ = built
    no_ties = export(store, 2, filters=Filters(drop_ties=True))
    assert no_ties.row_count == 6
    assert not pl.read_parquet(no_ties.path / "data")["is_tie"].any()
    wide = export(store, 2, filters=Filters(drop_ties=True, min_margin=1.5))
    margins = sorted(pl.read_parquet(wide.path / "data")["margin"].to_list())
    assert margins == [1.5, 2.0, 2.5, 3.0]
    assert len({no_ties.content_hash, wide.content_hash}) == 2
    row = store.scan("snapshots").filter(pl.col("name") == wide.name).collect()
    assert json.loads(row["filters"][0]) == {"drop_ties": True, "min_margin": 1.5}
    with pytest.raises(SelmError, match=r"passes --min-margin 99: of its 7 pairs, 1 are ties"):
        export(store, 2, filters=Filters(min_margin=99))
    with pytest.raises(SelmError, match=r"no pairs; build them first: `selm-data build --iter 3`"):
        export(store, 3)


def test_files_are_read_only_and_verify_detects_a_change(built):
    store, _, _ = built
    snap = export(store, 2)
    row = store.scan("snapshots").filter(pl.col("name") == snap.name).collect().row(0, named=True)
    assert check_snapshot(store, row) == []
    shard = snap.path / snap.files[0]
    # the mode bits, not os.access: root (as in CI) may write anything
    assert all(not (f.stat().st_mode & 0o222) for f in [*snap.path.rglob("*.parquet"),
                                                         snap.path / "snapshot.json"])
    table = pq.read_table(shard)
    shard.chmod(0o644)
    pq.write_table(table.slice(1), shard)
    assert "was modified" in check_snapshot(store, row)[0]
    meta = json.loads((snap.path / "snapshot.json").read_text())
    assert meta["row_count"] == 7 and meta["content_hash"] == snap.content_hash


def test_datasets_loads_a_snapshot(built):
    from datasets import load_dataset

    store, _, _ = built
    snap = export(store, 2, layout="ultrafeedback")
    ds = load_dataset("parquet", data_files=str(snap.path / "data" / "*.parquet"),
                      split="train")
    assert ds.num_rows == 7
    assert ds[0]["chosen"][-1]["role"] == "assistant"
    assert set(ds.column_names) >= {"prompt", "prompt_id", "chosen", "rejected", "messages",
                                    "score_chosen", "score_rejected", "reference"}
    trl = export(store, 2)  # the default layout: the prompt turns apart from the answers
    ds = load_dataset("parquet", data_files=str(trl.path / "data" / "*.parquet"),
                      split="train")
    assert ds[0]["prompt"][-1]["role"] == "user" and len(ds[0]["chosen"]) == 1
    assert set(ds.column_names) >= {"prompt", "chosen", "rejected", "reference",
                                    "score_chosen", "score_rejected"}


def test_verify_reports_a_modified_or_missing_snapshot(built):
    from selm_data.verify import verify

    store, _, _ = built
    snap = export(store, 2)
    assert verify(store) == []
    extra = snap.path / "data" / "extra.parquet"
    (snap.path / "data").chmod(0o755)
    extra.write_bytes(b"x")
    problems = verify(store)
    assert [(p.table, p.check) for p in problems] == [("snapshots", "snapshot files")]
    assert "unexpected file data/extra.parquet" in problems[0].detail
    extra.unlink()
    (snap.path / snap.files[0]).unlink()
    assert "is missing" in verify(store)[0].detail


def test_export_command(built):
    import subprocess

    store, _, _ = built
    out = subprocess.run([SELM_DATA, "export", "--iter", "2", "--store", str(store.root),
                          "--name", "cli", "--drop-ties"], capture_output=True, text=True,
                         check=True).stdout
    assert "exported cli: 6 pairs" in out and "load_dataset(" in out
    again = subprocess.run([SELM_DATA, "export", "--iter", "2", "--store", str(store.root),
                            "--name", "cli", "--drop-ties"], capture_output=True, text=True,
                           check=True).stdout
    assert "unchanged: already exported as cli" in again
    clash = subprocess.run([SELM_DATA, "export", "--iter", "2", "--store", str(store.root),
                            "--name", "cli"], capture_output=True, text=True)
    assert clash.returncode == 2 and "never overwritten" in clash.stderr + clash.stdout


def test_trl_layout_goes_through_trl_dpo_data_preparation(built, tiny_lm):
    """TRL's own DPOTrainer._prepare_dataset (extract prompt, tokenise with the chat template)
    on a snapshot loaded with `datasets`; the UltraFeedback layout is refused by it, which is
    why the trl layout exists."""
    import types

    from datasets import load_dataset
    from transformers import AutoTokenizer

    from helpers import require

    require("trl", "trl")
    from trl import DPOConfig, DPOTrainer

    store, rows, _ = built
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    args = DPOConfig(output_dir=str(store.root / "trl"), report_to=[], use_cpu=True,
                     bf16=False)
    trainer = types.SimpleNamespace(_tokenizer=tok, _is_vision_dataset=False)
    texts = {r["response_id"]: r["text"] for r in rows["responses"]}
    for layout in ("trl", "ultrafeedback"):
        snap = export(store, 2, layout=layout)
        ds = load_dataset("parquet", data_files=str(snap.path / "data" / "*.parquet"),
                          split="train")
        if layout == "ultrafeedback":
            # Which error depends on which key TRL's is_conversational pops from a set.
            with pytest.raises((TypeError, AttributeError), match=r"str|endswith"):
                DPOTrainer._prepare_dataset(trainer, ds, tok, args, "train")
            continue
        out = DPOTrainer._prepare_dataset(trainer, ds, tok, args, "train")
        assert out.num_rows == 7
        for example in out:
            chosen = texts[example["chosen_id"]]
            assert chosen in tok.decode(example["chosen_ids"])
            assert example["prompt"][-1]["content"] in tok.decode(example["prompt_ids"])
            assert example["reference"] == [{"role": "assistant",
                                             "content": texts[example["ref_id"]]}]


def test_ultrafeedback_layout_is_what_alignment_handbook_reads(built):
    """alignment-handbook's DPO preprocessing takes chosen[:-1] as the prompt turns and the
    last turns as the answers: they must share the prompt and end in the assistant's answer."""
    store, _, _ = built
    frame = pl.read_parquet(export(store, 2, layout="ultrafeedback").path / "data")
    for row in frame.iter_rows(named=True):
        assert row["chosen"][:-1] == row["rejected"][:-1] == row["reference"][:-1]
        assert row["chosen"][-1]["role"] == row["rejected"][-1]["role"] == "assistant"
        assert row["prompt"] == row["chosen"][-2]["content"]


def test_the_same_rows_in_other_chunks_write_the_same_bytes(tmp_path):
    """polars chunks its output by thread timing, and Parquet pages follow Arrow chunks once a
    column outgrows a page (here ~7 MB of text; without combine_chunks the hashes differ)."""
    import pyarrow as pa

    from selm_data.publish.snapshot import _write_files, files_hash

    texts = [f"word {i} " * (i % 50 + 1) for i in range(30_000)]
    table = pa.table({"text": texts, "n": list(range(30_000))})
    chunked = pa.concat_tables([table.slice(0, 7_000), table.slice(7_000, 11_000),
                                table.slice(18_000)])
    assert chunked.column(0).num_chunks == 3
    hashes = []
    for name, t in (("one", table), ("three", chunked)):
        (tmp_path / name).mkdir()
        files = _write_files(t, tmp_path / name)
        hashes.append(files_hash(tmp_path / name, files))
    assert hashes[0] == hashes[1]


def test_export_defaults_to_trl_and_says_who_reads_each_layout(built):
    """The default is the layout TRL's DPOTrainer reads; the export names, for each trainer,
    whether it reads the snapshot and the line that loads it (or the export it needs)."""
    from selm_data.publish.snapshot import readers

    store, _, _ = built
    snap = export(store, 2)
    assert snap.layout == "trl"
    by_name = {r.name: r for r in readers(snap, store.uri)}
    assert by_name["TRL DPOTrainer"].reads and "train_dataset=ds" in by_name["TRL DPOTrainer"].line
    assert not by_name["alignment-handbook"].reads
    assert "`selm-data export --iter 2 --layout ultrafeedback`" in by_name[
        "alignment-handbook"].line
    assert by_name["selm-train"].line == f"`selm-train train --snapshot {store.uri}@{snap.name}`"
    data = f'data_files="{snap.path}/data/*.parquet"'
    assert data in by_name["datasets / polars"].line

    uf = export(store, 2, layout="ultrafeedback")
    by_name = {r.name: r for r in readers(uf, store.uri)}
    assert by_name["alignment-handbook"].reads and not by_name["TRL DPOTrainer"].reads
    assert "--layout trl" in by_name["TRL DPOTrainer"].line
