"""Hostile and noisy feedback on the real stack: none of it may get a worse model served.

Three attacks, one after the other on one stack (real broker, API and worker; flags through POST /feedback):
a single hostile reporter calling ham spam (20% of the flags), three colluding reporters calling one spam
campaign ham (20% of the flags, each backing the others), and 30% random label noise from every reporter.
After each, the served model must not be worse on mail nobody flagged, by the same one-sided test at 5% the gate
uses (DeLong's paired test on the served scores before and after, over HTTP).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from models.consensus import message_id_for, reporter_weight
from models.gate import delong
from services.bench.harness import LocalStack
from services.local.daemon import wait_until
from services.settings import Settings

HONEST = {f"k-honest-{i}": f"honest{i}" for i in range(4)}
COLLUDERS = {f"k-gang-{i}": f"gang{i}" for i in range(3)}
KEYS = {**HONEST, **COLLUDERS, "k-mallory": "mallory", "dev-admin-key": "admin"}
Z_5PCT = 1.645

pytestmark = pytest.mark.e2e


class Attack:
    def __init__(self, stack: LocalStack, pool: list[Any], probe: list[Any]) -> None:
        self.stack = stack
        self.pool = pool
        self.probe = probe
        self.used = 0

    def take(self, n: int, spam: bool | None = None) -> list[Any]:
        out: list[Any] = []
        while len(out) < n and self.used < len(self.pool):
            m = self.pool[self.used]
            self.used += 1
            if spam is None or m.is_spam == spam:
                out.append(m)
        assert len(out) == n, "corpus pool exhausted"
        return out

    def flag(self, m: Any, key: str, label: str) -> None:
        mid = self.stack.classify(m.raw)["message_id"]
        r = self.stack.flag(label, key, message_id=mid)
        assert r.status_code == 202, r.text

    def probe_scores(self) -> np.ndarray:
        return np.array([a["score"] for a in self.stack.classify_many([m.raw for m in self.probe])])

    def settle(self) -> None:
        wait_until(self.stack.settled, 300, "the worker to settle", 0.5)
        champ = self.stack.registry().champion()
        wait_until(lambda: self.stack.classify(self.probe[0].raw)["model"]["version"] == champ, 60, "the API reload")

    def assert_not_worse(self, before: np.ndarray) -> None:
        after = self.probe_scores()
        y = np.array([m.is_spam for m in self.probe])
        r = delong(after, before, y)
        assert r.z_better() > -Z_5PCT, f"worse on unflagged mail: AUC {r.auc_b:.5f} -> {r.auc_a:.5f} (se {r.se:.5f})"

    def weights(self) -> dict[str, float]:
        with self.stack.db() as db:
            return {r: reporter_weight(a, d) for r, a, d in db.execute("SELECT reporter, agree, disagree FROM reporters")}


@pytest.fixture(scope="module")
def attack(kafka: Settings, p1_split: tuple[list, list], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attack]:
    from services.bench.flywheel import split_flagged

    root = tmp_path_factory.mktemp("poison")
    _, test = p1_split
    flaggable, unflagged = split_flagged([m for m in test if len(m.raw) < 100_000])
    probe = unflagged[1::2]
    exclude = root / "unflagged.txt"
    exclude.write_text("\n".join(message_id_for(m.raw) for m in unflagged))
    pool = list(flaggable)
    random.Random(11).shuffle(pool)
    stack = LocalStack(kafka, root / "stack", api_keys=KEYS, eval_exclude_file=exclude, neural_retrain=False,
                       linear_refit_s=1.0)
    with stack:
        yield Attack(stack, pool, probe)


def test_a_hostile_reporter_loses_weight_and_gets_no_worse_model_served(attack: Attack) -> None:
    before = attack.probe_scores()
    msgs = attack.take(200)
    hams = attack.take(50, spam=False)
    honest = list(HONEST)
    for i, m in enumerate(msgs):
        attack.flag(m, honest[i % len(honest)], "spam" if m.is_spam else "ham")
        if i % 4 == 0:  # mallory: 20% of all flags, every one of them ham called spam
            attack.flag(hams[i // 4], "k-mallory", "spam")
    attack.settle()
    w = attack.weights()
    w_honest = min(w[HONEST[k]] for k in honest)
    assert w["mallory"] < attack.stack.settings.consensus_min_weight and w["mallory"] < 0.5 * w_honest, w
    attack.assert_not_worse(before)


def test_colluding_reporters_cannot_teach_a_spam_campaign_as_ham(attack: Attack) -> None:
    """Three reporters who back each other call one spam campaign ham (20% of the flags together)."""
    from models.features import FeatureConfig, featurize
    from models.message import parse
    from models.rules import RuleEngine

    before = attack.probe_scores()
    spam = attack.take(120, spam=True)
    engine = RuleEngine.default()
    parsed = [parse(m.raw) for m in spam]
    x = featurize(parsed, [engine.evaluate(p) for p in parsed], FeatureConfig()).to_csr(FeatureConfig().n_buckets)
    x = x.multiply(1.0 / np.sqrt(x.multiply(x).sum(axis=1))).tocsr()
    similarity = np.asarray((x @ x[0].T).todense()).ravel()
    campaign = [spam[i] for i in np.argsort(-similarity)[:20]]  # a spam message and its 19 nearest neighbours
    others = [m for m in spam if m not in campaign] + attack.take(140, spam=False)
    random.Random(3).shuffle(others)
    honest = list(HONEST)
    n_honest = 0
    for i, m in enumerate(others[:240]):
        attack.flag(m, honest[i % len(honest)], "spam" if m.is_spam else "ham")
        n_honest += 1
    for m in campaign:
        for key in COLLUDERS:
            attack.flag(m, key, "ham")
    assert 3 * len(campaign) / (3 * len(campaign) + n_honest) == pytest.approx(0.2, abs=0.001)
    attack.settle()
    attack.assert_not_worse(before)
    # Vouching for each other earned the gang nothing: the models' evidence left every one of them below the bar,
    # so the campaign carries no label at all in what the worker learns from (today's weights)...
    w = attack.weights()
    assert all(w[name] < 0.5 * attack.stack.settings.consensus_min_weight for name in COLLUDERS.values()), w
    campaign_ids = {message_id_for(m.raw) for m in campaign}
    from models.consensus import consensus

    with attack.stack.db() as db:
        votes = db.execute("SELECT message_id, reporter, label FROM votes WHERE retracted=0").fetchall()
    by_message: dict[str, list[tuple[str, float]]] = {}
    for mid, reporter, label in votes:
        if mid in campaign_ids:
            by_message.setdefault(mid, []).append((label, w[reporter]))
    assert len(by_message) == len(campaign)
    assert all(consensus(v, attack.stack.settings.consensus_min_weight)[0] is None for v in by_message.values())
    # ... and the champion's lineage counts only the honest flags of this test on top of the earlier ones.
    champ = attack.stack.registry().champion()
    counts = attack.stack.registry().get(champ).lineage["counts"]["flags"]
    assert counts["spam"] + counts["ham"] <= attack.stack.counters()["votes"] - 3 * len(campaign)


def test_thirty_percent_label_noise_gets_no_worse_model_served(attack: Attack) -> None:
    before = attack.probe_scores()
    msgs = attack.take(300)
    rng = random.Random(5)
    honest = list(HONEST)
    for i, m in enumerate(msgs):
        wrong = rng.random() < 0.3
        attack.flag(m, honest[i % len(honest)], "spam" if m.is_spam != wrong else "ham")
    attack.settle()
    attack.assert_not_worse(before)
