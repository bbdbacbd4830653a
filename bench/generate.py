"""Benchmark: the build's generation stage on vLLM against raw `vllm.LLM.chat`.

Same engine (one `vllm.LLM`, loaded once and shared), same model (the bundled SmolLM2-135M-
Instruct, converted to safetensors), same prompts (the first N bundled UltraFeedback prompts),
same sampling (greedy, `--max-tokens`). Timed:

- raw: `llm.chat(conversations, SamplingParams(...))`, which is how a vLLM user generates
  chat responses: vLLM applies the chat template and runs all prompts in one call.
- selm: `build(manifest, 1, store, generator=VLLMGenerator(...), ranker=DoubleRanker())` into a
  fresh store: loading the source, ids, rendering and tokenising prompts, the same one engine
  call, and every store write (prompts, responses, judgments, pairs). The ranker is the test
  double of bench/overhead.py (scores by a hash of the text, at once), so the time is
  generation and our overhead around it.

Tokens/s = each side's completion tokens / its wall seconds. The prefix cache is emptied before
every run, so no run reuses another's prompts (a build sees each prompt once). Both sides feed
the engine the same prompt tokens (checked); their texts are compared and the count of equal
ones printed: vLLM's CPU build in bf16 is not bit-reproducible between calls (two identical raw
calls differed on 2 of 64 prompts with the prefix cache on). Runs alternate raw/selm,
`--repeats` each; medians. Goal: selm at least 0.9 of raw tokens/s.

Also timed on the same engine, without the store (issue 14): the whole list of requests as
one stream (`VLLMGenerator.stream`, the build's generation phase: every request enters the
engine at once and results are taken as they finish) against the path builds took before,
one `generate` call per chunk of `--chunk` prompts, each call draining the engine to its
longest generation before the next starts.

Run: python bench/generate.py [--prompts 64] [--max-tokens 96] [--repeats 3] [--chunk 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl
from overhead import DoubleRanker

from selm_data.builder.iteration import build
from selm_data.generation.backends import GenerationRequest, VLLMGenerator, requests_for
from selm_data.generation.models import resolve_policy
from selm_data.manifest import BUNDLED_DATA, GenerationSpec, Manifest, PolicySpec, VllmSpec
from selm_data.store.store import RunInfo, open_store

GOAL = 0.9
MODEL = "bundled:smollm2-135m-instruct"


def raw_run(gen: VLLMGenerator, conversations: list, max_tokens: int) -> tuple[float, list]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    gen.llm.reset_prefix_cache()
    t0 = time.perf_counter()
    outputs = gen.llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    # prompt_token_ids is None only for a prompt given as embeddings
    return seconds, [(o.outputs[0].text.strip(), len(o.prompt_token_ids or ()),
                      len(o.outputs[0].token_ids)) for o in outputs]


def chunked_run(gen: VLLMGenerator, requests: list[GenerationRequest],
                chunk: int) -> tuple[float, int]:
    """Before issue 14: one engine call per chunk; each call waits for its longest request."""
    gen.llm.reset_prefix_cache()
    t0 = time.perf_counter()
    results = [r for start in range(0, len(requests), chunk)
               for r in gen.generate(requests[start:start + chunk])]
    seconds = time.perf_counter() - t0
    assert all(r.status == "ok" for r in results)
    return seconds, sum(r.completion_tokens or 0 for r in results)


def stream_run(gen: VLLMGenerator, requests: list[GenerationRequest]) -> tuple[float, int]:
    """The build's generation phase: all requests in one stream."""
    gen.llm.reset_prefix_cache()
    t0 = time.perf_counter()
    results = [r for _, r in gen.stream(requests)]
    seconds = time.perf_counter() - t0
    assert all(r.status == "ok" for r in results) and len(results) == len(requests)
    return seconds, sum(r.completion_tokens or 0 for r in results)


