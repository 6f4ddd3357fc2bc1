"""A consumer over in-memory partitions that follows aiokafka's contract, for unit tests of
the Kafka-side layers (service/kafka/): ``getmany`` returns records from each partition's
position and moves it past them, ``seek`` sets it, paused partitions return nothing,
``commit`` records what it was given. Real Kafka is in the integration tests."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError

from service.batches import Batch

TOPIC = "t"


def rec(partition: int, offset: int, size: int = 10) -> Any:
    return SimpleNamespace(
        topic=TOPIC, partition=partition, offset=offset, timestamp=0,
        key=b"k", value=b"v" * (size - 1), headers=[],
    )  # fmt: skip


class InMemoryConsumer:
    def __init__(self, log: dict[TopicPartition, list[Any]]) -> None:
        self.log = log
        self.assigned = set(log)
        self.positions = dict.fromkeys(log, 0)
        self._paused: set[TopicPartition] = set()
        self.commits: list[dict[TopicPartition, int]] = []
        self.committed_offsets: dict[TopicPartition, int] = {}
        self.fail_commits = 0  # the next n commits fail (a rebalance in the group)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        out: dict[TopicPartition, list[Any]] = {}
        left = max_records or 10**9
        for tp, records in self.log.items():
            if tp in self._paused or tp not in self.assigned or left == 0:
                continue
            got = [r for r in records if r.offset >= self.positions[tp]][:left]
            if got:
                out[tp] = got
                self.positions[tp] = got[-1].offset + 1
                left -= len(got)
        # like aiokafka: wait up to timeout_ms when there is nothing (and always let others run)
        await asyncio.sleep(0 if out else min(timeout_ms, 20) / 1000)
        return out

    def pause(self, *tps: TopicPartition) -> None:
        self._paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused.difference_update(tps)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def highwater(self, tp: TopicPartition) -> int:
        records = self.log[tp]
        return records[-1].offset + 1 if records else 0

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.committed_offsets.get(tp)

    async def commit(self, offsets: dict) -> None:
        if self.fail_commits:
            self.fail_commits -= 1
            raise CommitFailedError("the group rebalanced")
        self.commits.append(dict(offsets))
        self.committed_offsets.update(offsets)


class RecordingProcessor:
    """``add_record`` as the pipeline calls it; notes what was taken. The stages' steps do
    nothing unless ``writable`` is cleared: then ``write`` waits (Elasticsearch down)."""

    def __init__(self) -> None:
        self.taken: list[tuple[int, int]] = []
        self.written: list[int] = []  # Batch.seq, in the order written
        self.writable = asyncio.Event()
        self.writable.set()

    def add_record(self, batch: Batch, topic: str, partition: int, offset: int, *_: Any) -> None:
        batch.records += 1
        batch.next_offsets[TopicPartition(topic, partition)] = offset + 1
        self.taken.append((partition, offset))

    async def prepare(self, batch: Batch) -> None:
        pass

    async def encode(self, batch: Batch) -> None:
        pass

    async def write(self, batch: Batch) -> None:
        await self.writable.wait()
        self.written.append(batch.seq)

    async def send_dead_letters(self, batch: Batch) -> None:
        pass
