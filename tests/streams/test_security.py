"""Kafka security in every client, against the project's own local broker started with a SASL_PLAINTEXT listener
and a SCRAM-SHA-512 user (created by ``kafka-storage format --add-scram``; services/local/broker.py), then with SASL_SSL
(the same login over TLS, a certificate for 127.0.0.1 signed by a CA made for the test with ``openssl``).

A client without credentials, with a wrong password, without TLS or trusting another CA is refused; the producer,
a kafka-python consumer and the faust worker (aiokafka) configured through the settings produce and consume. The
arguments each client library receives are checked too.
"""

from __future__ import annotations

import dataclasses
import secrets
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_ports, make_settings
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from test_app import WorkerProc, _counters, _flags

from services.local import broker
from services.local.daemon import tail, wait_until
from services.settings import Settings, SettingsError
from streams import admin
from streams.events import FeedbackEvent, decode, encode
from streams.topics import BrokerUnavailable, EventProducer, Topics, topic_specs

USER = "flywheel-test"
# a CA certificate alone (its key was thrown away): something for the TLS context to load and show back
TEST_CA = """\
-----BEGIN CERTIFICATE-----
MIIBjTCCATOgAwIBAgIUGPJoNgw3O0cLBhMDBpCSBm++0igwCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQZmx5d2hlZWwgdGVzdCBDQTAgFw0yNjEyMDcxMDA0MTJaGA8y
MTI2MTExMzEwMDQxMlowGzEZMBcGA1UEAwwQZmx5d2hlZWwgdGVzdCBDQTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABHmkJVW/heoVFMn7YNbwS8QYuDSMxu3By3mL
ofDNlCNEHTKOKdrvpCRL4WLKSqqx3qXoSidvLF/5hl0DsrPV93ijUzBRMB0GA1Ud
DgQWBBTpWefDmQd6r0CEDD1grbpW1XaH1DAfBgNVHSMEGDAWgBTpWefDmQd6r0CE
DD1grbpW1XaH1DAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQCi
KNimTAUVfAi1qIZFNV4VXvQEz9C7d78TBCROckEAHAIgIPi4FohGErQbRb1RCVpi
+RadBdq5RkN6TsaJjHc1qVc=
-----END CERTIFICATE-----
"""


@pytest.fixture(scope="module")
def sasl_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A broker of its own that refuses every client that does not log in as USER over SCRAM-SHA-512."""
    s = make_settings(tmp_path_factory.mktemp("sasl-kafka"), kafka_security_protocol="SASL_PLAINTEXT",
                      kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username=USER,
                      kafka_sasl_password=secrets.token_hex(16), feedback_partitions=2)
    config = s.streams()
    broker.ensure_jars(config)
    broker.start(config)
    try:
        yield s
    finally:
        if not broker.is_running(config):  # it died under the tests: say how, for the failure they report
            print(f"the SASL broker had exited; its log ends:\n{tail(config.state_dir / 'kafka' / 'kafka.log', 60)}")
        broker.stop(config)


def _make_ca(where: Path, name: str) -> tuple[Path, Path]:
    """A CA certificate and key (RSA, valid two days)."""
    where.mkdir(parents=True, exist_ok=True)
    cert, key = where / f"{name}.pem", where / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", f"/CN={name}"], check=True, capture_output=True, timeout=60)
    return cert, key


def _broker_certificate(where: Path, ca: Path, ca_key: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (in its subjectAltName, which both clients check) signed by ``ca``, and its key."""
    key, csr, cert, ext = (where / n for n in ("broker.key", "broker.csr", "broker.pem", "broker.ext"))
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                    "-subj", "/CN=127.0.0.1"], check=True, capture_output=True, timeout=60)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                    "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def sasl_ssl_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A broker of its own on SASL_SSL: TLS with a certificate for 127.0.0.1, then the SCRAM login."""
    root = tmp_path_factory.mktemp("sasl-ssl-kafka")
    ca, ca_key = _make_ca(root / "pki", "flywheel test CA")
    cert, key = _broker_certificate(root / "pki", ca, ca_key)
    s = make_settings(root / "state", kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-256",
                      kafka_sasl_username=USER, kafka_sasl_password=secrets.token_hex(16), kafka_ssl_cafile=ca,
                      kafka_ssl_certfile=cert, kafka_ssl_keyfile=key, feedback_partitions=2)
    config = s.streams()
    broker.ensure_jars(config)
    broker.start(config)
    try:
        yield s
    finally:
        if not broker.is_running(config):
            print(f"the SASL_SSL broker had exited; its log ends:\n{tail(config.state_dir / 'kafka' / 'kafka.log', 60)}")
        broker.stop(config)


def _fresh_topics(s: Settings) -> Settings:
    s = s.model_copy(update={"topic_prefix": f"sec-{uuid.uuid4().hex[:8]}"})
    admin.ensure_topics(s.streams(), topic_specs(s.streams()))
    return s


