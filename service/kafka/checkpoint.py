"""What may be committed, and committing it.

A batch's records are committable once Elasticsearch (or the dead-letter topic) confirmed
them: ``offset + 1`` of its last record per partition. Batches finish in the order they were
made (:mod:`service.kafka.stages`), so a committable offset never passes an unwritten record.
Commits are made every ``commit_interval_ms``, on a revoke and on stopping; a failed commit
is logged and the records are read again, which is safe (writes are versioned).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from service.metrics import Metrics

log = logging.getLogger(__name__)


class Checkpoint:
    def __init__(self, consumer: AIOKafkaConsumer, metrics: Metrics, interval_s: float) -> None:
        self.consumer = consumer
        self.metrics = metrics
        self.interval_s = interval_s
        self._committable: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._last_commit = time.monotonic()

    def written(self, next_offsets: Mapping[TopicPartition, int]) -> None:
        """A batch is written: its records may be committed."""
        for tp, offset in next_offsets.items():
            if offset > self._committable.get(tp, -1):
                self._committable[tp] = offset

    @property
    def due(self) -> bool:
        """``commit_interval_ms`` has passed since the last commit."""
        return time.monotonic() - self._last_commit >= self.interval_s

    async def commit(self, idle: Callable[[], bool]) -> None:
        """Commit what is committable on the partitions still assigned. ``idle``: nothing is
        in flight (every record taken is written)."""
        assignment = self.consumer.assignment()
        await self._past_markers(assignment, idle)
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

    async def _past_markers(
        self, assignment: set[TopicPartition], idle: Callable[[], bool]
    ) -> None:
        """With nothing in flight, every record taken is written: the committable offset of a
        partition may then go up to the consumer's position, past what never reaches us (a
        transaction's commit marker, an aborted transaction's records). Else a transactional
        topic's lag never reaches 0, and a reader of the committed offsets (``reindex``) never
        sees it caught up. (``position`` does not wait for a partition that has one.)"""
        if not idle():
            return
        positions = {}
        for tp in assignment:
            if tp in self._committable:
                with contextlib.suppress(Exception):
                    positions[tp] = await self.consumer.position(tp)
        if not idle():  # something was taken meanwhile
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

    # ------------------------------------------------------------------ rebalance
    async def assigned(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Seed the committed offsets of newly assigned partitions (lag is reported before our
        first commit); returns those the group has committed (where consuming starts)."""
        found: dict[TopicPartition, int] = {}
        for tp in tps:
            try:
                offset = await self.consumer.committed(tp)
            except KafkaError:
                continue
            self._committed[tp] = 0 if offset is None else offset
            if offset is not None:
                found[tp] = offset
        return found

    def revoked(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._committable.pop(tp, None)
            self._committed.pop(tp, None)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
