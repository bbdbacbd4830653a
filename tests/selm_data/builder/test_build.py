"""`selm-data build` end to end on tiny models built on the spot and real UltraFeedback rows."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from helpers import manifest_dict
from selm_data import SelmError, open_store, verify
from selm_data.builder.iteration import Shard, build
from selm_data.builder.pairing import ranks
from selm_data.manifest import Manifest
from selm_data.store.store import RunInfo

pytestmark = pytest.mark.slow
SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"
PAIR_CONTENT = ["pair_id", "prompt_id", "iteration", "ranking_id", "rule", "chosen_id",
                "rejected_id", "ref_id", "chosen_score", "rejected_score", "margin", "is_tie",
                "chosen_origin", "rejected_origin"]


def open_new(path: Path):
    return open_store(path, create=True, run=RunInfo.new("pytest build"))


def pair_content(store_path: Path, iteration: int) -> pl.DataFrame:
    lf = open_store(store_path).scan("pairs").filter(pl.col("iteration") == iteration)
    return lf.select(PAIR_CONTENT).collect().sort("pair_id")


def test_build_iteration_1(tmp_path, tiny_lm, tiny_rm):
    m = Manifest.model_validate(manifest_dict(tmp_path, tiny_lm, tiny_rm))
    store = open_new(m.store)
    report = build(m, 1, store)
    # 24 rows, none quarantined, 2 portions of 12 (contiguous): iteration 1 is rows 0-11.
    assert (report.source_rows, report.prompts, report.generated) == (24, 12, 12)
    assert (report.ranked, report.pairs, report.failed) == (12, 12, [])
    prompts = store.scan("prompts").collect()
    assert sorted(prompts["source_row"].to_list()) == list(range(12))

    responses = store.scan("responses").collect()
    assert responses.group_by("origin").len().sort("origin").rows() == [
        ("dataset_chosen", 12), ("dataset_rejected", 12), ("policy", 12)]
    policy = responses.filter(pl.col("origin") == "policy")
    assert set(policy["policy"].to_list()) == {str(tiny_lm)}
    assert set(policy["backend"].to_list()) == {"transformers"}
    assert policy["sampling"].to_list()[0] == {"temperature": 0.0, "top_p": 1.0, "top_k": -1,
                                                "max_tokens": 8, "seed": None}

    # Each pair is the best and worst of its three scores, worked out here from the judgments.
    judgments = store.scan("judgments").collect()
    pairs = store.scan("pairs").collect()
    for pair in pairs.iter_rows(named=True):
        j = judgments.filter(pl.col("ranking_id") == pair["ranking_id"]).sort("position")
        scores, ids = j["score"].to_list(), j["response_id"].to_list()
        assert j["rank"].to_list() == ranks(scores)
        best = max(range(3), key=lambda i: (scores[i], -i))
        worst = min(range(3), key=lambda i: (scores[i], -i))
        assert (pair["chosen_id"], pair["rejected_id"]) == (ids[best], ids[worst])
        assert pair["margin"] == pytest.approx(scores[best] - scores[worst])
        assert pair["ref_id"] == ids[0]
    assert report.ref_won == (pairs["chosen_origin"] == "policy").sum()
    assert verify(store) == []

    # The lineage of a built pair reaches its source row, policy, sampling and ranker, and
    # after an export, the snapshot that holds it.
    from selm_data.publish.lineage import lineage
    from selm_data.publish.snapshot import export

    snap = export(store, 1)
    pair = pairs.row(0, named=True)
    node = lineage(store, pair["pair_id"])
    up = node["upstream"]
    assert up["prompt"]["source"] == str(tmp_path / "data.jsonl")
    assert up["prompt"]["source_row"] in range(12)
    assert up["ref"]["policy"] == str(tiny_lm) and up["ref"]["backend"] == "transformers"
    assert up["ref"]["sampling"]["max_tokens"] == 8
    assert up["ranking"]["ranker"] == f"reward_model:{tiny_rm}"
    assert node["downstream"]["snapshots"][0]["name"] == snap.name
    assert verify(store) == []


def test_rerun_adds_nothing_and_changes_nothing(tmp_path, tiny_lm, tiny_rm):
    m = Manifest.model_validate(manifest_dict(tmp_path, tiny_lm, tiny_rm))
    store = open_new(m.store)
    build(m, 1, store)
    before = pair_content(m.store, 1)
    versions = store.versions()
    again = build(m, 1, open_new(m.store))
    assert (again.generated, again.ranked, again.already_paired) == (0, 0, 12)
    assert pair_content(m.store, 1).equals(before)
    assert {k: v for k, v in open_store(m.store).versions().items() if k != "runs"} == {
        k: v for k, v in versions.items() if k != "runs"}


WORKER = """
import sys, yaml
from selm_data import open_store
from selm_data.builder.iteration import Shard, build
from selm_data.manifest import Manifest
from selm_data.store.store import RunInfo
m = Manifest.model_validate(yaml.safe_load(open(sys.argv[1])))
store = open_store(m.store, create=True, run=RunInfo.new("worker"))
def progress(stage, done, total):
    print("progress", done, total, flush=True)
