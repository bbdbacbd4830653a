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
