"""The campaign benchmark's own parts: the near-duplicate grouping it states, and the memory measure."""

from __future__ import annotations

import random

import numpy as np
import pytest

from models.campaign import normalise, shingles
from services.campaignbench import group_near_duplicates, memory_per_100k

pytestmark = pytest.mark.unit

WORDS = [f"w{c}{d}" for c in "abcdefghij" for d in "klmnopqrst"]


def _sets(texts: list[str]) -> list[np.ndarray]:
    return [shingles(normalise(t)) for t in texts]


def test_grouping_joins_each_copy_to_the_earliest_near_first_copy() -> None:
    rnd = random.Random(1)
    a = [rnd.choice(WORDS) for _ in range(60)]
    b = [rnd.choice(WORDS) for _ in range(60)]
    a_copy = a[:]
    a_copy[30] = "changed"  # one word: 4 of 57 shingles differ, Jaccard ~0.87
    far = a[:20] + [rnd.choice(WORDS) for _ in range(40)]  # shares a third: Jaccard well under 0.6
    texts = [" ".join(a), " ".join(b), " ".join(a_copy) + " http://x.example/1 2026", " ".join(far), " ".join(b)]
    groups = group_near_duplicates(_sets(texts))
    assert groups == [[0, 2], [1, 4], [3]]


def test_memory_measure_counts_a_full_index() -> None:
    m = memory_per_100k(2000, queries=50)
    assert m["fingerprints"] == 2000
    assert m["near_found"] >= 0.95 and m["unrelated_matched"] == 0.0
    assert 128 * 4 * 2000 <= m["traced_bytes"] < 50 * 1024 * 1024  # at least the signatures themselves
