"""Prometheus metrics of the API and spamd listener (names fixed by the team contract).

With several uvicorn workers, prometheus-client's multiprocess mode is used: ``serve()`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory under the state dir BEFORE any worker imports this module,
and ``render()`` aggregates every worker's files. Label children are cached because ``.labels()`` costs a
lock and a dict lookup on every request of the hot path.
"""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_PROB_BUCKETS = tuple(i / 20 for i in range(1, 21))

HTTP_REQUESTS = Counter(
    "flywheel_http_requests_total", "HTTP requests served.", ["endpoint", "method", "status"]
)
HTTP_DURATION = Histogram(
    "flywheel_http_request_duration_seconds",
    "Time to serve an HTTP request.",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS,
)
VERDICTS = Counter("flywheel_verdicts_total", "Verdicts per side.", ["side", "verdict"])
RULE_HITS = Counter("flywheel_rule_hits_total", "Rule hits on classified messages.", ["rule"])
SPAM_PROBABILITY = Histogram(
    "flywheel_spam_probability", "Spam probability per side.", ["side"], buckets=_PROB_BUCKETS
)
FEEDBACK = Counter("flywheel_feedback_total", "User flags.", ["outcome", "reason"])
MODEL_INFO = Gauge(
    "flywheel_model_info",
    "The model version this process serves (value 1).",
    ["version", "kind", "provider"],
    multiprocess_mode="liveall",
)
MODEL_RELOADS = Counter("flywheel_model_reloads_total", "Model (re)loads by outcome.", ["outcome"])
RULES_ACTIVE = Gauge(
    "flywheel_rules_active", "Enabled rules in the served rule set.", multiprocess_mode="livemax"
)
RULE_CHANGES = Counter("flywheel_rule_changes_total", "Rule changes applied through the API.", ["action"])
SPAMD_REQUESTS = Counter(
    "flywheel_spamd_requests_total", "spamd-protocol requests.", ["command", "outcome"]
)
CAMPAIGN_HITS = Counter(
    "flywheel_campaign_hits_total",
    "Classified messages that matched a campaign-memory fingerprint, by its label and whether the match made the "
    "verdict spam (decided: the model and the rules alone said ham).",
    ["flagged", "decided"],
)
CAMPAIGN_FINGERPRINTS = Gauge(
    "flywheel_campaign_fingerprints", "Fingerprints in this process's campaign memory.", ["flagged"],
    multiprocess_mode="livemax",
)
MODEL_RECORDS = Counter(
    "flywheel_model_records_total",
    "Models-topic records applied by a replica with model_source=kafka (version, champion, refused).", ["kind"],
)
CAMPAIGN_RECORDS = Counter(
    "flywheel_campaign_records_total", "Campaign-topic records applied, by kind (fingerprint, withdrawn, invalid).",
    ["kind"],
)


@lru_cache(maxsize=4096)
def http_requests(endpoint: str, method: str, status: int) -> Counter:
    return HTTP_REQUESTS.labels(endpoint, method, str(status))


@lru_cache(maxsize=256)
def http_duration(endpoint: str) -> Histogram:
    return HTTP_DURATION.labels(endpoint)


@lru_cache(maxsize=16)
def verdicts(side: str, spam: bool) -> Counter:
    return VERDICTS.labels(side, "spam" if spam else "ham")


@lru_cache(maxsize=8)
def probability(side: str) -> Histogram:
    return SPAM_PROBABILITY.labels(side)


@lru_cache(maxsize=8192)
def rule_hits(rule: str) -> Counter:
    return RULE_HITS.labels(rule)


_current_model: tuple[str, str, str] | None = None


def set_model_info(version: str, kind: str, provider: str) -> None:
    """Expose exactly one served version per process."""
    global _current_model
    if _current_model is not None:
        # In multiprocess mode the old sample lives on in this worker's file: zero it, then drop it.
        MODEL_INFO.labels(*_current_model).set(0)
        with contextlib.suppress(KeyError):
            MODEL_INFO.remove(*_current_model)
    _current_model = (version, kind, provider)
    MODEL_INFO.labels(version, kind, provider).set(1)


def render() -> tuple[bytes, str]:
    """The exposition text of this process, or of every worker in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
