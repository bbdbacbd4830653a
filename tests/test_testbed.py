"""The testbed (bench/testbed): its true reward by hand, and a smoke run of the whole thing
(`run.py --quick`: 1 seed, 2 iterations, iterative DPO, SELM and SAIL-PR) through the real
pipeline, checked in the store it leaves: every iteration built, ranked by the oracle with the
scores r* gives, exported, trained, registered and generated from, with lineage closed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from selm_data.rankers.base import RankRequest
from selm_data.store.store import open_store
from selm_data.verify import verify

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.append(str(BENCH))  # `testbed`, after everything else

from testbed.task import (  # noqa: E402
    ANSWER_WORDS,
    OracleRanker,
    TrueReward,
    build_tokenizer,
    split_prompts,
)

# A reward small enough to work by hand: topic x0 likes w1, w2 and dislikes w3; x1 likes w2.
HAND = TrueReward(likes={"x0": ("w1", "w2"), "x1": ("w2",)},
                  dislikes={"x0": ("w3",), "x1": ()}, length_cost=0.1, off_vocabulary=-1.0,
                  repeat=-1.0)


def test_true_reward_worked_by_hand():
    # w2 is liked by both topics (+2), w1 by one (+1), w3 disliked (-1); 3 words cost 0.3
    assert HAND("x0 x1", "w1 w2 w3") == pytest.approx(2 + 1 - 1 - 0.3)
    # the repeated w2 counts once, then -1 as padding; 3 words cost 0.3
    assert HAND("x0 x1", "w2 w2 w1") == pytest.approx(2 + 1 - 1 - 0.3)
    # x1 alone: w1 is neutral, and a word outside the answer words (x0) is -1
    assert HAND("x1", "w1 x0") == pytest.approx(0 - 1 - 0.2)
    assert HAND("x0 x1", "") == 0.0
    # best: w1 (+1) and w2 (+2), each minus its length cost
    assert HAND.best("x0 x1") == pytest.approx(0.9 + 1.9)


def test_oracle_ranker_scores_with_r_star_and_names_its_definition():
    ranker = OracleRanker(HAND)
    messages = [{"role": "user", "content": "x0 x1"}]
    assert ranker.score([RankRequest(messages, ["w1", "w2 w3", "w3"])]) == [
        [pytest.approx(0.9), pytest.approx(0.8), pytest.approx(-1.1)]]
    changed = TrueReward(likes=HAND.likes, dislikes=HAND.dislikes, length_cost=0.2)
    assert OracleRanker(changed).version != ranker.version, "the version hashes the definition"
    assert OracleRanker(TrueReward.make()).version == OracleRanker(TrueReward.make()).version


def test_task_prompts_and_tokenizer():
    train, held_out = split_prompts(30, 10)
    assert len(set(train)) == 30 and not set(train) & set(held_out)
    tokenizer = build_tokenizer()
    text = " ".join(ANSWER_WORDS[:3])
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == 3 and tokenizer.decode(ids) == text, "one token a word, round trip"


def run_testbed(out: Path) -> None:
    command = [sys.executable, str(BENCH / "testbed" / "run.py"), "--quick", "--out", str(out),
               "--jobs", "2"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_quick_run_goes_through_the_pipeline_and_the_store(tmp_path):
    out = tmp_path / "out"
    run_testbed(out)
    results = json.loads((out / "results.json").read_text())
    provenance = json.loads((out / "provenance.json").read_text())
    T, n_eval = results["settings"]["iterations"], results["settings"]["eval_prompts"]
    per_iter = results["settings"]["prompts_per_iteration"]
    assert results["methods"] == ["dpo", "selm-0.1", "sail-pr"] and results["seeds"] == ["0"]
    assert list(results["regimes"]) == ["self", "stronger"]
    for regime in results["regimes"]:
        for name in ("reward_by_iteration", "reward_distributions", "implicit_rewards",
                     "yref_wins"):
            png = (out / f"{regime}-{name}.png").read_bytes()
            assert png.startswith(b"\x89PNG") and len(png) > 10_000, name
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in results["methods"])
    assert "## Regime `self`" in table and "## Regime `stronger`" in table
    assert "Wall time" in provenance["timing"] and str(tmp_path) not in json.dumps(results)

    reward = TrueReward.make()
    base = results["base"]["0"]
    assert len(base["greedy_rewards"]) == n_eval
    for regime, data in results["regimes"].items():
        for method in results["methods"]:
            run = data["runs"][method]["0"]
            assert [it["iteration"] for it in run["iterations"]] == list(range(1, T + 1))
            for it in run["iterations"]:
                assert len(it["greedy_rewards"]) == n_eval and it["steps"] > 0
                assert all(row["loss"] == row["loss"] for row in it["history"]), "finite"
            store = open_store(provenance["regimes"][regime][method]["0"]["store"])
            _check_store(store, method, T, per_iter, reward)
            _check_source(store, out / "work" / "seed-0" / f"data-{regime}.jsonl")

    # The same command writes the same files, byte for byte: the report from the kept units,
    # and a unit trained again from nothing (its folder removed; ids hash the paths in a
    # checkpoint's lineage, so it must be the same --work)
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".md", ".png")}
    files["results.json"] = (out / "results.json").read_bytes()
    assert len(files) == 10
    shutil.rmtree(out / "work" / "runs" / "stronger" / "dpo-s0")
    run_testbed(out)
    assert json.loads((out / "provenance.json").read_text())["reused_units"] == 6
    assert {p: (out / p).read_bytes() for p in files} == files


def _check_source(store, data: Path) -> None:
    """Every iteration's dataset answers are the regime's dataset's (y_w, y_l)."""
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    pairs = {(r["chosen"], r["rejected"]) for r in rows}
    stored = store.scan("responses").filter(pl.col("origin") != "policy").select(
        "prompt_id", "origin", "text").collect()
    by_prompt: dict[str, dict[str, str]] = {}
    for row in stored.iter_rows(named=True):
        by_prompt.setdefault(row["prompt_id"], {})[row["origin"]] = row["text"]
    assert by_prompt and all((r["dataset_chosen"], r["dataset_rejected"]) in pairs
                             for r in by_prompt.values())