@pytest.mark.integration
def test_the_broker_refuses_clients_without_the_right_credentials(sasl_kafka: Settings) -> None:
    config = sasl_kafka.streams()
    props = (config.state_dir / "kafka" / "server.properties")
    assert "SASL_PLAINTEXT://127.0.0.1" in props.read_text() and props.stat().st_mode & 0o077 == 0
    assert admin.answers_metadata(config, timeout_s=5.0)  # the configured client is answered

    assert not admin.answers_metadata(config.bootstrap_servers, timeout_s=3.0)  # PLAINTEXT: no login
    wrong = dataclasses.replace(config, sasl_password="not-the-password")
    assert not admin.answers_metadata(wrong, timeout_s=3.0)
    with pytest.raises(KafkaError):
        KafkaProducer(bootstrap_servers=config.bootstrap_servers, max_block_ms=3000, request_timeout_ms=3000)

    plain = dataclasses.replace(config, security_protocol="PLAINTEXT", sasl_username=None, sasl_password=None)
    topic = Topics.from_config(config).feedback
    with EventProducer(plain, timeout_s=3.0) as unauthenticated, pytest.raises(BrokerUnavailable):
        unauthenticated.send_bytes(topic, b"k", b"refused")
    with EventProducer(wrong, timeout_s=3.0) as wrong_password, pytest.raises(BrokerUnavailable):
        wrong_password.send_bytes(topic, b"k", b"refused")


@pytest.mark.integration
def test_configured_clients_produce_and_consume(sasl_kafka: Settings) -> None:
    s = _fresh_topics(sasl_kafka)
    config = s.streams()
    topic = Topics.from_config(config).feedback
    sent = [FeedbackEvent.create(label="spam", reporter=f"u{i}", raw=f"Subject: {i}\r\n\r\nbody\r\n".encode())
            for i in range(20)]
    with EventProducer(config, timeout_s=10.0) as producer:
        producer.send_many(topic, [(e.message_id, encode(e)) for e in sent])

    consumer = KafkaConsumer(topic, bootstrap_servers=config.bootstrap_servers, **config.kafka_python_auth(),
                             group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
                             consumer_timeout_ms=10_000)
    try:
        got: list[str] = []
        for record in consumer:
            got.append(decode(record.value).message_id)
            if len(got) == len(sent):
                break
    finally:
        consumer.close()
    assert sorted(got) == sorted(e.message_id for e in sent)


@pytest.mark.integration
def test_the_faust_worker_consumes_over_sasl(sasl_kafka: Settings, tmp_path: Path) -> None:
    """The worker process (faust, aiokafka) reads its settings from FLYWHEEL_* like `flywheel worker` does."""
    s = _fresh_topics(sasl_kafka).model_copy(update={"state_dir": tmp_path / "worker"})
    config = s.streams()
    flags = _flags(30)
    with EventProducer(config, timeout_s=10.0) as producer:
        producer.send_many(Topics.from_config(config).feedback, [(e.message_id, encode(e)) for e in flags])
    worker = WorkerProc(s, "--ingest-only")
    try:
        worker.start()
        wait_until(lambda: _counters(s).get("votes", 0) >= 30, 120, "the worker to store the 30 flags")
        assert _counters(s)["votes"] == 30
    finally:
        worker.kill()
    assert "SASL_PLAINTEXT" in s.child_env()["FLYWHEEL_KAFKA_SECURITY_PROTOCOL"]


@pytest.mark.integration
def test_tls_refuses_plain_and_foreign_clients_and_carries_every_client(sasl_ssl_kafka: Settings,
                                                                       tmp_path: Path) -> None:
    s = _fresh_topics(sasl_ssl_kafka).model_copy(update={"state_dir": tmp_path / "worker"})
    config = s.streams()
    assert admin.answers_metadata(config, timeout_s=5.0)
    no_tls = dataclasses.replace(config, security_protocol="SASL_PLAINTEXT")
    assert not admin.answers_metadata(no_tls, timeout_s=3.0)
    other_ca, _ = _make_ca(tmp_path / "other", "someone else's CA")
    foreign = dataclasses.replace(config, ssl_cafile=other_ca)
    assert not admin.answers_metadata(foreign, timeout_s=3.0)  # the broker's certificate is not trusted
    topic = Topics.from_config(config).feedback
    with EventProducer(foreign, timeout_s=3.0) as untrusting, pytest.raises(BrokerUnavailable):
        untrusting.send_bytes(topic, b"k", b"refused")

    flags = _flags(25)
    with EventProducer(config, timeout_s=10.0) as producer:
        producer.send_many(topic, [(e.message_id, encode(e)) for e in flags])
    consumer = KafkaConsumer(topic, bootstrap_servers=config.bootstrap_servers, **config.kafka_python_auth(),
                             group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
                             consumer_timeout_ms=10_000)
    try:
        got = sorted(decode(r.value).message_id for _, r in zip(range(len(flags)), consumer, strict=False))
    finally:
        consumer.close()
    assert got == sorted(e.message_id for e in flags)

    worker = WorkerProc(s, "--ingest-only")  # faust's aiokafka clients, over TLS with the SCRAM login
    try:
        worker.start()
        wait_until(lambda: _counters(s).get("votes", 0) >= 25, 120, "the worker to store the 25 flags over SASL_SSL")
        assert _counters(s)["votes"] == 25
    finally:
        worker.kill()


