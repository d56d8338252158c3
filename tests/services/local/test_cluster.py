"""The local three-node KRaft cluster (``kafka_nodes = 3``): every topic on three nodes with min.insync.replicas 2,
and a node SIGKILLed while flags stream in, then restarted, loses no flag the cluster acknowledged."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from conftest import consume_all, make_settings

from services.local import broker
from services.local.daemon import free_port_run, wait_until
from streams import admin
from streams.events import FeedbackEvent
from streams.topics import BrokerUnavailable, EventProducer, Topics, topic_specs


@pytest.mark.integration
def test_a_node_killed_mid_stream_loses_no_acknowledged_flag(tmp_path: Path) -> None:
    port = free_port_run(3)
    cport = free_port_run(3, avoid=range(port, port + 3))
    s = make_settings(tmp_path / "state", kafka_nodes=3, kafka_port=port, kafka_controller_port=cport)
    config = s.streams()
    assert config.bootstrap_servers.count(",") == 2
    broker.start(config)
    try:
        admin.ensure_topics(config, topic_specs(config))
        topic = Topics.from_config(config).feedback
        client = admin._admin(config, 10.0)
        try:
            described = {t["name"]: t for t in client.describe_topics([topic])}
        finally:
            client.close()
        assert all(len(p["replica_nodes"]) == 3 for p in described[topic]["partitions"]), described

        acked: list[str] = []
        refused = 0
        stop = threading.Event()
        producer = EventProducer(config, timeout_s=10.0)

        def stream() -> None:
            nonlocal refused
            i = 0
            while not stop.is_set():
                event = FeedbackEvent.create(label="spam", reporter=f"r{i % 5}",
                                             raw=f"Subject: flag {i}\r\n\r\nbody {i}\r\n".encode())
                try:
                    producer.send(topic, event.message_id, event)
                except BrokerUnavailable:
                    refused += 1  # not acknowledged: the API answers 503 and the client retries
                else:
                    acked.append(event.event_id)
                i += 1

        sender = threading.Thread(target=stream, daemon=True)
        sender.start()
        try:
            wait_until(lambda: len(acked) >= 200, 60, "flags acknowledged before the kill", 0.05)
            victim = broker.node_daemon(config, 1)
            pid = victim.pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed_at = len(acked)
            wait_until(lambda: len(acked) >= killed_at + 200, 120, "flags acknowledged with a node down", 0.05)
            broker.start(config)  # starts the missing node only; waits until all three are back in the metadata
            back_at = len(acked)
            wait_until(lambda: len(acked) >= back_at + 100, 60, "flags acknowledged after the restart", 0.05)
        finally:
            stop.set()
            sender.join(30)
            producer.close()
        stored = [record["event_id"] for record in consume_all(s, topic, timeout_s=60)]
        lost = set(acked) - set(stored)
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged flags lost ({refused} refused, never acknowledged)"
        assert len(stored) == len(set(stored))  # the idempotent producer's retries duplicated nothing
    finally:
        broker.stop(config)
    assert not broker.is_running(config)
