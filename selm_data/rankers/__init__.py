"""Rankers: the interface (base), each kind (reward_model, pairrm, judge, demo) and the factory
that loads the one a manifest names (factory; nothing here imports it back).
May import: errors, store, manifest, sources, generation.
"""

from selm_data.rankers.base import Ranker, RankRequest
from selm_data.rankers.factory import make_ranker

__all__ = ["RankRequest", "Ranker", "make_ranker"]
