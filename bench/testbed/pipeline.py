"""One method, one seed: T iterations through selm's real pipeline, measured after each.

Per iteration t, the steps of `selm_train.loop.run_loop`, through the same public
functions: `build(manifest, t, store, ranker=oracle)` (generate y_ref, or SAIL's two samples,
with the policy of t through the manifest's transformers backend; rank with the oracle; pair),
`export(store, t)` (an immutable snapshot), `train(STORE@SNAPSHOT, policy_for(store, m, t),
...)` (selm-train through DeepSpeed; the checkpoint is registered and becomes the policy of
t + 1). run_loop itself is not called only because it takes no ranker argument and the
oracle is not a ranker kind a manifest can name (see README.md here).

After each iteration the checkpoint answers the held-out prompts greedily (selm's
TransformersGenerator, as the build generates y_ref) and the answers are scored with r*.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from selm_data.builder.iteration import build, policy_for
from selm_data.generation.backends import TransformersGenerator, requests_for
from selm_data.manifest import GenerationSpec, Manifest, PolicySpec
from selm_data.publish.snapshot import export
from selm_data.store.store import RunInfo, Store, open_store
from selm_train.loop import checkpoint_folder
from selm_train.train import train
from testbed.policy import MAX_NEW_TOKENS, sample
from testbed.task import OracleRanker, TrueReward

SAIL_TEMPERATURE = 1.0  # SAIL's two policy samples: the policy's own distribution


@dataclass(frozen=True)
class Method:
    """A row of the comparison: a loss and the pairs it trains on."""

    name: str
    loss: str  # dpo | selm | sail
    alpha: float = 0.0  # selm (the public code's convention: the term is alpha*beta*(...))
    sail: dict[str, Any] = field(default_factory=dict)
    rule: str = "best_worst"  # pairing.rule
    pairs: str = "ranked"  # ranked | original (the dataset's own pairs of portion t)


HOOK = {"extra_gradient": "reference_hook"}
METHODS = {m.name: m for m in (
    # iterative DPO: SELM's pairs and SELM's loss at alpha 0, which equals DPO's loss exactly
    # (tests/selm_train/test_losses.py) and also logs y_ref's implicit reward (Figure 4)
    Method("dpo", "selm", alpha=0.0),
    Method("selm-0.0001", "selm", alpha=0.0001),
    Method("selm-0.001", "selm", alpha=0.001),  # the paper's Zephyr recipe
    Method("selm-0.01", "selm", alpha=0.01),
    Method("selm-0.1", "selm", alpha=0.1),
    # SAIL's reference recipes: one route beside plain DPO on the dataset pair (SailSpec).
    # DP trains on the dataset pair alone (relabelled by the policy), so its build samples
    # nothing (`pairs: original`); the extra gradient exists on PP and PR only, so those two
    # run in both forms (score_function, the default, and the reference code's hook).
    Method("sail-dp", "sail", sail={"r": 0.4, "rho": 0.2}, pairs="original"),
    Method("sail-pp", "sail", sail={"p": 0.3, "pi": 0.2}, rule="sail"),
    Method("sail-pp-hook", "sail", sail={"p": 0.3, "pi": 0.2, **HOOK}, rule="sail"),
    Method("sail-pr", "sail", sail={"g": 0.3, "gamma": 0.3}, rule="sail"),
    Method("sail-pr-hook", "sail", sail={"g": 0.3, "gamma": 0.3, **HOOK}, rule="sail"),
    Method("offline-dpo", "dpo", pairs="original"),  # the dataset's own pairs, every iteration
)}


@dataclass(frozen=True)
class Settings:
    """The size of a run (run.py's full setting; --quick shrinks it). Chosen so that iterative
    DPO, the baseline, improves r* in iteration 1 without collapsing (calibrated on DPO only;
    README.md here): beta 0.5 (answers are ~9 tokens, so a margin of a few nats is already
    decisive), AdamW at 5e-4, cosine with 10% warmup, 2 epochs of 16 steps."""

    iterations: int = 3
    prompts_per_iteration: int = 512  # 3 x 512 training prompts + 256 held out of 2,024
    eval_prompts: int = 256
    beta: float = 0.5
    learning_rate: float = 5e-4
    epochs: int = 2
    global_batch: int = 32
    sft_steps: int = 1000  # the base policy's supervised fit (policy.fit_base)


def manifest(method: Method, settings: Settings, *, seed: int, base: Path, data: Path,
             folder: Path) -> Manifest:
    """The run's whole recipe, validated by selm's own schema."""
    sail = method.rule == "sail"
    generation: dict[str, Any] = {"backend": "transformers", "max_tokens": MAX_NEW_TOKENS,
                                  "batch_size": 128}
    if sail:  # two seeded samples a prompt
        generation |= {"temperature": SAIL_TEMPERATURE, "n": 2, "seed": seed}
    train_spec: dict[str, Any] = {
        "loss": method.loss, "beta": settings.beta, "alpha": method.alpha,
        "learning_rate": settings.learning_rate, "lr_scheduler": "cosine", "warmup_ratio": 0.1,
        "epochs": settings.epochs, "global_batch_size": settings.global_batch,
        "micro_batch_size": settings.global_batch,  # one forward a step: tiny sequences
        "max_length": 48, "max_prompt_length": 16,  # prompts are 8 tokens, answers <= 17
        "zero_stage": 0, "precision": "fp32", "seed": seed,
    }
    if method.sail:
        train_spec["sail"] = method.sail
    return Manifest.model_validate({
        "name": f"testbed-{method.name}-s{seed}",
        "store": str(folder / "store"),
        "seed": seed,
        "source": {"path": str(data), "layout": "flat"},
        "portions": {"split": "contiguous"},
        "policy": {"model": str(base), "dtype": "float32"},
        "generation": generation,
        # Not loaded: build() is handed the oracle (OracleRanker), whose name and version the
        # judgments record. A manifest cannot name a Python ranker (README.md here).
        "ranker": {"kind": "reward_model", "model": "testbed/true-reward"},
        "pairing": {"rule": method.rule},
        "train": train_spec,
        "iterations": [{"pairs": method.pairs}] * settings.iterations,
    })


def greedy_answers(model: str | Path, prompts: list[str]) -> list[str]:
    """Greedy answers through selm's transformers backend (as the build makes y_ref)."""
    spec = GenerationSpec(backend="transformers", max_tokens=MAX_NEW_TOKENS, batch_size=128)
    generator = TransformersGenerator(str(model), policy=PolicySpec(model=str(model),
                                      dtype="float32"), revision=None, batch_size=128)
    requests = requests_for(spec, [(f"eval-{i}", [{"role": "user", "content": p}])
                                   for i, p in enumerate(prompts)])
    results = generator.generate(requests)
    failed = [r.error for r in results if r.status != "ok"]
    assert not failed, f"greedy evaluation failed: {failed[:3]}"
    return [r.text or "" for r in results]


def evaluate(model: str | Path, prompts: list[str], reward: TrueReward, *, seed: int) -> dict:
    """r* of the greedy answers (one per held-out prompt), and the mean r* of one sampled
    answer per prompt (temperature 1): the policy's distribution, not only its mode."""
    answers = greedy_answers(model, prompts)
    sampled = sample(Path(model), prompts, seed=seed)
    return {
        "greedy_rewards": [reward(p, a) for p, a in zip(prompts, answers, strict=True)],
        "greedy_lengths": [len(a.split()) for a in answers],
        "greedy_distinct_answers": len(set(answers)),
        "sampled_reward_mean": statistics.fmean(
            reward(p, a) for p, a in zip(prompts, sampled, strict=True)),
        "examples": [[p, a] for p, a in zip(prompts[:3], answers[:3], strict=True)],
    }


def store_stats(store: Store, iteration: int) -> dict:
    """What the iteration's data says, read from the store with polars: how often the policy's
    own answer was ranked first (y_ref won; for SAIL, one of its two samples), its r*, ties."""
    it = pl.col("iteration") == iteration
    judged = store.scan("judgments").filter(it).join(
        store.scan("responses").select("response_id", "origin"), on="response_id")
    # rankings that hold a policy answer (none where the iteration trains on original pairs)
    judged = judged.filter((pl.col("origin") == "policy").any().over("ranking_id"))
    firsts = judged.filter(pl.col("rank") == 1).select(
        (pl.col("origin") == "policy").mean().alias("policy_ranked_first")).collect()
    policy = judged.filter(pl.col("origin") == "policy").select(
        pl.col("score").mean().alias("policy_reward_mean")).collect()
    # the policy's answer (SAIL: the better of its two) against the dataset's chosen y_w
    versus = judged.group_by("ranking_id").agg(
        pl.col("score").filter(pl.col("origin") == "policy").max().alias("policy"),
        pl.col("score").filter(pl.col("origin") == "dataset_chosen").max().alias("chosen"),
    ).select((pl.col("policy") > pl.col("chosen")).mean().alias("policy_beats_chosen")).collect()
    pairs = store.scan("pairs").filter(it & (pl.col("rule") != "sail_policy")).select(
        pl.len().alias("pairs"), pl.col("is_tie").mean().alias("tie_rate"),
        (pl.col("chosen_origin") == "policy").mean().alias("chosen_is_policy"),
        (pl.col("rejected_origin") == "policy").mean().alias("rejected_is_policy"),
        pl.col("margin").mean().alias("margin_mean")).collect()
    return {**firsts.row(0, named=True), **policy.row(0, named=True),
            **versus.row(0, named=True), **pairs.row(0, named=True)}


def run_method(method: Method, settings: Settings, *, seed: int, base: Path, data: Path,
               folder: Path, eval_prompts: list[str], reward: TrueReward) -> dict:
    """Iterations 1..T of `method` into a fresh store under `folder`; the measurements."""
    m = manifest(method, settings, seed=seed, base=base, data=data, folder=folder)
    store = open_store(m.store, create=True, run=RunInfo.new(
        f"bench/testbed/run.py {method.name} seed {seed}", manifest_hash=m.hash(),
        manifest_json=m.canonical_json()))
    ranker = OracleRanker(reward)
    iterations = []
    for t in range(1, settings.iterations + 1):
        clock = time.perf_counter()
        report = build(m, t, store, ranker=ranker)
        built = time.perf_counter()
        snap = export(store, t)
        policy = policy_for(store, m, t)
        result = train(f"{store.root}@{snap.name}", policy,
                       checkpoint_folder(store.root, t, snap.content_hash), m.train_for(t),
                       iteration=t)
        trained = time.perf_counter()
        assert result.checkpoint is not None
        measured = evaluate(result.checkpoint, eval_prompts, reward, seed=seed + 1000 * t)
        iterations.append({
            "iteration": t, "snapshot": snap.name, "snapshot_rows": snap.row_count,
            "policy": policy, "checkpoint": str(result.checkpoint),
            "checkpoint_id": result.checkpoint_id, "steps": result.steps,
            "nonfinite": result.nonfinite,
            "build": {k: v for k, v in asdict(report).items() if k not in ("failed", "unranked")},
            "failed": len(report.failed), "unranked": len(report.unranked),
            "data": store_stats(store, t), "history": result.history, **measured,
            "seconds": {"build": built - clock, "export_train": trained - built,
                        "evaluate": time.perf_counter() - trained},
        })
    return {"method": method.name, "seed": seed, "store": str(store.root),
            "manifest_hash": m.hash(), "ranker": {"name": ranker.name,
                                                  "version": ranker.version},
            "iterations": iterations}