report = build(m, 1, store, shard=Shard.parse(sys.argv[2]), progress=progress)
print("done", report.generated, flush=True)
"""


def run_worker(manifest_file: Path, shard: str = "0/1") -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(manifest_file), shard],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_and_resume_gives_identical_pairs(tmp_path, tiny_lm, tiny_rm):
    reference = Manifest.model_validate(manifest_dict(tmp_path / "a", tiny_lm, tiny_rm))
    build(reference, 1, open_new(reference.store))
    expected = pair_content(reference.store, 1)

    m = manifest_dict(tmp_path / "b", tiny_lm, tiny_rm)
    path = tmp_path / "b" / "manifest.yaml"
    path.write_text(yaml.safe_dump(m))
    worker = run_worker(path)
    line = worker.stdout.readline()  # the first batch of 4 prompts is committed
    assert line.startswith("progress 4 12"), line + worker.stderr.read()
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    partial = pair_content(Path(m["store"]), 1)
    assert 4 <= partial.height < 12
    resumed = run_worker(path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    generated = int(out.split()[-1])
    # Prompts already paired are not generated again (a chunk killed after its responses
    # were committed but before its pairs were is not generated again either).
    assert generated <= 12 - partial.height, "only unfinished work is redone"
    assert pair_content(Path(m["store"]), 1).equals(expected)
    assert verify(open_store(m["store"])) == []


def test_two_shards_in_parallel_equal_one_process(tmp_path, tiny_lm, tiny_rm):
    reference = Manifest.model_validate(manifest_dict(tmp_path / "a", tiny_lm, tiny_rm))
    build(reference, 1, open_new(reference.store))
    m = manifest_dict(tmp_path / "b", tiny_lm, tiny_rm)
    path = tmp_path / "b" / "manifest.yaml"
    path.write_text(yaml.safe_dump(m))
    open_new(Path(m["store"]))
    shards = [run_worker(path, f"{i}/2") for i in range(2)]
    for s in shards:
        _, err = s.communicate(timeout=300)
        assert s.returncode == 0, err
    sharded, single = pair_content(Path(m["store"]), 1), pair_content(reference.store, 1)
    scores = ["chosen_score", "rejected_score", "margin"]
    # The same pairs. Scores agree to float precision only: a reward model's logits move by
    # ~1e-6 with the composition of its batch, which differs between shards.
    assert sharded.drop(scores).equals(single.drop(scores))
    for column in scores:
        assert (sharded[column] - single[column]).abs().max() < 1e-4
    assert verify(open_store(m["store"])) == []


def test_later_iterations_take_the_previous_checkpoint(tmp_path, tiny_lm, tiny_rm):
    m = Manifest.model_validate(manifest_dict(tmp_path, tiny_lm, tiny_rm))
    store = open_new(m.store)
    with pytest.raises(SelmError, match=r"no checkpoint for it\. Train it with `selm-data "
                                        r"export --iter 1` and then `selm-train train "
                                        r"--snapshot .*@NAME`"):
        build(m, 2, store)
    store.append("checkpoints", [{"iteration": 1, "path": str(tiny_lm), "fingerprint": "w1",
                                  "base_model": str(tiny_lm), "loss": "selm", "config": "{}"}])
    report = build(m, 2, store)
    assert report.policy == str(tiny_lm) and report.pairs == 12
    sources = store.scan("prompts").filter(pl.col("iteration") == 2).collect()["source_row"]
    assert sorted(sources.to_list()) == list(range(12, 24))


def test_original_pairs_iteration(tmp_path, tiny_lm, tiny_rm):
    d = manifest_dict(tmp_path, tiny_lm, tiny_rm)
    d["iterations"] = [{"pairs": "original", "loss": "dpo", "alpha": 0.0}, {}]
    m = Manifest.model_validate(d)
    store = open_new(m.store)
    report = build(m, 1, store)
    assert report.generated == 0 and report.pairs == 12
    pairs = store.scan("pairs").collect()
    rows = [json.loads(r) for r in
            (SHARED / "ultrafeedback_binarized_1000.jsonl").read_text().splitlines()[:12]]
    ties = sum(r["metadata"]["score_chosen"] == r["metadata"]["score_rejected"] for r in rows)
    assert pairs["is_tie"].sum() == report.ties == ties
    assert set(pairs["rule"].to_list()) == {"original"}
    assert verify(store) == []


def test_shard_parse():
    assert Shard.parse("1/4") == Shard(1, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(SelmError, match="--shard"):
            Shard.parse(bad)


def test_build_command_prints_summary_examples_and_polars_line(tmp_path, tiny_lm, tiny_rm):
    m = manifest_dict(tmp_path, tiny_lm, tiny_rm)
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(m))
    cli = Path(sys.executable).parent / "selm-data"
    proc = subprocess.run([str(cli), "build", "--iter", "1", "--manifest", str(path)],
                          capture_output=True, text=True, timeout=300,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin",
                               "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "pairs" in out and "y_ref chosen" in out and "margins: mean" in out
    assert out.count("prompt: ") == 2 and out.count("chosen (") == 2
    assert f'pl.scan_delta("{m["store"]}/pairs")' in out
    pairs = open_store(m["store"]).scan("pairs").collect()
    assert pairs.height == 12
    again = subprocess.run([str(cli), "build", "--iter", "1", "--manifest", str(path)],
                           capture_output=True, text=True, timeout=300,
                           env={"COLUMNS": "200", "PATH": "/usr/bin:/bin",
                                "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert again.returncode == 0, again.stderr
    assert open_store(m["store"]).scan("pairs").collect().height == 12


def test_candidates_the_ranker_cannot_score_are_reported_and_retried(tmp_path, tiny_lm,
                                                                     tiny_rm):
    """A judge that gives no rating scores NaN: that prompt is reported unranked, nothing of
    its ranking is stored, and the next run ranks it."""
    from selm_data.rankers.factory import make_ranker

    m = Manifest.model_validate(manifest_dict(tmp_path, tiny_lm, tiny_rm))
    real = make_ranker(m.ranker)

    class Flaky:
        name, version = real.name, real.version

        def __init__(self, refuse: set[str]):
            self.refuse = refuse

        def score(self, requests):
            rows = real.score(requests)
            return [[float("nan"), *row[1:]] if r.messages[-1]["content"][:20] in self.refuse
                    else row for r, row in zip(requests, rows, strict=True)]

    store = open_new(m.store)
    rows = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    refuse = {rows[i]["prompt"][:20] for i in range(3)}  # the first portion holds rows 0-11
    report = build(m, 1, store, ranker=Flaky(refuse))
    assert len(report.unranked) == 3 and report.pairs == 9 == report.ranked
    assert all("gave no score to candidate(s) [0]" in reason for _, reason in report.unranked)
    judged = store.scan("judgments").filter(pl.col("iteration") == 1).collect()
    assert judged.height == 9 * 3 and judged["score"].is_not_nan().all()
    again = build(m, 1, open_store(m.store, run=RunInfo.new("pytest")), ranker=Flaky(set()))
    assert (again.ranked, again.pairs, again.unranked) == (3, 12, [])
    assert again.generated == 0, "responses were kept: only the ranking is redone"
