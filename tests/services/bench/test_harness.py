"""The harness's throwaway stack: one that fails to start leaves nothing running."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.bench.harness import LocalStack
from services.local.daemon import free_port_run, port_open
from services.settings import Settings

pytestmark = pytest.mark.integration


def test_a_stack_that_fails_to_start_stops_the_broker_it_started(settings: Settings, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from streams import admin

    port = free_port_run(2)
    s = settings.model_copy(update={"kafka_port": port, "kafka_controller_port": port + 1, "kafka_bootstrap": None,
                                    "kafka_nodes": 1})

    def refused(*args: object, **kwargs: object) -> None:
        assert port_open(port), "the broker was started before the topics"
        raise admin.BrokerError("creating topics failed (as a cluster that has not settled may)")

    monkeypatch.setattr(admin, "ensure_topics", refused)
    with pytest.raises(admin.BrokerError, match="creating topics failed"), LocalStack(s, tmp_path / "stack"):
        pass
    assert not port_open(port)  # the broker it started is stopped again
