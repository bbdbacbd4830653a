"""Memory-lean log-probs (selm_train/logps.py): the same values and gradients as the full
logits in float64, and a peak memory that does not grow with the (tokens, vocab) logits."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from selm_train.logps import SequenceLogps
from selm_train.losses import sequence_logps


def _model(vocab: int = 300, *, tied: bool = True, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=16, tie_word_embeddings=tied, initializer_range=0.5)
    return LlamaForCausalLM(config).to(dtype)


def _batch(vocab: int, rows: int = 3, width: int = 20, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    attention = torch.ones(rows, width, dtype=torch.long)
    loss_mask = torch.zeros(rows, width, dtype=torch.bool)
    for r in range(rows):  # prompt of 4 + 2r tokens, response up to the row's own end
        end = width - 3 * r
        attention[r, end:] = 0
        loss_mask[r, 4 + 2 * r:end] = True
    return ids, attention, loss_mask


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("tied", [True, False])
def test_values_and_gradients_equal_the_full_logits(chunk, tied):
    """float64: chunked (any chunk size, checkpointed in backward) == full logits, values and
    every weight's gradient."""
    model = _model(tied=tied)
    ids, attention, loss_mask = _batch(300)
    weights = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)

    full = sequence_logps(model(input_ids=ids, attention_mask=attention).logits, ids, loss_mask)
    (full * weights).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    got = SequenceLogps(model, chunk_tokens=chunk)(ids, attention, loss_mask)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, full.detach(), rtol=1e-12, atol=1e-12)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_bf16_model_gives_fp32_log_probs_as_the_upcast_full_logits():
    """A bf16 model: the log-probs are fp32 and equal the full bf16 logits upcast to fp32
    (sequence_logps), to fp32 rounding."""
    model = _model(dtype=torch.bfloat16)
    ids, attention, loss_mask = _batch(300)
    with torch.no_grad():
        full = sequence_logps(model(input_ids=ids, attention_mask=attention).logits, ids,
                              loss_mask)
        got = SequenceLogps(model, chunk_tokens=5)(ids, attention, loss_mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-4)


def test_softcapped_logits_match():
    """A final soft-cap (Gemma 2) is applied to each chunk as the model applies it."""
    model = _model()
    model.config.final_logit_softcapping = 2.0
    ids, attention, loss_mask = _batch(300)
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
    logits = 2.0 * torch.tanh(model.lm_head(hidden) / 2.0)
    expected = sequence_logps(logits, ids, loss_mask)
    got = SequenceLogps(model, chunk_tokens=4)(ids, attention, loss_mask)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_scaled_logits_are_refused():
    model = _model()
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        SequenceLogps(model)


PEAK_SCRIPT = """
import sys, torch
from selm_train.logps import token_logps
torch.manual_seed(0)
vocab, tokens, chunk = 32_768, 4096, 256
head = torch.nn.Linear(64, vocab, bias=False)
hidden = torch.randn(tokens, 64, requires_grad=True)
targets = torch.randint(0, vocab, (tokens,))

def status(key):  # bytes, from the kernel's own accounting of this process
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

# Reset the peak (VmHWM) to the current RSS: getrusage's ru_maxrss would carry the peak of the
# process that started this one (it survives execve), i.e. pytest's, after a long suite.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
if sys.argv[1] == "chunked":
    token_logps(head, hidden, targets, chunk_tokens=chunk).sum().backward()
else:  # the full-logits path as it was: fp32 logits, then logsumexp over them
    logits = head(hidden).float()
    (logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(-1)).sum().backward()
print(status("VmHWM") - before)
"""


def test_peak_memory_is_a_few_chunks_not_the_logits():
    """Forward and backward through 4096 tokens of a 32k vocabulary, each in a fresh process
    (peak RSS above the inputs): the full fp32 logits are 512 MB and the plain path holds them
    and their gradient (2.2 GB measured); the chunked path never holds one copy (0.24 GB
    measured: a few 32 MB chunks, their gradients and the backward pass's own start-up)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo,
                                                                      os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}

    def peak(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, mode], capture_output=True,
                             text=True, env=env, timeout=900, check=True)
        return int(out.stdout.split()[-1])

    logits_bytes = 4096 * 32_768 * 4
    plain, lean = peak("full"), peak("chunked")
    assert plain >= logits_bytes, plain
    assert lean < logits_bytes and lean < plain / 4, (lean, plain)
