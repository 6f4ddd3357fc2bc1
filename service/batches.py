"""What happens to one batch, whichever runner feeds it (the aiokafka pipeline or Faust).

decode (per record) -> prepare (newest per id, content hashes, look up unchanged texts) ->
encode (off the event loop) -> write (versioned bulk, retried while Elasticsearch refuses) ->
dead letters (decode failures and documents Elasticsearch rejected). Committing offsets is the
runner's job, after :meth:`BatchProcessor.send_dead_letters` returned.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from service.deadletter import DeadLetter, DeadLetterWriter
from service.kafka.record_guard import unreadable
from service.messages import (
    Action,
    BadRecord,
    MessageContract,
    RecordRef,
    Upsert,
    content_hash,
    decode_record,
    newest_per_id,
    vector_fingerprint,
)
from service.metrics import Metrics
from service.sink import ElasticsearchSink, SinkUnavailable, Stored

log = logging.getLogger(__name__)


class Encoder(Protocol):
    """What the pipeline needs of :class:`encoder.SparseEncoder`."""

    async def aencode_documents(
        self, texts: Sequence[str], stats: Any = None
    ) -> list[dict[str, float]]: ...

    async def aencode_passages(self, texts: Sequence[str], stats: Any = None) -> list[Any]:
        """Per text its passages (``encoder.Passage``); used when the sink writes passages."""
        ...


class StaleLog:
    """A sampled warning for changes Elasticsearch refused as stale: at most one line per topic
    every ``every_s`` seconds, naming one id and both versions, and how many were dropped since
    the last line. Many stale drops after a topic was recreated, restored or replayed, or
    partitions were added, mean offset versions no longer order the changes (README: Versions)."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def report(self, action: Action, detail: str) -> None:
        topic = action.ref.topic
        self._since[topic] = self._since.get(topic, 0) + 1
        now = time.monotonic()
        if now - self._last.get(topic, -self.every_s) < self.every_s:
            return
        log.warning(
            "stale: %d change(s) from %s dropped since the last report, Elasticsearch holds "
            "newer versions; e.g. %s id %r with version %d (%s). Expected after a redelivery; "
            "if it persists after a topic was recreated, restored or replayed, or partitions "
            "were added, see README 'Versions' (SPARSE_INGEST_VERSION_EPOCH)",
            self._since[topic],
            topic,
            action.ref,
            action.doc_id,
            action.version,
            detail[:300],
        )
        self._last[topic] = now
        self._since[topic] = 0


