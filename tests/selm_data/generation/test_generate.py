"""The transformers backend on a tiny chat model built on the spot."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from selm_data.generation.backends import GenerationResult, TransformersGenerator, requests_for
from selm_data.manifest import GenerationSpec, PolicySpec

PROMPTS = [
    ("p1", [{"role": "user", "content": "How do I cook a steak in the oven?"}]),
    ("p2", [{"role": "user", "content": "hi"}]),
    ("p3", [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Write a poem about the sea and the sky at night."}]),
    ("p4", [{"role": "user", "content": "Name three prime numbers."}]),
]


def generator(tiny_lm, batch_size: int) -> TransformersGenerator:
    return TransformersGenerator(str(tiny_lm), policy=PolicySpec(model=str(tiny_lm)),
                                 revision=None, batch_size=batch_size)


@pytest.mark.slow
def test_greedy_batches_left_padded_equal_one_at_a_time(tiny_lm):
    spec = GenerationSpec(backend="transformers", max_tokens=12)
    requests = requests_for(spec, PROMPTS)
    batched = generator(tiny_lm, 4).generate(requests)
    single = generator(tiny_lm, 1).generate(requests)
    assert batched == single
    assert all(r.status == "ok" and r.text for r in batched)
    assert len({r.text for r in batched}) == len(PROMPTS), "outputs follow their prompts"


@pytest.mark.slow
def test_token_counts_and_finish_reason(tiny_lm):
    spec = GenerationSpec(backend="transformers", max_tokens=7)
    results = generator(tiny_lm, 2).generate(requests_for(spec, PROMPTS))
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    for (_, messages), r in zip(PROMPTS, results, strict=True):
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert r.prompt_tokens == len(tok(rendered, add_special_tokens=False).input_ids)
        assert r.completion_tokens <= 7
        assert r.finish_reason == ("length" if r.completion_tokens == 7 else "stop")


@pytest.mark.slow
def test_seeded_sampling_repeats_and_differs_by_sample(tiny_lm):
    spec = GenerationSpec(backend="transformers", temperature=1.0, top_p=0.95, n=2, seed=7,
                          max_tokens=10)
    requests = requests_for(spec, PROMPTS[:2])
    assert [r.sample_index for r in requests] == [0, 1, 0, 1]
    assert len({r.sampling.seed for r in requests}) == 4
    first = generator(tiny_lm, 4).generate(requests)
    again = generator(tiny_lm, 1).generate(list(reversed(requests)))[::-1]
    assert first == again, "a seeded request's output depends on its seed only"
    assert first[0].text != first[1].text


@pytest.mark.slow
def test_a_failing_prompt_is_recorded_and_the_others_succeed(tiny_lm, monkeypatch):
    gen = generator(tiny_lm, 4)
    real = gen._generate_batch

    def flaky(texts, sampling):
        if any("BOOM" in t for t in texts):
            raise RuntimeError("simulated device error")
        return real(texts, sampling)

    monkeypatch.setattr(gen, "_generate_batch", flaky)
    prompts = [*PROMPTS[:2], ("bad", [{"role": "user", "content": "BOOM"}])]
    results = gen.generate(requests_for(GenerationSpec(max_tokens=5), prompts))
    assert [r.status for r in results] == ["ok", "ok", "failed"]
    assert results[2] == GenerationResult("failed", error="RuntimeError: simulated device error")


@pytest.mark.slow
def test_seeded_batches_give_the_texts_of_one_at_a_time(tiny_lm):
    """Eight seeded requests (four prompts of different lengths, two samples each) in one
    batch of 8 and one at a time: the same texts, so a request's output does not depend on
    its batch, its order or how a build is sharded."""
    spec = GenerationSpec(backend="transformers", temperature=1.0, top_p=0.9, top_k=50, n=2,
                          seed=11, max_tokens=12)
    requests = requests_for(spec, PROMPTS)
    by_8 = generator(tiny_lm, 8).generate(requests)
    by_1 = generator(tiny_lm, 1).generate(list(reversed(requests)))[::-1]
    assert by_8 == by_1
    assert all(r.status == "ok" and r.text for r in by_8)
    assert len({r.text for r in by_8}) == 8, "every seed draws its own text"
