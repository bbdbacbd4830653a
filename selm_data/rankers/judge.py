"""An LLM judge over an OpenAI-compatible server: each candidate rated alone, 1 to 9.

The score is the expected rating under the judge's distribution over the first answer token
(G-Eval style: the top-20 log-probs restricted to the tokens "1".."9", renormalised), so scores
are continuous and ties are rare; a server that returns no log-probs gives the rating it wrote.
Ratings are single digits so that each is one token in every common tokenizer. Greedy
(temperature 0): rerunning gives the same scores. A reply with no rating scores NaN, which the
build reports as unranked instead of guessing.

`version` hashes the served model's name and the rating prompt: changing either is a new ranker
in lineage. (A server cannot prove which weights it serves: pin them when you start it.)
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from selm_data.errors import SelmError
from selm_data.generation.server import Server
from selm_data.manifest import ServerSpec
from selm_data.rankers.base import Message, RankRequest, by_request

log = logging.getLogger(__name__)

SYSTEM = (
    "You are a strict, fair judge of AI assistant responses. Rate the response to the "
    "conversation for helpfulness, correctness, honesty and instruction following, on a scale "
    "from 1 (useless or harmful) to 9 (excellent). Reply with the rating digit only."
)
USER = "[Conversation]\n{conversation}\n\n[Response]\n{response}\n\nRating (1-9):"
DIGITS = {str(d): d for d in range(1, 10)}


def render(messages: list[Message], candidate: str) -> list[Message]:
    conversation = "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER.format(conversation=conversation,
                                                    response=candidate)}]


def rating(choice: Any) -> float:
    """Expected rating from the first token's top log-probs, else the first digit written."""
    content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
    if content:
        weights: dict[int, float] = {}
        for top in content[0].top_logprobs or []:
            digit = DIGITS.get(top.token.strip())
            if digit is not None:  # " 7" and "7" are one rating
                weights[digit] = weights.get(digit, 0.0) + math.exp(top.logprob)
        if weights:
            return sum(d * w for d, w in weights.items()) / sum(weights.values())
    found = re.search(r"[1-9]", choice.message.content or "")
    return float(found.group()) if found else math.nan


class JudgeRanker:
    def __init__(self, spec: ServerSpec):
        self.server = Server(spec)
        self.name = f"judge:{self.server.model}"
        self.version = hashlib.sha256(
            f"{self.server.model}\n{SYSTEM}\n{USER}".encode()).hexdigest()[:32]

    def score(self, requests: Sequence[RankRequest]) -> list[list[float]]:
        jobs = [(r.messages, c) for r in requests for c in r.candidates]
        with ThreadPoolExecutor(self.server.max_concurrency) as pool:
            flat = list(pool.map(lambda job: self._rate(*job), jobs))
        return by_request(flat, requests)

    def _rate(self, messages: list[Message], candidate: str) -> float:
        try:
            response = self.server.chat(render(messages, candidate), temperature=0.0,
                                        max_tokens=4, logprobs=True, top_logprobs=20)
        except Exception as e:  # the chunk is not committed; a rerun resumes before it
            raise SelmError(f"the judge at {self.server.base_url} failed: "
                            f"{self.server.redact(f'{type(e).__name__}: {e}')}. Fix the server "
                            "and rerun the same command to resume") from None
        score = rating(response.choices[0])
        if math.isnan(score):
            log.warning("judge %s gave no rating: %r", self.server.model,
                        response.choices[0].message.content)
        return score
