"""Records of the models topic: each published model version's files and the champion, for API replicas that share
nothing with the worker but Kafka.

The topic is compacted, one partition (one total order), and only the worker produces to it:

* ``file/<version>/<name>/<index>``: one chunk (at most :data:`CHUNK_BYTES`) of one file of a version;
* ``version/<version>``: the version's manifest, a :class:`VersionManifest` (each file's size, chunk count and
  SHA-256), produced after the version's chunks, so a follower that reads it has read every chunk before it;
* ``champion``: a :class:`ChampionRecord`, the version to serve (a promotion or a rollback), produced after that
  version's manifest.

Compaction keeps the newest record of every key, so a replica that starts on an empty disk and reads the topic
from its beginning finds every published version whole and the current champion last. A tombstone on a version's
keys withdraws it (the worker pruned it). :class:`ModelAssembler` turns records back into whole files with a
bounded buffer; the registry that receives them (``models.registry``) checks the model's hashes and self-check
again before anything serves it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from streams.events import EventInvalid

__all__ = [
    "CHUNK_BYTES",
    "MODELS_TOPIC_CONFIG",
    "ChampionRecord",
    "ModelAssembler",
    "Received",
    "VersionManifest",
    "champion_record",
    "version_records",
    "version_tombstones",
]

CHUNK_BYTES = 256 * 1024
"""Largest record value: well under the broker's default message size limit (1 MiB)."""

MODELS_TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    "min.cleanable.dirty.ratio": "0.1",
    "segment.ms": "3600000",
    "delete.retention.ms": "86400000",
}
"""A table of versions: the newest record of every key survives compaction; a tombstone lasts a day."""

_M = TypeVar("_M", bound=BaseModel)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_FILES = 16


class VersionManifest(BaseModel):
    """What a version is made of: per file, its size, chunk count and SHA-256."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1] = 1
    type: Literal["model-version"] = "model-version"
    version: str = Field(pattern=_NAME.pattern)
    files: dict[str, tuple[int, int, str]] = Field(min_length=1, max_length=MAX_FILES)
    """name -> (bytes, chunks, sha256 hex)."""

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, tuple[int, int, str]]) -> dict[str, tuple[int, int, str]]:
        for name, (size, chunks, digest) in v.items():
            _check_name("file", name)  # a file name, never a path
            if size < 0 or not 1 <= chunks <= size // CHUNK_BYTES + 1 or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"bad description of {name}")
        return v


class ChampionRecord(BaseModel):
    """The version every replica should serve."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1] = 1
    type: Literal["champion"] = "champion"
    version: str = Field(pattern=_NAME.pattern)
    reason: str = Field("", max_length=2000)
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"bad {kind} name {name!r}")


