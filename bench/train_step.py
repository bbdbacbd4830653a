"""Benchmark: a training step of selm-train (DPO and SELM) against TRL's DPOTrainer.

Same model (a random Llama of `--hidden` x `--layers` with the bundled SmolLM2 tokenizer and
chat template), same pairs (`--pairs` bundled UltraFeedback rows, y_ref the reversed chosen
answer, exported as a `trl`-layout snapshot that both read; `--ref ranked`, the default, makes
y_ref the chosen answer of a third of the pairs, the rejected of a third, and neither of the
rest, as a ranker that knows nothing would, and near the demo build's 69-72% of y_ref that became
chosen or rejected; `--ref middle` keeps it apart in every pair, the worst case for SELM),
same batch (micro-batch `--micro`, `--accum` accumulation steps), same max length, fp32 on CPU,
constant learning rate. TRL precomputes its reference log-probs too
(`precompute_ref_log_probs=True`), as selm does, so both time only the policy's steps.

Each variant runs in its own process (so peak memory is its own): selm DPO, selm SELM, TRL DPO.
A step's time is the wall time between the ends of consecutive optimizer steps (the first
step, which pays one-off costs, is left out), and the process CPU time over the same span (with
`--threads 1`, the work itself, which a busy shared machine inflates far less than wall time);
medians over the steps of `--repeats` processes.
Goals: selm DPO / TRL DPO at most 1.0; selm SELM / selm DPO at most 1.35.

Peak memory (the process's peak RSS, model and all): selm DPO / TRL DPO at most 0.5 where the
logits dominate (`--vocab 128256 --max-length 2048`: selm never holds (rows, length, vocab)
logits, selm_train/logps.py; TRL does).

Run: python bench/train_step.py [--pairs 48] [--steps 6] [--repeats 2] [--hidden 256]
     [--ref ranked|middle] [--vocab 128256] [--max-length 2048]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

GOALS = {"selm dpo / trl dpo": 1.0, "selm selm / selm dpo": 1.35}
VARIANTS = ("selm-dpo", "selm-selm", "trl-dpo")


def setup(root: Path, args: argparse.Namespace) -> tuple[str, Path]:
    import json as _json

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from selm_data.generation.models import resolve_policy
    from selm_data.manifest import BUNDLED_DATA
    from selm_data.publish.snapshot import export
    from selm_data.store.schema import RESPONSES, content_id, row_id
    from selm_data.store.store import RunInfo, open_store

    tok = AutoTokenizer.from_pretrained(resolve_policy("bundled:smollm2-135m-instruct").path)
    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(vocab_size=max(args.vocab, len(tok)), hidden_size=args.hidden,
                         intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         head_dim=args.hidden // heads, max_position_embeddings=4096,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)

    store = open_store(root / "store", create=True, run=RunInfo.new("bench train_step"))
    lines = (BUNDLED_DATA / "ultrafeedback_binarized_1000.jsonl").read_text().splitlines()
    prompts, responses, judgments, pairs = [], [], [], []
    for i, line in enumerate(lines[:args.pairs]):
        row = _json.loads(line)
        messages = [{"role": "user", "content": row["prompt"]}]
        pid = content_id("prompts", {"messages": messages})
        prompts.append({"prompt_id": pid, "iteration": 1, "messages": messages,
                        "source": "bench", "source_row": i})
        ids = []
        for origin, text in (("policy", " ".join(row["chosen"].split()[::-1])),
                             ("dataset_chosen", row["chosen"]),
                             ("dataset_rejected", row["rejected"])):
            r = {"prompt_id": pid, "iteration": 1, "origin": origin, "sample_index": 0,
                 "status": "ok", "text": text}
            r["response_id"] = row_id(RESPONSES, r)
            responses.append(r)
            ids.append(r["response_id"])
        ranking = content_id("ranking", {"candidates": ids})
        for pos, (rid, score) in enumerate(zip(ids, (0.5, 1.0, -1.0), strict=True)):
            judgments.append({"ranking_id": ranking, "prompt_id": pid, "iteration": 1,
                              "response_id": rid, "position": pos, "n_candidates": 3,
                              "score": score, "rank": pos + 1, "ranker": "bench"})
        # where y_ref landed: best, worst or between (one in three each, as a ranker that
        # knows nothing would place it), or always between (`--ref middle`: the worst case)
        place = "middle" if args.ref == "middle" else ("best", "worst", "middle")[i % 3]
        chosen, rejected = {"best": (0, 2), "worst": (1, 0), "middle": (1, 2)}[place]
        origins = ("policy", "dataset_chosen", "dataset_rejected")
        pairs.append({"prompt_id": pid, "iteration": 1, "ranking_id": ranking,
                      "rule": "best_worst", "chosen_id": ids[chosen],
                      "rejected_id": ids[rejected], "ref_id": ids[0], "chosen_score": 1.0,
                      "rejected_score": -1.0, "margin": 2.0, "is_tie": False,
                      "chosen_origin": origins[chosen], "rejected_origin": origins[rejected]})
    for table, rows in (("prompts", prompts), ("responses", responses),
                        ("judgments", judgments), ("pairs", pairs)):
        store.append(table, rows)
    export(store, 1, name="bench", layout="trl")
    return f"{store.root}@bench", model_dir


def child(variant: str, root: Path, args: argparse.Namespace) -> dict:
    snapshot, model_dir = f"{root / 'store'}@bench", root / "model"
    marks: list[float] = []
    cpu: list[float] = []  # process CPU time (all threads) at the same marks
    if variant.startswith("selm-"):
        from selm_data.manifest import Loss, TrainSpec
        from selm_train.train import train

        loss = cast("Loss", variant.split("-")[1])  # the variants name only these losses
        spec = TrainSpec(loss=loss, beta=0.1, alpha=0.001 if loss == "selm" else 0.0,
                         learning_rate=1e-5, lr_scheduler="constant", warmup_ratio=0.0,
                         global_batch_size=args.micro * args.accum,
                         micro_batch_size=args.micro, max_length=args.max_length,
                         max_prompt_length=args.max_length // 2, epochs=99, zero_stage=0)
        marks.append(time.perf_counter())
        cpu.append(time.process_time())

        class Stop(Exception):
            pass

        def on_step(row: dict) -> None:
            marks.append(time.perf_counter())
            cpu.append(time.process_time())
            if len(marks) > args.steps:
                raise Stop

        with contextlib.suppress(Stop):  # stopped after --steps optimizer steps
            train(snapshot, str(model_dir), root / f"out-{variant}", spec, iteration=1,
                  register=False, progress=on_step)
    else:
        from datasets import load_dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import DPOConfig, DPOTrainer

        class Clock(TrainerCallback):
            def on_step_end(self, *a, **k) -> None:
                marks.append(time.perf_counter())
                cpu.append(time.process_time())

        data = load_dataset("parquet", data_files=str(root / "store/exports/bench/data/*"),
                            split="train").select_columns(["prompt", "chosen", "rejected"])
        config = DPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=args.micro,
                           gradient_accumulation_steps=args.accum, max_steps=args.steps,
                           learning_rate=1e-5, lr_scheduler_type="constant", beta=0.1,
                           max_length=args.max_length, precompute_ref_log_probs=True,
                           use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                           logging_strategy="no", dataloader_num_workers=0, seed=0)
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                             args=config, train_dataset=data,
                             processing_class=AutoTokenizer.from_pretrained(model_dir),
                             callbacks=[Clock()])
        trainer.train()
    steps = [b - a for a, b in itertools.pairwise(marks[1:])]
    cpu_steps = [b - a for a, b in itertools.pairwise(cpu[1:])]
    return {"variant": variant, "steps": steps, "cpu_steps": cpu_steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=0,
                        help="output vocabulary (default: the tokenizer's, 49152); e.g. 128256 "
                        "for Llama-3's, where the logits dominate memory")
    parser.add_argument("--ref", choices=("ranked", "middle"), default="ranked")
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--child", choices=VARIANTS)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.workdir, args)), flush=True)
        return
    root = Path(tempfile.mkdtemp(prefix="selm-bench-train-"))
    try:
        setup(root, args)
        results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                 ("pairs", "steps", "micro", "accum", "max_length", "hidden", "layers", "ref",
                  "vocab")]
        env = dict(os.environ)
        if args.threads:  # one thread: CPU time per step is the work, whatever else runs
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        for rep in range(args.repeats):
            for variant in VARIANTS:
                proc = subprocess.run([sys.executable, __file__, "--child", variant,
                                       "--workdir", str(root), *flags],
                                      capture_output=True, text=True, timeout=1800, env=env)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")),
                            None)
                assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-3000:]
                results[variant].append(json.loads(line[7:]))
                shutil.rmtree(root / f"out-{variant}", ignore_errors=True)
                print(f"  repeat {rep + 1}/{args.repeats} {variant}: median step "
                      f"{statistics.median(results[variant][-1]['steps']):.3f} s", flush=True)
        def median(key: str) -> dict[str, float]:
            return {v: statistics.median([s for r in results[v] for s in r[key]])
                    for v in VARIANTS}

        step, cpu = median("steps"), median("cpu_steps")
        peak = {v: max(r["peak_rss_mb"] for r in results[v]) for v in VARIANTS}
        print(f"\n{args.pairs} pairs, micro-batch {args.micro} x {args.accum} accumulation, "
              f"max length {args.max_length}, Llama {args.hidden} x {args.layers}, vocabulary "
              f"{args.vocab or 'of the tokenizer'}, fp32 CPU, "
              f"{args.threads or 'default'} thread(s), y_ref placed: {args.ref}")
        print("| variant | median step s | median step CPU s | peak RSS MB |\n|---|---|---|---|")
        for v in VARIANTS:
            print(f"| {v} | {step[v]:.3f} | {cpu[v]:.3f} | {peak[v]:.0f} |")
        for clock, t in (("wall", step), ("CPU", cpu)):
            ratios = {"selm dpo / trl dpo": t["selm-dpo"] / t["trl-dpo"],
                      "selm selm / selm dpo": t["selm-selm"] / t["selm-dpo"]}
            for name, value in ratios.items():
                verdict = "pass" if value <= GOALS[name] else "FAIL"
                print(f"{clock}: {name}: {value:.2f}x (goal at most {GOALS[name]}x): {verdict}")
        memory = peak["selm-dpo"] / peak["trl-dpo"]
        verdict = (f" (goal at most 0.5x with --vocab: {'pass' if memory <= 0.5 else 'FAIL'})"
                   if args.vocab else "")
        print(f"peak RSS: selm dpo / trl dpo: {memory:.2f}x{verdict}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
