"""The worker process's start: it waits a bounded time for Kafka, saying so, instead of dying with faust's first
failed bootstrap (a worker started while the broker restarts)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import make_settings
from structlog.testing import capture_logs

from services.settings import Settings
from services.worker.app import await_kafka


@pytest.mark.integration
def test_await_kafka_returns_at_once_when_the_broker_answers(kafka: Settings) -> None:
    t0 = time.monotonic()
    with capture_logs() as logs:
        await_kafka(kafka)
    assert time.monotonic() - t0 < kafka.kafka_start_timeout_s
    assert not [e for e in logs if e["event"] == "waiting for kafka"]


@pytest.mark.unit
def test_await_kafka_waits_saying_so_then_exits_naming_the_setting(tmp_path: Path) -> None:
    s = make_settings(tmp_path, kafka_start_timeout_s=5.0)  # a free port: no broker there
    t0 = time.monotonic()
    with capture_logs() as logs, pytest.raises(SystemExit, match="FLYWHEEL_KAFKA_START_TIMEOUT_S"):
        await_kafka(s, log_every_s=1.0)
    assert time.monotonic() - t0 >= 5.0
    waits = [e for e in logs if e["event"] == "waiting for kafka"]
    assert len(waits) >= 2 and all(e["bootstrap"] == s.bootstrap_servers for e in waits)