@pytest.mark.unit
def test_tls_settings_reach_both_client_libraries(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(TEST_CA)
    s = Settings(_env_file=None, kafka_bootstrap="kafka.example:9093", kafka_security_protocol="SASL_SSL",
                 kafka_sasl_mechanism="SCRAM-SHA-256", kafka_sasl_username="svc", kafka_sasl_password="pw",
                 kafka_ssl_cafile=ca)
    config = s.streams()
    assert config.kafka_python_auth() == {
        "security_protocol": "SASL_SSL", "ssl_check_hostname": True, "ssl_cafile": str(ca),
        "sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_username": "svc", "sasl_plain_password": "pw",
    }
    creds = config.faust_credentials()
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    aiokafka = credentials_to_aiokafka_auth(creds)
    assert aiokafka["security_protocol"] == "SASL_SSL" and aiokafka["sasl_mechanism"] == "SCRAM-SHA-256"
    assert aiokafka["sasl_plain_username"] == "svc" and aiokafka["sasl_plain_password"] == "pw"
    context = aiokafka["ssl_context"]
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert context.get_ca_certs()[0]["subject"] == ((("commonName", "flywheel test CA"),),)
    assert "pw" not in repr(config) and "pw" not in repr(s)

    tls_only = dataclasses.replace(config, security_protocol="SSL")
    assert credentials_to_aiokafka_auth(tls_only.faust_credentials())["security_protocol"] == "SSL"
    assert "sasl_mechanism" not in tls_only.kafka_python_auth()
    plain = dataclasses.replace(config, security_protocol="PLAINTEXT")
    assert plain.faust_credentials() is None and plain.kafka_python_auth() == {"security_protocol": "PLAINTEXT"}


@pytest.mark.unit
def test_unusable_security_settings_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="FLYWHEEL_KAFKA_SASL_USERNAME and FLYWHEEL_KAFKA_SASL_PASSWORD"):
        Settings(_env_file=None, kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u")
    with pytest.raises(SettingsError, match="FLYWHEEL_KAFKA_SSL_CAFILE"):
        Settings(_env_file=None, kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="kafka_security_protocol"):
        Settings(_env_file=None, kafka_security_protocol="TLS")
    # the local broker speaks TLS only with a certificate, and SASL only with SCRAM: said before anything starts
    tls = make_settings(tmp_path, kafka_security_protocol="SSL").streams()
    with pytest.raises(broker.BrokerError, match="FLYWHEEL_KAFKA_SSL_CERTFILE"):
        broker.start(tls)
    plain_mech = make_settings(tmp_path, kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                               kafka_sasl_username="u", kafka_sasl_password="p").streams()
    with pytest.raises(broker.BrokerError, match="SCRAM"):
        broker.start(plain_mech)


@pytest.mark.integration
def test_the_api_process_records_a_flag_over_sasl(sasl_kafka: Settings, tmp_path: Path) -> None:
    """`flywheel serve`'s code path in its own process, its settings from FLYWHEEL_*: the flag's 2xx means the
    secured broker acknowledged it, and a configured consumer reads it back."""
    import httpx

    from services.bench.api_process import ApiProcess
    from services.bench.harness import seed_registry

    (api_port, spamd_port) = free_ports(2)
    s = _fresh_topics(sasl_kafka).model_copy(update={"state_dir": tmp_path / "api", "api_port": api_port,
                                                     "spamd_port": spamd_port})
    seed_registry(s)  # serving never trains its own
    config = s.streams()
    raw = f"Subject: flagged over SASL {uuid.uuid4().hex}\r\nFrom: a@example.com\r\n\r\nbuy now\r\n"
    with ApiProcess(s, tmp_path / "api.log").start() as api, httpx.Client(base_url=api.base_url, timeout=30) as http:
        answer = http.post("/feedback", json={"label": "spam", "raw": raw}, headers={"X-API-Key": "dev-user-key"})
        assert answer.status_code in (200, 202), answer.text
    topic = Topics.from_config(config).feedback
    consumer = KafkaConsumer(topic, bootstrap_servers=config.bootstrap_servers, **config.kafka_python_auth(),
                             group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
                             consumer_timeout_ms=10_000)
    try:
        events = [decode(r.value) for r in consumer]
    finally:
        consumer.close()
    assert [(e.label, e.reporter) for e in events] == [("spam", "user")]
