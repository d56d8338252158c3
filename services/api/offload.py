"""Classification off the event loop, with bounded concurrency and a bounded queue.

One API process serves HTTP and spamd on one event loop. Scoring a message inline would make every other
request of the process (``/healthz``, ``/readyz``, ``/metrics``, spamd) wait until that message is done, so a
large or crafted message would stall the whole process. Here scoring runs on a few threads: the loop keeps
answering while they work (parsing, rules and ONNX inference release the GIL often; the loop gets it back
within the interpreter's switch interval).

The work is bounded: ``threads`` messages are scored at once and at most ``queue`` more wait; beyond that
``Busy`` is raised at once (HTTP 503 with Retry-After, spamd EX_TEMPFAIL) instead of queueing without end. A
slot is held until the thread finishes, even when the client went away, so abandoned work still counts.
``threads == 0`` scores inline on the loop (the previous behaviour, kept for comparison).

Slots count messages, not requests. A batch takes a *share* (``share(n)``: ``n`` slots, the batch's chunk size,
for as long as it runs) and submits its messages one chunk at a time, waiting for each before the next: the
threads take work first come, first served, so a single message waits behind at most one chunk of each running
batch, never behind a whole batch of a thousand, and several batches cannot fill the queue the single messages
need.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

RETRY_AFTER_S = 1
"""What a refused client is told to wait: a queue of normal messages drains in milliseconds."""


class Busy(Exception):
    """Every classification slot is taken; the caller should answer "retry later"."""

    def __init__(self, capacity: int) -> None:
        super().__init__(f"the server is busy ({capacity} messages being classified or waiting); retry later")
        self.retry_after_s = RETRY_AFTER_S


class ClassifyPool:
    def __init__(self, threads: int, queue: int) -> None:
        self.threads = max(0, threads)
        self.capacity = self.threads + max(0, queue) if self.threads else 0
        self._executor = (
            ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="flywheel-classify")
            if self.threads else None
        )
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Messages being classified or waiting (0 when inline)."""
        return self._pending

    def _release(self, _: Future[Any]) -> None:
        with self._lock:
            self._pending -= 1

    def _take(self, n: int) -> None:
        with self._lock:
            if self._pending + n > self.capacity:
                raise Busy(self.capacity)
            self._pending += n

    @contextlib.asynccontextmanager
    async def share(self, n: int) -> AsyncIterator[Share]:
        """``n`` slots for a batch while the block runs (``Busy`` when they are not free); run its chunks
        through the ``Share`` one at a time."""
        if self._executor is None:
            yield Share(self, 0)
            return
        n = max(1, min(n, self.capacity))
        self._take(n)
        share = Share(self, n)
        try:
            yield share
        finally:
            running = share.inflight
            if running is not None and not running.done():  # the client went away mid-chunk: the slots stay
                running.add_done_callback(lambda _: self._give_back(n))  # taken until the thread is done
            else:
                self._give_back(n)

    def _give_back(self, n: int) -> None:
        with self._lock:
            self._pending -= n

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on a classification thread; ``Busy`` when every slot is taken."""
        if self._executor is None:
            return fn(*args)
        self._take(1)
        try:
            fut = self._executor.submit(fn, *args)
        except BaseException:
            with self._lock:
                self._pending -= 1
            raise
        fut.add_done_callback(self._release)  # on the thread when it finishes, or here if cancelled while queued
        return await asyncio.wrap_future(fut)

    def _submit_held(self, fn: Callable[..., T], *args: object) -> Future[T] | None:
        """``fn(*args)`` submitted to a classification thread on slots the caller already holds (None inline)."""
        return self._executor.submit(fn, *args) if self._executor is not None else None

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


class Share:
    """A batch's slots in a ``ClassifyPool`` (from ``ClassifyPool.share``): ``run`` one chunk at a time."""

    def __init__(self, pool: ClassifyPool, slots: int) -> None:
        self.pool = pool
        self.slots = slots
        self.inflight: Future[Any] | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on a classification thread, counted in this share's slots."""
        fut = self.pool._submit_held(fn, *args)
        if fut is None:
            return fn(*args)
        self.inflight = fut
        return await asyncio.wrap_future(fut)
