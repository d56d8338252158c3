"""The models topic (streams.models, services.api.follow): versions travel whole in bounded chunks,
anything tampered with is refused, and a replica on an empty disk that knows only the brokers ends up serving the
worker's champion and follows its promotions."""

from __future__ import annotations

import hashlib
import random
import threading
import uuid
from pathlib import Path

import orjson
import pytest

from services.settings import Settings
from streams.models import (
    CHUNK_BYTES,
    ChampionRecord,
    ModelAssembler,
    champion_record,
    version_records,
    version_tombstones,
)


def _files(size: int, seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"model.onnx": rng.randbytes(size), "meta.json": b'{"kind": "linear"}', "features.json": b"{}"}


def _feed_all(asm: ModelAssembler, records: list[tuple[str, bytes | None]]) -> list:
    return [got for key, value in records if (got := asm.feed(key.encode(), value)) is not None]


@pytest.mark.unit
def test_a_version_travels_whole_in_chunks_no_larger_than_the_bound() -> None:
    files = _files(3 * CHUNK_BYTES + 17)
    records = version_records("v1", files)
    assert all(len(v) <= CHUNK_BYTES for _, v in records)
    assert records[-1][0] == "version/v1"  # the manifest after every chunk
    got = _feed_all(ModelAssembler(), [*records, champion_record("v1", "better")])
    assert [g.files for g in got[:1]] == [files]
    assert got[1].champion is not None and got[1].champion.version == "v1" and got[1].champion.reason == "better"


@pytest.mark.unit
def test_a_changed_chunk_or_a_missing_one_refuses_the_version() -> None:
    records = version_records("v1", _files(2 * CHUNK_BYTES))
    tampered = [(k, (v[:-1] + bytes([v[-1] ^ 1])) if k == "file/v1/model.onnx/1" else v) for k, v in records]
    asm = ModelAssembler()
    assert _feed_all(asm, tampered) == [] and "does not match its manifest" in asm.refused[-1]
    asm = ModelAssembler()
    assert _feed_all(asm, [r for r in records if r[0] != "file/v1/model.onnx/0"]) == []
    assert "missing chunks" in asm.refused[-1]


@pytest.mark.unit
@pytest.mark.parametrize("key", ["file/../x/model.onnx/0", "file/v1/../../etc/0", "version/.hidden", "file/v1/a/b/c",
                                 "nonsense"])
def test_keys_that_are_not_names_are_refused(key: str) -> None:
    asm = ModelAssembler()
    assert asm.feed(key.encode(), b"x") is None and asm.refused


@pytest.mark.unit
def test_a_manifest_naming_a_path_is_refused() -> None:
    asm = ModelAssembler()
    asm.feed(b"file/v1/model.onnx/0", b"x")
    bad = {"version": "v1", "files": {"../model.onnx": [1, 1, hashlib.sha256(b"x").hexdigest()]}}
    assert asm.feed(b"version/v1", orjson.dumps(bad)) is None and "bad file name" in asm.refused[-1]


@pytest.mark.unit
def test_memory_is_bounded_per_version_and_in_versions_pending() -> None:
    asm = ModelAssembler(max_bytes=2 * CHUNK_BYTES, max_pending=2)
    for i in range(3):
        asm.feed(f"file/v1/model.onnx/{i}".encode(), b"\0" * CHUNK_BYTES)
    assert "exceeds" in asm.refused[-1]
    for v in ("a", "b", "c"):
        asm.feed(f"file/{v}/model.onnx/0".encode(), b"\0")
    assert "version a: dropped incomplete" in asm.refused
    assert _feed_all(asm, version_records("c", {"model.onnx": b"\0"})[-1:])  # c is still whole


@pytest.mark.unit
def test_tombstones_withdraw_every_key_of_a_version() -> None:
    from streams.models import VersionManifest

    records = version_records("v1", _files(CHUNK_BYTES + 1))
    manifest = VersionManifest.model_validate(orjson.loads(records[-1][1]))
    assert sorted(version_tombstones(manifest)) == sorted(k for k, _ in records)
    got = ModelAssembler().feed(b"version/v1", None)
    assert got is not None and got.files is None and got.champion is None