def version_records(version: str, files: Mapping[str, bytes]) -> list[tuple[str, bytes]]:
    """The (key, value) records that publish ``version``: its files' chunks, then its manifest."""
    _check_name("version", version)
    if not files or len(files) > MAX_FILES:
        raise ValueError(f"a version has 1 to {MAX_FILES} files, not {len(files)}")
    out: list[tuple[str, bytes]] = []
    described: dict[str, tuple[int, int, str]] = {}
    for name, data in sorted(files.items()):
        _check_name("file", name)
        chunks = max(1, -(-len(data) // CHUNK_BYTES))
        for i in range(chunks):
            out.append((f"file/{version}/{name}/{i}", data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES]))
        described[name] = (len(data), chunks, hashlib.sha256(data).hexdigest())
    manifest = VersionManifest(version=version, files=described)
    out.append((f"version/{version}", orjson.dumps(manifest.model_dump(mode="json"))))
    return out


def version_tombstones(manifest: VersionManifest) -> list[str]:
    """The keys to tombstone (value None) to withdraw a published version."""
    keys = [f"file/{manifest.version}/{name}/{i}" for name, (_, chunks, _) in manifest.files.items()
            for i in range(chunks)]
    return [*keys, f"version/{manifest.version}"]


def champion_record(version: str, reason: str) -> tuple[str, bytes]:
    """The record that makes ``version`` the champion everywhere (publish it after the version's records)."""
    return "champion", orjson.dumps(ChampionRecord(version=version, reason=reason[:2000]).model_dump(mode="json"))


@dataclass(frozen=True, slots=True)
class Received:
    """What one record completed: a whole version (``files``), a champion, or a withdrawn version (``files`` None
    and ``champion`` False)."""

    version: str
    files: dict[str, bytes] | None = None
    champion: ChampionRecord | None = None


@dataclass(slots=True)
class _Pending:
    chunks: dict[tuple[str, int], bytes] = field(default_factory=dict)
    size: int = 0


class ModelAssembler:
    """Whole versions from the topic's records, in the order they are read; memory bounded by ``max_bytes`` per
    version and ``max_pending`` versions in flight (the oldest is dropped beyond it: compaction left it
    incomplete, or a producer died mid-version, and its manifest will never complete it)."""

    def __init__(self, *, max_bytes: int = 512 * 1024 * 1024, max_pending: int = 4) -> None:
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        self._pending: dict[str, _Pending] = {}
        self.refused: list[str] = []
        """Why records were refused (newest last, at most 100): for logs and tests."""

    def _refuse(self, why: str) -> None:
        self.refused = [*self.refused[-99:], why]

    def feed(self, key: bytes | None, value: bytes | None) -> Received | None:
        """One record; returns what it completed, or None."""
        if key is None:
            self._refuse("a record without a key")
            return None
        text = key.decode("utf-8", "replace")
        kind, _, rest = text.partition("/")
        try:
            if kind == "file":
                self._chunk(rest, value)
                return None
            if kind == "version":
                return self._manifest(rest, value)
            if text == "champion" and value is not None:
                return Received(version="", champion=_decode(ChampionRecord, value))
        except ValueError as exc:  # EventInvalid included
            self._refuse(f"{text[:200]}: {exc}")
            return None
        self._refuse(f"unknown key {text[:200]!r}")
        return None

    def _chunk(self, rest: str, value: bytes | None) -> None:
        version, name, index = rest.split("/") if rest.count("/") == 2 else ("", "", "")
        _check_name("version", version)
        _check_name("file", name)
        if value is None:
            return  # a withdrawn version's chunk
        pending = self._pending.pop(version, None) or _Pending()
        self._pending[version] = pending  # newest last
        previous = pending.chunks.get((name, int(index)))
        pending.size += len(value) - (len(previous) if previous is not None else 0)
        if pending.size > self.max_bytes:
            del self._pending[version]
            raise ValueError(f"version {version} exceeds {self.max_bytes} bytes")
        pending.chunks[(name, int(index))] = value
        while len(self._pending) > self.max_pending:
            dropped = next(iter(self._pending))
            del self._pending[dropped]
            self._refuse(f"version {dropped}: dropped incomplete")

    def _manifest(self, version: str, value: bytes | None) -> Received | None:
        _check_name("version", version)
        pending = self._pending.pop(version, None)
        if value is None:
            return Received(version=version)
        manifest = _decode(VersionManifest, value)
        if manifest.version != version:
            raise ValueError(f"manifest of {manifest.version} under the key of {version}")
        if pending is None:
            raise ValueError(f"version {version}: manifest without chunks")
        files: dict[str, bytes] = {}
        for name, (size, chunks, digest) in manifest.files.items():
            parts = [pending.chunks.get((name, i)) for i in range(chunks)]
            if any(p is None for p in parts):
                raise ValueError(f"version {version}: {name} is missing chunks")
            data = b"".join(p for p in parts if p is not None)
            if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
                raise ValueError(f"version {version}: {name} does not match its manifest")
            files[name] = data
        return Received(version=version, files=files)


def _decode(model: type[_M], value: bytes) -> _M:
    try:
        return model.model_validate(orjson.loads(value))
    except (orjson.JSONDecodeError, ValidationError) as exc:
        raise EventInvalid(f"not a {model.__name__}: {str(exc)[:200]}") from exc
