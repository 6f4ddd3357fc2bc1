"""The aiokafka runner: Kafka -> batch -> look up -> encode -> write -> commit.

:class:`Pipeline` is the fetch loop. It polls the consumer, adds records to the open batch
(what each record becomes is :mod:`service.batches`' job) and hands closed batches to the
stages (:mod:`service.kafka.stages`); when a batch is written, its offsets become committable
(:mod:`service.kafka.checkpoint`) and its bytes are freed (:mod:`service.kafka.pausing`).

Nothing is committed before Elasticsearch (or the dead-letter topic) has confirmed it. When
Elasticsearch keeps refusing, the write stage retries the batch with backoff and the queues
fill up. Then the fetch loop is *blocked*: it takes no more records, pauses every assigned
partition (newly assigned ones too, after a rebalance) and keeps polling, so the group keeps
it. Records fetched beyond the bytes bound go back (seek) and are fetched again later.

Stopping (SIGTERM) and a partition revoke are bounded by ``shutdown_timeout_s``, even while
Elasticsearch is down: hand the open batch over, wait for the stages, commit what was written;
whatever is not written by then stays uncommitted and is consumed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from service.batches import Batch, BatchProcessor
from service.config import Settings
from service.kafka.checkpoint import Checkpoint
from service.kafka.pausing import Pausing
from service.kafka.stages import Stages
from service.metrics import Metrics

log = logging.getLogger(__name__)

# How often the fetch loop polls while it is blocked (Kafka's max.poll.interval is minutes).
_BLOCKED_POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    batch_max_docs: int = 256
    batch_max_tokens: int = 65_536
    batch_linger_ms: int = 200
    max_inflight_batches: int = 2
    max_poll_records: int = 2000
    commit_interval_ms: int = 1000
    shutdown_timeout_s: float = 30.0
    max_inflight_bytes: int = 64 * 1024 * 1024


def pipeline_config(settings: Settings) -> PipelineConfig:
    s = settings
    return PipelineConfig(
        batch_max_docs=s.batch_max_docs,
        batch_max_tokens=s.batch_max_tokens,
        batch_linger_ms=s.batch_linger_ms,
        max_inflight_batches=s.max_inflight_batches,
        max_poll_records=s.kafka_max_poll_records,
        commit_interval_ms=s.commit_interval_ms,
        shutdown_timeout_s=s.shutdown_timeout_s,
        max_inflight_bytes=s.max_inflight_bytes,
    )


class Pipeline(ConsumerRebalanceListener):
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        processor: BatchProcessor,
        metrics: Metrics,
        config: PipelineConfig,
    ) -> None:
        self.consumer = consumer
        self.processor = processor
        self.metrics = metrics
        self.config = config
        self.pausing = Pausing(consumer, metrics, config.max_inflight_bytes)
        self.checkpoint = Checkpoint(consumer, metrics, config.commit_interval_ms / 1000)
        self.stages = Stages(
            processor, config.max_inflight_batches, self._room_freed, self._written
        )
        self._seq = 0
        self._open = self._new_batch()
        self._room = asyncio.Event()  # set when the stages have room, bytes are freed, or on stop
        self._stopping = asyncio.Event()
        self._stop_deadline = math.inf
        self.last_progress = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        """Ask the pipeline to finish: no new records, drain what is in flight, commit; all
        within ``shutdown_timeout_s`` from now."""
        if not self._stopping.is_set():
            self._stop_deadline = time.monotonic() + self.config.shutdown_timeout_s
            self._stopping.set()
            self._room.set()

    async def run(self) -> None:
        stages = self.stages.start()
        fetch = asyncio.create_task(self._fetch_loop(), name="fetch")
        stopping = asyncio.create_task(self._stopping.wait(), name="stopping")
        tasks: list[asyncio.Task[Any]] = [fetch, *stages]
        try:
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task in done:
                    task.result()  # re-raises the failure of a stage
            # Stopping. The fetch loop may wait in a poll (a rebalance): it takes no more.
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetch
            await self._finish_inflight(self._stop_deadline, "shutdown")
        finally:
            everything: list[asyncio.Task[Any]] = [stopping, *tasks]
            for task in everything:
                task.cancel()
            for task in everything:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _deadline(self, deadline: float) -> float:
        """A deadline, cut short by a stop request (a revoke in progress must not make the
        stop wait longer than ``shutdown_timeout_s``)."""
        return min(deadline, self._stop_deadline)

    def _commit_reserve(self) -> float:
        """Time kept back from draining for the final commit."""
        return min(2.0, self.config.shutdown_timeout_s / 4)

    async def _finish_inflight(self, deadline: float, why: str) -> None:
        """Hand the open batch over, wait for the stages, commit what was written; all by
        ``deadline``. What is not written by then stays uncommitted (consumed again)."""
        drain_by = deadline - self._commit_reserve()
        if not await self._hand_over_by(drain_by):
            log.warning(
                "%s: %d record(s) not handed to the stages within the %.0fs bound "
                "(SPARSE_INGEST_SHUTDOWN_TIMEOUT_S); they stay uncommitted and will be read again",
                why,
                self._open.records,
                self.config.shutdown_timeout_s,
            )
            self._drop_open_batch()
        if not await self.stages.drained_by(lambda: self._deadline(drain_by)):
            log.warning(
                "%s: %d batch(es) not written within the %.0fs bound "
                "(SPARSE_INGEST_SHUTDOWN_TIMEOUT_S); they stay uncommitted and will be read again",
                why,
                self.stages.in_flight,
                self.config.shutdown_timeout_s,
            )
        left = self._deadline(deadline) - time.monotonic()
        try:
            await asyncio.wait_for(self.commit(), max(left, 0.1))
        except TimeoutError:
            log.warning(
                "%s: the offset commit did not finish in time; records will be re-read", why
            )

    # ------------------------------------------------------------------ fetch
    def _new_batch(self) -> Batch:
        self._seq += 1
        return Batch(seq=self._seq, opened_at=time.monotonic())

    def _add_record(self, record: Any) -> None:
        self.processor.add_record(
            self._open,
            record.topic,
            record.partition,
            record.offset,
            record.timestamp,
            record.key,
            record.value,
            list(record.headers or ()),
        )

    def _batch_full(self, batch: Batch) -> bool:
        return (
            batch.records >= self.config.batch_max_docs
            or batch.est_tokens >= self.config.batch_max_tokens
        )

    def _linger_left(self, batch: Batch) -> float:
        if batch.records == 0:
            return self.config.batch_linger_ms / 1000 or 0.1
        return batch.opened_at + self.config.batch_linger_ms / 1000 - time.monotonic()

    def _ready_to_close(self) -> bool:
        batch = self._open
        return batch.records > 0 and (
            self._batch_full(batch)
            or self._linger_left(batch) <= 0
            or self.pausing.wanted_bytes > 0
        )

    def _blocked(self) -> bool:
        """No record may be taken now: the bytes bound is reached, or the open batch is
        complete and the stages have no room for it."""
        return self.pausing.bytes_blocked() or (self._ready_to_close() and self.stages.full)

    async def _fetch_loop(self) -> None:
        while not self._stopping.is_set():
            if self._ready_to_close():
                self._hand_over()
            if self._blocked():
                await self._wait_for_room()
                continue
            self.pausing.set_paused(False)
            timeout = max(0.0, min(self._linger_left(self._open), _BLOCKED_POLL_S))
            room = self.config.batch_max_docs - self._open.records
            max_records = max(1, min(self.config.max_poll_records, room))
            records = await self.consumer.getmany(
                timeout_ms=int(timeout * 1000), max_records=max_records
            )
            if records and self._open.records == 0:
                self._open.opened_at = time.monotonic()
            self._take(records)
            # A quiet topic still gets its last batches committed.
            if self.checkpoint.due:
                await self.commit()

    async def _wait_for_room(self) -> None:
        """Backpressure: take nothing until there is room. Blocked for longer than a moment,
        pause the whole assignment (a new one too) and poll, so that the group keeps us."""
        self._room.clear()
        if not self._blocked() or self._stopping.is_set():
            return
        try:
            await asyncio.wait_for(self._room.wait(), _BLOCKED_POLL_S)
            return  # room again (or a stop): no poll, so aiokafka keeps what it prefetched
        except TimeoutError:
            pass
        await self.pausing.poll_paused()
        self.checkpoint.update_lag()  # lag keeps growing while we are blocked: show it

    def _take(self, records: Mapping[TopicPartition, Sequence[Any]]) -> None:
        self.pausing.take(records, self._add_record)

    def _hand_over(self) -> bool:
        """The open batch to the stages, if they have room (never waits)."""
        if self._open.records == 0:
            return True
        if not self.stages.submit(self._open):
            return False
        self.pausing.handed_over(self._open.seq)
        self._open = self._new_batch()
        self.metrics.inflight_batches.set(self.stages.in_flight)
        return True

    async def _hand_over_by(self, deadline: float) -> bool:
        """Hand the open batch over, waiting for room until ``deadline``."""
        while not self._hand_over():
            left = self._deadline(deadline) - time.monotonic()
            if left <= 0:
                return False
            self._room.clear()
            if self.stages.full:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), min(left, _BLOCKED_POLL_S))
        return True

    def _drop_open_batch(self) -> None:
        """Forget the open batch (its records are uncommitted and will be fetched again)."""
        self.pausing.drop_open()
        self._open = self._new_batch()

    # ------------------------------------------------------------------ written
    def _room_freed(self) -> None:
        self._room.set()

    async def _written(self, batch: Batch) -> None:
        self.checkpoint.written(batch.next_offsets)
        self.pausing.written(batch.seq)
        self._room.set()
        self.last_progress = time.monotonic()
        self.metrics.inflight_batches.set(self.stages.in_flight)
        if self.checkpoint.due:
            await self.commit()

    # ------------------------------------------------------------------ commit
    async def commit(self) -> None:
        """Commit what is written (see :mod:`service.kafka.checkpoint`)."""
        await self.checkpoint.commit(lambda: self.idle)

    async def wait_drained(self, limit_s: float) -> bool:
        """Wait until every batch handed to the stages is written. False on timeout."""
        until = time.monotonic() + limit_s
        return await self.stages.drained_by(lambda: self._deadline(until))

    @property
    def idle(self) -> bool:
        return self.stages.in_flight <= 0 and self._open.records == 0

    @property
    def blocked(self) -> bool:
        """Backpressure: no record may be taken now."""
        return self._blocked()

    @property
    def inflight_bytes(self) -> int:
        """Bytes of the records held (open batch + batches not yet written)."""
        return self.pausing.held_bytes

    # ------------------------------------------------------------------ rebalance
    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if not revoked:
            return
        await self._finish_inflight(time.monotonic() + self.config.shutdown_timeout_s, "rebalance")
        self.checkpoint.revoked(revoked)
        self.pausing.revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))
        if assigned and (self.pausing.paused or self._blocked()):
            # Still blocked: the new assignment starts paused (the fetch loop keeps it so).
            self.pausing.set_paused(True)
        # The consumer starts each partition from its committed offset.
        for tp, offset in (await self.checkpoint.assigned(assigned)).items():
            self.pausing.assigned(tp, offset)
