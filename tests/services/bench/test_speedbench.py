"""`flywheel bench speed`, briefly: Flywheel's /classify and Debian's rspamd /checkv2 on the same messages, one
worker each, one sequential client; and the resolver that answers rspamd's lookups at once."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from services.settings import Settings


@pytest.mark.unit
def test_the_resolver_answers_every_query_at_once_with_nxdomain() -> None:
    from services.bench.speed import NxResolver

    # a query for "example.net" A IN, id 0x1234, recursion desired (RFC 1035 4.1)
    question = b"\x07example\x03net\x00\x00\x01\x00\x01"
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + question
    resolver = NxResolver().start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2.0)
            sock.sendto(query, ("127.0.0.1", resolver.port))
            reply, _ = sock.recvfrom(512)
    finally:
        resolver.stop()
    assert reply[:2] == b"\x12\x34"  # the query's id
    assert reply[2] & 0x80 and reply[2] & 0x01  # a response, recursion desired echoed
    assert reply[3] & 0x0F == 3  # NXDOMAIN
    assert reply[4:6] == b"\x00\x01" and reply[6:12] == b"\x00" * 6 and reply[12:] == question


@pytest.mark.integration
def test_flywheel_and_rspamd_classify_the_same_messages_side_by_side(settings: Settings, tmp_path: Path) -> None:
    from services.bench.speed import run_speed_bench

    out = tmp_path / "speed.json"
    r = run_speed_bench(settings.model_copy(update={"state_dir": tmp_path}), out, messages=40, rounds=1)
    assert r["messages"] == 40 and 0 < r["spam"] < 40 and r["rspamd"].startswith("Rspamd daemon version")
    (run,) = r["runs"]
    assert run["flywheel_failed"] == 0 and run["rspamd_failed"] == 0, run
    assert run["flywheel_msgs_per_s"] > 0 and run["rspamd_msgs_per_s"] > 0
    assert r["vs_rspamd"] == pytest.approx(run["flywheel_msgs_per_s"] / run["rspamd_msgs_per_s"], rel=0.01)
    assert r["checks"]["vs_rspamd"]["met"] == (r["vs_rspamd"] >= 3.0)
    assert json.loads(out.read_text())["vs_rspamd"] == r["vs_rspamd"]
