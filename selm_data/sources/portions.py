"""Portions: which rows of the dataset iteration t trains on.

SELM cuts the dataset into T equal contiguous portions and iteration t takes the t-th, as the
paper's scripts do (`train_prefs[fraction*(t-1):fraction*t]` with `fraction = N // T`, so the
last `N mod T` rows are in no portion). The hash split instead puts each prompt in the portion
its id hashes to: stable when rows are added, reordered or filtered. Both are deterministic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

Split = Literal["contiguous", "hash"]


def assign_portions(prompt_ids: Sequence[str], count: int, split: Split) -> list[int | None]:
    """The portion (1..count) of each row, or None for the remainder rows of a contiguous cut."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if split == "hash":
        return [int(hashlib.sha256(p.encode()).hexdigest()[:15], 16) % count + 1
                for p in prompt_ids]
    size = len(prompt_ids) // count
    return [i // size + 1 if size and i < size * count else None for i in range(len(prompt_ids))]
