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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from service.deadletter import DeadLetter, DeadLetterWriter
from service.messages import (
    Action,
    BadRecord,
    MessageContract,
    RecordRef,
    Upsert,
    content_hash,
    decode_record,
    newest_per_id,
)
from service.metrics import Metrics
from service.sink import ElasticsearchSink, SinkUnavailable

log = logging.getLogger(__name__)


class Encoder(Protocol):
    """What the pipeline needs of :class:`encoder.SparseEncoder`."""

    async def aencode_documents(
        self, texts: Sequence[str], stats: Any = None
    ) -> list[dict[str, float]]: ...


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    batch_max_docs: int = 256
    batch_max_tokens: int = 65_536
    batch_linger_ms: int = 200
    max_inflight_batches: int = 2
    max_poll_records: int = 2000
    skip_unchanged: bool = True
    commit_interval_ms: int = 1000
    shutdown_timeout_s: float = 30.0
    unavailable_backoff_s: float = 2.0
    max_unavailable_backoff_s: float = 30.0


def estimate_tokens(text: str) -> int:
    """Cheap token estimate for closing batches (WordPiece averages ~4 chars a token)."""
    return len(text) // 4 + 2


@dataclass(slots=True)
class Batch:
    seq: int
    opened_at: float
    actions: list[Action] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    raw: dict[RecordRef, tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = field(
        default_factory=dict
    )
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    records: int = 0
    est_tokens: int = 0
    # filled in by the stages
    to_write: list[Action] = field(default_factory=list)
    to_encode: list[Upsert] = field(default_factory=list)


class Pipeline(ConsumerRebalanceListener):
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        encoder: Encoder,
        sink: ElasticsearchSink,
        dead_letters: DeadLetterWriter,
        contract: MessageContract,
        metrics: Metrics,
        config: PipelineConfig,
        *,
        model_name: str,
        stats_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.consumer = consumer
        self.encoder = encoder
        self.sink = sink
        self.dead_letters = dead_letters
        self.contract = contract
        self.metrics = metrics
        self.config = config
        self.model_name = model_name
        self._stats_factory = stats_factory
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
        ref = RecordRef(record.topic, record.partition, record.offset, record.timestamp)
        headers = list(record.headers or ())
        batch.records += 1
        batch.next_offsets[TopicPartition(record.topic, record.partition)] = record.offset + 1
        self.metrics.documents_consumed.labels(record.topic).inc()
        try:
            action = decode_record(self.contract, ref, record.key, record.value, headers)
        except BadRecord as bad:
            log.warning("dead-lettering %s: %s", ref, bad)
            batch.dead.append(
                DeadLetter(ref, record.key, record.value, headers, bad.reason, bad.detail)
            )
            return
        batch.actions.append(action)
        batch.raw[ref] = (record.key, record.value, headers)
        if isinstance(action, Upsert):
            batch.est_tokens += estimate_tokens(action.text)

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
                log.info("pipeline full: paused %d partition(s)", len(paused))
            try:
                while True:
                    try:
                        await asyncio.wait_for(self._prepare_q.put(batch), timeout=1.0)
                        return
                    except TimeoutError:
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

    # ------------------------------------------------------------------ prepare
    async def _prepare_stage(self) -> None:
        while True:
            batch = await self._prepare_q.get()
            start = time.perf_counter()
            newest = newest_per_id(batch.actions)
            superseded = len(batch.actions) - len(newest)
            if superseded:
                self.metrics.documents_stale.labels("batch").inc(superseded)
            batch.to_write = newest
            upserts = [a for a in newest if isinstance(a, Upsert)]
            for up in upserts:
                up.content_hash = content_hash(self.model_name, up.text)
            stored: dict[str, tuple[str, dict[str, float]]] = {}
            if self.config.skip_unchanged and upserts:
                try:
                    stored = await self.sink.lookup([u.doc_id for u in upserts])
                except Exception as exc:  # an optimisation only: encode everything instead
                    log.warning("content-hash look-up failed, encoding all: %s", exc)
            for up in upserts:
                hit = stored.get(up.doc_id)
                if hit is not None and hit[0] == up.content_hash:
                    up.vector = hit[1]
                    self.metrics.documents_unchanged.inc()
                else:
                    batch.to_encode.append(up)
            self.metrics.stage_seconds.labels("prepare").observe(time.perf_counter() - start)
            await self._encode_q.put(batch)

    # ------------------------------------------------------------------ encode
    async def _encode_stage(self) -> None:
        while True:
            batch = await self._encode_q.get()
            if batch.to_encode:
                await self._encode(batch)
            await self._write_q.put(batch)

    async def _encode(self, batch: Batch) -> None:
        texts = [u.text for u in batch.to_encode]
        stats = self._stats_factory() if self._stats_factory else None
        start = time.perf_counter()
        try:
            vectors = await self.encoder.aencode_documents(texts, stats)
        except Exception as exc:
            log.error("encoding a batch of %d failed (%s); encoding one by one", len(texts), exc)
            vectors = []
            for up in batch.to_encode:
                try:
                    vectors.append((await self.encoder.aencode_documents([up.text]))[0])
                except Exception as one_exc:
                    vectors.append({})
                    self._reject(batch, up, "encoder_error", f"{type(one_exc).__name__}: {one_exc}")
        elapsed = time.perf_counter() - start
        for up, vec in zip(batch.to_encode, vectors, strict=True):
            up.vector = vec
        self.metrics.stage_seconds.labels("encode").observe(elapsed)
        self.metrics.encoder_busy_seconds.inc(elapsed)
        self.metrics.batch_documents.observe(len(texts))
        if stats is not None:
            self.metrics.stage_seconds.labels("tokenize").observe(stats.tokenize_seconds)
            self.metrics.stage_seconds.labels("inference").observe(stats.inference_seconds)
            self.metrics.encoded_tokens.inc(stats.tokens)
            self.metrics.encoded_padded_tokens.inc(stats.padded_tokens)
            self.metrics.batch_tokens.observe(stats.tokens)
            if elapsed > 0:
                self.metrics.encoder_tokens_per_second.set(stats.tokens / elapsed)

    def _reject(self, batch: Batch, action: Action, reason: str, detail: str) -> None:
        key, value, headers = batch.raw.get(action.ref, (None, None, []))
        batch.dead.append(
            DeadLetter(action.ref, key, value, headers, reason, detail, stage="index")
        )
        batch.to_write = [a for a in batch.to_write if a is not action]

    # ------------------------------------------------------------------ write
    async def _write_stage(self) -> None:
        while True:
            batch = await self._write_q.get()
            await self._write(batch)
            await self._finish(batch)

    async def _write(self, batch: Batch) -> None:
        pending = list(batch.to_write)
        backoff = self.config.unavailable_backoff_s
        start = time.perf_counter()
        while pending:
            try:
                outcome = await self.sink.write(pending)
            except SinkUnavailable as exc:
                self.metrics.bulk_requests.labels("unavailable").inc()
                log.warning("Elasticsearch unavailable (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.max_unavailable_backoff_s)
                continue
            now = time.time()
            acked: list[Action] = [*outcome.indexed, *outcome.deleted, *outcome.not_found]
            for action in acked:
                if action.ref.timestamp_ms is not None:
                    self.metrics.end_to_end_lag.observe(
                        max(0.0, now - action.ref.timestamp_ms / 1000)
                    )
            self.metrics.documents_indexed.inc(len(outcome.indexed))
            self.metrics.documents_deleted.labels("deleted").inc(len(outcome.deleted))
            self.metrics.documents_deleted.labels("not_found").inc(len(outcome.not_found))
            self.metrics.documents_stale.labels("elasticsearch").inc(len(outcome.stale))
            for action, reason, detail in outcome.rejected:
                self.metrics.bulk_item_errors.labels(reason).inc()
                log.warning(
                    "Elasticsearch rejected %s (id %r): %s", action.ref, action.doc_id, detail
                )
                self._reject(batch, action, reason, detail)
            for _, reason in outcome.retry:
                self.metrics.bulk_item_errors.labels(reason).inc()
            pending = [action for action, _ in outcome.retry]
            if pending:
                self.metrics.bulk_requests.labels("retry").inc()
                log.warning(
                    "%d item(s) refused by Elasticsearch (%s); retrying in %.1fs",
                    len(pending),
                    outcome.retry[0][1],
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.max_unavailable_backoff_s)
            else:
                self.metrics.bulk_requests.labels("ok").inc()
        self.metrics.stage_seconds.labels("bulk").observe(time.perf_counter() - start)

    async def _finish(self, batch: Batch) -> None:
        if batch.dead:
            start = time.perf_counter()
            while True:
                try:
                    await self.dead_letters.send(batch.dead)
                    break
                except KafkaError as exc:
                    log.warning("dead-letter topic unavailable (%s); retrying", exc)
                    await asyncio.sleep(self.config.unavailable_backoff_s)
            for letter in batch.dead:
                self.metrics.documents_dead_lettered.labels(letter.reason).inc()
            self.metrics.stage_seconds.labels("dead_letter").observe(time.perf_counter() - start)
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
        for tp in assignment:
            high = self.consumer.highwater(tp)
            done = self._committed.get(tp)
            if high is not None and done is not None:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                    max(0, high - done)
                )

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
