"""A sequence-classification reward model as a ranker (`ranker.kind: reward_model`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from selm_data.errors import SelmError
from selm_data.generation.devices import resolve_device, resolve_dtype
from selm_data.rankers.base import Message, RankRequest, by_request


class RewardModelRanker:
    """A sequence-classification reward model: the score of a candidate is the model's single
    logit for the conversation (prompt turns + the candidate as the assistant turn), rendered
    with the reward model's own chat template, read at the conversation's last real token.

    Where that token is: transformers' sequence-classification heads read the logit at the
    rightmost token that is not `config.pad_token_id`. With pad = eos and a template that ends
    in its end-of-turn token (Llama-3's `<|eot_id|>`), that is the token before the end: the
    score would be read one token early. So inputs are padded on the right (positions stay
    those of the unpadded text) with a pad id that no text of the batch ends with
    (`pad_id_for`); the pad positions are masked, so which id fills them changes no score.

    The model and its inputs go to `device` in `dtype` (generation/devices.py: auto is this
    process's GPU in bf16, else the CPU in fp32); candidates are scored in batches sorted by
    length, so a batch pads little.
    """

    def __init__(self, model_path: str, *, revision: str | None, batch_size: int,
                 fingerprint: str, device: str = "auto", dtype: str = "auto"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision)
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, revision=revision, use_safetensors=True, dtype=self.dtype,
        ).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise SelmError(
                f"reward model {model_path} has {self.model.config.num_labels} labels; a reward "
                "model for ranking has exactly one (a scalar score)"
            )
        self.batch_size = batch_size
        self.name = f"reward_model:{model_path}"
        self.version = fingerprint
        self._torch = torch

    def score(self, requests: Sequence[RankRequest]) -> list[list[float]]:
        texts = [self._render(r.messages, c) for r in requests for c in r.candidates]
        ids = [self.tokenizer(t, add_special_tokens=False, truncation=True).input_ids
               for t in texts]
        order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
        flat = [0.0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            for i, value in zip(batch, self._score_batch([ids[i] for i in batch]), strict=True):
                flat[i] = value
        return by_request(flat, requests)

    def _render(self, messages: list[Message], candidate: str) -> str:
        conversation = [*messages, {"role": "assistant", "content": candidate}]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned a "
                            f"{type(text).__name__}, not a str")
        return text

    def _score_batch(self, rows: list[list[int]]) -> list[float]:
        torch = self._torch
        if any(not row for row in rows):
            raise SelmError(f"{self.name}: a rendered conversation has no tokens; check the "
                            "reward model's chat template")
        pad = pad_id_for(rows, self.tokenizer)
        width = max(len(row) for row in rows)
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        self.model.config.pad_token_id = pad
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device),
                                attention_mask=mask.to(self.device)).logits
        return [float(x) for x in logits[:, 0].float().cpu().tolist()]


def pad_id_for(rows: Sequence[Sequence[int]], tokenizer: Any) -> int:
    """A pad id that no row ends with, so the head's "rightmost non-pad token" is each row's
    last real token: the tokenizer's pad, else its unk, bos or eos, else the lowest such id."""
    last = {row[-1] for row in rows}
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id,
                      tokenizer.eos_token_id):
        if candidate is not None and candidate not in last:
            return int(candidate)
    return next(i for i in range(len(last) + 1) if i not in last)