def selm_run(gen: VLLMGenerator, source: Path, root: Path, max_tokens: int) -> tuple[float, list]:
    store_path = root / "store"
    shutil.rmtree(store_path, ignore_errors=True)
    manifest = Manifest.model_validate({
        "name": "bench-generate", "store": str(store_path),
        "source": {"path": str(source), "layout": "flat"},
        "policy": {"model": MODEL},
        "generation": {"backend": "vllm", "max_tokens": max_tokens},
        "ranker": {"kind": "demo"},  # unused: the double below ranks
        "iterations": 1,
    })
    store = open_store(store_path, create=True, run=RunInfo.new("bench generate"))
    gen.llm.reset_prefix_cache()
    t0 = time.perf_counter()
    report = build(manifest, 1, store, generator=gen, ranker=DoubleRanker())
    seconds = time.perf_counter() - t0
    assert report.generated == report.prompts and not report.failed, report
    rows = (store.scan("responses").filter(pl.col("origin") == "policy")
            .join(store.scan("prompts").select("prompt_id", "source_row"), on="prompt_id")
            .sort("source_row").select("text", "prompt_tokens", "completion_tokens").collect())
    return seconds, list(rows.iter_rows())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=16, help="prompts a call, chunked path")
    args = parser.parse_args()

    rows = [json.loads(line) for line in
            (BUNDLED_DATA / "ultrafeedback_binarized_1000.jsonl").read_text().splitlines()]
    rows = rows[:args.prompts]
    root = Path(tempfile.mkdtemp(prefix="selm-bench-generate-"))
    source = root / "source.jsonl"
    source.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")})
                              + "\n" for r in rows))
    conversations = [[{"role": "user", "content": r["prompt"]}] for r in rows]

    model = resolve_policy(MODEL)
    spec = VllmSpec(enforce_eager=True, cpu_kvcache_space_gib=2, max_model_len=2048,
                    enable_chunked_prefill=False)
    gen = VLLMGenerator(model.path, policy=PolicySpec(model=MODEL), revision=None, spec=spec,
                        seed=0)
    raw_run(gen, conversations[:4], 8)  # warm-up: first-call allocations on both paths
    requests = requests_for(GenerationSpec(backend="vllm", max_tokens=args.max_tokens),
                            [(str(i), c) for i, c in enumerate(conversations)])
    raw_tps, selm_tps, raw_s, selm_s = [], [], [], []
    chunk_tps, stream_tps = [], []
    try:
        for rep in range(args.repeats):
            seconds, raw_out = raw_run(gen, conversations, args.max_tokens)
            raw_s.append(seconds)
            raw_tps.append(sum(n for *_, n in raw_out) / seconds)
            seconds, selm_out = selm_run(gen, source, root, args.max_tokens)
            selm_s.append(seconds)
            selm_tps.append(sum(n for *_, n in selm_out) / seconds)
            assert [p for _, p, _ in selm_out] == [p for _, p, _ in raw_out], "prompt tokens"
            seconds, n = chunked_run(gen, requests, args.chunk)
            chunk_tps.append(n / seconds)
            seconds, n = stream_run(gen, requests)
            stream_tps.append(n / seconds)
            same = sum(a[0] == b[0] for a, b in zip(raw_out, selm_out, strict=True))
            print(f"  repeat {rep + 1}/{args.repeats}: raw {raw_s[-1]:.2f} s "
                  f"({raw_tps[-1]:.1f} tok/s), selm {selm_s[-1]:.2f} s ({selm_tps[-1]:.1f} "
                  f"tok/s), same text {same}/{len(raw_out)}; chunks of {args.chunk} "
                  f"{chunk_tps[-1]:.1f} tok/s, one stream {stream_tps[-1]:.1f} tok/s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    tokens = sum(n for *_, n in raw_out)
    ratio = statistics.median(selm_tps) / statistics.median(raw_tps)
    threads = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    print(f"\n{args.prompts} prompts, {tokens} completion tokens, greedy, max_tokens "
          f"{args.max_tokens}, VLLM_CPU_OMP_THREADS_BIND={threads}")
    print("| path | median s | tokens/s |\n|---|---|---|")
    print(f"| raw `LLM.chat` | {statistics.median(raw_s):.2f} | "
          f"{statistics.median(raw_tps):.1f} |")
    print(f"| selm build (generation + store) | {statistics.median(selm_s):.2f} | "
          f"{statistics.median(selm_tps):.1f} |")
    print(f"ratio {ratio:.3f} of raw tokens/s (goal at least {GOAL}): "
          f"{'pass' if ratio >= GOAL else 'FAIL'}")
    print(f"\n| engine calls (no store) | tokens/s |\n|---|---|\n"
          f"| one call per chunk of {args.chunk} prompts (before) | "
          f"{statistics.median(chunk_tps):.1f} |\n"
          f"| one stream of all {args.prompts} (the build now) | "
          f"{statistics.median(stream_tps):.1f} |")
    print(f"stream / chunked: {statistics.median(stream_tps) / statistics.median(chunk_tps):.3f}")
    print(f"all runs, s: raw {[round(s, 2) for s in raw_s]}, selm {[round(s, 2) for s in selm_s]}")


if __name__ == "__main__":
    main()
