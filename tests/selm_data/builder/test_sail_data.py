"""SAIL's data (`pairing.rule: sail`): two seeded policy samples a prompt, one ranking of
(y_0, y_1, y_w, y_l), a dataset pair and a policy pair in the store, and a snapshot that holds
both, one row a prompt, for every SAIL route.

Most tests build with a stand-in generator and ranker (text and scores a pure function of the
request), so every expected value is recomputed here from the stored texts; one slow test
builds with the tiny models of conftest.py.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Set as AbstractSet
from pathlib import Path

import polars as pl
import pytest
import yaml

from helpers import chain_rows, manifest_dict
from selm_data import ManifestError, load_manifest, open_store, verify
from selm_data.builder.iteration import build
from selm_data.generation.backends import GenerationResult
from selm_data.manifest import Manifest
from selm_data.publish.snapshot import POLICY_COLUMNS, Filters, export
from selm_data.store.store import RunInfo

REPO = Path(__file__).resolve().parents[3]
POLICY = "org/fake-policy"  # a Hub id: resolved without a download, never loaded


def fake_text(seed: int | None, sample_index: int) -> str:
    """A sample whose length, and so its score, follows from its seed."""
    assert seed is not None, "rule sail must send seeded requests"
    return f"sample {sample_index}: " + "x" * (seed % 11)


def fake_score(text: str) -> float:
    """Few distinct values, so some policy pairs tie."""
    return float(len(text) % 4)


class FakeGenerator:
    backend = "fake"

    def __init__(self, fail: AbstractSet[tuple[str, int]] = frozenset()):
        self.fail = fail  # (prompt_id, sample_index) that fail
        self.calls = 0

    def generate(self, requests):
        self.calls += len(requests)
        return [GenerationResult("failed", error="fake outage")
                if (r.prompt_id, r.sample_index) in self.fail else
                GenerationResult("ok", text=fake_text(r.sampling.seed, r.sample_index),
                                 completion_tokens=3, finish_reason="stop")
                for r in requests]


class FakeRanker:
    name, version = "fake-ranker", "1"

    def __init__(self, refuse: AbstractSet[str] = frozenset()):
        self.refuse = refuse  # prompts whose second candidate (y_1) it gives no score

    def score(self, requests):
        return [[float("nan") if k == 1 and r.messages[-1]["content"] in self.refuse
                 else fake_score(c) for k, c in enumerate(r.candidates)]
                for r in requests]


def sail_manifest(tmp_path: Path, **generation) -> Manifest:
    d = manifest_dict(tmp_path, Path("org/tiny-lm"), Path("org/tiny-rm"))
    d["generation"].update(temperature=0.7, n=2, seed=7, **generation)
    d["pairing"] = {"rule": "sail"}
    d["train"] = {"loss": "dpo", "beta": 0.1}
    return Manifest.model_validate(d)


def run_build(m: Manifest, *, generator=None, ranker=None, label: str = "pytest sail"):
    store = open_store(m.store, create=True, run=RunInfo.new(label))
    report = build(m, 1, store, policy=POLICY, generator=generator or FakeGenerator(),
                   ranker=ranker or FakeRanker())
    return store, report


@pytest.fixture
def sail(tmp_path):
    m = sail_manifest(tmp_path)
    store, report = run_build(m)
    return m, store, report


def responses_by_id(store) -> dict[str, dict]:
    return {r["response_id"]: r for r in store.scan("responses").collect().iter_rows(named=True)}


# --- the store ------------------------------------------------------------------------------


def test_each_prompt_gets_a_dataset_pair_and_a_ranked_policy_pair(sail):
    _, store, report = sail
    pairs = store.scan("pairs").collect()
    responses = responses_by_id(store)
    judgments = store.scan("judgments").collect()
    assert (report.prompts, report.generated, report.ranked) == (12, 24, 12)
    assert (report.pairs, report.policy_pairs, report.failed, report.unranked) == (12, 12, [], [])
    assert pairs.height == 24 and pairs["pair_id"].n_unique() == 24
    assert set(judgments["n_candidates"]) == {4}
    ties = swaps = 0
    for _, group in pairs.group_by("prompt_id"):
        by_rule = {p["rule"]: p for p in group.iter_rows(named=True)}
        assert set(by_rule) == {"sail_dataset", "sail_policy"}
        dataset, policy = by_rule["sail_dataset"], by_rule["sail_policy"]
        assert dataset["ranking_id"] == policy["ranking_id"]
        assert dataset["ref_id"] is None and policy["ref_id"] is None
        # The ranking's candidates are (y_0, y_1, y_w, y_l), in that order.
        ranked = judgments.filter(pl.col("ranking_id") == dataset["ranking_id"]).sort("position")
        y0, y1, yw, yl = (responses[i] for i in ranked["response_id"])
        assert [(r["origin"], r["sample_index"]) for r in (y0, y1, yw, yl)] == [
            ("policy", 0), ("policy", 1), ("dataset_chosen", 0), ("dataset_rejected", 0)]
        # The dataset pair keeps the dataset's label, with the ranker's scores.
        assert (dataset["chosen_id"], dataset["rejected_id"]) == (yw["response_id"],
                                                                  yl["response_id"])
        assert dataset["chosen_score"] == fake_score(yw["text"])
        assert dataset["margin"] == fake_score(yw["text"]) - fake_score(yl["text"])
        # The policy pair: the higher score first, y_0 on a tie; scores recomputed from text.
        s0, s1 = fake_score(y0["text"]), fake_score(y1["text"])
        better, worse = (y0, y1) if s0 >= s1 else (y1, y0)
        assert (policy["chosen_id"], policy["rejected_id"]) == (better["response_id"],
                                                                worse["response_id"])
        assert (policy["chosen_score"], policy["rejected_score"]) == (max(s0, s1), min(s0, s1))
        assert policy["is_tie"] == (s0 == s1)
        assert (policy["chosen_origin"], policy["rejected_origin"]) == ("policy", "policy")
        ties += s0 == s1
        swaps += s1 > s0
    assert report.policy_ties == ties
    assert ties and swaps and swaps + ties < 12, "the data covers ties, swaps and neither"
    assert verify(store) == []


def test_samples_are_seeded_and_a_rerun_adds_nothing(sail, tmp_path):
    m, store, _ = sail
    policy = store.scan("responses").filter(pl.col("origin") == "policy").collect()
    seeds = policy["sampling"].struct.field("seed")
    assert seeds.null_count() == 0 and seeds.n_unique() == 24  # one seed a (prompt, sample)
    versions = store.versions()
    generator = FakeGenerator()
    _, again = run_build(m, generator=generator, label="pytest sail again")
    assert (again.generated, again.ranked, again.already_paired, generator.calls) == (0, 0, 12, 0)
    assert {k: v for k, v in open_store(m.store).versions().items() if k != "runs"} == {
        k: v for k, v in versions.items() if k != "runs"}
    # A fresh store with the same manifest draws the same samples, under the same ids.
    fresh = sail_manifest(tmp_path / "fresh")
    other, _ = run_build(fresh)

    def samples(s) -> pl.DataFrame:
        return (s.scan("responses").filter(pl.col("origin") == "policy")
                .select("response_id", "prompt_id", "sample_index", "text").collect()
                .sort("response_id"))

    assert samples(other).equals(samples(store))
    pair_ids = ["pair_id", "rule", "chosen_id", "rejected_id"]
    assert (other.scan("pairs").select(pair_ids).collect().sort("pair_id")
            .equals(store.scan("pairs").select(pair_ids).collect().sort("pair_id")))


def test_a_failed_or_unscored_sample_gives_the_prompt_no_pair_until_a_rerun(tmp_path):
    m = sail_manifest(tmp_path)
    store = open_store(m.store, create=True, run=RunInfo.new("pytest"))
    data = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    failed, unscored = data[0]["prompt"], data[1]["prompt"]  # iteration 1 holds rows 0-11
    failed_id = next(pid for pid, messages in store_prompts(m)
                     if messages[-1]["content"] == failed)

    report = build(m, 1, store, policy=POLICY, generator=FakeGenerator({(failed_id, 1)}),
                   ranker=FakeRanker({unscored}))
    assert report.failed == [(failed_id, "fake outage")]
    assert len(report.unranked) == 1
    assert "candidate(s) [1] of (y_0, y_1, y_w, y_l)" in report.unranked[0][1]
    assert (report.generated, report.pairs, report.policy_pairs) == (23, 10, 10)
    paired = set(store.scan("pairs").collect()["prompt_id"])
    assert failed_id not in paired and report.unranked[0][0] not in paired
    again = build(m, 1, open_store(m.store, run=RunInfo.new("retry")), policy=POLICY,
                  generator=FakeGenerator(), ranker=FakeRanker())
    assert (again.generated, again.ranked, again.failed, again.unranked) == (1, 2, [], [])
    pairs = store.scan("pairs").collect()
    assert pairs.height == 24 and set(Counter(pairs["prompt_id"]).values()) == {2}
    assert verify(store) == []


def store_prompts(m: Manifest) -> list[tuple[str, list[dict]]]:
    """(prompt_id, messages) of iteration 1, as the build will id them."""
    from selm_data.builder.iteration import portion_of
    from selm_data.sources.dataset import load_source

    return [(pid, ex.messages) for pid, ex in portion_of(m, load_source(m.source), 1)]


# --- the snapshot ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["ultrafeedback", "trl"])
def test_export_holds_the_policy_pair_beside_the_dataset_pair(sail, layout):
    _, store, _ = sail
    snap = export(store, 1, layout=layout)
    assert snap.row_count == 12 and snap.policy_pair
    meta = json.loads((snap.path / "snapshot.json").read_text())
    assert meta["policy_pair"] is True and meta["columns"][-len(POLICY_COLUMNS):] == list(
        POLICY_COLUMNS)
    frame = pl.read_parquet(snap.path / "data")
    responses = responses_by_id(store)
    pairs = {(p["prompt_id"], p["rule"]): p for p in store.scan("pairs").collect().to_dicts()}
    prompts = {p["prompt_id"]: p["messages"] for p in store.scan("prompts").collect().to_dicts()}
    for row in frame.iter_rows(named=True):
        dataset = pairs[(row["prompt_id"], "sail_dataset")]
        policy = pairs[(row["prompt_id"], "sail_policy")]
        assert row["rule"] == "sail_dataset" and row["pair_id"] == dataset["pair_id"]
        assert row["reference"] is None and row["ref_id"] is None
        prompt = prompts[row["prompt_id"]]

        def message(response_id: str, prompt=prompt) -> list[dict]:
            turn = {"role": "assistant", "content": responses[response_id]["text"]}
            return [*prompt, turn] if layout == "ultrafeedback" else [turn]

        assert row["chosen"] == message(dataset["chosen_id"])
        assert row["rejected"] == message(dataset["rejected_id"])
        assert row["policy_chosen"] == message(policy["chosen_id"])
        assert row["policy_rejected"] == message(policy["rejected_id"])
        assert (row["policy_pair_id"], row["policy_chosen_id"], row["policy_rejected_id"]) == (
            policy["pair_id"], policy["chosen_id"], policy["rejected_id"])
        assert (row["score_policy_chosen"], row["score_policy_rejected"]) == (
            policy["chosen_score"], policy["rejected_score"])
        assert row["policy_is_tie"] == policy["is_tie"]
        # Undoing the swap gives the samples in their drawn order (y_0, y_1): SAIL-PP's pair.
        first, second = ((row["policy_rejected_id"], row["policy_chosen_id"])
                         if row["policy_swapped"] else
                         (row["policy_chosen_id"], row["policy_rejected_id"]))
        assert (responses[first]["sample_index"], responses[second]["sample_index"]) == (0, 1)
    assert 0 < frame["policy_swapped"].sum() < 12


def test_datasets_reads_a_sail_snapshot(sail):
    from datasets import load_dataset

    _, store, _ = sail
    snap = export(store, 1)
    ds = load_dataset("parquet", data_files=str(snap.path / "data" / "*.parquet"),
                      split="train")
    assert ds.num_rows == 12 and set(POLICY_COLUMNS) <= set(ds.column_names)
    assert ds[0]["policy_chosen"][-1]["role"] == "assistant"
    assert ds[0]["policy_chosen"][:-1] == ds[0]["chosen"][:-1]  # the same prompt turns
    assert isinstance(ds[0]["policy_swapped"], bool)


def test_filters_choose_rows_by_the_dataset_pair(sail):
    _, store, _ = sail
    everything = pl.read_parquet(export(store, 1).path / "data")
    untied = pl.read_parquet(export(store, 1, filters=Filters(drop_ties=True)).path / "data")
    assert untied.height == (~everything["is_tie"]).sum() < 12
    # A tied policy pair is kept with its row, flagged: the filter looks at the dataset pair.
    kept = everything.filter(~pl.col("is_tie"))
    assert untied.sort("pair_id").equals(kept.sort("pair_id"))
    wide = pl.read_parquet(export(store, 1, filters=Filters(min_margin=1.0)).path / "data")
    assert wide.height == (everything["margin"] >= 1.0).sum()
    assert wide["policy_pair_id"].null_count() == 0


# The snapshot of tests/selm_data/publish/test_snapshot.py's `built` fixture (iteration 2), exported
# before SAIL's columns existed. A non-SAIL export must keep these bytes, so the snapshots
# (and names like iter2-12df086c) made before stay reproducible. The hashes depend on
# pyarrow's Parquet writer (see snapshot.py): a pyarrow upgrade may move them.
PINNED = {"ultrafeedback": "12df086c5911fc0564883fa1ab37abb3cc9a5ba9fe8c38e95773fbf6f4af7804",
          "trl": "0902cbc31324bfcfd494284fe4dcf02cfd7a34ebcef8b1c4e9b55f7ae5879576"}


def test_other_rules_export_as_before(store):
    for iteration, n in ((1, 5), (2, 7)):
        rows = chain_rows(iteration, n)
        for k, pair in enumerate(rows["pairs"]):
            pair.update(margin=0.5 * k, is_tie=k == 0)
        for table in ("prompts", "quarantine", "responses", "judgments", "pairs"):
            store.append(table, rows[table])
    for layout, content_hash in PINNED.items():
        snap = export(store, 2, layout=layout)
        assert snap.content_hash == content_hash and not snap.policy_pair
        assert not set(POLICY_COLUMNS) & set(pl.read_parquet(snap.path / "data").columns)
        assert json.loads((snap.path / "snapshot.json").read_text())["policy_pair"] is False


# --- lineage, card, inspect -----------------------------------------------------------------


def test_lineage_of_a_policy_pair_reaches_samples_seeds_and_ranker(sail):
    from selm_data.publish.lineage import lineage

    _, store, _ = sail
    snap = export(store, 1)
    policy = store.scan("pairs").filter(pl.col("rule") == "sail_policy").collect().row(
        0, named=True)
    node = lineage(store, policy["pair_id"])
    up = node["upstream"]
    assert node["row"]["rule"] == "sail_policy" and up["ref"] is None
    assert up["ranking"]["ranker"] == "fake-ranker" and len(up["ranking"]["scores"]) == 4
    for role in ("chosen", "rejected"):
        assert up[role]["origin"] == "policy" and up[role]["policy"] == POLICY
        assert up[role]["sampling"]["temperature"] == 0.7
        assert up[role]["sampling"]["seed"] is not None
    assert {up["chosen"]["sample_index"], up["rejected"]["sample_index"]} == {0, 1}
    assert up["prompt"]["source_row"] in range(12)
    assert [s["name"] for s in node["downstream"]["snapshots"]] == [snap.name]


def test_card_and_lineage_file_say_the_snapshot_holds_the_policy_pair(sail):
    from selm_data.publish.card import CARD_FILE
    from selm_data.publish.hub import repo_files
    from selm_data.publish.provenance import LINEAGE_FILE

    _, store, _ = sail
    snap = export(store, 1)
    files = repo_files(store, snap.name, repo_id="org/sail-iter1")
    card = files[CARD_FILE].decode()
    lineage = json.loads(files[LINEAGE_FILE])
    frame = pl.read_parquet(snap.path / "data")
    assert lineage["rules"] == ["sail_dataset", "sail_policy"]
    assert lineage["policy_pair"]["rows"] == 12
    assert lineage["policy_pair"]["ties"] == frame["policy_is_tie"].sum()
    assert lineage["policy_pair"]["swapped"] == frame["policy_swapped"].sum()
    margins = (frame["score_policy_chosen"] - frame["score_policy_rejected"]).sort()
    assert lineage["policy_pair"]["margin"]["max"] == margins.max()
    [policy] = lineage["policies"]  # the samples of the policy pairs, both of every prompt
    assert (policy["policy"], policy["seeded"], policy["responses"]) == (POLICY, True, 24)
    assert "# SAIL iteration 1" in card and "sail" in card.split("---\n")[1]
    for route in ("| SAIL-PP |", "| SAIL-PR |", "| SAIL-DP |", "| DPO |"):
        assert route in card
    for column in POLICY_COLUMNS:
        assert f"| `{column}` | " in card and f"| `{column}` | — |" not in card
    assert "arXiv:2406.15567" in card and "| policy pairs | 12 |" in card


def test_inspect_counts_policy_pairs_apart(sail):
    from rich.console import Console

    from selm_data.publish.stats import iteration_stats, render_stats

    _, store, report = sail
    row = iteration_stats(store, iteration=1).row(0, named=True)
    assert (row["pairs"], row["policy_pairs"], row["policy_ties"]) == (12, 12,
                                                                      report.policy_ties)
    assert (row["generated"], row["rankings"], row["unpaired"], row["compared"]) == (24, 12, 0, 0)
    assert row["ties"] == report.ties and row["chosen_is_ref"] is None
    console = Console(record=True, width=200)
    console.print(render_stats(iteration_stats(store)))
    assert f"12 ({report.policy_ties})" in console.export_text()


# --- manifests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generation", "pairing", "message"),
    [
        ({"n": 1}, {}, r"pairing.rule 'sail' pairs two policy samples per prompt: set "
                       r"generation.n to 2 \(it is 1\)"),
        ({"n": 3}, {}, r"set generation.n to 2 \(it is 3\)"),
        ({"temperature": 0.0}, {}, r"n > 1 with temperature 0"),
        ({"n": 1, "temperature": 0.0}, {}, r"generation.n to 2"),
        ({"seed": None}, {}, r"pairing.rule 'sail' needs seeded samples: set generation.seed"),
        ({}, {"ties": "drop"}, r"pairing.rule 'sail' keeps ties .* set pairing.ties to keep"),
    ],
)
def test_sail_manifest_needs_two_seeded_samples(tmp_path, generation, pairing, message):
    demo = yaml.safe_load((REPO / "manifests/sail-demo.yaml").read_text())
    demo["generation"].update(generation)
    demo["pairing"].update(pairing)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(demo))
    with pytest.raises(ManifestError, match=message):
        load_manifest(path)


def test_shipped_sail_manifests():
    demo = load_manifest(REPO / "manifests/sail-demo.yaml")
    assert (demo.pairing.rule, demo.generation.n, demo.generation.seed) == ("sail", 2, 42)
    assert demo.generation.temperature > 0 and demo.ranker.kind == "demo"
    assert demo.source == load_manifest(REPO / "manifests/demo.yaml").source
    for name in ("sail-pr", "sail-pp"):
        m = load_manifest(REPO / f"manifests/{name}.yaml")
        assert (m.pairing.rule, m.generation.n, m.ranker.kind) == ("sail", 2, "pairrm")
        assert {it.pairs for it in m.iterations} == {"ranked"}
        assert m.train.beta == 0.1
    dp = load_manifest(REPO / "manifests/sail-dp.yaml")
    assert {it.pairs for it in dp.iterations} == {"original"} and dp.train.beta == 0.1


# --- the tiny models ------------------------------------------------------------------------


@pytest.mark.slow
def test_sail_build_with_tiny_models(tmp_path, tiny_lm, tiny_rm):
    """The real path: the transformers backend samples two seeded responses a prompt, a reward
    model ranks four candidates, and the policy pair's order is that of a fresh scoring."""
    from selm_data.rankers.base import RankRequest
    from selm_data.rankers.factory import make_ranker

    def manifest(folder: Path) -> Manifest:
        d = manifest_dict(folder, tiny_lm, tiny_rm)
        d["generation"].update(temperature=1.0, n=2, seed=3)
        d["pairing"] = {"rule": "sail"}
        d["train"] = {"loss": "dpo", "beta": 0.1}
        return Manifest.model_validate(d)

    m = manifest(tmp_path / "a")
    store = open_store(m.store, create=True, run=RunInfo.new("pytest"))
    report = build(m, 1, store)
    assert (report.generated, report.pairs, report.policy_pairs) == (24, 12, 12)
    responses = responses_by_id(store)
    policy = store.scan("pairs").filter(pl.col("rule") == "sail_policy").collect()
    y0_y1 = Counter()
    requests, pairs = [], []
    prompts = {p["prompt_id"]: p["messages"] for p in store.scan("prompts").collect().to_dicts()}
    for p in policy.iter_rows(named=True):
        chosen, rejected = responses[p["chosen_id"]], responses[p["rejected_id"]]
        y0_y1[chosen["text"] == rejected["text"]] += 1
        requests.append(RankRequest(prompts[p["prompt_id"]], [chosen["text"], rejected["text"]]))
        pairs.append(p)
    assert y0_y1[False] >= 10, "seeded samples of one prompt differ"
    fresh = make_ranker(m.ranker).score(requests)  # scored alone, not beside y_w and y_l
    for p, (chosen, rejected) in zip(pairs, fresh, strict=True):
        if p["is_tie"]:
            continue
        assert chosen > rejected  # the stored order is the reward model's
        assert abs(chosen - p["chosen_score"]) < 1e-4 and abs(rejected - p["rejected_score"]) < 1e-4
    assert verify(store) == []

    again = build(m, 1, open_store(m.store, run=RunInfo.new("again")))
    assert (again.generated, again.ranked, again.already_paired) == (0, 0, 12)
    other = manifest(tmp_path / "b")
    other_store = open_store(other.store, create=True, run=RunInfo.new("pytest"))
    build(other, 1, other_store)
    texts = {r["response_id"]: r["text"] for r in responses.values() if r["origin"] == "policy"}
    assert {r["response_id"]: r["text"] for r in responses_by_id(other_store).values()
            if r["origin"] == "policy"} == texts, "a rebuild samples the same texts"
    snap = export(store, 1, layout="trl")
    frame = pl.read_parquet(snap.path / "data")
    assert frame.height == 12 and frame["policy_chosen"].null_count() == 0