class _Frames(Exception):
    """Logs an exception's traceback (where it was raised) without its message, which may
    quote a record's content (``SerializationError: Unable to serialize ... {'body': ...}``)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"{type(exc).__module__}.{type(exc).__qualname__} (message left out)")
        self.__traceback__ = exc.__traceback__
        self.__suppress_context__ = True


def _internal(exc: BaseException) -> str:
    """The dead-letter message of an unexpected exception (the traceback goes to the log)."""
    return f"unexpected {type(exc).__name__} (a bug in sparse-ingest; the traceback is in its log)"


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
    isolated: bool = False  # a step raised: its actions were processed one by one instead
    # records whose schema the registry has not given yet: decoded by prepare()
    pending: list[tuple[RecordRef, bytes | None, bytes | None, list[tuple[str, bytes]]]] = field(
        default_factory=list
    )


class BatchProcessor:
    def __init__(
        self,
        encoder: Encoder,
        sink: ElasticsearchSink,
        dead_letters: DeadLetterWriter,
        contract: MessageContract,
        metrics: Metrics,
        *,
        model_name: str,
        skip_unchanged: bool = True,
        unavailable_backoff_s: float = 2.0,
        max_unavailable_backoff_s: float = 30.0,
        stats_factory: Callable[[], Any] | None = None,
        registry: Any | None = None,
    ) -> None:
        self.encoder = encoder
        self.registry = registry  # service.registry.SchemaRegistry, for wire-format topics
        self.sink = sink
        self.dead_letters = dead_letters
        self.contract = contract
        self.metrics = metrics
        self.model_name = model_name
        # unchanged texts are skipped only when their stored vector came from the same model
        # files, long-text mode and pruning (a re-export under the same name re-encodes)
        self.fingerprint = vector_fingerprint(
            model_name, str(getattr(encoder, "fingerprint", "")), sink.config.prune_below
        )
        sink.fingerprint = self.fingerprint
        self.passages = sink.config.passage_field is not None
        if sink.config.passage_field:  # a document's own field of that name would be lost
            contract = replace(contract, reserved=contract.reserved | {sink.config.passage_field})
            self.contract = contract
        self.skip_unchanged = skip_unchanged
        self.unavailable_backoff_s = unavailable_backoff_s
        self.max_unavailable_backoff_s = max_unavailable_backoff_s
        self._stats_factory = stats_factory
        self._stale_log = StaleLog()
        self._probe_failed = False  # a probe found Elasticsearch down since its last answer

    def add_record(
        self,
        batch: Batch,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> None:
        batch.records += 1
        batch.next_offsets[TopicPartition(topic, partition)] = offset + 1
        self.metrics.documents_consumed.labels(topic).inc()
        marker = unreadable(headers)
        if marker is not None:  # the Kafka client could not read these offsets (record_guard)
            ref = RecordRef(topic, partition, marker.first_offset, timestamp_ms)
            batch.dead.append(
                DeadLetter(
                    ref,
                    key,
                    value,
                    headers[1:],
                    marker.reason,
                    marker.message,
                    stage="consume",
                    last_offset=marker.last_offset,
                )
            )
            return
        ref = RecordRef(topic, partition, offset, timestamp_ms)
        if (
            self.registry is not None
            and self.contract.format_for(topic).uses_registry  # never for a JSON topic
            and self._schemas_missing(key, value)
        ):
            batch.pending.append((ref, key, value, headers))  # the schema comes first (prepare)
            return
        self._decode(batch, ref, key, value, headers)

    def _schemas_missing(self, *payloads: bytes | None) -> bool:
        from service.registry import wire_schema_id

        assert self.registry is not None
        ids = (wire_schema_id(p) for p in payloads)
        return any(i is not None and not self.registry.known(i) for i in ids)

    def _decode(
        self,
        batch: Batch,
        ref: RecordRef,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> None:
        loads = self.registry.decode if self.registry is not None else None
        try:
            action = decode_record(self.contract, ref, key, value, headers, loads)
        except BadRecord as bad:
            log.warning("dead-lettering %s: %s", ref, bad)
            batch.dead.append(DeadLetter(ref, key, value, headers, bad.reason, bad.detail))
            return
        except Exception as exc:  # a bug of ours: this record must not stop the stream
            log.error(
                "dead-lettering %s: decoding raised %s",
                ref,
                type(exc).__name__,
                exc_info=_Frames(exc),
            )
            batch.dead.append(
                DeadLetter(ref, key, value, headers, "internal_error", _internal(exc))
            )
            return
        if action is None:  # e.g. Debezium's tombstone after its delete event
            self.metrics.documents_ignored.labels(ref.topic).inc()
            return
        batch.actions.append(action)
        batch.raw[ref] = (key, value, headers)
        if isinstance(action, Upsert):
            batch.est_tokens += estimate_tokens(action.text)

    async def _decode_pending(self, batch: Batch) -> None:
        """Fetch the schemas the batch's pending records need (waiting, with backoff, while
        the registry does not answer: nothing is dead-lettered for an outage), then decode
        them."""
        if not batch.pending or self.registry is None:
            return
        from service.registry import RegistryUnavailable, wire_schema_id

        ids = {
            i
            for _, key, value, _ in batch.pending
            for i in (wire_schema_id(key), wire_schema_id(value))
            if i is not None
        }
        delay = self.unavailable_backoff_s
        while True:
            try:
                await self.registry.fetch(ids)
                break
            except RegistryUnavailable as exc:
                self.metrics.schema_registry_unavailable.inc()
                log.warning("schema registry unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_unavailable_backoff_s)
        pending, batch.pending = batch.pending, []
        for ref, key, value, headers in pending:
            self._decode(batch, ref, key, value, headers)

    async def process(self, batch: Batch) -> None:
        """All steps in turn (the Faust runner's way; the pipeline overlaps them)."""
        await self.prepare(batch)
        await self.encode(batch)
        await self.write(batch)
        await self.send_dead_letters(batch)

    async def prepare(self, batch: Batch) -> None:
        await self._decode_pending(batch)
        await self._guarded("prepare", self._prepare, batch)

    async def encode(self, batch: Batch) -> None:
        await self._guarded("encode", self._encode, batch)

    async def write(self, batch: Batch) -> None:
        await self._guarded("write", self._write, batch)

    async def _guarded(
        self, stage: str, step: Callable[[Batch], Awaitable[None]], batch: Batch
    ) -> None:
        """Run one step of a batch. If it raises (a bug of ours, or a record that trips one),
        no record may stop the stream: every action of the batch goes through all the steps
        again on its own, and those that still raise become ``internal_error`` dead letters."""
        if batch.isolated:
            return
        try:
            await step(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error(
                "%s of a batch of %d record(s) raised %s; processing its records one by one",
                stage,
                batch.records,
                type(exc).__name__,
                exc_info=_Frames(exc),
            )
            await self._isolate(batch)

    async def _isolate(self, batch: Batch) -> None:
        batch.isolated = True
        batch.to_encode, batch.to_write = [], []
        for action in batch.actions:
            one = Batch(seq=batch.seq, opened_at=batch.opened_at, actions=[action])
            one.raw[action.ref] = batch.raw.get(action.ref, (None, None, []))
            try:
                for step in (self._prepare, self._encode, self._write):
                    await step(one)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error(
                    "dead-lettering %s: processing it raised %s",
                    action.ref,
                    type(exc).__name__,
                    exc_info=_Frames(exc),
                )
                key, value, headers = one.raw[action.ref]
                one.dead.append(
                    DeadLetter(
                        action.ref, key, value, headers, "internal_error", _internal(exc), "index"
                    )
                )
            batch.dead.extend(one.dead)

    async def _prepare(self, batch: Batch) -> None:
        start = time.perf_counter()
        newest = newest_per_id(batch.actions)
        if len(newest) != len(batch.actions):
            kept = {id(a) for a in newest}
            for action in batch.actions:
                if id(action) not in kept:
                    self.metrics.documents_stale.labels("batch", action.ref.topic).inc()
        batch.to_write = newest
        upserts = [a for a in newest if isinstance(a, Upsert)]
        for up in upserts:
            up.content_hash = content_hash(self.fingerprint, up.text)
        stored: dict[str, Stored] = {}
        if self.skip_unchanged and upserts:
            try:
                stored = await self.sink.lookup([u.doc_id for u in upserts])
            except Exception as exc:  # an optimisation only: encode everything instead
                log.warning("content-hash look-up failed, encoding all: %s", exc)
        for up in upserts:
            hit = stored.get(up.doc_id)
            if hit is not None and hit.content_hash == up.content_hash:
                up.vector, up.passages = hit.vector, hit.passages
                self.metrics.documents_unchanged.inc()
            else:
                batch.to_encode.append(up)
        self.metrics.stage_seconds.labels("prepare").observe(time.perf_counter() - start)

    async def _encode(self, batch: Batch) -> None:
        if not batch.to_encode:
            return
        texts = [u.text for u in batch.to_encode]
        stats = self._stats_factory() if self._stats_factory else None
        encode = self._encode_passages if self.passages else self._encode_vectors
        start = time.perf_counter()
        try:
            await encode(batch.to_encode, texts, stats)
        except Exception as exc:
            log.error(
                "encoding a batch of %d failed (%s); encoding one by one",
                len(texts),
                type(exc).__name__,
                exc_info=_Frames(exc),
            )
            for up in batch.to_encode:
                try:
                    await encode([up], [up.text], None)
                except Exception as one_exc:
                    self.reject(batch, up, "encoder_error", f"{type(one_exc).__name__}: {one_exc}")
        elapsed = time.perf_counter() - start
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

    async def _encode_vectors(self, upserts: list[Upsert], texts: list[str], stats: Any) -> None:
        vectors = await self.encoder.aencode_documents(texts, stats)
        for up, vec in zip(upserts, vectors, strict=True):
            up.vector = vec

    async def _encode_passages(self, upserts: list[Upsert], texts: list[str], stats: Any) -> None:
        passages = await self.encoder.aencode_passages(texts, stats)
        for up, found in zip(upserts, passages, strict=True):
            up.passages = found
            self.metrics.document_passages.observe(len(found))

    def reject(self, batch: Batch, action: Action, reason: str, detail: str) -> None:
        key, value, headers = batch.raw.get(action.ref, (None, None, []))
        batch.dead.append(
            DeadLetter(action.ref, key, value, headers, reason, detail, stage="index")
        )
        batch.to_write = [a for a in batch.to_write if a is not action]

    async def _write(self, batch: Batch) -> None:
        pending = list(batch.to_write)
        backoff = self.unavailable_backoff_s
        start = time.perf_counter()
        while pending:
            try:
                outcome = await self.sink.write(pending)
            except SinkUnavailable as exc:
                self.metrics.bulk_requests.labels("unavailable").inc()
                log.warning("Elasticsearch unavailable (%s); retrying within %.1fs", exc, backoff)
                await self._wait_until_back(backoff)
                backoff = min(backoff * 2, self.max_unavailable_backoff_s)
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
            for action in outcome.stale:
                self.metrics.documents_stale.labels("elasticsearch", action.ref.topic).inc()
                self._stale_log.report(action, outcome.stale_details.get(action.doc_id, ""))
            for action, reason, detail in outcome.rejected:
                self.metrics.bulk_item_errors.labels(reason).inc()
                log.warning(
                    "Elasticsearch rejected %s (id %r): %s", action.ref, action.doc_id, detail
                )
                self.reject(batch, action, reason, detail)
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
                backoff = min(backoff * 2, self.max_unavailable_backoff_s)
            else:
                self.metrics.bulk_requests.labels("ok").inc()
        self.metrics.stage_seconds.labels("bulk").observe(time.perf_counter() - start)

    async def _wait_until_back(self, limit: float) -> None:
        """Back off for up to ``limit`` seconds, but end early once Elasticsearch, found
        unreachable by a probe (in this wait or an earlier one), answers again (a cheap probe
        each second): after an outage writing resumes within about a second, not after the
        rest of a 30 s backoff. (A node that answers probes but not bulks gets the plain
        backoff.)"""
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(1.0, left))
            if not await self.sink.reachable():
                self._probe_failed = True
            elif self._probe_failed:
                self._probe_failed = False
                return

    async def send_dead_letters(self, batch: Batch) -> None:
        """Send the batch's dead letters and wait for the broker to have them."""
        if batch.dead:
            start = time.perf_counter()
            while True:
                try:
                    await self.dead_letters.send(batch.dead)
                    break
                except KafkaError as exc:
                    log.warning("dead-letter topic unavailable (%s); retrying", exc)
                    await asyncio.sleep(self.unavailable_backoff_s)
            for letter in batch.dead:
                self.metrics.documents_dead_lettered.labels(letter.reason).inc()
            self.metrics.stage_seconds.labels("dead_letter").observe(time.perf_counter() - start)
