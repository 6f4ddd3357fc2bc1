"""The stages a batch goes through after the fetch: prepare -> encode -> write.

Each stage is one task; bounded queues join them, so fetching, encoding and writing overlap
and at most ``size`` batches wait between any two stages. With one worker per stage, batches
finish in the order they were made: when one is done, every record before it is done too
(what :mod:`service.kafka.checkpoint` relies on).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from service.batches import Batch, BatchProcessor

# How long one wait for progress lasts before the deadline is looked at again.
_WAIT_S = 0.5


class Stages:
    """``on_taken``: the first stage took a batch (there is room again); ``on_written``: a
    batch is written and its dead letters are sent (runs after it is counted done)."""

    def __init__(
        self,
        processor: BatchProcessor,
        size: int,
        on_taken: Callable[[], None],
        on_written: Callable[[Batch], Awaitable[None]],
    ) -> None:
        self.processor = processor
        self._on_taken = on_taken
        self._on_written = on_written
        self._prepare_q: asyncio.Queue[Batch] = asyncio.Queue(maxsize=size)
        self._encode_q: asyncio.Queue[Batch] = asyncio.Queue(maxsize=size)
        self._write_q: asyncio.Queue[Batch] = asyncio.Queue(maxsize=size)
        self.made = 0  # batches handed to the stages
        self.done = 0  # batches written
        self._progress = asyncio.Condition()

    def start(self) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self._prepare(), name="prepare"),
            asyncio.create_task(self._encode(), name="encode"),
            asyncio.create_task(self._write(), name="write"),
        ]

    @property
    def full(self) -> bool:
        """No room for another batch."""
        return self._prepare_q.full()

    @property
    def in_flight(self) -> int:
        return self.made - self.done

    def submit(self, batch: Batch) -> bool:
        """Hand ``batch`` to the first stage if it has room (never waits)."""
        if self._prepare_q.full():
            return False
        self.made += 1
        self._prepare_q.put_nowait(batch)
        return True

    async def drained_by(self, deadline: Callable[[], float]) -> bool:
        """Wait until every batch handed over is written; False once ``deadline()`` (a
        monotonic time, looked at again on each wake) has passed."""
        async with self._progress:
            while self.done < self.made:
                left = deadline() - time.monotonic()
                if left <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), min(left, _WAIT_S))
            return True

    async def _prepare(self) -> None:
        while True:
            batch = await self._prepare_q.get()
            self._on_taken()
            await self.processor.prepare(batch)
            await self._encode_q.put(batch)

    async def _encode(self) -> None:
        while True:
            batch = await self._encode_q.get()
            await self.processor.encode(batch)
            await self._write_q.put(batch)

    async def _write(self) -> None:
        while True:
            batch = await self._write_q.get()
            await self.processor.write(batch)
            await self.processor.send_dead_letters(batch)
            await self.mark_done(batch)

    async def mark_done(self, batch: Batch) -> None:
        async with self._progress:
            self.done += 1
            self._progress.notify_all()
        await self._on_written(batch)
