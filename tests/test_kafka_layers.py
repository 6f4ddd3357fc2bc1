"""The Kafka-side layers of the aiokafka runner (service/kafka/), each on its own with fakes:
the checkpoint (what is committed, when), pausing (the paused assignment), the stages (order,
draining), and the pipeline that joins them, run over in-memory partitions. The same
guarantees against real Kafka and Elasticsearch: tests/test_service_ingest.py and
tests/reliability/."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiokafka import TopicPartition
from kafka_fakes import TOPIC, InMemoryConsumer, RecordingProcessor, rec

from service.batches import Batch
from service.kafka.checkpoint import Checkpoint
from service.kafka.pausing import Pausing
from service.kafka.pipeline import Pipeline, PipelineConfig
from service.kafka.stages import Stages
from service.metrics import Metrics

P0, P1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


async def until(condition: Callable[[], bool], what: str, limit_s: float = 60) -> None:
    """Wait on a condition (never on elapsed time; the limit only ends a hung test)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def metric(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# ---------------------------------------------------------------------------- checkpoint
async def test_checkpoint_commits_only_what_was_written_per_partition() -> None:
    consumer = InMemoryConsumer({P0: [rec(0, o) for o in range(10)], P1: []})
    metrics = Metrics()
    checkpoint = Checkpoint(consumer, metrics, interval_s=0)  # type: ignore[arg-type]
    await checkpoint.commit(idle=lambda: False)
    assert consumer.commits == []  # nothing written, nothing committed
    checkpoint.written({P0: 5})
    checkpoint.written({P0: 3})  # an older offset never moves the commit back
    await checkpoint.commit(idle=lambda: False)
    assert consumer.commits == [{P0: 5}]
    await checkpoint.commit(idle=lambda: False)
    assert consumer.commits == [{P0: 5}]  # nothing new: no commit request
    assert metric(metrics, "sparse_ingest_consumer_lag_records", topic=TOPIC, partition="0") == 5


async def test_a_failed_commit_is_counted_and_made_again() -> None:
    consumer = InMemoryConsumer({P0: [rec(0, o) for o in range(3)]})
    metrics = Metrics()
    checkpoint = Checkpoint(consumer, metrics, interval_s=0)  # type: ignore[arg-type]
    checkpoint.written({P0: 3})
    consumer.fail_commits = 1
    await checkpoint.commit(idle=lambda: False)
    assert consumer.commits == []
    assert metric(metrics, "sparse_ingest_commits_total", outcome="failed") == 1
    await checkpoint.commit(idle=lambda: False)
    assert consumer.commits == [{P0: 3}]


async def test_with_nothing_in_flight_the_commit_goes_past_transaction_markers() -> None:
    """Offsets that never reach the consumer (a commit marker) are passed when idle only."""
    consumer = InMemoryConsumer({P0: [rec(0, 0), rec(0, 1)]})
    checkpoint = Checkpoint(consumer, Metrics(), interval_s=0)  # type: ignore[arg-type]
    checkpoint.written({P0: 2})
    consumer.positions[P0] = 3  # offset 2 was a commit marker
    await checkpoint.commit(idle=lambda: False)
    assert consumer.commits == [{P0: 2}]  # records in flight: only what was written
    await checkpoint.commit(idle=lambda: True)
    assert consumer.commits == [{P0: 2}, {P0: 3}]


async def test_a_revoked_partition_is_forgotten_and_not_committed() -> None:
    consumer = InMemoryConsumer({P0: [rec(0, 0)], P1: [rec(1, 0)]})
    metrics = Metrics()
    checkpoint = Checkpoint(consumer, metrics, interval_s=0)  # type: ignore[arg-type]
    assert await checkpoint.assigned([P0, P1]) == {}  # nothing committed by the group yet
    checkpoint.written({P0: 1, P1: 1})
    consumer.assigned.discard(P1)
    checkpoint.revoked([P1])
    await checkpoint.commit(idle=lambda: False)
    assert consumer.commits == [{P0: 1}]
    assert metric(metrics, "sparse_ingest_consumer_lag_records", topic=TOPIC, partition="1") is None


# ---------------------------------------------------------------------------- pausing
async def test_pausing_covers_a_partition_assigned_while_paused() -> None:
    consumer = InMemoryConsumer({P0: [rec(0, o) for o in range(5)], P1: []})
    consumer.assigned = {P0}
    metrics = Metrics()
    pausing = Pausing(consumer, metrics, max_bytes=100)  # type: ignore[arg-type]
    pausing.set_paused(True)
    assert consumer.paused() == {P0} and metric(metrics, "sparse_ingest_consumer_paused") == 1
    consumer.assigned.add(P1)  # a rebalance while blocked
    consumer.log[P1] = [rec(1, o) for o in range(4)]
    await pausing.poll_paused()
    assert consumer.paused() == {P0, P1}
    pausing.set_paused(False)
    assert consumer.paused() == set() and metric(metrics, "sparse_ingest_consumer_paused") == 0


async def test_records_polled_from_a_partition_not_yet_paused_go_back() -> None:
    consumer = InMemoryConsumer({P0: [rec(0, o) for o in range(5)]})
    pausing = Pausing(consumer, Metrics(), max_bytes=100)  # type: ignore[arg-type]
    real_pause = consumer.pause
    consumer.pause = lambda *tps: None  # type: ignore[method-assign]  # the pause comes late
    await pausing.poll_paused()
    consumer.pause = real_pause  # type: ignore[method-assign]
    assert consumer.positions[P0] == 0  # fetched, not taken: sought back


# ---------------------------------------------------------------------------- stages
async def test_stages_finish_batches_in_the_order_they_were_made() -> None:
    processor = RecordingProcessor()
    written: list[int] = []

    async def on_written(batch: Batch) -> None:
        written.append(batch.seq)

    stages = Stages(processor, 2, lambda: None, on_written)  # type: ignore[arg-type]
    tasks = stages.start()
    try:
        for seq in range(1, 7):
            await until(lambda: not stages.full, "room in the stages")
            assert stages.submit(Batch(seq=seq, opened_at=0))
        end = time.monotonic() + 60
        assert await stages.drained_by(lambda: end)
        assert written == processor.written == [1, 2, 3, 4, 5, 6]
        assert stages.in_flight == 0
    finally:
        for task in tasks:
            task.cancel()


async def test_draining_ends_at_the_deadline_while_writes_are_refused() -> None:
    processor = RecordingProcessor()
    processor.writable.clear()  # Elasticsearch down

    async def on_written(batch: Batch) -> None:
        pass

    stages = Stages(processor, 1, lambda: None, on_written)  # type: ignore[arg-type]
    tasks = stages.start()
    try:
        assert stages.submit(Batch(seq=1, opened_at=0))
        end = time.monotonic() + 0.05
        assert not await stages.drained_by(lambda: end)
        assert stages.in_flight == 1 and processor.written == []
    finally:
        for task in tasks:
            task.cancel()


# ---------------------------------------------------------------------------- the pipeline
def pipeline_over(log: dict, **config: int | float) -> Pipeline:
    settings = PipelineConfig(**{"batch_max_docs": 4, "batch_linger_ms": 10, **config})  # type: ignore[arg-type]
    return Pipeline(InMemoryConsumer(log), RecordingProcessor(), Metrics(), settings)  # type: ignore[arg-type]


async def test_the_pipeline_commits_every_record_after_it_is_written() -> None:
    pipeline = pipeline_over(
        {P0: [rec(0, o) for o in range(10)], P1: [rec(1, o) for o in range(7)]}
    )
    consumer: InMemoryConsumer = pipeline.consumer  # type: ignore[assignment]
    processor: RecordingProcessor = pipeline.processor  # type: ignore[assignment]
    running = asyncio.create_task(pipeline.run())
    await until(lambda: consumer.committed_offsets == {P0: 10, P1: 7}, "every record committed")
    pipeline.stop()
    await asyncio.wait_for(running, 60)
    for tp, n in ((P0, 10), (P1, 7)):  # every record taken once, in order
        assert [o for p, o in processor.taken if p == tp.partition] == list(range(n))
    assert processor.written == sorted(processor.written)


async def test_stopping_while_elasticsearch_is_down_commits_nothing_unwritten() -> None:
    pipeline = pipeline_over(
        {P0: [rec(0, o) for o in range(12)]}, shutdown_timeout_s=0.5, max_inflight_bytes=50
    )
    consumer: InMemoryConsumer = pipeline.consumer  # type: ignore[assignment]
    processor: RecordingProcessor = pipeline.processor  # type: ignore[assignment]
    processor.writable.clear()
    running = asyncio.create_task(pipeline.run())
    await until(lambda: pipeline.blocked, "the pipeline blocked behind the write stage")
    await until(lambda: consumer.paused() == {P0}, "the assignment paused")
    pipeline.stop()
    await asyncio.wait_for(running, 60)  # ends within the bound although nothing is written
    assert processor.written == [] and consumer.commits == []


async def test_a_revoke_commits_what_was_written_before_the_partition_goes() -> None:
    pipeline = pipeline_over({P0: [rec(0, o) for o in range(6)]}, commit_interval_ms=3_600_000)
    consumer: InMemoryConsumer = pipeline.consumer  # type: ignore[assignment]
    processor: RecordingProcessor = pipeline.processor  # type: ignore[assignment]
    running = asyncio.create_task(pipeline.run())
    try:
        await until(lambda: len(processor.taken) == 6, "every record taken")
        await pipeline.on_partitions_revoked([P0])  # drains, then commits
        assert consumer.committed_offsets == {P0: 6}
    finally:
        pipeline.stop()
        await asyncio.wait_for(running, 60)
