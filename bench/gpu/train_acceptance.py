"""GPU acceptance of selm-train: what the CPU tests cannot show, on the first machine with GPUs.

No Hub: the model is built on the spot from a Llama config (random weights, safetensors, the
bundled SmolLM2 tokenizer; default ~1.3B parameters with Llama-3's 128k vocabulary) and the
pairs are the bundled UltraFeedback rows (bench/train_step.py's setup). Checks, each a real
`selm-train` run in its own processes under torchrun on every GPU (or --gpus):

  selm-zero3   SELM at ZeRO-3, bf16, gradient checkpointing: finite losses, step 1 = log 2
               (policy = reference), the checkpoint loads; peak GPU memory and step time.
  lora         the same with LoRA (r 16, all linear layers): also a merged plain checkpoint
               and its adapter/.
  offload      the same as selm-zero3 with train.offload optimizer+params (ZeRO-Offload).
  loop         `selm-train loop`, one iteration: build (vLLM if installed, else transformers;
               the bundled demo ranker), export, train, each phase a process: the train phase
               must start on a free GPU (it would OOM or vLLM would refuse otherwise), and the
               checkpoint is registered.

Prints one line per check (PASS / FAIL, peak GiB, median step s) and a table; exits 1 when any
check failed, 2 when there is no GPU. Run: bash bench/gpu/train_acceptance.sh [--gpus N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=0, help="0: every GPU of the machine")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these checks (selm-zero3 lora offload loop)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run on CPU (one process): a smoke test of this script itself, "
                        "with --hidden 64 --layers 2 --vocab 0 --max-length 128 --pairs 16")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("FAIL: no CUDA GPU visible to torch; this script checks selm-train on GPUs")
        return 2
    gpus = args.gpus or max(1, torch.cuda.device_count())
    root = args.workdir or Path(tempfile.mkdtemp(prefix="selm-train-acceptance-"))
    root.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke test)"
    print(f"workdir {root}; {gpus} process(es) on {where}", flush=True)

    import train_step  # bench/train_step.py: the model and the snapshot, built on the spot

    setup_args = argparse.Namespace(hidden=args.hidden, layers=args.layers, vocab=args.vocab,
                                    pairs=args.pairs, ref="ranked")
    started = time.perf_counter()
    snapshot, model = train_step.setup(root, setup_args)
    params = _count_params(model)
    print(f"model {model}: {params / 1e9:.2f}B parameters, built in "
          f"{time.perf_counter() - started:.0f} s", flush=True)

    global_batch = args.micro * gpus * 2  # two accumulation steps
    base = {"loss": "selm", "beta": 0.1, "alpha": 0.001, "learning_rate": 1e-6,
            "lr_scheduler": "constant", "warmup_ratio": 0.0, "global_batch_size": global_batch,
            "micro_batch_size": args.micro, "max_length": args.max_length,
            "max_prompt_length": args.max_length // 2, "zero_stage": 3, "precision": "bf16",
            "gradient_checkpointing": True, "gpus": gpus}
    checks = {
        "selm-zero3": base,
        "lora": {**base, "lora": {"r": 16, "alpha": 32, "dropout": 0.05,
                                  "target_modules": "all-linear"}},
        "offload": {**base, "offload": "optimizer+params"},
    }
    results = []
    for name, train in checks.items():
        if args.only is None or name in args.only:
            results.append(_train_check(name, train, root, snapshot, model, gpus))
    if args.only is None or "loop" in args.only:
        results.append(_loop_check(base, root, model, gpu=torch.cuda.is_available()))

    print("\n| check | result | peak GPU GiB (rank 0) | median step s | notes |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['check']} | {'PASS' if r['ok'] else 'FAIL'} | {r.get('peak', '-')} | "
              f"{r.get('step', '-')} | {r['notes']} |")
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"\n{params / 1e9:.2f}B-parameter Llama (vocabulary {args.vocab}), {gpus} GPU(s), "
          f"max length {args.max_length}, micro-batch {args.micro}, global batch "
          f"{global_batch}: " + (f"FAILED: {', '.join(failed)}" if failed else "all passed"))
    return 1 if failed else 0


def _train_check(name: str, train: dict, root: Path, snapshot: str, model: Path,
                 gpus: int) -> dict:
    manifest = root / f"{name}.yaml"
    manifest.write_text(json.dumps({
        "name": name, "store": snapshot.split("@")[0], "source": {"path": "unused.jsonl"},
        "policy": {"model": str(model)}, "iterations": 1, "train": train}))
    out = root / f"out-{name}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={gpus}", "-m", "selm_train.cli", "train", "--snapshot", snapshot,
           "--manifest", str(manifest), "--policy", str(model), "--output", str(out),
           "--no-register", "--json-log"]
    print(f"\n== {name}: {' '.join(cmd[3:])}", flush=True)
    proc = _run(cmd, root / f"{name}.log")
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"')]
    notes: list[str] = []  # what was seen
    problems: list[str] = []  # what fails the check
    if proc.returncode != 0:
        problems.append(f"exit {proc.returncode}: " + _last_error(proc.stdout))
    elif not rows:
        problems.append("no step logged")
    if rows:
        losses = [r["loss"] for r in rows]
        if not all(math.isfinite(x) for x in losses):
            problems.append(f"non-finite loss {losses}")
        if abs(losses[0] - math.log(2)) > 0.02:
            problems.append(f"step 1 loss {losses[0]:.4f}, expected log 2")
        notes.append(f"{len(rows)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if not problems:
        files = {p.name for p in out.iterdir()}
        if not any(f.endswith(".safetensors") for f in files) or "config.json" not in files:
            problems.append(f"checkpoint incomplete: {sorted(files)}")
        if "lora" in train and not (out / "adapter" / "adapter_config.json").is_file():
            problems.append("no adapter/ in the LoRA checkpoint")
    ok = not problems
    notes = problems + notes
    result = {"check": name, "ok": ok, "notes": "; ".join(notes)}
    if rows and "memory/peak_gib" in rows[-1]:
        result["peak"] = f"{max(r['memory/peak_gib'] for r in rows):.1f}"
    if len(rows) > 1:
        result["step"] = f"{statistics.median(r['time/step_s'] for r in rows[1:]):.2f}"
    print(f"{'PASS' if ok else 'FAIL'} {name}: {result}", flush=True)
    return result


def _loop_check(train: dict, root: Path, model: Path, *, gpu: bool) -> dict:
    from selm_data.manifest import BUNDLED_DATA

    try:
        import vllm  # noqa: F401

        backend = "vllm" if gpu else "transformers"
    except ImportError:
        backend = "transformers"
    data = root / "loop-data.jsonl"
    data.write_text("\n".join((BUNDLED_DATA / "ultrafeedback_binarized_1000.jsonl")
                              .read_text().splitlines()[:32]) + "\n")
    manifest = root / "loop.yaml"
    manifest.write_text(json.dumps({
        "name": "loop", "store": str(root / "loop-store"), "source": {"path": str(data)},
        "policy": {"model": str(model)},
        "generation": {"backend": backend, "max_tokens": 64, "batch_size": 32},
        "ranker": {"kind": "demo"}, "iterations": 1, "commit_every": 32,
        "train": {**train, "global_batch_size": train["micro_batch_size"] * train["gpus"]}}))
    cmd = [sys.executable, "-m", "selm_train.cli", "loop", "--manifest", str(manifest)]
    print(f"\n== loop ({backend} generation): {' '.join(cmd[1:])}", flush=True)
    proc = _run(cmd, root / "loop.log")
    ok = proc.returncode == 0 and "iteration 1: checkpoint" in proc.stdout
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"')]
    result = {"check": "loop", "ok": ok,
              "notes": (f"build ({backend}), export, train as processes; {len(rows)} steps"
                        if ok else f"exit {proc.returncode}: " + _last_error(proc.stdout))}
    if rows and "memory/peak_gib" in rows[-1]:
        result["peak"] = f"{max(r['memory/peak_gib'] for r in rows):.1f}"
    print(f"{'PASS' if ok else 'FAIL'} loop: {result}", flush=True)
    return result


def _run(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "COLUMNS": "200"}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=REPO)
    log.write_text(proc.stdout)
    print(f"   exit {proc.returncode}, log {log}", flush=True)
    return proc


def _last_error(output: str) -> str:
    lines = output.strip().splitlines()
    errors = [x for x in lines if "rror" in x]
    return (errors or lines or [""])[-1][:300]


def _count_params(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(f.get_slice(key).get_shape())
    return total


if __name__ == "__main__":
    sys.exit(main())
