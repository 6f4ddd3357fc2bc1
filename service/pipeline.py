"""The ingest pipeline: Kafka -> batch -> look up -> encode -> write -> commit.

Four stages run as tasks joined by bounded queues, so fetching, encoding and writing overlap
and at most ``max_inflight_batches`` batches wait between any two stages. Each stage has one
worker, so batches finish in the order they were made; that is what makes committing simple:
when a batch is done, every record before it is done too, and ``offset + 1`` of its last
record per partition can be committed.

Nothing is committed before Elasticsearch (or the dead-letter topic) has confirmed it. When
Elasticsearch keeps refusing, the write stage retries the batch with backoff and the queues
fill up. Then the fetch stage is *blocked*: it takes no more records, pauses every assigned
partition (newly assigned ones too, after a rebalance) and keeps polling, so the group keeps
it. Memory held by records is bounded in bytes as well (``max_inflight_bytes``: keys, values
and headers of the records in batches not yet written): records fetched beyond the bound are
not taken; their partition is sought back to the first record not taken (as quix-streams
does), so they are fetched again once there is room. None is skipped, and since only written
batches are committed, none is committed unwritten.

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
from aiokafka.errors import CommitFailedError, KafkaError

from service.metrics import Metrics
from service.processing import Batch, BatchProcessor

log = logging.getLogger(__name__)

# How often the fetch stage polls while it is blocked (Kafka's max.poll.interval is minutes).
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


def record_bytes(record: Any) -> int:
    """What one Kafka record holds in memory, as counted against ``max_inflight_bytes``:
    key + value + header keys and values."""
    size = len(record.key or b"") + len(record.value or b"")
    for key, value in record.headers or ():
        size += len(key) + len(value or b"")
    return size


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
        self._seq = 0
        self._open = self._new_batch()
        self._made = 0  # batches closed and handed to the stages
        self._done = 0  # batches written and marked committable
        self._progress = asyncio.Condition()
        # Bytes of the records held: the open batch's, each handed-over batch's until written.
        self._open_bytes = 0
        self._batch_bytes: dict[int, int] = {}  # by Batch.seq
        self._inflight_bytes = 0
        self._wanted_bytes = 0  # size of the record last refused for want of room (0: none)
        self._room = asyncio.Event()  # set when the queue has room, bytes are freed, or on stop
        self._paused = False  # the fetch stage paused the assignment (blocked)
        # Per partition, the offset to fetch again from when records go back (seek).
        self._resume_at: dict[TopicPartition, int] = {}
        self._committable: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._last_commit = time.monotonic()
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
        stages = [
            asyncio.create_task(self._prepare_stage(), name="prepare"),
            asyncio.create_task(self._encode_stage(), name="encode"),
            asyncio.create_task(self._write_stage(), name="write"),
        ]
        fetch = asyncio.create_task(self._fetch_stage(), name="fetch")
        stopping = asyncio.create_task(self._stopping.wait(), name="stopping")
        tasks: list[asyncio.Task[Any]] = [fetch, *stages]
        try:
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task in done:
                    task.result()  # re-raises the failure of a stage
            # Stopping. The fetch stage may wait in a poll (a rebalance): it takes no more.
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
        if not await self._drained_by(drain_by):
            log.warning(
                "%s: %d batch(es) not written within the %.0fs bound "
                "(SPARSE_INGEST_SHUTDOWN_TIMEOUT_S); they stay uncommitted and will be read again",
                why,
                self._made - self._done,
                self.config.shutdown_timeout_s,
            )
        left = self._deadline(deadline) - time.monotonic()
        try:
            await asyncio.wait_for(self.commit(force=True), max(left, 0.1))
        except TimeoutError:
            log.warning(
                "%s: the offset commit did not finish in time; records will be re-read", why
            )

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

    def _ready_to_close(self) -> bool:
        batch = self._open
        return batch.records > 0 and (
            self._batch_full(batch) or self._linger_left(batch) <= 0 or self._wanted_bytes > 0
        )

    def _bytes_blocked(self) -> bool:
        """A record was refused for want of room, and nothing freed enough since. (One record
        larger than the bound is taken when nothing else is held.)"""
        held = self._inflight_bytes
        return (
            self._wanted_bytes > 0
            and held > 0
            and held + self._wanted_bytes > self.config.max_inflight_bytes
        )

    def _blocked(self) -> bool:
        """No record may be taken now: the bytes bound is reached, or the open batch is
        complete and the stages have no room for it."""
        return self._bytes_blocked() or (self._ready_to_close() and self._prepare_q.full())

    async def _fetch_stage(self) -> None:
        interval = self.config.commit_interval_ms / 1000
        while not self._stopping.is_set():
            if self._ready_to_close():
                self._hand_over()
            if self._blocked():
                await self._wait_blocked()
                continue
            self._set_paused(False)
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
            if time.monotonic() - self._last_commit >= interval:
                await self.commit()

    async def _wait_blocked(self) -> None:
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
        self._set_paused(True)
        # Paused partitions return nothing; a partition assigned since the last pause may
        # have: it goes back, to be fetched again when there is room.
        late = await self.consumer.getmany(timeout_ms=0)
        for tp, recs in late.items():
            if recs:
                self._seek_back(tp, recs[0])
        self.update_lag()  # lag keeps growing while we are blocked: show it

    def _set_paused(self, paused: bool) -> None:
        if paused:
            assigned = self.consumer.assignment()
            if assigned:
                self.consumer.pause(*assigned)
            if not self._paused:
                self._paused = True
                self.metrics.paused.set(1)
                log.debug("pipeline full: paused %d partition(s)", len(assigned))
        elif self._paused:
            self._paused = False
            held = self.consumer.paused()
            if held:
                self.consumer.resume(*held)
            self.metrics.paused.set(0)

    def _take(self, records: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """Add the records to the open batch while the bytes bound allows; at the first that
        does not fit, this and every later record (of every partition) go back."""
        refused = False
        for tp, recs in records.items():
            for record in recs:
                if not refused:
                    size = record_bytes(record)
                    held = self._inflight_bytes
                    if held == 0 or held + size <= self.config.max_inflight_bytes:
                        self._add_record(self._open, record)
                        self._open_bytes += size
                        self._held(size)
                        self._resume_at[tp] = record.offset + 1
                        self._wanted_bytes = 0
                        continue
                    refused = True
                    self._wanted_bytes = size
                self._seek_back(tp, record)
                break

    def _seek_back(self, tp: TopicPartition, first_not_taken: Any) -> None:
        """Fetch ``tp`` again from ``first_not_taken`` (the position after the last record
        taken from it, when known: a record standing for several offsets does not lose the
        first of them)."""
        if tp not in self.consumer.assignment():
            return
        offset = min(self._resume_at.get(tp, first_not_taken.offset), first_not_taken.offset)
        self.consumer.seek(tp, offset)
        self._resume_at[tp] = offset
        log.debug("%s/%d: not taken, fetched again from offset %d", tp.topic, tp.partition, offset)

    def _held(self, delta: int) -> None:
        self._inflight_bytes += delta
        self.metrics.inflight_bytes.set(self._inflight_bytes)

    def _hand_over(self) -> bool:
        """The open batch to the stages, if they have room (never waits)."""
        if self._open.records == 0:
            return True
        if self._prepare_q.full():
            return False
        batch, self._open = self._open, self._new_batch()
        self._batch_bytes[batch.seq] = self._open_bytes
        self._open_bytes = 0
        self._made += 1
        self.metrics.inflight_batches.set(self._made - self._done)
        self._prepare_q.put_nowait(batch)
        return True

    async def _hand_over_by(self, deadline: float) -> bool:
        """Hand the open batch over, waiting for room until ``deadline``."""
        while not self._hand_over():
            left = self._deadline(deadline) - time.monotonic()
            if left <= 0:
                return False
            self._room.clear()
            if self._prepare_q.full():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), min(left, _BLOCKED_POLL_S))
        return True

    def _drop_open_batch(self) -> None:
        """Forget the open batch (its records are uncommitted and will be fetched again)."""
        self._held(-self._open_bytes)
        self._open_bytes = 0
        self._wanted_bytes = 0
        self._open = self._new_batch()

    # ------------------------------------------------------------------ stages
    async def _prepare_stage(self) -> None:
        while True:
            batch = await self._prepare_q.get()
            self._room.set()
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
        self._held(-self._batch_bytes.pop(batch.seq, 0))
        self._room.set()
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
        await self._past_markers(assignment)
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

    async def _past_markers(self, assignment: set[TopicPartition]) -> None:
        """With nothing in flight, every record taken is written: the committable offset of a
        partition may then go up to the consumer's position, past what never reaches us (a
        transaction's commit marker, an aborted transaction's records). Else a transactional
        topic's lag never reaches 0, and a reader of the committed offsets (``reindex``) never
        sees it caught up. (``position`` does not wait for a partition that has one.)"""
        if self._made != self._done or self._open.records:
            return
        positions = {}
        for tp in assignment:
            if tp in self._committable:
                with contextlib.suppress(Exception):
                    positions[tp] = await self.consumer.position(tp)
        if self._made != self._done or self._open.records:  # something was taken meanwhile
            return
        for tp, position in positions.items():
            if position > self._committable.get(tp, -1):
                self._committable[tp] = position

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
        return await self._drained_by(time.monotonic() + limit_s)

    async def _drained_by(self, deadline: float) -> bool:
        async with self._progress:
            while self._done < self._made:
                left = self._deadline(deadline) - time.monotonic()
                if left <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), min(left, _BLOCKED_POLL_S))
            return True

    @property
    def idle(self) -> bool:
        return self._done >= self._made and self._open.records == 0

    @property
    def blocked(self) -> bool:
        """Backpressure: no record may be taken now."""
        return self._blocked()

    @property
    def inflight_bytes(self) -> int:
        """Bytes of the records held (open batch + batches not yet written)."""
        return self._inflight_bytes

    # ------------------------------------------------------------------ rebalance
    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        if not revoked:
            return
        await self._finish_inflight(time.monotonic() + self.config.shutdown_timeout_s, "rebalance")
        for tp in revoked:
            self._committable.pop(tp, None)
            self._committed.pop(tp, None)
            self._resume_at.pop(tp, None)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))
        if assigned and (self._paused or self._blocked()):
            # Still blocked: the new assignment starts paused (the fetch stage keeps it so).
            self._set_paused(True)
        # Seed the committed offsets, so that lag is reported before our first commit; the
        # consumer starts each partition from there.
        for tp in assigned:
            try:
                offset = await self.consumer.committed(tp)
            except KafkaError:
                continue
            self._committed[tp] = 0 if offset is None else offset
            if offset is not None:  # unless records were taken from it meanwhile
                self._resume_at.setdefault(tp, offset)
