"""The real Kafka broker: topics, a kafka-python group round trip, a faust agent, restart + resume, bad set-ups."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_settings

from services.local import broker
from services.local.daemon import is_alive, read_pid, wait_for
from services.settings import Settings
from streams import admin

DEADLINE_S = 30.0


def _producer(bootstrap: str):  # type: ignore[no-untyped-def]
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0, max_block_ms=10_000)


def _consumer(bootstrap: str, group: str, topic: str):  # type: ignore[no-untyped-def]
    from kafka import KafkaConsumer

    return KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        consumer_timeout_ms=500,
        # A group joined while a restarted broker has no partition metadata for the topic yet gets an empty
        # assignment, and kafka-python rejoins only when its metadata refresh shows the partitions: every 5 min
        # by default, every second here.
        metadata_max_age_ms=1000,
    )


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = _producer(bootstrap)
    try:
        for v in values:
            producer.send(topic, value=v, key=v).get(timeout=10)
    finally:
        producer.close(timeout=5)


def _consume(consumer, n: int, deadline_s: float = DEADLINE_S) -> list[bytes]:  # type: ignore[no-untyped-def]
    """Poll until ``n`` records arrived (or the deadline); returns their values in arrival order."""
    got: list[bytes] = []
    end = time.monotonic() + deadline_s
    while len(got) < n and time.monotonic() < end:
        for records in consumer.poll(timeout_ms=500).values():
            got.extend(r.value for r in records)
    return got


def _drain(consumer, quiet_s: float = 3.0) -> list[bytes]:  # type: ignore[no-untyped-def]
    """Everything the consumer gets until nothing more arrives for ``quiet_s`` after it was assigned partitions."""
    got: list[bytes] = []
    end = time.monotonic() + DEADLINE_S
    last = None
    while time.monotonic() < end:
        for records in consumer.poll(timeout_ms=300).values():
            got.extend(r.value for r in records)
            last = time.monotonic()
        if consumer.assignment():
            last = last or time.monotonic()
            if time.monotonic() - last >= quiet_s:
                return got
    raise AssertionError(f"consumer never settled (assignment {consumer.assignment()}, got {got})")


# ------------------------------------------------------------------------------------------- topics
@pytest.mark.integration
def test_project_topics_exist_with_their_partition_counts(kafka: Settings) -> None:
    from streams.topics import topic_specs

    specs = dict(topic_specs(kafka.streams()))
    assert admin.topic_partitions(kafka.streams(), specs) == specs
    admin.ensure_topics(kafka.streams(), list(specs.items()))  # idempotent: no error, nothing changes
    assert admin.topic_partitions(kafka.streams(), specs) == specs
    assert admin.topic_replicas(kafka.streams(), specs) == dict.fromkeys(specs, 1)  # one node, one replica


@pytest.mark.integration
def test_ensure_topics_grows_a_topic_with_too_few_partitions(kafka: Settings) -> None:
    name = kafka.topic(f"grow-{uuid.uuid4().hex[:6]}")
    admin.ensure_topics(kafka.streams(), [(name, 1)])
    assert admin.topic_partitions(kafka.streams(), [name]) == {name: 1}
    admin.ensure_topics(kafka.streams(), [(name, 3)])
    assert admin.topic_partitions(kafka.streams(), [name]) == {name: 3}


@pytest.mark.integration
def test_status_reports_the_running_broker(kafka: Settings) -> None:
    st = broker.status(kafka.streams())
    assert st["managed"] is kafka.manages_kafka
    assert st["reachable"] is True
    if kafka.manages_kafka:
        assert st["running"] is True and is_alive(st["pid"])
        assert 50 < st["rss_mb"] < 2000
        before = st["pid"]
        with open(f"/proc/{before}/cmdline", "rb") as f:  # the configured JVM options reached the broker's JVM
            argv = f.read().decode().split("\0")
        assert kafka.kafka_jvm_options and all(opt in argv for opt in shlex.split(kafka.kafka_jvm_options)), argv
        broker.start(kafka.streams())  # already running: a no-op, same process
        assert broker.status(kafka.streams())["pid"] == before


# ------------------------------------------------------------------------------------------- kafka-python
@pytest.mark.integration
def test_group_commit_and_resume_with_kafka_python(kafka: Settings) -> None:
    topic = kafka.topic(f"roundtrip-{uuid.uuid4().hex[:6]}")
    group = f"g-{uuid.uuid4().hex[:6]}"
    admin.ensure_topics(kafka.streams(), [(topic, 2)])
    first = [f"a{i}".encode() for i in range(10)]
    _produce(kafka.bootstrap_servers, topic, first)

    consumer = _consumer(kafka.bootstrap_servers, group, topic)
    try:
        got = _consume(consumer, len(first))
        assert sorted(got) == sorted(first)
        consumer.commit()
    finally:
        consumer.close()

    second = [f"b{i}".encode() for i in range(5)]
    _produce(kafka.bootstrap_servers, topic, second)

    resumed = _consumer(kafka.bootstrap_servers, group, topic)
    try:
        got = _drain(resumed)
    finally:
        resumed.close()
    assert sorted(got) == sorted(second), "a new member of the group must resume at the committed offsets"


# ------------------------------------------------------------------------------------------- faust
_FAUST_APP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import faust

    bootstrap, app_id, topic_name, out, expect = sys.argv[1:6]
    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_replication_factor=1,
        topic_partitions=1,
        broker_commit_every=1,
        broker_commit_interval=0.2,
    )
    topic = app.topic(topic_name, value_type=bytes, value_serializer="raw")
    seen = []

    @app.agent(topic)
    async def collect(stream):
        async for value in stream:
            seen.append(value)
            with open(out, "ab") as f:
                f.write(value + b"\\n")
            if len(seen) >= int(expect):
                Path(out + ".done").touch()

    if __name__ == "__main__":
        sys.argv = [sys.argv[0], "worker", "--loglevel", "warn", "--without-web"]
        app.main()
    """
)