@pytest.mark.slow
def test_the_stronger_regime_stays_calibrated(tmp_path):
    """The stronger regime's point: at iteration 1 the base policy's greedy y_ref is the
    chosen answer of 30-40% of the new pairs (the demo build on UltraFeedback: 34%), not the
    59% of the self regime. Seed 0 at the shipped settings, through the real build and store;
    this fails if the styles, the base fit or the pairing drift (25-45% allowed)."""
    from testbed import pipeline, policy
    from testbed.run import settings_for

    from selm_data.builder.iteration import build
    from selm_data.store.store import RunInfo

    settings = settings_for(quick=False)
    reward = TrueReward.make()
    train, _ = split_prompts(settings.iterations * settings.prompts_per_iteration,
                             settings.eval_prompts)
    base, data = tmp_path / "base", tmp_path / "data.jsonl"
    policy.fit_base(base, train, reward, seed=0, steps=settings.sft_steps)
    stats = policy.stronger_dataset(train, reward, data, seed=0)
    assert all(r > 1.0 for r in stats["style_reward_mean"].values()), stats
    m = pipeline.manifest(pipeline.METHODS["dpo"], settings, seed=0, base=base, data=data,
                          folder=tmp_path)
    store = open_store(m.store, create=True, run=RunInfo.new("test", manifest_hash=m.hash(),
                                                             manifest_json=m.canonical_json()))
    build(m, 1, store, ranker=OracleRanker(reward))
    shares = pipeline.store_stats(store, 1)
    assert 0.25 <= shares["chosen_is_policy"] <= 0.45, shares
    assert 0.30 <= shares["policy_beats_chosen"] <= 0.55, shares


def _check_store(store, method: str, T: int, per_iter: int, reward: TrueReward) -> None:
    assert verify(store) == [], f"{method}: selm-data verify finds problems"
    sail = method.startswith("sail")
    # Every iteration: its portion's prompts, the policy's answers (two seeded samples for
    # SAIL), one ranking a prompt by the oracle, pairs, a snapshot, a registered checkpoint.
    prompts = store.scan("prompts").group_by("iteration").len().sort("iteration").collect()
    assert prompts["iteration"].to_list() == list(range(1, T + 1))
    assert prompts["len"].to_list() == [per_iter] * T
    policy = store.scan("responses").filter(pl.col("origin") == "policy").collect()
    assert policy.filter(pl.col("status") != "ok").height == 0
    assert policy.height == T * per_iter * (2 if sail else 1)
    judged = store.scan("judgments").join(
        store.scan("responses").select("response_id", "text"), on="response_id").join(
        store.scan("prompts").select("prompt_id", "messages").unique("prompt_id"),
        on="prompt_id").collect()
    assert set(judged["ranker"]) == {"true-reward"}
    assert set(judged["ranker_version"]) == {reward.version}
    assert judged.height == T * per_iter * (4 if sail else 3)
    for row in judged.iter_rows(named=True):  # the stored score is r* of the stored text
        assert row["score"] == pytest.approx(reward(row["messages"][-1]["content"], row["text"]))
    pairs = store.scan("pairs").group_by("iteration", "rule").len().collect()
    rules = {"sail_dataset", "sail_policy"} if sail else {"best_worst"}
    assert set(pairs["rule"]) == rules and set(pairs["len"]) == {per_iter}
    snapshots = store.scan("snapshots").sort("iteration").collect()
    checkpoints = store.scan("checkpoints").sort("iteration").collect()
    assert snapshots["iteration"].to_list() == checkpoints["iteration"].to_list() == list(
        range(1, T + 1))
    assert checkpoints["snapshot_id"].to_list() == snapshots["snapshot_id"].to_list()
    assert checkpoints["parent_id"][0] is None
    assert checkpoints["parent_id"][1:].to_list() == checkpoints["checkpoint_id"][:-1].to_list()
    for t in range(2, T + 1):  # iteration t generated with iteration t-1's checkpoint
        used = set(policy.filter(pl.col("iteration") == t)["policy_fingerprint"])
        assert used == {checkpoints["fingerprint"][t - 2]}, f"{method} iteration {t}"
    for folder in snapshots["path"]:
        assert (store.root / folder / "snapshot.json").is_file()
    _check_trained(checkpoints["path"].to_list(), store.root.parents[3] / "seed-0" / "base")


def _check_trained(paths: list[str], base: Path) -> None:
    """Each checkpoint's weights differ from the model it started from."""
    from safetensors.torch import load_file

    before = load_file(base / "model.safetensors")
    for path in paths:
        after = load_file(Path(path) / "model.safetensors")
        assert before.keys() == after.keys()
        assert any(not (before[k] == after[k]).all() for k in before), f"{path} did not train"
        before = after
