"""Backpressure on the consumer: the bytes bound, pausing the assignment, seeking back.

Memory held by records is bounded in bytes (``max_inflight_bytes``: keys, values and headers
of the records in batches not yet written). Records fetched beyond the bound are not taken:
their partition is sought back to the first record not taken (as quix-streams does), so they
are fetched again once there is room; none is skipped. When nothing may be taken for longer
than a moment, the whole assignment (a newly assigned partition too) is paused and the
consumer keeps polling, so that the group keeps it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from service.metrics import Metrics

log = logging.getLogger(__name__)


def record_bytes(record: Any) -> int:
    """What one Kafka record holds in memory, as counted against ``max_inflight_bytes``:
    key + value + header keys and values."""
    size = len(record.key or b"") + len(record.value or b"")
    for key, value in record.headers or ():
        size += len(key) + len(value or b"")
    return size


class Pausing:
    """The bytes held by the records taken (the open batch's, then each handed-over batch's
    until it is written), what was refused for want of room, and the paused assignment."""

    def __init__(self, consumer: AIOKafkaConsumer, metrics: Metrics, max_bytes: int) -> None:
        self.consumer = consumer
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self.wanted_bytes = 0  # size of the record last refused for want of room (0: none)
        self.paused = False
        self._open_bytes = 0
        self._batch_bytes: dict[int, int] = {}  # by Batch.seq
        # Per partition, the offset to fetch again from when records go back (seek).
        self._resume_at: dict[TopicPartition, int] = {}

    # ------------------------------------------------------------------ the bytes bound
    def take(
        self, records: Mapping[TopicPartition, Sequence[Any]], add: Callable[[Any], None]
    ) -> None:
        """``add`` the records while the bytes bound allows; at the first that does not fit,
        this and every later record (of every partition) go back."""
        refused = False
        for tp, recs in records.items():
            for record in recs:
                if not refused:
                    size = record_bytes(record)
                    held = self.held_bytes
                    if held == 0 or held + size <= self.max_bytes:
                        add(record)
                        self._open_bytes += size
                        self._held(size)
                        self._resume_at[tp] = record.offset + 1
                        self.wanted_bytes = 0
                        continue
                    refused = True
                    self.wanted_bytes = size
                self.seek_back(tp, record)
                break

    def bytes_blocked(self) -> bool:
        """A record was refused for want of room, and nothing freed enough since. (One record
        larger than the bound is taken when nothing else is held.)"""
        held = self.held_bytes
        return self.wanted_bytes > 0 and held > 0 and held + self.wanted_bytes > self.max_bytes

    def handed_over(self, seq: int) -> None:
        """The open batch became batch ``seq``: its bytes are held until :meth:`written`."""
        self._batch_bytes[seq] = self._open_bytes
        self._open_bytes = 0

    def written(self, seq: int) -> None:
        self._held(-self._batch_bytes.pop(seq, 0))

    def drop_open(self) -> None:
        """The open batch is forgotten (its records are uncommitted, fetched again)."""
        self._held(-self._open_bytes)
        self._open_bytes = 0
        self.wanted_bytes = 0

    def _held(self, delta: int) -> None:
        self.held_bytes += delta
        self.metrics.inflight_bytes.set(self.held_bytes)

    # ------------------------------------------------------------------ the consumer
    def seek_back(self, tp: TopicPartition, first_not_taken: Any) -> None:
        """Fetch ``tp`` again from ``first_not_taken`` (the position after the last record
        taken from it, when known: a record standing for several offsets does not lose the
        first of them)."""
        if tp not in self.consumer.assignment():
            return
        offset = min(self._resume_at.get(tp, first_not_taken.offset), first_not_taken.offset)
        self.consumer.seek(tp, offset)
        self._resume_at[tp] = offset
        log.debug("%s/%d: not taken, fetched again from offset %d", tp.topic, tp.partition, offset)

    def set_paused(self, paused: bool) -> None:
        """Pause the whole assignment (again: a partition assigned since is paused too), or
        resume what is paused."""
        if paused:
            assigned = self.consumer.assignment()
            if assigned:
                self.consumer.pause(*assigned)
            if not self.paused:
                self.paused = True
                self.metrics.paused.set(1)
                log.debug("pipeline full: paused %d partition(s)", len(assigned))
        elif self.paused:
            self.paused = False
            held = self.consumer.paused()
            if held:
                self.consumer.resume(*held)
            self.metrics.paused.set(0)

    async def poll_paused(self) -> None:
        """Pause the assignment and poll (so that the group keeps us). Paused partitions
        return nothing; one assigned since the last pause may have: it goes back, to be
        fetched again when there is room."""
        self.set_paused(True)
        late = await self.consumer.getmany(timeout_ms=0)
        for tp, recs in late.items():
            if recs:
                self.seek_back(tp, recs[0])

    # ------------------------------------------------------------------ rebalance
    def assigned(self, tp: TopicPartition, committed: int) -> None:
        """``tp`` starts at its committed offset (unless records were taken from it since)."""
        self._resume_at.setdefault(tp, committed)

    def revoked(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._resume_at.pop(tp, None)