def _run_faust_until(script: Path, args: list[str], out: Path, deadline_s: float = 90.0) -> list[bytes]:
    """Run the faust worker until it has written ``out.done``, then SIGTERM it; returns the values it saw."""
    done = Path(str(out) + ".done")
    done.unlink(missing_ok=True)
    out.unlink(missing_ok=True)
    log = out.with_suffix(".log")
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, str(script), *args], stdout=logf, stderr=subprocess.STDOUT,
                                cwd=script.parent)
    try:
        ok = wait_for(done.exists, deadline_s, interval_s=0.2, abort=lambda: proc.poll() is not None)
        assert ok, f"faust agent did not receive the records in time; its log:\n{log.read_text()[-3000:]}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return out.read_bytes().splitlines()


@pytest.mark.integration
def test_faust_agent_consumes_commits_and_resumes(kafka: Settings, tmp_path: Path) -> None:
    topic = kafka.topic(f"faust-{uuid.uuid4().hex[:6]}")
    app_id = f"flywheel-test-{uuid.uuid4().hex[:6]}"
    admin.ensure_topics(kafka.streams(), [(topic, 1)])
    script = tmp_path / "faust_app.py"
    script.write_text(_FAUST_APP)
    out = tmp_path / "seen.txt"

    first = [f"f{i}".encode() for i in range(5)]
    _produce(kafka.bootstrap_servers, topic, first)
    assert _run_faust_until(script, [kafka.bootstrap_servers, app_id, topic, str(out), "5"], out) == first

    second = [f"g{i}".encode() for i in range(3)]
    _produce(kafka.bootstrap_servers, topic, second)
    # Same app id = same consumer group: the restarted agent starts after what it committed.
    assert _run_faust_until(script, [kafka.bootstrap_servers, app_id, topic, str(out), "3"], out) == second


# ------------------------------------------------------------------------------------------- restart
@pytest.fixture()
def private(tmp_path: Path) -> Iterator[Settings]:
    """Settings for a broker of the test's own (restarts and failures must not touch the session broker)."""
    s = make_settings(tmp_path / "state", kafka_start_timeout_s=60.0)
    if not s.manages_kafka:
        pytest.skip("FLYWHEEL_KAFKA_BOOTSTRAP points at an external Kafka; local broker management is not used")
    yield s
    broker.stop(s.streams())


