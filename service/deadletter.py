"""Dead-letter topic: bad records go here with the original bytes and headers saying why.

Headers added (all UTF-8): ``error.reason`` (a short code), ``error.message``, ``error.stage``
(decode or index), ``source.topic``, ``source.partition``, ``source.offset``,
``source.timestamp``. The record's own headers are kept in front of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from service.messages import RecordRef

MAX_ERROR_MESSAGE = 2000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    ref: RecordRef
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    reason: str
    message: str
    stage: str = "decode"

    def kafka_headers(self) -> list[tuple[str, bytes]]:
        extra = {
            "error.reason": self.reason,
            "error.message": self.message[:MAX_ERROR_MESSAGE],
            "error.stage": self.stage,
            "source.topic": self.ref.topic,
            "source.partition": str(self.ref.partition),
            "source.offset": str(self.ref.offset),
            "source.timestamp": "" if self.ref.timestamp_ms is None else str(self.ref.timestamp_ms),
        }
        return [*self.headers, *((k, v.encode()) for k, v in extra.items())]


class DeadLetterWriter:
    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        """Send and wait until the broker has every one (acks=all on the producer)."""
        if not letters:
            return
        futures = [
            await self.producer.send(
                self.topic, value=d.value, key=d.key, headers=d.kafka_headers()
            )
            for d in letters
        ]
        await asyncio.gather(*futures)
