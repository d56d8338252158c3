"""The consumed record as a handler sees it: where it came from and its raw bytes (decoding is the handler's)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Record"]


@dataclass(slots=True)
class Record:
    """One consumed Kafka record (what the faust agent hands over)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