@pytest.mark.integration
def test_restart_keeps_data_and_committed_offsets(private: Settings) -> None:
    s = private
    broker.start(s.streams())
    topic, group = s.topic("restart"), "g-restart"
    admin.ensure_topics(s.streams(), [(topic, 1)])
    _produce(s.bootstrap_servers, topic, [b"before-1", b"before-2"])
    c = _consumer(s.bootstrap_servers, group, topic)
    try:
        assert _consume(c, 2) == [b"before-1", b"before-2"]
        c.commit()
    finally:
        c.close()

    pid = broker.status(s.streams())["pid"]
    broker.stop(s.streams())
    assert not is_alive(pid)
    assert broker.status(s.streams())["reachable"] is False
    assert "[BrokerServer id=1] shut down completed" in (s.state_dir / "kafka" / "kafka.log").read_text()

    broker.start(s.streams())
    _produce(s.bootstrap_servers, topic, [b"after-1"])
    # The group's committed offset is read back by assigning the partition: a group *join* right after a restart
    # can wait out kafka-python's rebalance timers with an empty assignment, which says nothing about the broker.
    from kafka import KafkaConsumer, TopicPartition

    tp = TopicPartition(topic, 0)
    resumed = KafkaConsumer(
        bootstrap_servers=s.bootstrap_servers, group_id=group, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    try:
        resumed.assign([tp])
        assert resumed.committed(tp) == 2
        assert _drain(resumed) == [b"after-1"]
    finally:
        resumed.close()
    everything = KafkaConsumer(bootstrap_servers=s.bootstrap_servers, auto_offset_reset="earliest")
    try:
        everything.assign([tp])
        assert _consume(everything, 3) == [b"before-1", b"before-2", b"after-1"]
    finally:
        everything.close()


# ------------------------------------------------------------------------------------------- bad set-ups
@pytest.mark.integration
def test_port_already_taken_is_a_clear_error(private: Settings) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", private.kafka_port))
        squatter.listen()
        with pytest.raises(broker.BrokerError, match=rf"port {private.kafka_port} .*already in use.*FLYWHEEL_KAFKA_PORT"):
            broker.start(private.streams())
    assert broker.status(private.streams())["running"] is False


@pytest.mark.unit
def test_java_missing_is_a_clear_error(private: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(broker.BrokerError, match=r"Java was not found on PATH.*openjdk-17"):
        broker.start(private.streams())
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    with pytest.raises(broker.BrokerError, match=r"JAVA_HOME"):
        broker.start(private.streams())
    assert broker.status(private.streams())["running"] is False


@pytest.mark.integration
def test_broker_not_up_in_time_stops_it_and_shows_the_log_tail(private: Settings) -> None:
    s = private.model_copy(update={"kafka_start_timeout_s": 0.5})
    with pytest.raises(broker.BrokerError) as err:
        broker.start(s.streams())
    message = str(err.value)
    assert "did not answer a metadata request within" in message
    assert str(s.state_dir / "kafka" / "kafka.log") in message
    assert "starting kafka" in message  # the tail of the log is part of the message
    assert read_pid(s.state_dir / "kafka" / "kafka.pid") is None
    assert broker.status(s.streams())["running"] is False


@pytest.mark.integration
def test_maven_unreachable_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nobody listens on: connection refused, fast and offline
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    mirror = tmp_path / "settings.xml"
    mirror.write_text(
        f"""<settings><mirrors><mirror><id>nowhere</id><mirrorOf>*</mirrorOf>
        <url>http://127.0.0.1:{dead}/maven2</url></mirror></mirrors></settings>"""
    )
    s = make_settings(tmp_path / "state", downloads_dir=tmp_path / "downloads")
    with pytest.raises(broker.BrokerError, match=r"could not reach Maven Central"):
        broker.ensure_jars(s.streams(), maven_settings=mirror, local_repo=tmp_path / "m2")
    assert not broker.jars_dir(s.streams()).exists()


@pytest.mark.unit
def test_maven_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    s = make_settings(tmp_path / "state", downloads_dir=tmp_path / "downloads")
    with pytest.raises(broker.BrokerError, match=r"Maven \('mvn'\) is not installed"):
        broker.ensure_jars(s.streams())


@pytest.mark.unit
def test_errors_are_marked_for_the_cli() -> None:
    assert broker.BrokerError("x").user_facing is True


# ------------------------------------------------------------------------------------------- external kafka
@pytest.mark.integration
def test_external_bootstrap_starts_and_stops_nothing(kafka: Settings, tmp_path: Path) -> None:
    external = make_settings(tmp_path / "ext", kafka_bootstrap=kafka.bootstrap_servers)
    broker.start(external.streams())
    broker.stop(external.streams())
    assert broker.status(external.streams())["managed"] is False
    assert admin.answers_metadata(kafka.bootstrap_servers), "stop() must not touch a Kafka it does not manage"
    assert not (external.state_dir / "kafka").exists()

    nowhere = make_settings(tmp_path / "ext2", kafka_bootstrap=f"127.0.0.1:{external.kafka_port}",
                            kafka_start_timeout_s=2.0)
    with pytest.raises(broker.BrokerError, match="does not answer"):
        broker.start(nowhere.streams())
