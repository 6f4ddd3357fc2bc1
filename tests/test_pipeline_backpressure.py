"""The fetch stage's bytes bound and seek-back, as pure logic (a consumer over in-memory
partitions that follows aiokafka's contract: ``getmany`` returns records from each partition's
position and moves it past them, ``seek`` sets it). The real thing, Elasticsearch down, is in
tests/reliability/test_rel_backpressure.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition
from kafka_fakes import TOPIC, InMemoryConsumer, RecordingProcessor, rec

from service.kafka.pausing import record_bytes
from service.kafka.pipeline import Pipeline, PipelineConfig
from service.metrics import Metrics


def pipeline_over(log: dict[TopicPartition, list[Any]], bound: int) -> Pipeline:
    config = PipelineConfig(batch_max_docs=1000, max_inflight_bytes=bound, commit_interval_ms=0)
    return Pipeline(InMemoryConsumer(log), RecordingProcessor(), Metrics(), config)  # type: ignore[arg-type]


async def write_everything(pipeline: Pipeline) -> None:
    """What the stages do once Elasticsearch answers: every batch handed over is written."""
    assert pipeline._hand_over()
    stages = pipeline.stages
    while not stages._prepare_q.empty():
        await stages.mark_done(stages._prepare_q.get_nowait())


async def test_records_past_the_bound_go_back_and_come_again_none_skipped() -> None:
    tps = [TopicPartition(TOPIC, p) for p in range(2)]
    log = {tp: [rec(tp.partition, o, 100) for o in range(25)] for tp in tps}
    pipeline = pipeline_over(log, bound=1000)
    processor: RecordingProcessor = pipeline.processor  # type: ignore[assignment]
    consumer: InMemoryConsumer = pipeline.consumer  # type: ignore[assignment]

    pipeline._take(await consumer.getmany())
    assert processor.taken == [(0, o) for o in range(10)]  # 10 x 100 B = the bound
    assert pipeline.inflight_bytes == 1000
    assert consumer.positions == {tps[0]: 10, tps[1]: 0}  # sought back to the first not taken
    assert pipeline._blocked()

    peak = 0
    while any(consumer.positions[tp] < 25 for tp in tps):
        await write_everything(pipeline)
        assert not pipeline._blocked()
        pipeline._take(await consumer.getmany())
        peak = max(peak, pipeline.inflight_bytes)
    assert peak <= 1000
    for tp in tps:  # every record taken exactly once, in order
        assert [o for p, o in processor.taken if p == tp.partition] == list(range(25))


async def test_a_record_larger_than_the_bound_goes_through_alone() -> None:
    tp = TopicPartition(TOPIC, 0)
    pipeline = pipeline_over({tp: [rec(0, 0, 5000), rec(0, 1, 10)]}, bound=1000)
    pipeline._take(await pipeline.consumer.getmany())
    assert pipeline.processor.taken == [(0, 0)]  # type: ignore[attr-defined]
    assert pipeline.inflight_bytes == 5000
    await write_everything(pipeline)
    pipeline._take(await pipeline.consumer.getmany())
    assert pipeline.processor.taken == [(0, 0), (0, 1)]  # type: ignore[attr-defined]


async def test_seek_back_starts_after_the_last_record_taken() -> None:
    """A record may stand for several offsets (the record guard's marker for an unreadable
    batch sits at the last offset it covers): going back, the first of them is not lost."""
    tp = TopicPartition(TOPIC, 0)
    marker = rec(0, 7, 600)  # covers offsets 3..7
    pipeline = pipeline_over({tp: [rec(0, 0, 300), rec(0, 1, 300), rec(0, 2, 300), marker]}, 1000)
    pipeline._take(await pipeline.consumer.getmany())
    assert pipeline.processor.taken == [(0, 0), (0, 1), (0, 2)]  # type: ignore[attr-defined]
    assert pipeline.consumer.positions[tp] == 3  # type: ignore[attr-defined]


def test_record_bytes_counts_key_value_and_headers() -> None:
    record = SimpleNamespace(key=b"abc", value=None, headers=[("h", b"12345"), ("hh", None)])
    assert record_bytes(record) == 3 + 0 + 1 + 5 + 2
