"""The base policy (the SFT model of the miniature) and the initial preference dataset.

The base policy is a tiny Llama fitted by plain supervised learning (AdamW, `fit_base`) to a
broad answer distribution: 3-10 distinct answer words drawn from a Zipf-like prior (a few
words are frequent, most are rare), tilted only slightly towards the words the prompt's topics
like (`AWARENESS`), and written in increasing word order. The order is the language's grammar:
it makes "never repeat a word" a property of the previous token alone, which a 2-layer model
learns in 1,000 steps (with unordered answers the fitted model still repeated a word in 40-50%
of its samples). So the base answers generically, knows a little, and has room to improve:
its greedy answers score ~2.7 on held-out prompts where the best answers score ~8.6.

The initial preference dataset (the miniature's UltraFeedback) is drawn from that base policy:
two different samples per training prompt at temperature 1, labelled by Bradley-Terry on r*
(the first is chosen with probability sigmoid(r*(y_1) - r*(y_2)); ~80% of labels then agree
with r*), written as a `flat` jsonl that the pipeline's sources read (prompt, chosen,
rejected, and the two true rewards as score_chosen / score_rejected, which only
`pairs: original` iterations record).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from testbed.task import ANSWER_WORDS, REWARD_SEED, ModelSize, TrueReward, build_model

ZIPF = 0.7  # prior weight of the k-th most frequent answer word: 1 / k**ZIPF
AWARENESS = 0.5  # SFT tilt: a word's prior weight times exp(AWARENESS * value(w | x))
LENGTHS = (3, 10)  # SFT answer lengths, uniform, inclusive
MAX_NEW_TOKENS = 16  # generation budget everywhere (10-word answers + room to ramble)


def sft_weights(reward: TrueReward, prompt: str) -> list[float]:
    """The SFT distribution's (unnormalised) weight of each answer word for `prompt`."""
    order = list(ANSWER_WORDS)
    random.Random(REWARD_SEED + 2).shuffle(order)  # which words are frequent: fixed by the task
    rank = {w: k + 1 for k, w in enumerate(order)}
    topics = prompt.split()
    return [math.exp(AWARENESS * reward.value(w, topics)) / rank[w] ** ZIPF
            for w in ANSWER_WORDS]


def sft_batch(reward: TrueReward, prompts: Sequence[str],
              generator: torch.Generator) -> list[list[int]]:
    """One SFT answer per prompt, as indexes into ANSWER_WORDS: a uniform length, then that
    many distinct words drawn one after another with probability proportional to
    `sft_weights` among the words not drawn yet (Gumbel top-k: the same distribution)."""
    weights = torch.tensor([sft_weights(reward, p) for p in prompts], dtype=torch.float64)
    gumbel = -torch.log(-torch.log(torch.rand(weights.shape, generator=generator,
                                              dtype=torch.float64)))
    order = torch.argsort(weights.log() + gumbel, dim=1, descending=True)
    lengths = torch.randint(LENGTHS[0], LENGTHS[1] + 1, (len(prompts),), generator=generator)
    return [sorted(row[:n].tolist()) for row, n in zip(order, lengths.tolist(), strict=True)]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         tokenize=True, add_generation_prompt=True,
                                         return_dict=True)["input_ids"]


def fit_base(folder: Path, prompts: Sequence[str], reward: TrueReward, *, seed: int,
             steps: int, size: ModelSize | None = None, batch: int = 64,
             lr: float = 3e-3) -> dict:
    """Build a random tiny Llama and fit it to the SFT distribution (fresh samples each step:
    the model learns the distribution, not a finite set). Saved to `folder`; returns the
    loss curve's first and last values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_model(folder, seed=seed, size=size or ModelSize())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    vocab = tokenizer.get_vocab()
    words = [vocab[w] for w in ANSWER_WORDS]
    heads = {p: prompt_ids(tokenizer, p) for p in prompts}
    eos = tokenizer.eos_token_id
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / 20) * 0.5 * (1 + math.cos(math.pi * k / steps)))
    losses = []
    model.train()
    for _ in range(steps):
        picked = rng.choices(prompts, k=batch)
        rows = [(heads[p], [words[i] for i in answer] + [eos])
                for p, answer in zip(picked, sft_batch(reward, picked, generator), strict=True)]
        width = max(len(h) + len(a) for h, a in rows)
        ids = torch.full((batch, width), eos, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (h, a) in enumerate(rows):
            ids[i, :len(h) + len(a)] = torch.tensor(h + a)
            labels[i, len(h):len(h) + len(a)] = torch.tensor(a)
            mask[i, :len(h) + len(a)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.save_pretrained(folder, safe_serialization=True)
    return {"sft_loss_first": losses[0], "sft_loss_last": sum(losses[-20:]) / 20}


@torch.no_grad()
def sample(folder: Path, prompts: Sequence[str], *, seed: int, temperature: float = 1.0,
           batch: int = 128) -> list[str]:
    """One sampled answer per prompt (batched; every prompt renders to the same number of
    tokens, so no padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(prompts), batch):
        ids = torch.tensor([prompt_ids(tokenizer, p) for p in prompts[start:start + batch]])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             temperature=temperature, top_p=1.0, top_k=None,
                             max_new_tokens=MAX_NEW_TOKENS,
                             pad_token_id=tokenizer.pad_token_id)
        for row in gen[:, ids.shape[1]:].tolist():
            stop = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else None
            text = tokenizer.decode(row[:stop], skip_special_tokens=True)
            assert isinstance(text, str)  # one sequence of ids decodes to one string
            out.append(text.strip())
    return out


def preference_dataset(folder: Path, prompts: Sequence[str], reward: TrueReward, path: Path,
                       *, seed: int) -> dict:
    """Two different non-empty samples of the base policy per prompt, labelled by
    Bradley-Terry on r*, written to `path` (flat jsonl). Returns label statistics."""
    first = sample(folder, prompts, seed=seed)
    second = sample(folder, prompts, seed=seed + 10_007)
    for attempt in range(1, 20):  # resample the few prompts whose two samples coincide
        redo = [i for i, (a, b) in enumerate(zip(first, second, strict=True))
                if a == b or not a or not b]
        if not redo:
            break
        again = sample(folder, [prompts[i] for i in redo], seed=seed + 20_011 * attempt)
        for i, text in zip(redo, again, strict=True):
            if not first[i]:
                first[i] = text
            else:
                second[i] = text
    rng = random.Random(seed + 3)
    rows: list[dict[str, Any]] = []
    agree = 0
    for p, a, b in zip(prompts, first, second, strict=True):
        ra, rb = reward(p, a), reward(p, b)
        a_wins = rng.random() < 1 / (1 + math.exp(-(ra - rb)))
        (c, rc), (r, rr) = ((a, ra), (b, rb)) if a_wins else ((b, rb), (a, ra))
        agree += rc > rr
        rows.append({"prompt": p, "chosen": c, "rejected": r, "score_chosen": rc,
                     "score_rejected": rr})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    n = len(rows)
    return {"pairs": n, "labels_agree_with_r*": agree / n,
            "mean_r*_chosen": sum(r["score_chosen"] for r in rows) / n,
            "mean_r*_rejected": sum(r["score_rejected"] for r in rows) / n}
