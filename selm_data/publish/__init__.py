"""Publishing what was built: immutable snapshots (snapshot), lineage queries (lineage),
statistics, diffs and plots of iterations, the dataset card and the Hub push.
May import: errors, store, manifest, sources, generation, rankers, builder.
"""
