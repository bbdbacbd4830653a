"""Train a tiny Llama with DPO through `selm_train.engine` and write what happened to JSON.

Launched by test_engine.py, as a plain process or under torchrun; nothing imports it.

    python engine_worker.py --out DIR --stages 0,2,3
    python -m torch.distributed.run --standalone --nproc_per_node 2 engine_worker.py ...

For each ZeRO stage: a fresh model from one seed, the same fixed batches (global batch 4) and
STEPS optimizer steps. Each rank takes its contiguous share of every global batch in
micro-batches of 1; the loss logged per step is the all-reduced mean over the global batch, so
1 and 2 processes log the same number. Rank 0 writes DIR/stage{N}/ (save_pretrained of the
gathered weights) and DIR/result.json: per stage the losses, learning rates and weight sums.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from selm_train.engine import ds_config, gather_state_dict, init_distributed, make_engine
from selm_train.losses import dpo_loss, sequence_logps

STEPS = 4
GLOBAL_BATCH = 4  # 4 = 1 process x 4 accumulated micro-batches = 2 processes x 2
MICRO_BATCH = 1
PROMPT, RESPONSE = 4, 6  # tokens; only the response tokens count in the log-probs
VOCAB = 64
BETA = 0.1
LEARNING_RATE = 1e-3  # large for a real run: a few steps must move a random tiny model
WARMUP_RATIO = 0.25  # 1 warmup step of 4: step 0 trains at lr 0, then cosine from the peak


def build_model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # head_dim 16 (32 / 2 heads): no vLLM here, and the smaller the faster on 2 shared cores.
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def make_data(n: int) -> dict[str, torch.Tensor]:
    """n pairs sharing a prompt prefix, and fixed reference log-probs near the policy's."""
    g = torch.Generator().manual_seed(1234)
    prompt = torch.randint(0, VOCAB, (n, PROMPT), generator=g)
    chosen = torch.cat([prompt, torch.randint(0, VOCAB, (n, RESPONSE), generator=g)], 1)
    rejected = torch.cat([prompt, torch.randint(0, VOCAB, (n, RESPONSE), generator=g)], 1)
    uniform = -RESPONSE * math.log(VOCAB)  # a random model's log-prob of a response, roughly
    return {"chosen": chosen, "rejected": rejected,
            "ref_chosen": uniform + torch.randn(n, generator=g),
            "ref_rejected": uniform + torch.randn(n, generator=g)}


def micro_loss(engine, data: dict[str, torch.Tensor], idx: slice) -> torch.Tensor:
    ids = torch.cat([data["chosen"][idx], data["rejected"][idx]]).to(engine.device)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, PROMPT:] = True
    logps = sequence_logps(engine(input_ids=ids).logits, ids, mask)
    pc, pr = logps.chunk(2)
    ref_c, ref_r = data["ref_chosen"][idx], data["ref_rejected"][idx]
    return dpo_loss(pc, pr, ref_c.to(pc), ref_r.to(pc), BETA).losses.mean()


def train(stage: int, dist, data, out: Path) -> dict:
    spec = SimpleNamespace(zero_stage=stage, precision="auto", offload="none",
                           micro_batch_size=MICRO_BATCH,
                           global_batch_size=GLOBAL_BATCH)
    config = ds_config(spec, world_size=dist.world_size, device=dist.device.type)
    engine = make_engine(build_model(seed=0), config, learning_rate=LEARNING_RATE,
                         total_steps=STEPS, lr_scheduler="cosine", warmup_ratio=WARMUP_RATIO)
    accum = config["gradient_accumulation_steps"]
    per_rank = GLOBAL_BATCH // dist.world_size
    losses, lrs = [], []
    for step in range(STEPS):
        lrs.append(engine.get_lr()[0])
        total = torch.zeros((), dtype=torch.float64)
        for m in range(accum):
            start = step * GLOBAL_BATCH + dist.rank * per_rank + m * MICRO_BATCH
            loss = micro_loss(engine, data, slice(start, start + MICRO_BATCH))
            engine.backward(loss)
            engine.step()
            total += loss.detach().double().cpu() / accum
        torch.distributed.all_reduce(total)
        losses.append(total.item() / dist.world_size)
    state = gather_state_dict(engine)
    if state is None:
        return {}
    result = {"losses": losses, "lrs": lrs, "gradient_accumulation_steps": accum,
              "world_size": dist.world_size, "weight_sum": weight_sum(state),
              "initial_weight_sum": weight_sum(build_model(seed=0).state_dict())}
    # After the sums: transformers' save_pretrained empties the state_dict it is given.
    engine.module.save_pretrained(out / f"stage{stage}", state_dict=state,
                                  safe_serialization=True)
    return result


def weight_sum(state: dict[str, torch.Tensor]) -> float:
    """A checksum that tolerates float noise: the float64 sum of |w| over all weights."""
    return sum(t.double().abs().sum().item() for _, t in sorted(state.items()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", default="0,2")
    parser.add_argument("--local_rank", type=int, default=-1)  # the deepspeed launcher passes it
    args = parser.parse_args()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's notes on DeepSpeed's calls
    t0 = time.perf_counter()
    dist = init_distributed(device="cpu")
    data = make_data(STEPS * GLOBAL_BATCH)
    result: dict = {"init_s": time.perf_counter() - t0}
    for stage in map(int, args.stages.split(",")):
        t = time.perf_counter()
        result[f"stage{stage}"] = train(stage, dist, data, args.out)
        result[f"stage{stage}"]["seconds"] = time.perf_counter() - t
    if dist.rank == 0:
        (args.out / "result.json").write_text(json.dumps(result, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
