"""Faust runner: a faust-streaming agent on the same topic, with the same encoder, sink and
dead letters as ``sparse-ingest run``.

For teams that already run Faust workers. Each batch comes from ``stream.take_events``; Faust
acknowledges the events (and commits their offsets) only after the loop body has written the
batch to Elasticsearch and its dead letters to Kafka, so delivery stays at-least-once and the
external versions keep the writes idempotent. Unlike ``sparse-ingest run``, the steps of one
batch do not overlap with the next batch's (no pipelining), so it is slower per core.

Run it with ``sparse-ingest faust`` (same ``SPARSE_INGEST_*`` settings; the consumer group is
``SPARSE_INGEST_KAFKA_GROUP_ID``; metrics on ``SPARSE_INGEST_HTTP_PORT``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)


def create_app(settings: Any) -> Any:
    import faust
    from aiokafka import AIOKafkaProducer

    from service.app import (
        build_sink,
        check_elasticsearch,
        dead_letter_max_value,
        dead_letter_request_size,
        elasticsearch_client,
        kafka_security,
        load_encoder,
        message_contract,
    )
    from service.deadletter import DeadLetterWriter
    from service.metrics import Metrics
    from service.processing import Batch, BatchProcessor

    brokers = [f"kafka://{h.strip()}" for h in settings.kafka_bootstrap_servers.split(",")]
    app = faust.App(
        settings.kafka_group_id,
        broker=brokers,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset=settings.kafka_auto_offset_reset,
        broker_commit_interval=max(0.1, settings.commit_interval_ms / 1000),
        store="memory://",
    )
    source = app.topic(
        *settings.kafka_topics,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        allow_empty=True,  # tombstones (null values) are deletes
    )
    metrics = Metrics()
    app.sparse_metrics = metrics  # type: ignore[attr-defined]  # for tests and debugging

    @app.agent(source)
    async def ingest(stream: Any) -> None:
        encoder = load_encoder(settings)
        es = elasticsearch_client(settings)
        await check_elasticsearch(es, settings)
        sink = build_sink(settings, es, encoder.metadata.name)
        await sink.ensure_index(create=settings.es_create_index)
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            max_request_size=dead_letter_request_size(settings),
            **kafka_security(settings),
        )
        await producer.start()
        processor = BatchProcessor(
            encoder,
            sink,
            DeadLetterWriter(producer, settings.dead_letter_topic, dead_letter_max_value(settings)),
            message_contract(settings),
            metrics,
            model_name=encoder.metadata.name,
            skip_unchanged=settings.skip_unchanged,
            unavailable_backoff_s=settings.es_unavailable_backoff_s,
        )
        log.info("faust agent ready: %s -> index %r", settings.kafka_topics, settings.es_index)
        seq = 0
        try:
            async for events in stream.take_events(
                settings.batch_max_docs, within=max(0.01, settings.batch_linger_ms / 1000)
            ):
                seq += 1
                batch = Batch(seq=seq, opened_at=time.monotonic())
                for event in events:
                    m = event.message
                    headers = m.headers.items() if isinstance(m.headers, dict) else m.headers
                    processor.add_record(
                        batch,
                        m.topic,
                        m.partition,
                        m.offset,
                        None if m.timestamp is None else int(m.timestamp * 1000),
                        m.key,
                        m.value,
                        [(k, v) for k, v in (headers or ())],
                    )
                await processor.process(batch)
        finally:
            await producer.stop()
            await es.close()

    return app


def add_subcommands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "faust",
        help="run the ingest as a faust-streaming worker (same settings as `run`)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=_faust)


def _faust(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from service.commands import _settings

    settings = _settings()
    app = create_app(settings)
    start_http_server(settings.http_port, settings.http_host, registry=app.sparse_metrics.registry)
    sys.argv = ["sparse-ingest-faust", "worker", "--loglevel", "info", "--without-web"]
    app.main()
    return 0
