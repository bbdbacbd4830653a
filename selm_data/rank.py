"""Rankers: score every candidate response to a prompt, behind one interface.

A ranker returns full scores, not only an order, so ties and margins survive into the store;
ranks are derived from scores by `pairing.ranks` (rank 1 best, ties by position). `name` and
`version` identify the ranker in lineage: a ranking's id includes both.

Kinds: PairRM through llm-blender (`pairrm`, selm_data/pairrm.py), any sequence-classification
reward model (`reward_model`), an LLM judge over an OpenAI-compatible server (`judge`,
selm_data/judge.py) and the bundled offline demo ranker (`demo`). A candidate a ranker cannot
score gets NaN; the build reports that prompt as unranked and pairs it on a later run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from selm_data.errors import SelmError
from selm_data.manifest import RankerSpec
from selm_data.models import resolve_policy

Message = dict[str, str]


@dataclass(frozen=True)
class RankRequest:
    messages: list[Message]  # the prompt turns
    candidates: list[str]  # responses, in the order (y_ref, y_w, y_l)


def by_request(flat: Sequence[float], requests: Sequence[RankRequest]) -> list[list[float]]:
    """Scores of all candidates of all requests, in order, cut back into one list a request."""
    out, k = [], 0
    for r in requests:
        out.append(list(flat[k:k + len(r.candidates)]))
        k += len(r.candidates)
    return out


class Ranker(Protocol):
    name: str
    version: str

    def score(self, requests: Sequence[RankRequest]) -> list[list[float]]: ...


class RewardModelRanker:
    """A sequence-classification reward model: the score of a candidate is the model's single
    logit for the conversation (prompt turns + the candidate as the assistant turn), rendered
    with the reward model's own chat template."""

    def __init__(self, model_path: str, *, revision: str | None, batch_size: int,
                 fingerprint: str):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, revision=revision, use_safetensors=True
        ).eval()
        if self.model.config.num_labels != 1:
            raise SelmError(
                f"reward model {model_path} has {self.model.config.num_labels} labels; a reward "
                "model for ranking has exactly one (a scalar score)"
            )
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.name = f"reward_model:{model_path}"
        self.version = fingerprint
        self._torch = torch

    def score(self, requests: Sequence[RankRequest]) -> list[list[float]]:
        texts = [self._render(r.messages, c) for r in requests for c in r.candidates]
        flat: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            flat += self._score_batch(texts[start:start + self.batch_size])
        return by_request(flat, requests)

    def _render(self, messages: list[Message], candidate: str) -> str:
        conversation = [*messages, {"role": "assistant", "content": candidate}]
        return self.tokenizer.apply_chat_template(conversation, tokenize=False)

    def _score_batch(self, texts: list[str]) -> list[float]:
        enc: Any = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                  add_special_tokens=False)
        with self._torch.inference_mode():
            logits = self.model(**enc).logits
        return [float(x) for x in logits[:, 0].float().tolist()]


def make_ranker(spec: RankerSpec) -> Ranker:
    """The ranker a manifest names, loaded."""
    if spec.kind == "reward_model":
        model = resolve_policy(spec.model, revision=spec.revision)
        return RewardModelRanker(model.path, revision=model.revision,
                                 batch_size=spec.batch_size, fingerprint=model.fingerprint)
    if spec.kind == "demo":
        from selm_data.demo_ranker import load_demo_ranker

        return load_demo_ranker()
    if spec.kind == "judge":
        from selm_data.judge import JudgeRanker

        assert spec.server is not None  # the manifest checks it
        return JudgeRanker(spec.server)
    from selm_data.pairrm import load_pairrm

    return load_pairrm(spec.model, spec.revision, spec.batch_size)
