"""The shared feature pipeline: stable hashing, batch = rows, artefact switches, rule hits as tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.corpus import CorpusMessage, load_corpus
from models.features import ARTEFACT_HEADERS, FeatureBatch, FeatureConfig, featurize, message_tokens, token_id
from models.message import parse
from models.rules import RuleEngine, RuleHit, RuleResult

REPO = Path(__file__).resolve().parents[2]


def _downloads() -> Path:
    from services.settings import get_settings

    return get_settings().downloads


@pytest.fixture(scope="module")
def sample() -> list[CorpusMessage]:
    """Every 20th message of each group: ~300 real messages including hard ham and both spam periods."""
    msgs = load_corpus(_downloads())
    return [m for m in msgs if m.index % 20 == 0]


@pytest.fixture(scope="module")
def parsed(sample: list[CorpusMessage]) -> tuple[list, list]:
    engine = RuleEngine.default()
    msgs = [parse(m.raw) for m in sample]
    return msgs, [engine.evaluate(p) for p in msgs]


RAW = (
    b"From zzzz@example.com Thu Aug 22 12:36:23 2002\n"
    b"Return-Path: <bounce@spamassassin.taint.org>\n"
    b"Delivered-To: zzzz@localhost.netnoteinc.com\n"
    b"Received: from mx1.spamassassin.taint.org by dogma.slashnull.org; Thu, 22 Aug 2002 12:34:53 +0100\n"
    b"Date: Thu, 22 Aug 2002 12:34:53 +0100\n"
    b"From: Offers <deals@cheap-pills.biz>\n"
    b"To: zzzz@spamassassin.taint.org\n"
    b"Subject: FREE pills, act NOW\n"
    b"X-Mailer: Microsoft Outlook Express 6.00\n"
    b"Message-ID: <12345.67890@cheap-pills.biz>\n"
    b"Content-Type: text/html; charset=iso-8859-1\n"
    b"\n"
    b"<html><body><p>Buy cheap pills at <a href='http://cheap-pills.biz/buy'>our shop</a> today!!!</p>"
    b"<p>Write to yyyy@example.com or jm@jmason.org</p></body></html>\n"
)


@pytest.mark.unit
def test_config_round_trip_and_refuses_unknown_keys() -> None:
    cfg = FeatureConfig(n_buckets=1 << 16, body_bigrams=False, include_artefacts=True)
    assert FeatureConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError):
        FeatureConfig.from_dict({**cfg.to_dict(), "no_such_switch": 1})
    with pytest.raises(ValueError):
        FeatureConfig.from_dict({**cfg.to_dict(), "n_buckets": 1})


@pytest.mark.unit
def test_artefacts_excluded_by_default_and_switchable() -> None:
    msg = parse(RAW)
    off = message_tokens(msg, None, FeatureConfig())
    on = message_tokens(msg, None, FeatureConfig(include_artefacts=True))
    joined_off = " ".join(off)
    for needle in ("taint", "jmason", "netnoteinc", "slashnull", "example.com", "zzzz", "yyyy", "2002"):
        assert needle not in joined_off, needle
    for name in ("to", "delivered-to", "received", "date", "return-path"):
        assert f"hn:{name}" not in off
        assert f"hn:{name}" in on
    assert any("slashnull" in t for t in on)
    # what real mail carries stays: the sender's domain, URL host, mailer, content type, words
    for tok in ("f:cheap-pills.biz", "u:cheap-pills.biz", "ct:text/html", "cs:iso-8859-1", "pills", "s:free", "S:free"):
        assert tok in off, tok
    assert any(t.startswith("hv:x-mailer:") for t in off)


@pytest.mark.unit
def test_rule_hits_are_tokens_and_never_change_the_shape() -> None:
    msg = parse(RAW)
    cfg = FeatureConfig(n_buckets=1 << 12)
    none = RuleResult(score=0.0, threshold=5.0, is_spam=False, hits=[])
    some = RuleResult(score=7.0, threshold=5.0, is_spam=True, hits=[RuleHit("NEW_RULE", 3.0, "x"), RuleHit("B", 4.0, "y")])
    assert "rule:NEW_RULE" in message_tokens(msg, some, cfg)
    a, b = featurize([msg], [none], cfg), featurize([msg], [some], cfg)
    assert b.ids.size == a.ids.size + 2
    assert token_id("rule:NEW_RULE", cfg.n_buckets) in set(b.ids.tolist())
    assert a.ids.max() < cfg.n_buckets and b.ids.max() < cfg.n_buckets
    with pytest.raises(ValueError):
        featurize([msg], [], cfg)


@pytest.mark.unit
def test_batch_equals_rows_on_real_mail(parsed: tuple[list, list]) -> None:
    msgs, results = parsed
    cfg = FeatureConfig()
    batch = featurize(msgs, results, cfg)
    assert batch.rows == len(msgs)
    assert batch.ids.dtype == np.int64 and batch.vals.dtype == np.float32 and batch.seg.dtype == np.int64
    assert np.all(np.diff(batch.seg) >= 0)
    assert np.all((batch.ids >= 0) & (batch.ids < cfg.n_buckets))
    norms = np.sqrt(np.bincount(batch.seg, weights=batch.vals.astype(np.float64) ** 2, minlength=batch.rows))
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)  # every row has tokens (at least the numeric bins)
    for i in range(0, len(msgs), 7):
        one = featurize([msgs[i]], [results[i]], cfg)
        row = batch.row(i)
        np.testing.assert_array_equal(one.ids, row.ids)
        np.testing.assert_array_equal(one.vals, row.vals)
    again = FeatureBatch.concat([batch.take([0, 1]), batch.take(list(range(2, batch.rows)))])
    np.testing.assert_array_equal(again.ids, batch.ids)
    np.testing.assert_array_equal(again.seg, batch.seg)
    csr = batch.to_csr(cfg.n_buckets)
    assert csr.shape == (batch.rows, cfg.n_buckets) and csr.nnz == batch.ids.size


_CHILD = """
import json, sys
from pathlib import Path
from models.corpus import load_corpus
from models.features import FeatureConfig, featurize
from models.message import parse
msgs = [m for m in load_corpus(Path(sys.argv[1])) if m.index % 97 == 0]
b = featurize([parse(m.raw) for m in msgs], [None] * len(msgs), FeatureConfig())
print(json.dumps({"ids": b.ids.tolist(), "vals": b.vals.tolist(), "rows": b.rows}))
"""


@pytest.mark.unit
def test_hashing_is_stable_across_processes() -> None:
    """Python's hash() is salted per process; the features must not be (training and serving differ)."""
    outs = []
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(_downloads())], cwd=REPO, env=env, capture_output=True, text=True,
            check=True, timeout=120,
        )
        outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1]
    msgs = [m for m in load_corpus(_downloads()) if m.index % 97 == 0]
    here = featurize([parse(m.raw) for m in msgs], [None] * len(msgs), FeatureConfig())
    assert here.ids.tolist() == outs[0]["ids"]
    np.testing.assert_array_equal(here.vals, np.asarray(outs[0]["vals"], dtype=np.float32))
    # pinned values: CRC-32 of the token's UTF-8 bytes, so a change of hash function fails loudly
    assert token_id("viagra", 1 << 20) == 351546
    assert token_id("rule:FOO", 1 << 20) == 26472


