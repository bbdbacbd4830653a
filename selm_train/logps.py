"""Summed response log-probs of a causal LM without its (batch, seq, vocab) logits.

    SequenceLogps(model)(input_ids, attention_mask, loss_mask) -> (rows,) summed log-probs
    token_logps(head, hidden, targets, softcap=, chunk_tokens=) -> (tokens,) log-probs

Why: the logits of a batch are rows x positions x vocabulary; for Llama-3's 128k vocabulary at
length 2048 one row is 1 GB in fp32, and the upcast plus `logsumexp` make two more copies. Here
the decoder's last hidden states are taken at the response tokens only (prompt and padding
predict nothing that is trained), and the output layer runs on `chunk_tokens` of them at a time:
each chunk's logits are made in fp32, reduced to one log-prob per token, and dropped. Under
autograd each chunk is checkpointed (recomputed in the backward pass), so at most one chunk's
logits are alive at any moment, forward or backward. The values are those of the full-logits
computation (`selm_train.losses.sequence_logps`), to fp32 rounding (tests/selm_train/
test_logps.py, against float64).

`SequenceLogps` is the module DeepSpeed wraps: the decoder and the output layer both run inside
its forward, so ZeRO-3 gathers their weights through its usual module hooks, and recomputation in
the backward pass gathers them again as it does for checkpointed layers. It is the portable path;
no fused linear-cross-entropy kernel is used (none is installed here).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["CHUNK_ELEMENTS", "SequenceLogps", "token_logps"]

# Logit elements per chunk: 2**24 fp32 values is 64 MB, i.e. 128 tokens of a 128k vocabulary
# or 512 of a 32k one (the backward pass holds about four such tensors at once). Small enough to
# vanish beside a model's activations, large enough that the output layer still runs as big
# matrix products (128 x 4096 x 128k is 67 GFLOP).
CHUNK_ELEMENTS = 2**24


class SequenceLogps(nn.Module):
    """A causal LM whose forward returns each row's summed response log-prob (see module doc).

    `model` keeps its own name and state-dict keys under the attribute `lm` (strip the `lm.`
    prefix to save it). Models whose logits are not `output_layer(last_hidden_state)`, up to a
    final soft-cap (Gemma 2), are refused rather than computed wrongly.
    """

    def __init__(self, model: Any, *, chunk_tokens: int | None = None) -> None:
        super().__init__()
        self.lm = model
        self.train(model.training)  # the wrapped model's mode, not nn.Module's default (train)
        config = model.config
        for attr in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
            if getattr(config, attr, None) not in (None, 1, 1.0):
                raise ValueError(f"{type(model).__name__} scales its logits ({attr}); "
                                 "SequenceLogps supports plain output layers only")
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"{type(model).__name__} has no linear output layer")
        self.chunk_tokens = chunk_tokens or max(1, CHUNK_ELEMENTS // head.out_features)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> Tensor:
        """Summed log-probs of the tokens where `loss_mask` is true, per row, in fp32 (or in
        the model's dtype when wider). Position t predicts token t + 1, as `sequence_logps`."""
        decoder = self.lm.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         use_cache=False).last_hidden_state
        mask = loss_mask[:, 1:].bool()
        rows = mask.nonzero()[:, 0]
        picked = hidden[:, :-1][mask]  # (tokens, hidden): response positions only
        targets = input_ids[:, 1:][mask]
        per_token = token_logps(self.lm.get_output_embeddings(), picked, targets,
                                softcap=self.softcap, chunk_tokens=self.chunk_tokens)
        out = torch.zeros(input_ids.shape[0], dtype=per_token.dtype, device=per_token.device)
        return out.index_add(0, rows, per_token)


def token_logps(head: nn.Module, hidden: Tensor, targets: Tensor, *, softcap: float | None = None,
                chunk_tokens: int) -> Tensor:
    """log softmax(head(hidden))[targets] per token, `chunk_tokens` rows of logits at a time.

    With gradients on, each chunk is checkpointed: the backward pass recomputes its logits
    instead of keeping them, so peak memory is one chunk's logits whatever the sequence length.
    """
    if hidden.shape[0] == 0:
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        return hidden.new_zeros(0, dtype=dtype) + 0 * hidden.sum()  # keeps the graph connected
    parts = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk, head, h, y, softcap, use_reentrant=False))
        else:
            parts.append(_chunk(head, h, y, softcap))
    return torch.cat(parts)


def _chunk(head: nn.Module, hidden: Tensor, targets: Tensor, softcap: float | None) -> Tensor:
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    # gather minus logsumexp: the target's log-softmax without another (tokens, vocab) tensor
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
