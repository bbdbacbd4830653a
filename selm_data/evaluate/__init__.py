"""Evaluating iterations: answers to AlpacaEval and MT-Bench prompts kept with lineage (answers)
and pairwise win rates between policies (winrates).
May import every lower room: errors, store, manifest, sources, generation, rankers, builder,
publish.
"""