def _quick_registry(root: Path, corpus: list, n: int) -> list[str]:
    from services.bench.api import train_quick_version

    sample = corpus[:: max(1, len(corpus) // 200)][:200]
    return [train_quick_version(root, [m.raw for m in sample], [m.is_spam for m in sample], seed=i, promote=i == 0)
            for i in range(n)]


@pytest.mark.integration
def test_a_replica_on_an_empty_disk_serves_the_champion_and_follows_promotions(
        kafka: Settings, corpus: list, tmp_path: Path) -> None:
    """The worker's publication (Worker.publish_champion's records, sent as it sends them) read by a follower
    whose registry starts empty: the champion arrives whole and passes the load-time self-check; a later
    promotion reaches the running follower; a rollback too."""
    from models.registry import Registry
    from services.api.follow import ModelFollower
    from services.local.daemon import wait_until
    from streams import admin
    from streams.topics import EventProducer, Topics, topic_specs

    s = kafka.model_copy(update={"topic_prefix": f"models-{uuid.uuid4().hex[:8]}"})
    admin.ensure_topics(s.streams(), topic_specs(s.streams()))
    topic = Topics.from_config(s.streams()).models
    source = Registry(tmp_path / "worker-registry")
    v1, v2 = _quick_registry(source.root, corpus, 2)
    producer = EventProducer(s.streams(), timeout_s=10.0)

    def publish(version: str, reason: str) -> None:
        producer.send_many(topic, [*version_records(version, source.version_files(version)),
                                   champion_record(version, reason)])

    replica = Registry(tmp_path / "replica-registry")
    changed = threading.Event()
    follower = ModelFollower(s.model_copy(update={"model_source": "kafka"}), replica, changed.set)
    stop = threading.Event()
    try:
        assert not follower.catch_up(2.0) and replica.champion() is None  # nothing published yet
        publish(v1, "seed")
        assert follower.catch_up(30.0) and replica.champion() == v1
        assert replica.load(v1).version == v1  # hashes and self-check pass on the copy
        thread = threading.Thread(target=follower.run, args=(stop,), daemon=True)
        thread.start()
        changed.clear()
        publish(v2, "better on the flags")
        wait_until(lambda: replica.champion() == v2, 30, "the promotion to reach the replica")
        assert changed.is_set() and replica.load(v2).version == v2
        assert "better on the flags" in replica.history()[-1]["reason"]
        publish(v1, "rolled back")
        wait_until(lambda: replica.champion() == v1, 30, "the rollback to reach the replica")
    finally:
        stop.set()
        producer.close()
    assert not follower.assembler.refused, follower.assembler.refused  # every record was whole and well formed


@pytest.mark.integration
def test_the_worker_publishes_each_champion_once_and_withdraws_what_its_registry_pruned(
        kafka: Settings, corpus: list, tmp_path: Path) -> None:
    """Worker.publish_champion: a new champion's records go out once; a version the worker's registry no longer
    holds is withdrawn (the newest record of each of its keys is a tombstone), so the topic stays bounded."""
    import shutil

    from kafka import KafkaConsumer, TopicPartition

    from models.registry import Registry
    from services.worker.app import Worker
    from streams import admin
    from streams.topics import Topics, topic_specs

    s = kafka.model_copy(update={"topic_prefix": f"models-{uuid.uuid4().hex[:8]}", "state_dir": tmp_path})
    admin.ensure_topics(s.streams(), topic_specs(s.streams()))
    registry = Registry(s.registry)
    v1, v2, v3 = _quick_registry(registry.root, corpus, 3)  # v1 is the champion
    worker = Worker(s, serve_metrics=False, learn=False)  # publishes the champion at start
    try:
        assert not worker.publish_champion()  # unchanged: nothing sent again
        registry.promote(v2, "better")
        assert worker.publish_champion()
        shutil.rmtree(registry.versions_dir / v1)  # the registry pruned it
        registry.promote(v3, "better still")
        assert worker.publish_champion()
    finally:
        worker.close()
    consumer = KafkaConsumer(bootstrap_servers=s.bootstrap_servers.split(","), group_id=None,
                             enable_auto_commit=False)
    topic = Topics.from_config(s.streams()).models
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        latest: dict[str, bytes | None] = {}
        while consumer.position(tp) < end:
            for records in consumer.poll(timeout_ms=500).values():
                latest.update((r.key.decode(), r.value) for r in records)
    finally:
        consumer.close()
    gone = [k for k in latest if f"/{v1}" in k]
    assert gone and all(latest[k] is None for k in gone)  # every key of v1 withdrawn
    assert all(latest[k] is not None for k in latest if f"/{v2}" in k or f"/{v3}" in k)
    assert ChampionRecord.model_validate(orjson.loads(latest["champion"] or b"{}")).version == v3
    from services.api.follow import ModelFollower

    followed = Registry(tmp_path / "replica")
    replica = ModelFollower(s.model_copy(update={"model_source": "kafka"}), followed)
    assert replica.catch_up(30.0) and followed.champion() == v3
    assert sorted(p.name for p in followed.versions_dir.iterdir()) == sorted([v2, v3])
