"""Campaign memory's pure parts (models.campaign): normalising, MinHash, the bounded LSH index, ham beats spam."""

from __future__ import annotations

import random

import numpy as np
import pytest

from models.campaign import CampaignIndex, fingerprint_text, jaccard, normalise

pytestmark = pytest.mark.unit

_WORDS = ["offer", "account", "money", "free", "click", "secure", "bank", "verify", "winner", "prize", "limited", "time", "order", "shipping", "pharmacy", "cheap", "loan", "credit", "rate", "mortgage", "refinance", "investor", "stock", "meeting", "agenda", "project", "report", "release", "build", "kernel", "patch", "mailing", "list", "subscribe", "digest", "weekly", "friday", "lunch", "garden", "music"]


def _text(seed: int, n: int = 80) -> str:
    rnd = random.Random(seed)
    return " ".join(rnd.choice(_WORDS) for _ in range(n))


def _variant(text: str, seed: int, changes: int) -> str:
    """The same campaign text with ``changes`` words replaced, a different link and numbers."""
    rnd = random.Random(seed)
    words = text.split()
    for _ in range(changes):
        words[rnd.randrange(len(words))] = rnd.choice(_WORDS)
    return f"Dear user{seed} {' '.join(words)} http://x{seed}.example/{seed} call 555-{seed:04d} now"


def test_normalise_drops_links_addresses_and_numbers() -> None:
    assert normalise("Visit http://a.b/c?x=1 or WWW.Spam.com, mail joe@x.org: 50% off in 2026 only") == [
        "visit", "or", "mail", "off", "in", "only"]


def test_links_and_numbers_do_not_change_the_fingerprint() -> None:
    base = _text(1)
    a = fingerprint_text(f"{base} http://one.example/1 order 12345")
    b = fingerprint_text(f"{base} https://two.example/zz order 99")
    assert a is not None and b is not None
    assert np.array_equal(a, b)


def test_short_text_has_no_fingerprint() -> None:
    assert fingerprint_text("buy now") is None
    idx = CampaignIndex(capacity=10)
    assert idx.query(None) is None


def test_near_duplicates_found_unrelated_mail_not() -> None:
    idx = CampaignIndex(capacity=1000)
    for i in range(200):
        sig = fingerprint_text(_text(1000 + i))
        assert sig is not None
        idx.add(f"other-{i}", sig, "spam")
    base = _text(7)
    sig = fingerprint_text(base)
    assert sig is not None
    idx.add("campaign", sig, "spam")
    near = found = 0
    for v in range(50):
        text = _variant(base, v, changes=3)
        if jaccard(normalise(base), normalise(text)) >= 0.65:
            near += 1
            hit = idx.query(fingerprint_text(text))
            found += hit is not None and hit.message_id == "campaign" and hit.flagged == "spam"
    assert near >= 40
    assert found >= 0.9 * near
    for i in range(100):  # fresh random texts share few 4-word shingles with anything in the index
        assert idx.query(fingerprint_text(_text(5000 + i))) is None


def test_estimate_tracks_exact_jaccard() -> None:
    base = _text(3, n=200)
    errors = []
    for v in range(30):
        text = _variant(base, v, changes=v % 12 + 1)
        a, b = fingerprint_text(base), fingerprint_text(text)
        assert a is not None and b is not None
        est = float((a == b).mean())
        errors.append(abs(est - jaccard(normalise(base), normalise(text))))
    assert float(np.mean(errors)) < 0.05


def test_the_cap_holds_and_evicts_the_oldest() -> None:
    idx = CampaignIndex(capacity=50)
    sigs = {}
    for i in range(120):
        sig = fingerprint_text(_text(i))
        assert sig is not None
        sigs[i] = sig
        idx.add(f"m{i}", sig, "spam")
        assert len(idx) <= 50
    assert len(idx) == 50
    assert idx.evicted == 70
    assert "m69" not in idx and "m70" in idx and "m119" in idx
    assert idx.query(sigs[10]) is None  # evicted: no longer recognised
    hit = idx.query(sigs[100])
    assert hit is not None and hit.message_id == "m100" and hit.similarity == 1.0


def test_ham_beats_spam_nearby() -> None:
    idx = CampaignIndex(capacity=100)
    newsletter = _text(11)
    spam_copy, ham_copy = fingerprint_text(_variant(newsletter, 1, 1)), fingerprint_text(_variant(newsletter, 2, 1))
    assert spam_copy is not None and ham_copy is not None
    idx.add("hostile-flag", spam_copy, "spam")
    hit = idx.query(fingerprint_text(_variant(newsletter, 3, 1)))
    assert hit is not None and hit.flagged == "spam"
    idx.add("not-spam-flag", ham_copy, "ham")
    hit = idx.query(fingerprint_text(_variant(newsletter, 3, 1)))
    assert hit is not None and hit.flagged == "ham" and hit.message_id == "not-spam-flag"


def test_relabel_and_remove() -> None:
    idx = CampaignIndex(capacity=10)
    sig = fingerprint_text(_text(21))
    assert sig is not None
    idx.add("a", sig, "spam")
    idx.add("a", sig, "ham")
    assert len(idx) == 1 and idx.label_of("a") == "ham"
    assert idx.remove("a") and not idx.remove("a")
    assert idx.query(sig) is None


def test_many_entries_merge_into_the_sorted_bands() -> None:
    idx = CampaignIndex(capacity=5000)
    sigs = []
    for i in range(3000):  # beyond the unsorted tail: found through the sorted arrays too
        sig = fingerprint_text(_text(20000 + i, n=30))
        assert sig is not None
        sigs.append(sig)
        idx.add(f"x{i}", sig, "spam")
    for i in (0, 1500, 2999):
        hit = idx.query(sigs[i])
        assert hit is not None and hit.message_id == f"x{i}"


def test_bad_input_is_refused() -> None:
    idx = CampaignIndex(capacity=10)
    with pytest.raises(ValueError, match="label"):
        idx.add("a", np.zeros(128, dtype=np.uint32), "maybe")
    with pytest.raises(ValueError, match="signature"):
        idx.add("a", np.zeros(3, dtype=np.uint32), "spam")


def test_a_long_text_is_fingerprinted_by_its_opening() -> None:
    from models.campaign import MAX_WORDS

    opening = _text(31, n=MAX_WORDS)
    a = fingerprint_text(opening + " " + _text(32, n=20_000))
    b = fingerprint_text(opening + " " + _text(33, n=50_000))
    assert a is not None and b is not None and np.array_equal(a, b)
