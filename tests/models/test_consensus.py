"""Reputation, consensus, held-out membership and the trust filter (models.consensus)."""

from __future__ import annotations

import pytest

from models.consensus import (
    RECORD_DECAY,
    RELIABLE,
    add_to_record,
    confidence,
    consensus,
    is_holdout,
    live_weight,
    message_id_for,
    model_evidence,
    reliability,
    remove_from_record,
    reporter_weight,
    source_of,
    trusted,
)
from streams.events import message_id_for as event_message_id

pytestmark = pytest.mark.unit


def test_reputation_math() -> None:
    assert reporter_weight(0, 0) == 1.0
    assert reporter_weight(8, 0) == pytest.approx(2 * 10 / 12)
    assert reporter_weight(0, 8) == pytest.approx(2 * 2 / 12)
    assert reporter_weight(0, 1) == pytest.approx(0.8)
    assert reporter_weight(100, 0) < 2.0
    assert reliability(0, 0) == pytest.approx(0.8)  # a newcomer is presumed mostly right
    assert confidence(reliability(0, 0)) == pytest.approx(0.6)
    assert confidence(reliability(0, 50)) == 0.0 and confidence(reliability(500, 0)) > 0.95


def test_the_record_follows_how_a_reporter_flags_now() -> None:
    a, d = 0.0, 0.0
    for _ in range(500):  # a long perfect record stays proven ...
        a, d = add_to_record(a, d, 1.0, 0.0)
    assert reliability(a, d) >= RELIABLE and add_to_record(a, d, 0.0, 0.0) == (a, d)  # no evidence, no change
    for n in range(1, 101):  # ... but 30% wrong flags from now on lose that within a few dozen judged flags
        a, d = add_to_record(a, d, *((0.0, 1.0) if n % 10 in (3, 6, 9) else (1.0, 0.0)))
        if n == 40:
            assert reliability(a, d) < RELIABLE
    assert confidence(reliability(a, d)) == pytest.approx(0.4, abs=0.1)  # what a 70% right label is worth


def test_consensus_needs_the_weighted_margin() -> None:
    assert consensus([("spam", 1.0)], 1.0) == ("spam", 1.0)
    assert consensus([("spam", 1.0), ("ham", 0.5)], 1.0)[0] is None
    assert consensus([("spam", 1.8), ("ham", 0.2), ("ham", 0.3)], 1.0) == ("spam", pytest.approx(1.3))
    assert consensus([("ham", 1.2)], 1.0)[0] == "ham"


def test_model_evidence_only_where_the_model_is_very_sure() -> None:
    assert model_evidence("spam", 0.995) == 1 and model_evidence("spam", 0.005) == -1
    assert model_evidence("ham", 0.005) == 1 and model_evidence("ham", 0.995) == -1
    assert model_evidence("ham", 0.5) == 0 and model_evidence("ham", None) == 0


def test_trust_keeps_drift_from_reliable_reporters_and_drops_noise_from_others() -> None:
    honest = reliability(150, 1)
    noisy = reliability(105, 45)  # 30% of their flags contradicted the models
    assert reliability(0, 0) < RELIABLE  # a newcomer is not proven
    assert honest >= RELIABLE > noisy
    # New spam the base model is sure is ham: learned from an honest reporter, not from a noisy one.
    assert trusted("spam", 0.002, honest) and not trusted("spam", 0.002, noisy)
    # Hard mail (the model unsure): learned from a proven reporter only; a wrong label there costs the most.
    assert trusted("spam", 0.5, honest) and not trusted("spam", 0.5, noisy)
    assert not trusted("spam", 0.5, reliability(0, 0))  # a newcomer proves themselves on mail the model is sure of
    # A label the base model is very sure of is learned from anyone; with no base model every label is.
    assert trusted("spam", 0.999, 0.0) and trusted("ham", 0.001, 0.0) and trusted("ham", None, 0.0)


def test_holdout_is_stable_about_one_in_ten_and_ids_agree_with_the_events() -> None:
    ids = [f"msg{i}" for i in range(2000)]
    held = [m for m in ids if is_holdout(m)]
    assert 150 <= len(held) <= 250
    assert held == [m for m in ids if is_holdout(m)]
    raw = b"Subject: x\r\n\r\nbody"
    assert message_id_for(raw) == event_message_id(raw)


def test_a_flags_evidence_can_be_taken_back_exactly_after_later_flags() -> None:
    """What a retraction leaves: the record as if the flag had only decayed the others (removal is exact)."""
    a, d = add_to_record(3.0, 1.0, 1.0, 0.0)  # the flag to be retracted
    for _ in range(5):  # five later judged flags
        a, d = add_to_record(a, d, 0.0, 1.0)
    got = remove_from_record(a, d, 1.0, 0.0, steps_since=5)
    want_a, want_d = 3.0 * RECORD_DECAY, 1.0 * RECORD_DECAY  # the flag's own step decayed the record too
    for _ in range(5):
        want_d = RECORD_DECAY * want_d + 1.0
        want_a = RECORD_DECAY * want_a
    assert got == pytest.approx((want_a, want_d))
    assert remove_from_record(0.1, 0.0, 1.0, 0.0, 0) == (0.0, 0.0)  # never below nothing


def test_live_counts_are_weighted_like_labels() -> None:
    assert live_weight(0.0, 0.0) == 0.0  # a newcomer (0.8) is below RELIABLE
    assert live_weight(40.0, 0.0) == pytest.approx(confidence(reliability(40.0, 0.0))) and live_weight(40.0, 0.0) > 0.9
    assert live_weight(40.0, 20.0) == 0.0


def test_a_reporters_source_is_its_relay_or_its_key() -> None:
    assert source_of("imap:bob") == "imap" and source_of("spamd:alice") == "spamd" and source_of("carol") == "carol"
