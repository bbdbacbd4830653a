from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from selm_data.sources.portions import assign_portions


def test_contiguous_cut_matches_the_papers_slicing():
    n, t = 61135, 4  # UltraFeedback train_prefs, Zephyr's four iterations (train_zephyr.sh)
    ids = [str(i) for i in range(n)]
    portions = assign_portions(ids, t, "contiguous")
    fraction = n // t
    for i in range(1, t + 1):  # train_prefs[fraction*(i-1):fraction*i]
        rows = [r for r, p in enumerate(portions) if p == i]
        assert rows == list(range(fraction * (i - 1), fraction * i))
    assert portions[-3:] == [None, None, None]  # 61135 mod 4 rows are in no portion


def test_hash_split_is_deterministic_balanced_and_order_free():
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3000)]
    portions = assign_portions(ids, 3, "hash")
    assert portions == assign_portions(ids, 3, "hash")
    sizes = Counter(portions)
    assert set(sizes) == {1, 2, 3} and all(900 < s < 1100 for s in sizes.values())
    reordered = assign_portions(ids[::-1], 3, "hash")[::-1]
    assert reordered == portions  # a prompt's portion does not depend on where it sits
    assert assign_portions(ids[:10], 3, "hash") == portions[:10]


def test_fewer_rows_than_portions_and_bad_count():
    assert assign_portions(["a", "b"], 3, "contiguous") == [None, None]
    with pytest.raises(ValueError, match="at least 1"):
        assign_portions(["a"], 0, "contiguous")
