"""A sequence-classification reward model as a ranker (`ranker.kind: reward_model`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from selm_data.errors import SelmError
from selm_data.rankers.base import Message, RankRequest, by_request


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
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned a "
                            f"{type(text).__name__}, not a str")
        return text

    def _score_batch(self, texts: list[str]) -> list[float]:
        enc: Any = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                  add_special_tokens=False)
        with self._torch.inference_mode():
            logits = self.model(**enc).logits
        return [float(x) for x in logits[:, 0].float().tolist()]
