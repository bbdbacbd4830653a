"""Benchmark: seeded sampling in the transformers backend, batched (one torch.Generator a row,
`TransformersGenerator._sample_batch`) against the serial path builds took before issue 14
(each seeded request alone: `torch.manual_seed(seed)` then `model.generate(do_sample=True)`).

Same model (the bundled SmolLM2-135M-Instruct, fp32 on the CPU), the first N bundled
UltraFeedback prompts, temperature 1, top_p 0.95, `--max-tokens`, one sample a prompt with its
own seed. Tokens/s = completion tokens / wall seconds; medians of `--repeats` alternating runs.
Goal: batched at least the serial path's tokens/s.

Run: python bench/seeded.py [--prompts 16] [--max-tokens 64] [--batch-size 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from selm_data.generation.backends import TransformersGenerator, requests_for
from selm_data.generation.models import resolve_policy
from selm_data.manifest import BUNDLED_DATA, GenerationSpec, PolicySpec

MODEL = "bundled:smollm2-135m-instruct"


def serial_run(gen: TransformersGenerator, requests) -> tuple[float, int]:
    """The old path, as it was: one request at a time under the global seed."""
    tokens = 0
    t0 = time.perf_counter()
    for r in requests:
        enc = gen.tokenizer([gen._render(r.messages)], return_tensors="pt",
                            add_special_tokens=False)
        torch.manual_seed(r.sampling.seed)
        with torch.inference_mode():
            out = gen.model.generate(**enc, do_sample=True, temperature=r.sampling.temperature,
                                     top_p=r.sampling.top_p, top_k=None,
                                     max_new_tokens=r.sampling.max_tokens,
                                     pad_token_id=gen.tokenizer.pad_token_id)
        new = out[0, enc.input_ids.shape[1]:].tolist()
        eos = gen.tokenizer.eos_token_id
        tokens += new.index(eos) if eos in new else len(new)
    return time.perf_counter() - t0, tokens


def batched_run(gen: TransformersGenerator, requests) -> tuple[float, int]:
    t0 = time.perf_counter()
    results = gen.generate(requests)
    seconds = time.perf_counter() - t0
    assert all(r.status == "ok" for r in results), results
    return seconds, sum(r.completion_tokens or 0 for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = [json.loads(line) for line in
            (BUNDLED_DATA / "ultrafeedback_binarized_1000.jsonl").read_text().splitlines()]
    prompts = [(str(i), [{"role": "user", "content": r["prompt"]}])
               for i, r in enumerate(rows[:args.prompts])]
    spec = GenerationSpec(backend="transformers", temperature=1.0, top_p=0.95, seed=5,
                          max_tokens=args.max_tokens)
    requests = requests_for(spec, prompts)
    model = resolve_policy(MODEL)
    gen = TransformersGenerator(model.path, policy=PolicySpec(model=MODEL, dtype="float32"),
                                revision=None, batch_size=args.batch_size, device="cpu")
    serial, batched = [], []
    for rep in range(args.repeats):
        s, n = serial_run(gen, requests)
        serial.append(n / s)
        b, m = batched_run(gen, requests)
        batched.append(m / b)
        print(f"  repeat {rep + 1}: serial {s:.1f} s ({serial[-1]:.1f} tok/s), batched {b:.1f} s "
              f"({batched[-1]:.1f} tok/s)", flush=True)
    ratio = statistics.median(batched) / statistics.median(serial)
    print(f"\n{args.prompts} seeded prompts, max_tokens {args.max_tokens}, fp32 CPU, "
          f"{torch.get_num_threads()} threads")
    print("| path | tokens/s |\n|---|---|")
    print(f"| serial (before: one request a call, global seed) | {statistics.median(serial):.1f} |")
    print(f"| batched (batch {args.batch_size}, a generator a row) | "
          f"{statistics.median(batched):.1f} |")
    print(f"ratio {ratio:.2f} (goal at least 1): {'pass' if ratio >= 1 else 'FAIL'}")


if __name__ == "__main__":
    main()
