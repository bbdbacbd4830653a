"""The LLM judge against a scripted OpenAI-compatible server (stdlib HTTP, in a thread).

Each candidate text carries the reply the server should give, so every expected score is known
and computed here independently. The judge against a real `vllm serve` is in test_vllm.py.
"""

from __future__ import annotations

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from helpers import require
from selm_data.errors import SelmError
from selm_data.manifest import ServerSpec
from selm_data.rankers.base import RankRequest
from selm_data.rankers.judge import SYSTEM, JudgeRanker

KEY = "sk-judge-test-key-0000"


class Scripted(BaseHTTPRequestHandler):
    """`/v1/models` lists one model; a chat completion answers per the `<<...>>` script in the
    candidate: `<<lp 7:0.5 8:0.25 x:0.25>>` gives those first-token top log-probs (content is
    the likeliest; `_` stands for a space), `<<text SOME TEXT>>` gives that text and no
    log-probs, `<<500>>` fails."""

    seen: ClassVar[list[dict]] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.headers.get("authorization") != f"Bearer {KEY}":
            return self._send(401, {"error": {"message": "Unauthorized"}})
        self._send(200, {"object": "list", "data": [{"id": "judge-model", "object": "model",
                                                     "created": 0, "owned_by": "test"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        Scripted.seen.append(body)
        found = re.search(r"<<(.*?)>>", body["messages"][1]["content"])
        assert found is not None, body["messages"][1]["content"]
        script = found.group(1)
        logprobs, content = None, ""
        if script == "500":
            return self._send(500, {"error": {"message": "judge crashed"}})
        if script.startswith("lp "):
            tops = [(tok.replace("_", " "), math.log(float(p))) for tok, p in
                    (item.rsplit(":", 1) for item in script[3:].split())]
            content = max(tops, key=lambda t: t[1])[0]
            logprobs = {"content": [{"token": content, "logprob": max(lp for _, lp in tops),
                                     "bytes": None,
                                     "top_logprobs": [{"token": t, "logprob": lp, "bytes": None}
                                                      for t, lp in tops]}]}
        elif script.startswith("text "):
            content = script[5:]
        self._send(200, {
            "id": "x", "object": "chat.completion", "created": 0, "model": "judge-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop", "logprobs": logprobs}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })


@pytest.fixture
def judge_url():
    require("openai", "'selm[openai]'")
    Scripted.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def judge(url: str, monkeypatch, **spec) -> JudgeRanker:
    monkeypatch.setenv("JUDGE_KEY", KEY)
    return JudgeRanker(ServerSpec(base_url=url, api_key_env="JUDGE_KEY", **spec))


def test_scores_are_expected_ratings_over_digit_tokens(judge_url, monkeypatch):
    ranker = judge(judge_url, monkeypatch, max_concurrency=3)
    q = [{"role": "user", "content": "What is 2+2?"}]
    scores = ranker.score([
        RankRequest(q, ["<<lp 7:0.5 8:0.25 x:0.25>>", "<<lp 3:0.9 '_4':0.1>>",
                        "<<lp 9:0.6 10:0.4>>"]),
        RankRequest(q, ["<<text Rating: 6/9>>", "<<text 2>>", "<<text no idea>>"]),
    ])
    # Independent: renormalise the digit tokens' probabilities (" 4" counts as 4; "10" and
    # "x" are not ratings), then take the expectation.
    assert scores[0][0] == pytest.approx((7 * 0.5 + 8 * 0.25) / 0.75)
    assert scores[0][1] == pytest.approx(3.0)  # "' 4'" is quoted: not a digit token
    assert scores[0][2] == pytest.approx(9.0)
    assert scores[1][:2] == [6.0, 2.0]
    assert math.isnan(scores[1][2])
    assert ranker.name == "judge:judge-model" and len(ranker.version) == 32
    assert len(Scripted.seen) == 6
    for body in Scripted.seen:
        assert body["temperature"] == 0.0 and body["top_logprobs"] == 20 and body["logprobs"]
        assert body["messages"][0] == {"role": "system", "content": SYSTEM}
        assert "USER: What is 2+2?" in body["messages"][1]["content"]


def test_a_space_before_the_digit_is_the_same_rating(judge_url, monkeypatch):
    scores = judge(judge_url, monkeypatch).score(
        [RankRequest([{"role": "user", "content": "q"}], ["<<lp _5:0.5 5:0.25 6:0.25>>"])])
    assert scores == [[pytest.approx((5 * 0.75 + 6 * 0.25) / 1.0)]]


def test_server_failure_names_the_judge_and_hides_the_key(judge_url, monkeypatch):
    ranker = judge(judge_url, monkeypatch)
    with pytest.raises(SelmError, match=r"the judge at .* failed: .*rerun the same command") as e:
        ranker.score([RankRequest([{"role": "user", "content": "q"}], ["ok <<500>>"])])
    assert KEY not in str(e.value)


def test_wrong_key_is_refused_at_start(judge_url, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "wrong")
    with pytest.raises(SelmError, match="cannot list the models"):
        JudgeRanker(ServerSpec(base_url=judge_url, api_key_env="JUDGE_KEY"))