@pytest.mark.unit
def test_empty_and_odd_messages_featurize() -> None:
    cfg = FeatureConfig()
    msgs = [parse(b""), parse(b"\xff\xfe garbage \x00\x01"), parse(b"Subject: only a subject\n\n")]
    batch = featurize(msgs, [None] * 3, cfg)
    assert batch.rows == 3
    assert set(np.unique(batch.seg).tolist()) == {0, 1, 2}
    empty = featurize([], [], cfg)
    assert empty.rows == 0 and empty.ids.size == 0


@pytest.mark.unit
def test_artefact_headers_cover_the_collector() -> None:
    assert {"received", "date", "to", "cc", "delivered-to", "x-spam-status"} <= ARTEFACT_HEADERS


@pytest.mark.unit
def test_rows_match_the_plain_definition(parsed: tuple[list, list]) -> None:
    """Each row is log1p(count) of CRC-32 buckets of message_tokens, L2-normalised (bigrams off: they are hashed
    from word CRCs, not from their strings); pins the fast paths (ASCII byte scan, run-length counts) to the spec."""
    msgs, results = parsed
    cfg = FeatureConfig(body_bigrams=False)
    non_ascii = 0
    for msg, res in zip(msgs, results, strict=True):
        non_ascii += not msg.body_text.isascii()
        counts: dict[int, int] = {}
        for tok in message_tokens(msg, res, cfg):
            b = token_id(tok, cfg.n_buckets)
            counts[b] = counts.get(b, 0) + 1
        ids = np.array(sorted(counts), dtype=np.int64)
        v = np.log1p(np.array([counts[i] for i in sorted(counts)], dtype=np.float64))
        got = featurize([msg], [res], cfg)
        np.testing.assert_array_equal(got.ids, ids)
        np.testing.assert_allclose(got.vals, v / np.sqrt(v @ v), rtol=1e-6)
    assert non_ascii > 0  # both word scanners were exercised


@pytest.mark.unit
def test_known_output_is_pinned() -> None:
    """Digest of a two-row batch (one ASCII message, one with accents, capitals, currency and "!!"): any change
    to the features, however small, changes it (and every stored model would then need retraining)."""
    import hashlib

    msgs = [
        parse(RAW),
        parse(
            "Subject: Café ÜBER naïve €100!!\nFrom: Ann <ann@x.test>\n\n"
            "Prix spécial: 100 € — très bon marché, DON'T wait. e-mail v1.2 ok\n".encode()
        ),
    ]
    b = featurize(msgs, [None, None], FeatureConfig())
    assert b.ids.size == 112
    digest = hashlib.sha256(b.ids.tobytes() + b.vals.tobytes() + b.seg.tobytes()).hexdigest()
    assert digest == "fb60692411477a2543f787b08fecd5e9eb30552ae263afb3270a50b6327bf658"
