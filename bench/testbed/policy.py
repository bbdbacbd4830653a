"""The base policy (the SFT model of the miniature) and the initial preference datasets.

The base policy is a tiny Llama fitted by plain supervised learning (AdamW, `fit_base`) to a
broad answer distribution: 3-10 distinct answer words drawn from a Zipf-like prior (a few
words are frequent, most are rare), tilted only slightly towards the words the prompt's topics
like (`BASE_STYLE`), and written in increasing word order. The order is the language's grammar:
it makes "never repeat a word" a property of the previous token alone, which a 2-layer model
learns in 1,000 steps (with unordered answers the fitted model still repeated a word in 40-50%
of its samples). So the base answers generically, knows a little, and has room to improve:
its greedy answers score ~2.7 on held-out prompts where the best answers score ~8.6.

The initial preference dataset (the miniature's UltraFeedback), one per regime: `self`, two
different samples of the base policy per training prompt at temperature 1
(`preference_dataset`); `stronger`, answers of two of four stronger answer distributions
(`STRONGER_STYLES`, `stronger_dataset`). Both are labelled by Bradley-Terry on r* (the first
is chosen with probability sigmoid(r*(y_1) - r*(y_2)); ~80% of labels then agree with r*) and
written as a `flat` jsonl that the pipeline's sources read (prompt, chosen, rejected, and the
two true rewards as score_chosen / score_rejected, which only `pairs: original` iterations
record).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from testbed.task import ANSWER_WORDS, REWARD_SEED, ModelSize, TrueReward, build_model

MAX_NEW_TOKENS = 16  # generation budget everywhere (10-word answers + room to ramble)


@dataclass(frozen=True)
class Style:
    """A way of answering, as a distribution over answers: `lengths` (uniform, inclusive)
    distinct answer words drawn without replacement with weight
    exp(awareness * value(w | x)) / rank(w) ** zipf, where rank orders the words by a
    frequency that `order_seed` shuffles, written in increasing word order (the grammar)."""

    name: str
    awareness: float  # how much the prompt's tastes tilt the words (0: not at all)
    zipf: float = 0.7  # how concentrated the word prior is on a few frequent words
    order_seed: int = REWARD_SEED + 2  # which words are frequent
    lengths: tuple[int, int] = (3, 10)


# The base policy's SFT distribution: generic, slightly aware of the prompt's tastes.
BASE_STYLE = Style("base", awareness=0.5)
# The stronger regime's dataset models (the miniature's UltraFeedback mix of GPT-4-class and
# weaker models): each is at least as aware of the tastes as the base (model-a equally, the
# others more), with flatter word frequencies of its own and its own lengths, so their answers
# score higher than the base's samples and differ from them. Calibrated
# (README.md here) so that the base's greedy y_ref is ranked first in 30-40% of iteration 1's
# rankings, as in the demo build on UltraFeedback (34%).
STRONGER_STYLES = (
    Style("model-a", awareness=0.5, zipf=0.5, order_seed=REWARD_SEED + 101, lengths=(2, 8)),
    Style("model-b", awareness=0.6, zipf=0.4, order_seed=REWARD_SEED + 102, lengths=(3, 9)),
    Style("model-c", awareness=0.75, zipf=0.3, order_seed=REWARD_SEED + 103, lengths=(3, 8)),
    Style("model-d", awareness=1.0, zipf=0.2, order_seed=REWARD_SEED + 104, lengths=(2, 7)),
)


def style_weights(style: Style, reward: TrueReward, prompt: str) -> list[float]:
    """The style's (unnormalised) weight of each answer word for `prompt`."""
    order = list(ANSWER_WORDS)
    random.Random(style.order_seed).shuffle(order)
    rank = {w: k + 1 for k, w in enumerate(order)}
    topics = prompt.split()
    return [math.exp(style.awareness * reward.value(w, topics)) / rank[w] ** style.zipf
            for w in ANSWER_WORDS]


def style_batch(style: Style, reward: TrueReward, prompts: Sequence[str],
                generator: torch.Generator) -> list[list[int]]:
    """One answer of `style` per prompt, as indexes into ANSWER_WORDS: a uniform length, then
    that many distinct words drawn one after another with probability proportional to
    `style_weights` among the words not drawn yet (Gumbel top-k: the same distribution)."""
    weights = torch.tensor([style_weights(style, reward, p) for p in prompts],
                           dtype=torch.float64)
    gumbel = -torch.log(-torch.log(torch.rand(weights.shape, generator=generator,
                                              dtype=torch.float64)))
    order = torch.argsort(weights.log() + gumbel, dim=1, descending=True)
    low, high = style.lengths
    lengths = torch.randint(low, high + 1, (len(prompts),), generator=generator)
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
        rows = [(heads[p], [words[i] for i in answer] + [eos]) for p, answer in
                zip(picked, style_batch(BASE_STYLE, reward, picked, generator), strict=True)]
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
    return label_pairs(prompts, first, second, reward, path, rng=random.Random(seed + 3))


def stronger_dataset(prompts: Sequence[str], reward: TrueReward, path: Path, *,
                     seed: int) -> dict:
    """The stronger regime's dataset: per prompt, answers of two different `STRONGER_STYLES`
    (picked at random, as UltraFeedback samples 4 of its 17 models a prompt), labelled by
    Bradley-Terry on r*, written to `path` (flat jsonl). Returns label statistics and each
    style's mean r*."""
    rng = random.Random(seed + 5)
    generator = torch.Generator().manual_seed(seed + 7)
    picks = [rng.sample(range(len(STRONGER_STYLES)), 2) for _ in prompts]
    texts: list[list[str]] = [["", ""] for _ in prompts]
    for attempt in range(20):  # resample the few prompts whose two answers coincide
        redo = [i for i, t in enumerate(texts) if t[0] == t[1]]
        if not redo:
            break
        for k, style in enumerate(STRONGER_STYLES):
            for side in (0, 1) if attempt == 0 else (1,):
                rows = [i for i in redo if picks[i][side] == k]
                if not rows:
                    continue
                answers = style_batch(style, reward, [prompts[i] for i in rows], generator)
                for i, answer in zip(rows, answers, strict=True):
                    texts[i][side] = " ".join(ANSWER_WORDS[w] for w in answer)
    stats = label_pairs(prompts, [t[0] for t in texts], [t[1] for t in texts], reward, path,
                        rng=random.Random(seed + 3))
    by_style: dict[str, list[float]] = {s.name: [] for s in STRONGER_STYLES}
    for p, pick, pair in zip(prompts, picks, texts, strict=True):
        for k, text in zip(pick, pair, strict=True):
            by_style[STRONGER_STYLES[k].name].append(reward(p, text))
    return {**stats, "style_reward_mean": {k: sum(v) / len(v) for k, v in by_style.items()}}


def label_pairs(prompts: Sequence[str], first: Sequence[str], second: Sequence[str],
                reward: TrueReward, path: Path, *, rng: random.Random) -> dict:
    """Label each (first, second) by Bradley-Terry on r* (the first is chosen with probability
    sigmoid(r*(first) - r*(second))), write the flat jsonl, return label statistics."""
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
