"""Sources: a preference dataset read and normalised to one example shape, with its quarantine
(dataset), and cut into one portion per iteration (portions).
May import: errors, store, manifest.
"""
