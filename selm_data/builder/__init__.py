"""Building an iteration: pairing rules that turn rankings into pairs (pairing) and the build
itself, sources -> generate -> rank -> pair -> store (iteration).
May import: errors, store, manifest, sources, generation, rankers.
"""

from selm_data.builder.iteration import (
    BuildReport,
    Progress,
    Shard,
    build,
    checkpoint_path,
    policy_for,
)

__all__ = ["BuildReport", "Progress", "Shard", "build", "checkpoint_path", "policy_for"]
