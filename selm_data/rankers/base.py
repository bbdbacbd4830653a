"""The ranker interface: score every candidate response to a prompt.

A ranker returns full scores, not only an order, so ties and margins survive into the store;
ranks are derived from scores by `pairing.ranks` (rank 1 best, ties by position). `name` and
`version` identify the ranker in lineage: a ranking's id includes both.

Kinds: PairRM through llm-blender (`pairrm`, rankers/pairrm.py), any sequence-classification
reward model (`reward_model`), an LLM judge over an OpenAI-compatible server (`judge`,
rankers/judge.py) and the bundled offline demo ranker (`demo`). A candidate a ranker cannot
score gets NaN; the build reports that prompt as unranked and pairs it on a later run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

Message = dict[str, str]


@dataclass(frozen=True)
class RankRequest:
    messages: list[Message]  # the prompt turns
    candidates: list[str]  # responses, in the order (y_ref, y_w, y_l)


def by_request(flat: Sequence[float], requests: Sequence[RankRequest]) -> list[list[float]]:
    """Scores of all candidates of all requests, in order, cut back into one list a request."""
    out, k = [], 0
    for r in requests:
        out.append(list(flat[k:k + len(r.candidates)]))
        k += len(r.candidates)
    return out


class Ranker(Protocol):
    name: str
    version: str

    def score(self, requests: Sequence[RankRequest]) -> list[list[float]]: ...
