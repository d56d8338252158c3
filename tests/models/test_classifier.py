"""Classifier: both sides in every answer, each policy decides as documented, the blend fit recovers known data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from models.classifier import (
    POLICIES,
    Calibration,
    Classifier,
    fit_calibration,
    logit,
    sigmoid,
    threshold_for_fpr,
)
from models.features import FeatureConfig, featurize
from models.linear import LinearModel
from models.message import parse
from models.registry import LoadedModel, Registry, SelfCheckVector
from models.rules import Rule, RuleEngine

CONFIG = FeatureConfig(n_buckets=1 << 14)

SPAM_WORDS = ["viagra", "cheap", "winner", "free money", "click here", "act now", "offer", "cash", "lottery"]
HAM_WORDS = ["meeting", "patch", "review", "lunch", "release", "thanks", "diff", "schedule", "notes"]


def message(i: int, spam: bool) -> bytes:
    rng = np.random.default_rng(i)
    words = SPAM_WORDS if spam else HAM_WORDS
    body = " ".join(rng.choice(words, 12))
    subject = ("GET " + words[i % len(words)].upper() + " NOW!!") if spam else f"re: {words[i % len(words)]} #{i}"
    sender = f"promo{i}@deals{i % 3}.biz" if spam else f"dev{i % 5}@example.org"
    return f"From: {sender}\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()


ENGINE = RuleEngine([
    Rule(name="SUBJ_SHOUT", kind="header", header="Subject", pattern=r"/!!/", weight=3.0, description="shouting"),
    Rule(name="BODY_CASH", kind="body", pattern=r"/\b(?:cash|money)\b/i", weight=2.5, description="money talk"),
], threshold=5.0)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    tmp = tmp_path_factory.mktemp("clf")
    raws = [message(i, i % 2 == 0) for i in range(60)]
    labels = np.array([i % 2 == 0 for i in range(60)], dtype=np.int64)
    parsed = [parse(r) for r in raws]
    results = [ENGINE.evaluate(p) for p in parsed]
    batch = featurize(parsed, results, CONFIG)
    model = LinearModel(CONFIG).fit(batch, labels)
    exp = model.predict_proba(batch)
    vectors = [SelfCheckVector(raws[i], results[i], float(exp[i])) for i in (0, 1, 2, 3)]
    reg = Registry(tmp / "reg")
    cal = Calibration(w_model=0.8, w_rules=0.3, bias=-0.5, threshold=0.6, model_threshold_logit=0.2,
                      rules_a=1.1, rules_b=-5.0)
    v = reg.save(kind="linear", model_path=model.export_onnx(tmp / "m.onnx"), features=CONFIG, self_check=vectors,
                 calibration=cal.to_dict())
    return reg.load(v)


@pytest.mark.unit
def test_every_answer_shows_both_sides(loaded: LoadedModel) -> None:
    clf = Classifier(ENGINE, loaded)
    v = clf.classify(message(1000, True))
    d = v.to_dict()
    assert set(d) >= {"is_spam", "probability", "decided_by", "rules", "model", "policy", "threshold"}
    assert set(d["rules"]) >= {"score", "threshold", "is_spam", "hits", "probability"}
    assert "SUBJ_SHOUT" in {h["name"] for h in d["rules"]["hits"]}
    assert d["rules"]["score"] == pytest.approx(sum(h["weight"] for h in d["rules"]["hits"]))
    assert d["model"]["version"] == loaded.version and d["model"]["kind"] == "linear"
    assert d["model"]["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert 0.0 <= d["model"]["probability"] <= 1.0 and 0.0 <= d["probability"] <= 1.0
    assert v.is_spam and v.model.is_spam
    assert not clf.classify(message(1001, False)).is_spam


@pytest.mark.unit
def test_batch_matches_single(loaded: LoadedModel) -> None:
    clf = Classifier(ENGINE, loaded)
    raws = [message(2000 + i, i % 3 == 0) for i in range(10)] + [b"", b"\xff\xfe garbage"]
    batch = clf.classify_batch(raws)
    single = [clf.classify(r) for r in raws]
    assert len(batch) == len(raws)
    for a, b in zip(batch, single, strict=True):
        assert a.is_spam == b.is_spam and a.rules.score == b.rules.score
        assert a.probability == pytest.approx(b.probability, abs=1e-6)
    assert clf.classify_batch([]) == []


@pytest.mark.unit
def test_policies_decide_as_documented(loaded: LoadedModel) -> None:
    cal = Calibration.from_meta(loaded.calibration)
    raws = [message(3000 + i, i % 2 == 0) for i in range(30)]
    # a ham that an over-eager new rule calls spam while the model (which never saw that rule) says ham
    raws.append(b"From: dev1@example.org\r\nSubject: re: patch review\r\n\r\nthanks, patch review notes meeting\r\n")
    eager = ENGINE.with_rule(Rule(name="BODY_PATCH", kind="body", pattern=r"/\bpatch\b/", weight=6.0, description="x"))
    by_policy = {p: Classifier(eager, loaded, policy=p).classify_batch(raws) for p in POLICIES}
    for i in range(len(raws)):
        comb, mod, rul, eit = (by_policy[p][i] for p in ("combined", "model", "rules", "either"))
        z = float(logit(comb.model.probability))
        assert comb.decided_by == "combined"
        assert comb.probability == pytest.approx(float(sigmoid(0.8 * z + 0.3 * comb.rules.score - 0.5)), abs=2e-5)
        assert comb.is_spam == (comb.probability >= 0.6)
        assert mod.decided_by == "model" and mod.is_spam == mod.model.is_spam
        assert mod.probability == mod.model.probability
        if abs(z - 0.2) > 1e-3:  # away from float32 rounding at the boundary
            assert mod.model.is_spam == (z >= 0.2)
        assert rul.decided_by == "rules" and rul.is_spam == rul.rules.is_spam
        assert rul.probability == pytest.approx(float(cal.rules_probability(np.array([rul.rules.score]))[0]))
        assert eit.is_spam == (eit.rules.is_spam or eit.model.is_spam)
        assert eit.probability == max(eit.rules_probability, eit.model.probability)
    shouting = by_policy["either"][-1]
    assert shouting.rules.is_spam and not shouting.model.is_spam
    assert shouting.is_spam and shouting.decided_by == "rules"
    assert not by_policy["model"][-1].is_spam
    with pytest.raises(ValueError):
        Classifier(ENGINE, loaded, policy="majority")


@pytest.mark.unit
def test_rules_swap_by_assignment(loaded: LoadedModel) -> None:
    clf = Classifier(ENGINE, loaded)
    raw = b"From: a@example.org\r\nSubject: hello\r\n\r\nplease wire the bitcoin today\r\n"
    assert clf.classify(raw).rules.hits == []
    clf.rules = ENGINE.with_rule(Rule(name="BODY_BTC", kind="body", pattern=r"/bitcoin/i", weight=6.0,
                                      description="crypto"))
    v = clf.classify(raw)
    assert [h.name for h in v.rules.hits] == ["BODY_BTC"] and v.rules.is_spam


@pytest.mark.unit
def test_missing_calibration_means_model_alone_at_one_half(loaded: LoadedModel) -> None:
    bare = dataclasses.replace(loaded, meta={**loaded.meta, "calibration": None})
    for v in Classifier(ENGINE, bare).classify_batch([message(4000 + i, i % 2 == 0) for i in range(10)]):
        assert v.probability == pytest.approx(v.model.probability, abs=1e-5)
        assert v.is_spam == (v.model.probability >= 0.5)


@pytest.mark.unit
def test_fit_calibration_recovers_a_known_blend() -> None:
    rng = np.random.default_rng(0)
    n = 40_000
    z = rng.normal(0, 3, n)
    s = rng.normal(3, 3, n)
    y = rng.random(n) < sigmoid(1.5 * z + 0.7 * s - 2.0)
    cal = fit_calibration(z, s, y, fpr_budget=0.01, l2=1e-6)
    assert cal.w_model == pytest.approx(1.5, rel=0.05)
    assert cal.w_rules == pytest.approx(0.7, rel=0.05)
    assert cal.bias == pytest.approx(-2.0, rel=0.05)
    p = cal.combined(z, s)
    assert np.mean(p[~y] >= cal.threshold) <= 0.01
    assert np.mean(z[~y] >= cal.model_threshold_logit) <= 0.01


@pytest.mark.unit
def test_threshold_for_fpr_respects_ties_and_budget() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.9, 0.95, 0.99])
    labels = np.array([0, 0, 0, 0, 1, 1, 1], dtype=bool)
    t = threshold_for_fpr(scores, labels, 0.0)
    assert 0.9 < t <= 0.95  # the ham at 0.9 ties with a spam: both must fall below
    assert not np.any(scores[~labels] >= t) and np.sum(scores[labels] >= t) == 2
    t25 = threshold_for_fpr(scores, labels, 0.25)  # one of four ham may pass
    assert 0.3 < t25 <= 0.9 and np.sum(scores[~labels] >= t25) == 1


@pytest.mark.unit
def test_saturated_probabilities_stay_finite() -> None:
    cal = Calibration(w_model=1.0, w_rules=0.5, bias=0.0)
    out = cal.combined(np.array([np.inf, -np.inf, 1e9]), np.array([100.0, -100.0, 0.0]))
    assert np.all(np.isfinite(out)) and out[0] > 0.99 and out[1] < 0.01
    assert np.all(np.isfinite(logit(np.array([0.0, 1.0]))))


@pytest.mark.unit
def test_paths_are_plain(tmp_path: Path) -> None:
    """Classifier needs no settings or services: constructing from plain objects is the whole contract."""
    import models.classifier as mod

    src = Path(mod.__file__).read_text()
    assert "import services" not in src and "from services" not in src and "torch" not in src


@pytest.mark.unit
def test_campaign_memory_turns_a_near_duplicate_spam_and_ham_fingerprints_only_protect(loaded: LoadedModel) -> None:
    from models.campaign import CampaignIndex, fingerprint

    text = ("thanks for the review of the release notes the meeting moved to the lunch slot and the patch "
            "schedule is in the diff please read the notes before the meeting and send the review by friday")

    def mail(n: int, subject: str = "re: notes") -> bytes:
        return f"From: dev{n}@example.org\r\nSubject: {subject}\r\n\r\n{text} see http://x{n}.example/{n} {n}\r\n".encode()

    memory = CampaignIndex(capacity=100)
    clf = Classifier(ENGINE, loaded, campaign=memory)
    before = clf.classify(mail(1))
    assert not before.is_spam and before.campaign is None
    parsed = parse(mail(2))
    sig = fingerprint(parsed.subject, parsed.body_text)
    assert sig is not None
    memory.add("flagged-copy", sig, "spam")
    after = clf.classify(mail(3))
    assert after.is_spam and after.decided_by == "campaign"
    assert after.campaign is not None and after.campaign.flagged == "spam" and after.campaign.similarity >= 0.6
    assert after.probability == pytest.approx(before.probability, abs=1e-6)  # the blend's score is unchanged
    assert after.to_dict()["campaign"]["message_id"] == "flagged-copy"
    assert not clf.classify(message(1001, False)).is_spam  # unrelated mail untouched
    memory.add("not-spam-copy", sig, "ham")  # the same campaign flagged "not spam" by a trusted reporter
    protected = clf.classify(mail(4))
    assert not protected.is_spam and protected.campaign is not None and protected.campaign.flagged == "ham"
    spammy = parse(message(1000, True))
    spam_sig = fingerprint(spammy.subject, spammy.body_text)
    assert spam_sig is not None
    memory.add("spam-called-ham", spam_sig, "ham")
    spam = clf.classify(message(1000, True))
    assert spam.campaign is not None and spam.campaign.flagged == "ham"
    assert spam.is_spam and spam.decided_by != "campaign"  # a ham fingerprint never turns a spam verdict into ham
