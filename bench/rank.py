"""Benchmark: PairRMRanker.score against the paper's Blender.rank call, same model and inputs.

What is measured, in one run on one loaded model (medians over `--repeats`, the two methods
alternating so that a noisy neighbour slows both alike):

- baseline: `blender.rank(prompts, candidates, return_scores=True, batch_size=8)`, exactly as the
  SELM code calls it (`scripts/online_feedback.py`), on the Blender that PairRMRanker wraps;
- ours: `PairRMRanker.score(requests)` with `batch_size` 8: the same collation, the same
  `_forward`, regrouped into length-sorted forwards (see selm_data/rankers/pairrm.py).
Reported: seconds each, the ratio ours / baseline, how many prompts get the identical ranking
(`pairing.ranks` of both score lists), the largest score difference, and the tokens each method
pushes through the model, padding included (counted from the same collated batches).

Model: no PairRM weights can be had here (no Hub), so a PairRM-shaped ranker is built on the
spot: llm-blender's own pair ranker (`load_ranker`, as PairRM's RankerConfig with its 1224 / 412
token limits) over a random DeBERTa-v3 backbone of `--size` (`large` is deberta-v3-large's shape:
24 layers, hidden 1024; `base`, `xsmall` are v3-base's and v3-xsmall's; `mini` is a 6-layer,
384-wide model for quick runs), saved as model.safetensors and loaded through
`load_pairrm(folder)` (`Blender().loadranker`). The tokenizer is a sentencepiece unigram model
(`--vocab` pieces, DeBERTa-v3's special pieces) trained on the bundled UltraFeedback rows, so
texts split into about as many tokens as with DeBERTa-v3's own. Random weights rank nonsense but
cost what trained weights cost.

Inputs: the first `--prompts` rows of the bundled UltraFeedback slice
(selm_data/data/ultrafeedback_binarized_1000.jsonl): the prompt, and candidates (y_ref, y_w,
y_l) = (the previous row's chosen answer, chosen, rejected). y_ref is another row's answer: a
real response of realistic length where a policy's would be.

Run: python bench/rank.py [--size mini|xsmall|base|large|tiny] [--prompts 8] [--repeats 3]
     [--vocab 16000] [--workdir DIR]
(On 2 shared CPU cores `--size mini` takes about 8 minutes; `large` wants a GPU: `--device cuda`.)
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selm_data.builder.pairing import ranks
from selm_data.manifest import BUNDLED_DATA
from selm_data.rankers.base import RankRequest
from selm_data.rankers.pairrm import PairRMRanker, import_llm_blender, load_pairrm, render_prompt

ROWS = BUNDLED_DATA / "ultrafeedback_binarized_1000.jsonl"
BATCH_SIZE = 8  # the paper's (Blender.rank's default, as online_feedback.py calls it)
SIZES = {  # layers, hidden, heads, intermediate
    "large": (24, 1024, 16, 4096),  # microsoft/deberta-v3-large, PairRM's backbone
    "base": (12, 768, 12, 3072),  # microsoft/deberta-v3-base
    "xsmall": (12, 384, 6, 1536),  # microsoft/deberta-v3-xsmall
    "mini": (6, 384, 6, 1536),  # half of xsmall: for quick runs on 2 cores
    "tiny": (2, 64, 2, 128),  # smoke tests of this script only
}
# PairRM's RankerConfig (llm-blender/PairRM config.json), but model_name: the local backbone.
PAIRRM_CONFIG = {
    "ranker_type": "pairranker", "model_type": "deberta", "source_maxlength": 1224,
    "candidate_maxlength": 412, "n_tasks": 1, "num_pos": 5, "num_neg": 5,
    "sub_sampling_mode": "all_pair", "sub_sampling_ratio": 0.4, "loss_type": "instructgpt",
    "reduce_type": "linear", "inference_mode": "bubble", "drop_out": 0.05, "fp16": True,
}


def load_rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in ROWS.read_text().splitlines()]


def requests_from(rows: list[dict[str, str]], n: int) -> list[RankRequest]:
    """(previous row's chosen, chosen, rejected) for the first n rows."""
    return [RankRequest([{"role": "user", "content": r["prompt"]}],
                        [rows[k - 1]["chosen"], r["chosen"], r["rejected"]])
            for k, r in enumerate(rows[:n])]


def build_ranker(root: Path, size: str, vocab: int, rows: list[dict[str, str]]) -> Path:
    """A PairRM-shaped ranker folder over a random DeBERTa-v3 backbone of `size`."""
    import safetensors.torch
    import sentencepiece as spm
    import torch
    from transformers import DebertaV2Config, DebertaV2Model

    backbone, folder = root / "backbone", root / "ranker"
    backbone.mkdir()
    folder.mkdir()
    lines = [line for r in rows for k in ("prompt", "chosen", "rejected")
             for line in r[k].splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab,
        model_type="unigram", pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]",
        bos_piece="[CLS]", eos_piece="[SEP]", unk_piece="[UNK]",
        user_defined_symbols=["[MASK]"], minloglevel=2)
    (backbone / "spm.model").write_bytes(model.getvalue())
    (backbone / "tokenizer_config.json").write_text(
        '{"do_lower_case": false, "vocab_type": "spm"}')
    layers, hidden, heads, inter = SIZES[size]
    # keys that DebertaV2Config takes through **kwargs, not as declared parameters
    v3_keys: dict[str, Any] = {"position_buckets": 256, "norm_rel_ebd": "layer_norm",
                               "share_att_key": True}
    config = DebertaV2Config(  # deberta-v3's attention settings (its config.json)
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=inter, relative_attention=True,
        position_biased_input=False, pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
        type_vocab_size=0, pad_token_id=0, **v3_keys)
    torch.manual_seed(0)
    DebertaV2Model(config).save_pretrained(backbone)
    llm_blender = import_llm_blender()
    from llm_blender.blender.blender_utils import load_ranker

    ranker_config = llm_blender.RankerConfig(**PAIRRM_CONFIG, model_name=str(backbone))
    ranker, _, _ = load_ranker(ranker_config)
    safetensors.torch.save_model(ranker, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(ranker_config.to_json(indent=2))
    return folder


def padded_tokens(ranker: PairRMRanker, requests: list[RankRequest]) -> tuple[int, int, int]:
    """Tokens through the model: (real, baseline incl. padding, ours incl. padding).

    Baseline: for each batch of `batch_size` requests and each ordered pair, one forward of its
    rows padded to the longest. Ours: the forwards `_chunks` makes of the distinct inputs."""
    index, pairs = ranker._pairs(requests)
    real = sum(len(pairs[k]) for k in index[index >= 0])
    baseline = 0
    for start in range(0, len(requests), ranker.batch_size):
        block = index[start:start + ranker.batch_size]
        n = block.shape[1]
        for i in range(n):
            for j in range(n):
                if i != j:
                    baseline += len(block) * max(len(pairs[k]) for k in block[:, i, j])
    ours = sum(len(chunk) * len(pairs[chunk[0]]) for chunk in ranker._chunks(pairs))
    return real, baseline, ours


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall s, CPU s of this process): CPU seconds well under cores x wall mean that
    other work had the cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="mini")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=16_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir in /tmp")
    args = parser.parse_args()

    rows = load_rows()
    requests = requests_from(rows, args.prompts)
    root = Path(tempfile.mkdtemp(prefix="selm-bench-rank-", dir=args.workdir))
    try:
        folder, build_s, _ = timed(lambda: build_ranker(root, args.size, args.vocab, rows))
        ranker, load_s, _ = timed(lambda: load_pairrm(str(folder), None, BATCH_SIZE,
                                                      device=args.device))
        print(f"built the ranker in {build_s:.1f} s, loaded in {load_s:.1f} s", flush=True)
        prompts = [render_prompt(r.messages) for r in requests]
        candidates = [r.candidates for r in requests]
        baseline_s, ours_s, baseline_cpu, ours_cpu = [], [], [], []
        for rep in range(args.repeats):
            theirs, t, c = timed(lambda: ranker.blender.rank(
                prompts, candidates, return_scores=True, batch_size=BATCH_SIZE,
                disable_tqdm=True))
            baseline_s.append(t)
            baseline_cpu.append(c)
            ours, t, c = timed(lambda: ranker.score(requests))
            ours_s.append(t)
            ours_cpu.append(c)
            print(f"repeat {rep + 1}/{args.repeats}: baseline {baseline_s[-1]:.1f} s "
                  f"({baseline_cpu[-1]:.1f} s CPU), ours {ours_s[-1]:.1f} s "
                  f"({ours_cpu[-1]:.1f} s CPU)", flush=True)
        tokens = padded_tokens(ranker, requests)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    theirs = theirs.tolist()
    same = sum(ranks(a) == ranks(b) for a, b in zip(ours, theirs, strict=True))
    diff = max(abs(a - b) for x, y in zip(ours, theirs, strict=True)
               for a, b in zip(x, y, strict=True))
    base, mine = statistics.median(baseline_s), statistics.median(ours_s)
    layers, hidden, _, _ = SIZES[args.size]
    print(f"\nPairRM-shaped ranker, backbone {args.size} ({layers} layers, hidden {hidden}), "
          f"{args.prompts} prompts x 3 candidates, batch_size {BATCH_SIZE}, {args.device}; "
          f"medians of {args.repeats}")
    print("| method | median s | runs s | median CPU s | tokens through the model "
          "(padding incl.) |")
    print("|---|---|---|---|---|")
    for method, wall, cpu, n in (("Blender.rank (baseline)", baseline_s, baseline_cpu, tokens[1]),
                                 ("PairRMRanker.score (ours)", ours_s, ours_cpu, tokens[2])):
        print(f"| {method} | {statistics.median(wall):.2f} | "
              f"{' / '.join(f'{t:.2f}' for t in wall)} | {statistics.median(cpu):.2f} | {n:,} |")
    print(f"\nratio ours / baseline: {mine / base:.2f}x wall, "
          f"{statistics.median(ours_cpu) / statistics.median(baseline_cpu):.2f}x CPU")
    print(f"identical rankings: {same} / {len(requests)}; largest score difference {diff:.2e}")
    print(f"real tokens (no padding): {tokens[0]:,}")


if __name__ == "__main__":
    main()
