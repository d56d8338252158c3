"""services/api/offload.py: a batch's share of the classification pool, counted in messages. (The pool's bound and
abandoned single messages are tests/services/test_api_hostile.py's.)"""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.api.offload import Busy, ClassifyPool
from services.local.daemon import wait_until

pytestmark = pytest.mark.unit


def test_a_batch_holds_its_share_and_runs_one_chunk_at_a_time() -> None:
    async def scenario() -> None:
        pool = ClassifyPool(threads=2, queue=6)  # 8 slots
        order: list[str] = []
        async with pool.share(4) as share:
            assert pool.pending == 4
            async with pool.share(4):
                assert pool.pending == 8
                with pytest.raises(Busy):  # a single message finds no slot left
                    await pool.run(lambda: "single")
                with pytest.raises(Busy):
                    async with pool.share(1):
                        pass
            assert pool.pending == 4
            for i in range(3):
                order.append(await share.run(lambda i=i: f"chunk {i}"))
            assert await pool.run(lambda: "single") == "single"  # beside the batch's share
        assert order == ["chunk 0", "chunk 1", "chunk 2"] and pool.pending == 0
        async with pool.share(1000) as big:  # never more than the pool holds
            assert big.slots == 8 and pool.pending == 8
        pool.shutdown()

    asyncio.run(scenario())


def test_a_batch_abandoned_mid_chunk_keeps_its_share_until_the_chunk_is_done() -> None:
    async def scenario() -> None:
        pool = ClassifyPool(threads=1, queue=3)  # 4 slots
        gate = threading.Event()

        async def batch() -> None:
            async with pool.share(4) as share:
                await share.run(gate.wait, 30)

        task = asyncio.ensure_future(batch())
        for _ in range(1000):  # the batch takes its share at its first step
            if pool.pending == 4:
                break
            await asyncio.sleep(0)
        assert pool.pending == 4
        task.cancel()  # the client went away while its chunk is being scored
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.pending == 4  # the thread still works on it
        with pytest.raises(Busy):
            await pool.run(lambda: "single")
        gate.set()
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: wait_until(lambda: pool.pending == 0, 10, "the chunk to finish"))
        assert await pool.run(lambda: 42) == 42
        pool.shutdown()

    asyncio.run(scenario())


def test_inline_scoring_has_shares_too() -> None:
    async def scenario() -> None:
        pool = ClassifyPool(threads=0, queue=0)
        async with pool.share(8) as share:
            assert await share.run(threading.get_ident) == threading.get_ident()
        assert pool.pending == 0

    asyncio.run(scenario())
