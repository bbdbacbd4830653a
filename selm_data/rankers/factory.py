"""The ranker a manifest names, loaded: the one place that knows every kind.

The kinds' modules are imported only when chosen (llm-blender, an OpenAI client or the demo
ranker's embedder are optional), and none of them imports this module back.
"""

from __future__ import annotations

from selm_data.generation.models import resolve_policy
from selm_data.manifest import RankerSpec
from selm_data.rankers.base import Ranker
from selm_data.rankers.reward_model import RewardModelRanker


def make_ranker(spec: RankerSpec) -> Ranker:
    """The ranker a manifest names, loaded."""
    if spec.kind == "reward_model":
        model = resolve_policy(spec.model, revision=spec.revision)
        return RewardModelRanker(model.path, revision=model.revision,
                                 batch_size=spec.batch_size, fingerprint=model.fingerprint,
                                 device=spec.device, dtype=spec.dtype)
    if spec.kind == "demo":
        from selm_data.rankers.demo import load_demo_ranker

        return load_demo_ranker(device=spec.device, dtype=spec.dtype)
    if spec.kind == "judge":
        from selm_data.rankers.judge import JudgeRanker

        assert spec.server is not None  # the manifest checks it
        return JudgeRanker(spec.server)
    from selm_data.rankers.pairrm import load_pairrm

    return load_pairrm(spec.model, spec.revision, spec.batch_size, device=spec.device,
                       dtype=spec.dtype)
