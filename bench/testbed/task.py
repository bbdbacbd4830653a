"""The task: a tiny word language, its true reward r*(x, y), and the oracle ranker.

A prompt x is three distinct topic words ("x3 x7 x12"); a response y is a sequence of answer
words ("w2 w5 w30"). The 24 topic words fall into 6 categories of 4; each category likes 4
answer words and dislikes 4 others (a fixed random table, `REWARD_SEED`: the task, the same
for every run seed). Categories make the table low-rank, as real tastes are: what is learnt
about one topic word carries over to the others of its category, and to held-out prompts,
which are new combinations of known topic words. The true reward of a response is

    r*(x, y) = sum over the first occurrence of each word w of y of value(w | x)
               + REPEAT * (number of repeated occurrences)  -  LENGTH_COST * len(y)
    value(w | x) = #{topic words of x whose category likes w}
                   - #{topic words of x whose category dislikes w}
                   (OFF_VOCABULARY for a word that is not an answer word)

so a good answer names the words its topics like, once each, and nothing else; a neutral word
costs only its length, a repeated or foreign word 1.1. The best answers to the held-out prompts
average about 8.6; the base policy's greedy answers about 2.7 (README.md here).

Words are whole tokens (a word-level tokenizer), so the ranker, which sees text, and the
policy, which sees tokens, agree on what a word is. The chat template is ChatML, as SmolLM2's.

The oracle ranker scores candidates with r* itself: it stands where PairRM stands in the paper,
with no error. Its `version` hashes the reward's definition, so a changed reward is a
different ranker in the store's lineage.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from selm_data.rankers.base import RankRequest

TOPIC_WORDS = tuple(f"x{i}" for i in range(24))
ANSWER_WORDS = tuple(f"w{i}" for i in range(32))
PROMPT_WORDS = 3  # topic words a prompt: C(24, 3) = 2,024 distinct prompts
CATEGORIES = 6  # topic words fall into 6 categories of 4; a category's words share tastes
LIKED, DISLIKED = 4, 4  # answer words each category likes / dislikes
LENGTH_COST = 0.1  # per word: long answers must earn their length
OFF_VOCABULARY = -1.0  # a word that is not an answer word (a topic word, a role name)
REPEAT = -1.0  # a word said before in the same answer: padding, as bad as an off word
REWARD_SEED = 20240529  # the task's own seed: fixed across the runs' seeds
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ROLES = ("system", "user", "assistant")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TrueReward:
    """r*(x, y) of the module docstring; `likes[t]` and `dislikes[t]` for topic word t."""

    likes: dict[str, tuple[str, ...]]
    dislikes: dict[str, tuple[str, ...]]
    length_cost: float = LENGTH_COST
    off_vocabulary: float = OFF_VOCABULARY
    repeat: float = REPEAT

    @classmethod
    def make(cls, seed: int = REWARD_SEED) -> TrueReward:
        rng = random.Random(seed)
        topics = list(TOPIC_WORDS)
        rng.shuffle(topics)
        likes, dislikes = {}, {}
        per = len(topics) // CATEGORIES
        for c in range(CATEGORIES):
            picked = rng.sample(ANSWER_WORDS, LIKED + DISLIKED)
            for topic in topics[c * per:(c + 1) * per]:
                likes[topic] = tuple(sorted(picked[:LIKED], key=ANSWER_WORDS.index))
                dislikes[topic] = tuple(sorted(picked[LIKED:], key=ANSWER_WORDS.index))
        return cls(dict(sorted(likes.items(), key=lambda kv: TOPIC_WORDS.index(kv[0]))),
                   dict(sorted(dislikes.items(), key=lambda kv: TOPIC_WORDS.index(kv[0]))))

    def value(self, word: str, topics: Sequence[str]) -> float:
        if word not in ANSWER_WORDS:
            return self.off_vocabulary
        return float(sum(word in self.likes[t] for t in topics)
                     - sum(word in self.dislikes[t] for t in topics))

    def __call__(self, prompt: str, response: str) -> float:
        topics = [t for t in prompt.split() if t in self.likes]
        words = response.split()
        first = dict.fromkeys(words)
        gained = sum(self.value(w, topics) for w in first)
        gained += self.repeat * (len(words) - len(first))
        return round(gained - self.length_cost * len(words), 6)  # exact ties stay ties

    def best(self, prompt: str) -> float:
        """The highest reward any response to `prompt` can get: every word worth more than its
        length cost, once."""
        topics = prompt.split()
        return round(sum(max(0.0, self.value(w, topics) - self.length_cost)
                         for w in ANSWER_WORDS), 6)

    def definition(self) -> dict:
        return {"likes": self.likes, "dislikes": self.dislikes, "length_cost": self.length_cost,
                "off_vocabulary": self.off_vocabulary, "repeat": self.repeat,
                "rule": "sum of first-occurrence values + repeat * repeats - cost * len"}

    @property
    def version(self) -> str:
        text = json.dumps(self.definition(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class OracleRanker:
    """selm's Ranker interface over r*: a candidate's score is its true reward for the prompt
    (the last user turn). Deterministic, so equal rewards are exact ties, which the pairing
    rules keep visible."""

    name = "true-reward"

    def __init__(self, reward: TrueReward):
        self.reward = reward
        self.version = reward.version
        self.calls = 0

    def score(self, requests: Sequence[RankRequest]) -> list[list[float]]:
        self.calls += 1
        return [[self.reward(_prompt_text(r.messages), c) for c in r.candidates]
                for r in requests]


def _prompt_text(messages: Sequence[dict[str, str]]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def all_prompts() -> list[str]:
    """Every prompt of the task, in a fixed order (sorted topic triples)."""
    return [" ".join(c) for c in itertools.combinations(TOPIC_WORDS, PROMPT_WORDS)]


def split_prompts(n_train: int, n_eval: int, seed: int = REWARD_SEED) -> tuple[list[str],
                                                                                list[str]]:
    """Disjoint training and held-out prompts, shuffled by the task's seed (the same for every
    run seed, so that all runs are measured on the same held-out prompts)."""
    prompts = all_prompts()
    if n_train + n_eval > len(prompts):
        raise ValueError(f"the task has {len(prompts)} prompts; asked for {n_train + n_eval}")
    random.Random(seed + 1).shuffle(prompts)
    return prompts[:n_train], prompts[n_train:n_train + n_eval]


# --- the policy's tokenizer and model ---------------------------------------------------------


def build_tokenizer():
    """A word-level tokenizer over the task's words with ChatML: one token a word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL, *ROLES, *TOPIC_WORDS, *ANSWER_WORDS, "[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # drops the template's newlines
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", bos_token="<|endoftext|>",
                                        unk_token="[UNK]")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 64
    layers: int = 2
    heads: int = 2  # head_dim 32: the smallest vLLM's CPU attention takes (design.md §5)


def build_model(folder: Path, *, seed: int, size: ModelSize | None = None) -> Path:
    """A randomly initialised tiny Llama with the task's tokenizer, saved as a transformers
    folder (safetensors), as selm's policies are."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    size = size or ModelSize()
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=2 * size.hidden,
        num_hidden_layers=size.layers, num_attention_heads=size.heads,
        num_key_value_heads=size.heads, head_dim=size.hidden // size.heads,
        max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
