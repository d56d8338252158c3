"""The campaign benchmark's own parts: the near-duplicate grouping it states, and the memory measure."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from models.campaign import normalise, shingles
from services.bench.campaign import group_near_duplicates, memory_per_100k
from services.settings import Settings

WORDS = [f"w{c}{d}" for c in "abcdefghij" for d in "klmnopqrst"]


def _sets(texts: list[str]) -> list[np.ndarray]:
    return [shingles(normalise(t)) for t in texts]


@pytest.mark.unit
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


@pytest.mark.unit
def test_memory_measure_counts_a_full_index() -> None:
    m = memory_per_100k(2000, queries=50)
    assert m["fingerprints"] == 2000
    assert m["near_found"] >= 0.95 and m["unrelated_matched"] == 0.0
    assert 128 * 4 * 2000 <= m["traced_bytes"] < 50 * 1024 * 1024  # at least the signatures themselves


@pytest.mark.integration
def test_bench_campaign_runs_on_a_sample(kafka: Settings, tmp_path: Path) -> None:
    """``flywheel bench campaign`` for real on one group in 40 and one later ham in 40 (about 90 s, most of it the
    stack's start and the reporter earning trust), with its figures in the JSON."""
    from services.bench.campaign import run_campaign_bench

    out = tmp_path / "campaign.json"
    r = run_campaign_bench(kafka.model_copy(update={"state_dir": tmp_path}), out, every=40, memory_n=2000)
    assert json.loads(out.read_text())["campaign_fp"] == r["campaign_fp"]
    assert r["spam_with_near_duplicates"] > 600 and r["reporter_reliability"] >= 0.9
    assert r["campaign_population"] == r["later_copies_missed_by_model"]
    assert r["campaign_recall"] is None or 0.0 <= r["campaign_recall"] <= 1.0
    assert r["ham_classified"] > 30 and r["campaign_fp_count"] == 0
    assert r["memory"]["fingerprints"] == 2000 and r["memory_bytes_per_100k"] > 0
    assert set(r["checks"]) == {"campaign_recall", "campaign_fp"}
