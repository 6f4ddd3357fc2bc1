"""The ingest pipeline: Kafka -> batch -> look up -> encode -> write -> commit.

Four stages run as tasks joined by bounded queues, so fetching, encoding and writing overlap
and at most ``max_inflight_batches`` batches wait between any two stages. Each stage has one
worker, so batches finish in the order they were made; that is what makes committing simple:
when a batch is done, every record before it is done too, and ``offset + 1`` of its last
record per partition can be committed.

Nothing is committed before Elasticsearch (or the dead-letter topic) has confirmed it. When
Elasticsearch keeps refusing, the write stage retries the batch with backoff, the queues fill
up, and the fetch stage pauses its partitions (it keeps polling, so the group keeps it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from service.metrics import Metrics
from service.processing import Batch, BatchProcessor

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    batch_max_docs: int = 256
    batch_max_tokens: int = 65_536
    batch_linger_ms: int = 200
    max_inflight_batches: int = 2
    max_poll_records: int = 2000
    commit_interval_ms: int = 1000
    shutdown_timeout_s: float = 30.0


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
        size = config.max_inflight_batches
        self._prepare_q: asyncio.Queue[Batch] = asyncio.Queue(maxsize=size)
        self._encode_q: asyncio.Queue[Batch] = asyncio.Queue(maxsize=size)
        self._write_q: asyncio.Queue[Batch] = asyncio.Queue(maxsize=size)
        self._enqueue_lock = asyncio.Lock()
        self._seq = 0
        self._open = self._new_batch()
        self._made = 0  # batches closed and handed to the stages
        self._done = 0  # batches written and marked committable
        self._progress = asyncio.Condition()
        self._committable: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._last_commit = time.monotonic()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._rebalancing = False
        self.last_progress = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        """Ask the pipeline to finish: no new records, drain what is in flight, commit."""
        self._stopping.set()

    async def run(self) -> None:
        stages = [
            asyncio.create_task(self._prepare_stage(), name="prepare"),
            asyncio.create_task(self._encode_stage(), name="encode"),
            asyncio.create_task(self._write_stage(), name="write"),
        ]
        fetch = asyncio.create_task(self._fetch_stage(), name="fetch")
        try:
            done, _ = await asyncio.wait([fetch, *stages], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not fetch and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if fetch in done:
                fetch.result()  # re-raises a failure of the fetch stage
                await self._close_open_batch()
                drained = await self.wait_drained(self.config.shutdown_timeout_s)
                if not drained:
                    log.warning(
                        "shutdown: %d batch(es) not written within %.0fs; they stay uncommitted "
                        "and will be consumed again on restart",
                        self._made - self._done,
                        self.config.shutdown_timeout_s,
                    )
                await self.commit(force=True)
        finally:
            for task in [fetch, *stages]:
                task.cancel()
            for task in [fetch, *stages]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._stopped.set()

    # ------------------------------------------------------------------ fetch
    def _new_batch(self) -> Batch:
        self._seq += 1
        return Batch(seq=self._seq, opened_at=time.monotonic())

    def _add_record(self, batch: Batch, record: Any) -> None:
        self.processor.add_record(
            batch,
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

    async def _fetch_stage(self) -> None:
        while not self._stopping.is_set():
            timeout = max(0.0, min(self._linger_left(self._open), 0.5))
            max_records = max(1, min(self.config.max_poll_records, self.config.batch_max_docs))
            records = await self.consumer.getmany(
                timeout_ms=int(timeout * 1000), max_records=max_records
            )
            if records and self._open.records == 0:
                self._open.opened_at = time.monotonic()
            for recs in records.values():
                for record in recs:
                    self._add_record(self._open, record)
            if self._open.records and (
                self._batch_full(self._open) or self._linger_left(self._open) <= 0
            ):
                await self._close_open_batch(keepalive=True)
            # A quiet topic still gets its last batches committed.
            if time.monotonic() - self._last_commit >= self.config.commit_interval_ms / 1000:
                await self.commit()

    async def _close_open_batch(self, keepalive: bool = False) -> None:
        if self._open.records == 0:
            return
        batch, self._open = self._open, self._new_batch()
        self._made += 1
        self.metrics.inflight_batches.set(self._made - self._done)
        async with self._enqueue_lock:
            if not self._prepare_q.full():
                self._prepare_q.put_nowait(batch)
                return
            # Backpressure: pause fetching, keep polling (so the group keeps us), wait for room.
            paused = list(self.consumer.assignment()) if keepalive else []
            if paused:
                self.consumer.pause(*paused)
                self.metrics.paused.set(1)
                log.debug("pipeline full: paused %d partition(s)", len(paused))
            try:
                while True:
                    try:
                        await asyncio.wait_for(self._prepare_q.put(batch), timeout=1.0)
                        return
                    except TimeoutError:
                        self.update_lag()  # lag keeps growing while we are blocked: show it
                        if keepalive and not self._rebalancing:
                            late = await self.consumer.getmany(timeout_ms=0)
                            for recs in late.values():  # fetched before the pause took hold
                                for record in recs:
                                    self._add_record(self._open, record)
            finally:
                if paused:
                    still = [tp for tp in paused if tp in self.consumer.assignment()]
                    if still:
                        self.consumer.resume(*still)
                    self.metrics.paused.set(0)

    # ------------------------------------------------------------------ stages
    async def _prepare_stage(self) -> None:
        while True:
            batch = await self._prepare_q.get()
            await self.processor.prepare(batch)
            await self._encode_q.put(batch)

    async def _encode_stage(self) -> None:
        while True:
            batch = await self._encode_q.get()
            await self.processor.encode(batch)
            await self._write_q.put(batch)

    async def _write_stage(self) -> None:
        while True:
            batch = await self._write_q.get()
            await self.processor.write(batch)
            await self.processor.finish(batch)
            await self._done_with(batch)

    async def _done_with(self, batch: Batch) -> None:
        for tp, offset in batch.next_offsets.items():
            if offset > self._committable.get(tp, -1):
                self._committable[tp] = offset
        async with self._progress:
            self._done += 1
            self._progress.notify_all()
        self.last_progress = time.monotonic()
        self.metrics.inflight_batches.set(self._made - self._done)
        interval = self.config.commit_interval_ms / 1000
        if time.monotonic() - self._last_commit >= interval:
            await self.commit()

    # ------------------------------------------------------------------ commit
    async def commit(self, force: bool = False) -> None:
        assignment = self.consumer.assignment()
        offsets = {
            tp: off
            for tp, off in self._committable.items()
            if tp in assignment and off > self._committed.get(tp, -1)
        }
        self._last_commit = time.monotonic()
        if offsets:
            try:
                await self.consumer.commit(offsets)
                self._committed.update(offsets)
                self.metrics.commits.labels("ok").inc()
            except (CommitFailedError, KafkaError) as exc:
                self.metrics.commits.labels("failed").inc()
                log.warning(
                    "offset commit failed (%s); the records will be re-read, which is safe", exc
                )
        self.update_lag()

    def update_lag(self) -> None:
        """Consumer lag per partition: high watermark minus the committed offset."""
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            done = self._committed.get(tp)
            if high is not None and done is not None:
                lag = max(0, high - done)
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)

    async def wait_drained(self, limit_s: float) -> bool:
        """Wait until every batch handed to the stages is written. False on timeout."""
        async with self._progress:
            try:
                await asyncio.wait_for(
                    self._progress.wait_for(lambda: self._done >= self._made), limit_s
                )
                return True
            except TimeoutError:
                return False

    @property
    def idle(self) -> bool:
        return self._done >= self._made and self._open.records == 0

    # ------------------------------------------------------------------ rebalance
    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if not revoked:
            return
        self._rebalancing = True
        try:
            await self._close_open_batch()
            if not await self.wait_drained(self.config.shutdown_timeout_s):
                log.warning(
                    "rebalance: in-flight batches not written in time; they will be re-read"
                )
            await self.commit(force=True)
        finally:
            self._rebalancing = False
        for tp in revoked:
            self._committable.pop(tp, None)
            self._committed.pop(tp, None)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))
        # Seed the committed offsets, so that lag is reported before our first commit.
        for tp in assigned:
            try:
                offset = await self.consumer.committed(tp)
            except KafkaError:
                continue
            self._committed[tp] = 0 if offset is None else offset
