"""The reward-model ranker on a tiny model built on the spot."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from selm_data.errors import SelmError
from selm_data.rankers.base import RankRequest
from selm_data.rankers.reward_model import RewardModelRanker

REQUESTS = [
    RankRequest([{"role": "user", "content": "How do I cook a steak?"}],
                ["Sear it, then roast it.", "Boil it for an hour.", "no"]),
    RankRequest([{"role": "user", "content": "hi"}], ["Hello! How can I help?", "hi", "Bye"]),
]


@pytest.mark.slow
def test_scores_equal_one_forward_per_conversation(tiny_rm):
    ranker = RewardModelRanker(str(tiny_rm), revision=None, batch_size=4, fingerprint="f")
    scores = ranker.score(REQUESTS)
    assert [len(s) for s in scores] == [3, 3]
    tok = AutoTokenizer.from_pretrained(tiny_rm)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm).eval()
    for request, row in zip(REQUESTS, scores, strict=True):
        for candidate, score in zip(request.candidates, row, strict=True):
            text = tok.apply_chat_template(
                [*request.messages, {"role": "assistant", "content": candidate}], tokenize=False)
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():  # one unpadded sequence: the logit at its last token
                expected = model(input_ids=ids).logits[0, 0].item()
            assert score == pytest.approx(expected, abs=1e-5)
    assert len({s for row in scores for s in row}) == 6, "scores tell candidates apart"
    assert (ranker.name, ranker.version) == (f"reward_model:{tiny_rm}", "f")


@pytest.mark.slow
def test_a_classifier_with_several_labels_is_refused(tiny_lm, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig.from_pretrained(tiny_lm, num_labels=3)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(tmp_path)
    with pytest.raises(SelmError, match="has 3 labels"):
        RewardModelRanker(str(tmp_path), revision=None, batch_size=2, fingerprint="f")


# A Llama-3-like template: every turn ends in the end-of-turn token, with nothing after it, so
# a rendered conversation's last token is that token (here `<|im_end|>`, also eos and pad).
EOT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "<|im_end|>{% endfor %}")


@pytest.mark.slow
def test_score_is_read_at_the_end_of_turn_token(tiny_rm, tmp_path):
    """With pad = eos = the end-of-turn token, transformers' head would read the logit one
    token early (at the last token that is not pad). The expected score is worked out apart
    from that logic: the base model's last hidden state of the unpadded text, through the
    score head."""
    tok = AutoTokenizer.from_pretrained(tiny_rm)
    tok.chat_template = EOT_TEMPLATE
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    ranker = RewardModelRanker(str(tmp_path), revision=None, batch_size=6, fingerprint="f")
    scores = ranker.score(REQUESTS)
    for request, row in zip(REQUESTS, scores, strict=True):
        for candidate, score in zip(request.candidates, row, strict=True):
            text = tok.apply_chat_template(
                [*request.messages, {"role": "assistant", "content": candidate}], tokenize=False)
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
            assert ids[0, -1].item() == tok.eos_token_id
            with torch.no_grad():
                hidden = model.model(input_ids=ids).last_hidden_state[0, -1]
                expected = model.score(hidden).item()
                early = model.score(model.model(input_ids=ids).last_hidden_state[0, -2]).item()
            assert score == pytest.approx(expected, abs=1e-5)
            assert abs(score - early) > 1e-4, "the token before the end scores differently"
