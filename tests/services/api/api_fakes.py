"""The API in-process for the HTTP tests: the real app, routes, dependencies, middleware and conversions, over a
serving state that needs no Kafka and no trained model.

Real where cheap: the message cache, the classification pool, the feedback limiter (SQLite), the idempotency and
feedback-record stores, the registry (a directory), a small compiled rule set. Stood in for: the classifier (it
answers from one phrase, with both sides filled in as the real one does) and the Kafka producer (it records what
it is given, or refuses as an unreachable broker does).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from models.classifier import ModelSide, Verdict
from models.rules import Rule, RuleEngine, RuleHit, RuleResult
from services.api.deps import get_state
from services.api.state import FeedbackRecords, FileStore, MessageCache, ServingState
from services.settings import Settings

KEYS = {"user-key": "alice", "bob-key": "bob", "admin-key": "admin", "relay-key": "mx", "ops-key": "ops"}
USER = {"X-API-Key": "user-key"}
BOB = {"X-API-Key": "bob-key"}
ADMIN = {"Authorization": "Bearer admin-key"}
RELAY = {"X-API-Key": "relay-key"}
OPS = {"X-API-Key": "ops-key"}
"""A read-only operator (``operator_identities``)."""
MODEL_VERSION = "20260101T000000000000Z-linear-abcdef"

HAM = (b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: lunch on friday?\r\n"
       b"Message-ID: <1@example.org>\r\n\r\nShall we meet at noon?\r\n")
SPAM = (b"From: Prize <win@prizes.example>\r\nTo: you@example.com\r\nSubject: act now\r\n\r\n"
        b"Make money fast from home, click http://prizes.example/c\r\n")


class PhraseClassifier:
    """Spam when the message says "make money"; answers with a rules side and a model side like the real one."""

    policy = "combined"

    def __init__(self, version: str = MODEL_VERSION) -> None:
        self.version = version
        self.seen: list[bytes] = []

    def classify(self, raw: bytes) -> Verdict:
        self.seen.append(raw)
        spam = b"make money" in raw.lower()
        p = 0.97 if spam else 0.02
        hits = [RuleHit("MAKE_MONEY", 3.25, "says make money")] if spam else []
        rules = RuleResult(score=3.25 if spam else 0.0, threshold=5.0, is_spam=False, hits=hits)
        model = ModelSide(probability=p, is_spam=spam, version=self.version, provider="CPUExecutionProvider",
                          kind="linear", threshold=0.5)
        return Verdict(is_spam=spam, probability=p, threshold=0.5, decided_by="combined", policy=self.policy,
                       rules=rules, rules_probability=0.4 if spam else 0.01, model=model,
                       score=math.log(p / (1 - p)))

    def classify_batch(self, raws: Sequence[bytes]) -> list[Verdict]:
        return [self.classify(r) for r in raws]


class RecordingProducer:
    """What the routes publish, in order; ``down`` makes every send fail as an unreachable broker does."""

    timeout_s = 1.0

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Any]] = []
        self.down = False

    def send(self, topic: str, key: str, event: Any) -> tuple[int, int]:
        from streams.topics import BrokerUnavailable

        if self.down:
            raise BrokerUnavailable("the broker does not answer (test)")
        self.sent.append((topic, key, event))
        return 0, len(self.sent) - 1

    def events(self, topic: str) -> list[Any]:
        return [e for t, _, e in self.sent if t == topic]


@dataclass(frozen=True)
class Snapshot:
    """What ``ServingState.current()`` returns: the classifier and the rules it was built with."""

    classifier: PhraseClassifier
    engine: RuleEngine
    version: str = MODEL_VERSION


@dataclass
class Topics:
    feedback: str = "t.feedback"
    retractions: str = "t.feedback"
    model_events: str = "t.model-events"
    rule_changes: str = "t.rule-changes"
    dead_letter: str = "t.dead-letter"


def small_engine() -> RuleEngine:
    return RuleEngine([
        Rule(name="MAKE_MONEY", kind="body", pattern="/make money/i", weight=3.25, description="says make money"),
        Rule(name="SUBJ_ACT_NOW", kind="header", header="Subject", pattern="/act now/i", weight=1.0),
    ])


@dataclass
class FakeState:
    """The attributes and methods of ``services.api.state.ServingState`` that the routes use."""

    settings: Settings
    root: Path
    producer: RecordingProducer = field(default_factory=RecordingProducer)
    topics: Topics = field(default_factory=Topics)
    kafka_up: bool = True
    checks: int = 0
    adopted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from models.registry import Registry
        from services.api.limits import FeedbackLimiter
        from services.api.offload import ClassifyPool

        self.registry = Registry(self.settings.registry)
        self.messages = MessageCache(1000, 1 << 22, spool=None)
        self.classify_pool = ClassifyPool(2, 4)
        self.limiter = FeedbackLimiter.from_settings(self.root / "limits.sqlite3", self.settings)
        self.idempotency = FileStore(self.root / "idempotency", 100)
        self.feedback_records = FeedbackRecords(self.root / "feedback", 1000)
        self.served: Snapshot | None = Snapshot(PhraseClassifier(), small_engine())
        from models.userlists import UserListStore

        self.user_lists = UserListStore(self.settings.registry / "user-lists", self.settings.user_list_learn_after)

    def current(self) -> Snapshot:
        assert self.served is not None
        return self.served

    def kafka_reachable(self, ttl_s: float = 3.0) -> bool:
        return self.kafka_up

    def change_rules(self, change: Callable[[RuleEngine], RuleEngine]) -> RuleEngine:
        engine = change(self.current().engine)
        self.served = dataclasses.replace(self.current(), engine=engine)
        return engine

    def adopt(self, model: Any) -> None:
        self.adopted.append(model.version)

    def request_check(self) -> None:
        self.checks += 1

    # the real bookkeeping of flags (on the real FileStore above)
    remember_feedback = ServingState.remember_feedback
    feedback_record = ServingState.feedback_record
    last_feedback = ServingState.last_feedback
    forget_last_feedback = ServingState.forget_last_feedback
    learn_user_list = ServingState.learn_user_list

    def close(self) -> None:
        self.classify_pool.shutdown()
        self.limiter.close()


def api_settings(root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "state_dir": root, "api_keys": KEYS, "admin_identities": ["admin"], "relay_identities": ["mx"],
        "operator_identities": ["ops"],
        "max_message_bytes": 4096, "client_timeout_s": 2.0, "topic_prefix": "t",
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Api:
    """The real app, its TestClient (no lifespan: nothing starts) and the state it serves from."""

    app: FastAPI
    client: TestClient
    state: FakeState


def make_api(root: Path, **overrides: Any) -> Api:
    from services.api.app import create_app

    settings = api_settings(root, **overrides)
    state = FakeState(settings, root)
    app = create_app(settings)
    app.state.serving = state  # the routes that read it from the request
    app.dependency_overrides[get_state] = lambda: state  # the routes that take it as a dependency
    return Api(app, TestClient(app), state)


def fake_version(registry_root: Path, version: str, *, model: bytes = b"not an onnx graph") -> str:
    """A version directory the registry lists and can promote (it has a model file), but that no load accepts."""
    vdir = registry_root / "versions" / version
    vdir.mkdir(parents=True)
    (vdir / "model.onnx").write_bytes(model)
    (vdir / "meta.json").write_text(json.dumps({
        "version": version, "kind": "linear", "created_at": "2026-01-01T00:00:00Z", "metrics": {"auc": 0.9},
        "lineage": {"source": "test"}, "parent": None, "hyperparameters": {}, "code_version": "test",
        "calibration": None}))
    return version
