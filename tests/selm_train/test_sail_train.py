"""SAIL in the trainer: seeded routes, the pair each route trains on, first-step losses
computed by hand, a checkpoint with its lineage for every variant, and the non-finite guard.

The snapshot is a real `pairing.rule: sail` build (seeded stand-in samples and scores, so no
model is needed to make the data) of the 12 prompts of one portion; the policy is tiny_lm.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from helpers import manifest_dict, require
from selm_data.builder.iteration import build
from selm_data.errors import SelmError
from selm_data.generation.backends import GenerationResult
from selm_data.manifest import Manifest, SailSpec, TrainSpec
from selm_data.publish.lineage import lineage
from selm_data.publish.snapshot import export
from selm_data.store.store import RunInfo, open_store
from selm_train.data import read_examples, resolve_snapshot, tokenize
from selm_train.losses import ROUTE_DP, ROUTE_DPO, ROUTE_PP, ROUTE_PR, LossOutput
from selm_train.train import REFERENCE_DIR, _stop_if_nonfinite, sail_plan, train

LOG2 = math.log(2.0)


class Samples:
    """Seeded stand-in samples: lengths (and so scores) follow from each request's seed."""

    backend = "fake"

    def generate(self, requests):
        return [GenerationResult("ok", text=f"Answer {r.sample_index}: " + "yes " * (
            1 + r.sampling.seed % 7), completion_tokens=3, finish_reason="stop")
                for r in requests]


class Lengths:
    name, version = "length-ranker", "1"

    def score(self, requests):
        return [[float(len(c) % 5) for c in r.candidates] for r in requests]


def sail_spec(**sail) -> TrainSpec:
    return TrainSpec(loss="sail", beta=0.1, sail=SailSpec(**sail), learning_rate=1e-3,
                     global_batch_size=12, micro_batch_size=4, max_length=64,
                     max_prompt_length=32, warmup_ratio=0.0, lr_scheduler="constant",
                     zero_stage=0, epochs=1)


@pytest.fixture(scope="module")
def sail_snapshot(tmp_path_factory):
    require("deepspeed", "'selm[train]'")
    tmp = tmp_path_factory.mktemp("sail")
    d = manifest_dict(tmp, Path("org/tiny-lm"), Path("org/tiny-rm"))
    d["generation"].update(temperature=0.7, n=2, seed=7)
    d["pairing"] = {"rule": "sail"}
    m = Manifest.model_validate(d)
    store = open_store(m.store, create=True, run=RunInfo.new("pytest sail train"))
    report = build(m, 1, store, policy="org/fake-policy", generator=Samples(), ranker=Lengths())
    assert report.policy_pairs == 12
    snap = export(store, 1, name="sail")
    assert snap.policy_pair
    return store, f"{store.root}@sail"


@pytest.fixture(scope="module")
def examples(sail_snapshot, tiny_lm):
    from transformers import AutoTokenizer

    _, ref = sail_snapshot
    return tokenize(read_examples(resolve_snapshot(ref)), AutoTokenizer.from_pretrained(tiny_lm),
                    max_length=64, max_prompt_length=32)


def test_routes_are_seeded_by_run_and_epoch(examples):
    spec = sail_spec(r=0.4, p=0.3, g=0.3)
    first, again = sail_plan(examples, spec, 0), sail_plan(examples, spec, 0)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    epochs = [sail_plan(examples, spec, e) for e in range(4)]
    assert len({tuple(r.tolist()) for r, _ in epochs}) > 1  # each epoch draws anew
    other = sail_plan(examples, spec.model_copy(update={"seed": 7}), 0)
    assert not torch.equal(first[1], other[1])
    assert set(torch.cat([r for r, _ in epochs]).tolist()) <= {ROUTE_DP, ROUTE_PP, ROUTE_PR}
    assert bool(((first[1] >= 0) & (first[1] < 1)).all())


def test_an_example_without_a_policy_pair_trains_plain_dpo_where_it_drew_pp_or_pr(examples):
    from dataclasses import replace

    lacking = [replace(ex, policy_chosen_ids=None, policy_rejected_ids=None) if i % 2 else ex
               for i, ex in enumerate(examples)]
    spec = sail_spec(p=0.5, g=0.5)
    routes, _ = sail_plan(examples, spec, 0)
    fallen, _ = sail_plan(lacking, spec, 0)
    for i, (a, b) in enumerate(zip(routes.tolist(), fallen.tolist(), strict=True)):
        assert b == (ROUTE_DPO if i % 2 else a)


