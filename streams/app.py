"""The faust-streaming application of the worker: one agent on the feedback topic, one timer.

Records reach the handler as raw bytes (``raw`` serializers): decoding and validation are the handler's job so
that an invalid record is dead-lettered with its reason instead of crashing the agent. The agent takes
records in small batches (``take_events``) so the handler can apply each batch in one durable transaction;
events are acknowledged only after the handler returns (at-least-once). Agent concurrency is 1 and faust's
exactly-once mode is off: ordering per partition is what makes the handler's offset filter exact.

A handler that raises must not be acknowledged: faust's ``take_events`` acknowledges the batch in a ``finally``
block, so an exception unwinding the agent would move the committed offsets past records nobody stored, and the
dead agent would consume nothing more while the process looked alive. The agent therefore ends the process at
once (exit status ``EXIT_UNACKNOWLEDGED``), before the next commit, and a supervisor restarts it from its
committed offsets. Handlers retry what can pass (a locked database) themselves and raise only when giving up.

Flags and retractions share the feedback topic (see streams.topics), so one agent sees them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import TYPE_CHECKING, NoReturn, Protocol

import faust
import structlog

from streams.records import Record

if TYPE_CHECKING:
    from collections.abc import Sequence

    from streams.config import StreamsConfig

log = structlog.get_logger(__name__)

EXIT_UNACKNOWLEDGED = 70
"""Exit status of a worker whose handler failed a batch: nothing after its committed offsets was acknowledged."""


class BatchHandler(Protocol):
    """What the app drives: ``handle`` each batch of records (in partition order), ``tick`` on the timer."""

    async def on_start(self, app: faust.App) -> None: ...

    async def handle(self, records: Sequence[Record]) -> None:
        """Apply a batch durably, or raise (the process then exits unacknowledged). Cancelled (at shutdown), it
        must not return before the batch is stored or known not to be: faust acknowledges it as the agent
        unwinds."""
        ...

    async def tick(self) -> None: ...


class CountingHandler:
    """A handler that only counts (the app without the worker: smoke tests, lag checks)."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.ticks = 0

    async def on_start(self, app: faust.App) -> None:
        return None

    async def handle(self, records: Sequence[Record]) -> None:
        self.records.extend(records)

    async def tick(self) -> None:
        self.ticks += 1


def make_app(
    config: StreamsConfig,
    handler: BatchHandler | None = None,
    *,
    batch_max: int = 500,
    batch_within_s: float = 0.05,
    tick_s: float = 1.0,
) -> faust.App:
    """The worker's faust app (consumer group ``<prefix>-worker``), wired to ``handler``; ``tick`` every ``tick_s``."""
    h: BatchHandler = handler if handler is not None else CountingHandler()
    app = faust.App(
        f"{config.topic_prefix}-worker",
        broker=[f"kafka://{b.strip()}" for b in config.bootstrap_servers.split(",")],
        # TLS / SASL for aiokafka's consumer, producer and admin client, from the same config as every other client
        broker_credentials=config.faust_credentials(),
        store="memory://",
        # faust keeps its table state here (default: ``<app id>-data`` in the current directory, which litters
        # whatever directory the worker, a test or a benchmark was started from)
        datadir=str(config.state_dir / f"{config.topic_prefix}-worker-data"),
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # faust's 60 s session would leave a crashed worker's partitions unread for a minute after its restart.
        broker_session_timeout=config.session_timeout_s,
        broker_heartbeat_interval=min(3.0, config.session_timeout_s / 3),
        topic_allow_declare=False,
        topic_disable_leader=True,
        producer_acks=-1,
        processing_guarantee="at_least_once",
        autodiscover=False,
        stream_wait_empty=False,
    )
    app.flywheel_handler = h  # type: ignore[attr-defined]  # faust's App declares no such field: the handler, reachable from the app
    feedback = app.topic(
        config.topic("feedback"), key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )

    @app.agent(feedback, concurrency=1)
    async def feedback_agent(stream: faust.StreamT[bytes]) -> None:
        try:
            async for events in stream.take_events(batch_max, within=batch_within_s):  # type: ignore[attr-defined]  # StreamT omits take_events, which faust's Stream has
                records = [
                    Record(e.message.topic, e.message.partition, e.message.offset, e.message.key, e.message.value)
                    for e in events
                ]
                try:
                    await h.handle(records)
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:  # noqa: BLE001 - whatever it was, the batch must not be acknowledged
                    exit_unacknowledged(records, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the stream itself failed: a dead agent in a live process looks healthy
            exit_unacknowledged([], exc)

    @app.task
    async def start_handler() -> None:
        await h.on_start(app)

    @app.timer(interval=tick_s)
    async def tick() -> None:
        await h.tick()

    return app


def exit_unacknowledged(records: Sequence[Record], exc: BaseException) -> NoReturn:
    """End the process now, before faust acknowledges ``records`` (see the module docstring), saying why."""
    first = records[0] if records else None
    log.critical("batch not stored: the worker exits without acknowledging it, to restart from its committed "
                 "offsets", error=repr(exc), records=len(records),
                 partition=first.partition if first else None, first_offset=first.offset if first else None,
                 exit_status=EXIT_UNACKNOWLEDGED)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: nothing more can be said
            stream.flush()
    os._exit(EXIT_UNACKNOWLEDGED)


def run_app(app: faust.App, loglevel: str = "WARNING") -> None:
    """Run a faust app in this process until SIGTERM/SIGINT (faust owns the event loop)."""
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, override_logging=False)
    worker.execute_from_commandline()
