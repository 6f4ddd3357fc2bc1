"""Dead-letter topic: bad records go here with the original bytes and headers saying why.

Headers added (all UTF-8): ``error.reason`` (a short code), ``error.message``, ``error.stage``
(decode or index), ``source.topic``, ``source.partition``, ``source.offset``,
``source.timestamp``; ``source.offset.last`` when one letter stands for several offsets (a record
batch the Kafka client could not read: stage ``consume``, no key or value). The record's own
headers are kept in front of them.

A value longer than ``max_value_bytes`` (the service passes ``SPARSE_INGEST_MAX_MESSAGE_BYTES``,
at least ~1 MB: only ``too_large`` records are that long) is cut to that length, with the headers
``error.value.truncated`` (``true``) and ``error.value.bytes`` (the original length). If the
broker still refuses a letter as too large (the dead-letter topic allows less), it is sent
again with an empty value and the same two headers. Either way the letter gets out: a record
too big for the dead-letter topic must not stop its partition.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)

from service.config import Settings
from service.errors import StartupError
from service.kafka.clients import kafka_security
from service.messages import RecordRef

log = logging.getLogger(__name__)

MAX_ERROR_MESSAGE = 2000
# The headers a dead letter gets: a record's own headers of these names are replaced.
OUR_HEADERS = frozenset(
    {
        "error.reason",
        "error.message",
        "error.stage",
        "error.value.truncated",
        "error.value.bytes",
        "error.key.bytes",
        "error.headers.dropped",
        "source.topic",
        "source.partition",
        "source.offset",
        "source.offset.last",
        "source.timestamp",
    }
)
DEFAULT_MAX_VALUE_BYTES = 1_000_000
# What the producer or the broker says when a record is bigger than it takes: not retriable.
TOO_LARGE_ERRORS = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    ref: RecordRef
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    reason: str
    message: str
    stage: str = "decode"  # consume (the Kafka client could not read it), decode, index
    last_offset: int | None = None  # a letter standing for offsets source.offset..last_offset

    def kafka_headers(
        self, truncated_from: int | None = None, bare: bool = False
    ) -> list[tuple[str, bytes]]:
        """The record's own headers (except those named like ours, :data:`OUR_HEADERS`: ours
        replace them, e.g. when a dead letter is replayed and fails again), then ours. ``bare``: the
        record's headers are left out (a letter too large even without its value)."""
        extra = {
            "error.reason": self.reason,
            "error.message": self.message[:MAX_ERROR_MESSAGE],
            "error.stage": self.stage,
            "source.topic": self.ref.topic,
            "source.partition": str(self.ref.partition),
            "source.offset": str(self.ref.offset),
            "source.timestamp": "" if self.ref.timestamp_ms is None else str(self.ref.timestamp_ms),
        }
        if self.last_offset is not None and self.last_offset != self.ref.offset:
            extra["source.offset.last"] = str(self.last_offset)
        if truncated_from is not None:
            extra["error.value.truncated"] = "true"
            extra["error.value.bytes"] = str(truncated_from)
        own = [(k, v) for k, v in self.headers if k not in OUR_HEADERS]
        if bare:
            extra["error.key.bytes"] = str(len(self.key or b""))
            extra["error.headers.dropped"] = str(len(own))
            own = []
        return [*own, *((k, v.encode()) for k, v in extra.items())]