def reference_table(snapshot: str) -> dict[str, list[float]]:
    folder = resolve_snapshot(snapshot).folder / REFERENCE_DIR
    (path,) = folder.glob("*.parquet")
    frame = pl.read_parquet(path)
    return dict(zip(frame["pair_id"], frame["logps"].to_list(), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dp", "pp", "pr", "mix"])
def test_each_variant_trains_and_its_first_step_loss_is_the_formula(sail_snapshot, tiny_lm,
                                                                     tmp_path, variant):
    """At step 1 the policy is the reference, so h = 0 and l = log(1/2) on every route; the loss
    is then a closed form of the coefficients and (for PP and PR, whose score-function term is
    -c * l * (pc + pr)) the policy pair's log-probs, read from the reference cache."""
    store, snapshot = sail_snapshot
    sail = {"dp": {"r": 1.0}, "pp": {"p": 1.0}, "pr": {"g": 1.0},
            "mix": {"r": 0.4, "p": 0.3, "g": 0.3}}[variant]
    out = train(snapshot, str(tiny_lm), tmp_path / "ckpt", sail_spec(**sail), iteration=1)
    first = out.history[0]
    cached = reference_table(snapshot)
    assert all(len(v) == 5 and math.isnan(v[2]) for v in cached.values())  # no y_ref in SAIL
    policy_sum = sum(v[3] + v[4] for v in cached.values()) / len(cached)
    expected = {"dp": LOG2 - 0.2 / 2 * LOG2 ** 2,
                "pp": LOG2 - 0.2 / 2 * LOG2 ** 2 + 0.2 * LOG2 * policy_sum,
                "pr": LOG2 + 0.3 * LOG2 * policy_sum}
    if variant in expected:
        assert first["loss"] == pytest.approx(expected[variant], rel=1e-4)
        assert first[f"sail/{variant}"] == 1.0
    else:
        shares = [first[f"sail/{n}"] for n in ("dpo", "dp", "pp", "pr")]
        assert sum(shares) == pytest.approx(1.0) and shares[0] == 0.0
    assert out.nonfinite == 0 and out.steps == 1
    info = json.loads((out.checkpoint / "selm_checkpoint.json").read_text())
    assert info["loss"] == "sail" and info["config"]["sail"] == {
        **SailSpec().model_dump(), **sail}
    assert info["snapshot_name"] == "sail"
    node = lineage(store, out.checkpoint_id)
    assert node["kind"] == "checkpoints" and node["upstream"]["snapshot"]["name"] == "sail"


@pytest.mark.slow
def test_dp_and_pp_swaps_follow_the_draws(sail_snapshot, tiny_lm, tmp_path):
    """At step 1 h = 0, so sigmoid(beta h) = 1/2: an example is swapped exactly where its
    draw is at least 1/2."""
    _, snapshot = sail_snapshot
    spec = sail_spec(r=0.5, p=0.5)
    out = train(snapshot, str(tiny_lm), tmp_path / "ckpt", spec, iteration=1, register=False)
    examples = read_examples(resolve_snapshot(snapshot))
    _, draws = sail_plan([_stand_in(ex) for ex in examples], spec, 0)
    assert out.history[0]["sail/flipped"] == pytest.approx(float((draws >= 0.5).double().mean()))


def _stand_in(ex):
    """A TokenizedExample-like object with only what sail_plan reads."""
    from types import SimpleNamespace

    return SimpleNamespace(policy_chosen_ids=(1,) if ex.policy_chosen else None)


@pytest.mark.slow
def test_non_finite_losses_are_counted_and_kept_out_of_the_weights(sail_snapshot, tiny_lm,
                                                                   tmp_path, monkeypatch):
    import selm_train.train as trainer

    _, snapshot = sail_snapshot
    real = trainer.reference_logps

    def poisoned(*args, **kwargs):
        values = real(*args, **kwargs)
        first = sorted(values)[0]
        values[first] = (float("nan"), *values[first][1:])  # one pair's reference: nan
        return values

    monkeypatch.setattr(trainer, "reference_logps", poisoned)
    out = train(snapshot, str(tiny_lm), tmp_path / "ckpt", sail_spec(r=1.0), iteration=1,
                register=False)
    assert out.nonfinite == 1
    assert math.isfinite(out.history[0]["loss"])
    weights = load_file(out.checkpoint / "model.safetensors")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_other_losses_stop_before_a_non_finite_loss_reaches_the_weights():
    from selm_train.engine import DistInfo

    alone = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    out = LossOutput(torch.tensor([0.5, float("nan")]), {})
    with pytest.raises(SelmError, match=r"step 3: 1 of 2 losses are not finite.*learning_rate"):
        _stop_if_nonfinite(out, 3, alone)
    _stop_if_nonfinite(LossOutput(torch.tensor([0.5, 0.7]), {}), 3, alone)


@pytest.mark.slow
def test_policy_routes_need_a_snapshot_with_a_policy_pair(tiny_lm, tmp_path, store):
    from helpers import chain_rows

    require("deepspeed", "'selm[train]'")
    rows = chain_rows(1, 4)
    for table in ("prompts", "responses", "judgments", "pairs"):
        store.append(table, rows[table])
    export(store, 1, name="plain")
    with pytest.raises(SelmError, match=r"no policy pair.*pairing.rule sail"):
        train(f"{store.root}@plain", str(tiny_lm), tmp_path / "c", sail_spec(g=0.3),
              iteration=1)


def test_manifest_refuses_policy_routes_without_sail_pairs(tmp_path):
    d = manifest_dict(tmp_path, Path("org/tiny-lm"), Path("org/tiny-rm"))
    d["train"] = {"loss": "sail", "beta": 0.1, "sail": {"p": 0.3}}
    with pytest.raises(ValueError, match=r"SAIL-PP or SAIL-PR.*pairing.rule 'sail'"):
        Manifest.model_validate(d)
    d["train"]["sail"] = {"r": 0.4}  # SAIL-DP needs only the dataset pair
    assert Manifest.model_validate(d).train.sail.r == 0.4
    with pytest.raises(ValueError, match="sum to at most 1"):
        SailSpec(r=0.5, p=0.3, g=0.3)


def test_plan_shows_each_iterations_routes():
    from typer.testing import CliRunner

    from selm_train.cli import app

    demo = Path(__file__).resolve().parents[2] / "manifests" / "sail-demo.yaml"
    result = CliRunner().invoke(app, ["plan", "-m", str(demo)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "sail" in line and "│" in line]
    assert len(rows) == 2 and all("dp 0.4 pp 0.3 pr 0.3" in row for row in rows)