class DeadLetterWriter:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.max_value_bytes = max_value_bytes

    async def _enqueue(
        self, letter: DeadLetter, limit: int, bare: bool = False
    ) -> asyncio.Future[object]:
        value = letter.value
        cut = None
        if value is not None and len(value) > limit:
            value, cut = value[:limit], len(value)
        key = None if bare else letter.key
        if value is None and key is None:  # Kafka clients refuse a record with neither
            value = b""
        future: asyncio.Future[object] = await self.producer.send(
            self.topic, value=value, key=key, headers=letter.kafka_headers(cut, bare=bare)
        )
        return future

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        """Send and wait until the broker has every one (acks=all on the producer).

        A letter too large for the producer or the topic is sent again without its value, and
        if that is still too large (a huge key or headers), with only our headers (the key's
        length in ``error.key.bytes``, the number of headers left out in
        ``error.headers.dropped``): every letter gets out. Raises a (retriable) KafkaError when
        the broker is not there; the caller retries.
        """
        if not letters:
            return
        futures: list[tuple[DeadLetter, asyncio.Future[object] | None]] = []
        for d in letters:
            try:
                futures.append((d, await self._enqueue(d, self.max_value_bytes)))
            except TOO_LARGE_ERRORS:  # over the producer's max_request_size
                futures.append((d, None))
        for d, future in futures:
            try:
                if future is not None:
                    await future
                    continue
            except TOO_LARGE_ERRORS:  # over the dead-letter topic's max.message.bytes
                pass
            log.warning(
                "dead letter of %s (%d bytes) is too large for %s: sent without its value",
                d.ref,
                len(d.value or b""),
                self.topic,
            )
            try:
                await (await self._enqueue(d, 0))
                continue
            except TOO_LARGE_ERRORS:
                pass
            log.warning(
                "dead letter of %s is too large for %s even without its value (key %d bytes, "
                "%d headers): sent with only the error headers",
                d.ref,
                self.topic,
                len(d.key or b""),
                len(d.headers),
            )
            await (await self._enqueue(d, 0, bare=True))


def dead_letter_max_value(settings: Settings) -> int:
    """Dead letters carry the original value up to this length (longer ones, ``too_large``
    records, are cut to it): what the service accepts, and at least ~1 MB."""
    return max(settings.max_message_bytes, 960 * 1024)


def dead_letter_request_size(settings: Settings) -> int:
    """The dead-letter producer's ``max_request_size``: the value plus key and headers."""
    return dead_letter_max_value(settings) + 64 * 1024


async def ensure_dead_letter_topic(settings: Settings, producer: AIOKafkaProducer) -> None:
    """The dead-letter topic must exist before the first bad record: a broker without topic
    auto-creation would otherwise hold that record's partition. Created when missing (as
    many partitions as the widest source topic, replication up to 3), unless switched off."""
    s = settings
    topic = s.dead_letter_topic
    try:
        metadata = await producer.client.fetch_all_metadata()
    except KafkaError as exc:
        raise StartupError(
            f"Kafka at {s.kafka_bootstrap_servers} gave no topic metadata ({exc}): is the "
            "cluster healthy, and may this user Describe the topics (README: Least privilege)?"
        ) from None
    if topic in metadata.topics():
        return
    fix = (
        f"create it, or set SPARSE_INGEST_KAFKA_DEAD_LETTER_TOPIC to an existing topic"
        f"{'' if s.kafka_create_dead_letter_topic else ', or SPARSE_INGEST_KAFKA_CREATE_DEAD_LETTER_TOPIC=true'}"
    )
    if not s.kafka_create_dead_letter_topic:
        raise StartupError(f"dead-letter topic {topic!r} does not exist in Kafka: {fix}")
    partitions = max(
        (len(metadata.partitions_for_topic(t) or ()) for t in s.kafka_topics), default=1
    )
    replication = min(3, len(metadata.brokers())) or 1
    admin = AIOKafkaAdminClient(
        bootstrap_servers=s.kafka_bootstrap_servers,
        client_id=f"{s.kafka_client_id}-admin",
        **kafka_security(s),
    )
    try:
        await admin.start()
        response = await admin.create_topics([NewTopic(topic, max(partitions, 1), replication)])
        errors = [e for e in response.topic_errors if e[1] not in (0, 36)]  # 36: exists
        if errors:
            raise KafkaError(
                f"error code {errors[0][1]}: {errors[0][2] if len(errors[0]) > 2 else ''}"
            )
    except KafkaError as exc:
        raise StartupError(
            f"dead-letter topic {topic!r} does not exist and could not be created ({exc}): {fix}"
        ) from None
    finally:
        await admin.close()
    log.info(
        "created the dead-letter topic %s (%d partitions, replication %d)",
        topic,
        max(partitions, 1),
        replication,
    )
