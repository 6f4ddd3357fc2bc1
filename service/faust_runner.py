"""Faust runner: a faust-streaming agent on the same topic, with the same encoder, sink and
dead letters as ``sparse-ingest run``.

For teams that already run Faust workers. Each batch comes from ``stream.noack_take``, which
acknowledges nothing itself: the agent acknowledges a batch's events (and so lets Faust commit
their offsets) only after the batch is in Elasticsearch and its dead letters in Kafka. A batch
that does not get there is never acknowledged:

- while Elasticsearch refuses or is unreachable, the batch is retried (as in ``run``) and
  nothing after it is taken;
- on SIGTERM or SIGINT, and on a rebalance, Faust does not wait for the batch in progress
  (``stream_wait_empty=False``: that wait has no time bound and would last as long as an
  outage); what the batch did not get acknowledged is consumed again (after the restart, or by
  the partition's next owner), and what it wrote is written again, harmlessly (external
  versions);
- an error that the batch processing does not handle itself (it already retries Elasticsearch
  and the dead-letter topic while they refuse, so this is a fault to look at, not a state to
  wait out) stops the worker with exit status 1 and names the batch's records
  (topic[partition] offsets); they are consumed again when the worker is restarted. Stopping
  is the only safe choice: Faust's commit steps over a gap of one unacknowledged record right
  after the committed offset (and over any gap before the group's first commit), so a worker
  that went on would commit past the failed batch; retrying the same error in place would
  hold the partitions without anyone noticing.

Delivery is at-least-once and the writes idempotent. Unlike ``sparse-ingest run``, the steps of
one batch do not overlap with the next batch's (no pipelining), so it is slower per core.

Before the worker starts, the same checks as ``run``: the model loads, Elasticsearch answers
and has the index (created when missing), Kafka accepts the security settings, and the
dead-letter topic exists (created when missing); a failure prints what to fix, exit status 1.
Every Kafka client (Faust's consumer and producer, the dead-letter producer) uses the
``SPARSE_INGEST_KAFKA_SECURITY_PROTOCOL`` / ``_SASL_*`` / ``_SSL_CAFILE`` settings.

Run it with ``sparse-ingest faust`` (same ``SPARSE_INGEST_*`` settings; the consumer group is
``SPARSE_INGEST_KAFKA_GROUP_ID``; metrics on ``SPARSE_INGEST_HTTP_PORT``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from service.config import Settings

log = logging.getLogger(__name__)


def broker_credentials(settings: Settings) -> Any:
    """Faust's ``broker_credentials`` for the Kafka security settings (None for PLAINTEXT):
    the same SSL context, SASL mechanism and user as ``run``'s clients
    (:func:`service.kafka.clients.kafka_security`)."""
    import faust

    from service.kafka.clients import kafka_security

    security = kafka_security(settings)
    protocol = security["security_protocol"]
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(security["ssl_context"])
    # SASL_PLAINTEXT, or SASL_SSL when there is an SSL context
    return faust.SASLCredentials(
        username=security["sasl_plain_username"],
        password=security["sasl_plain_password"],
        mechanism=security["sasl_mechanism"],
        ssl_context=security.get("ssl_context"),
    )


def describe_records(events: Sequence[Any]) -> str:
    """``topic[partition] first-last`` for each partition of a batch (no record content)."""
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for event in events:
        m = event.message
        first, last = spans.get((m.topic, m.partition), (m.offset, m.offset))
        spans[(m.topic, m.partition)] = (min(first, m.offset), max(last, m.offset))
    return ", ".join(
        f"{topic}[{partition}] {first}-{last}"
        for (topic, partition), (first, last) in sorted(spans.items())
    )


async def preflight(settings: Settings, encoder: Any) -> None:
    """The start-up checks of ``run`` (Elasticsearch and the index made for ``encoder``'s
    vectors, Kafka, the dead-letter topic, the schema registry); raises
    :class:`service.errors.StartupError`."""
    from service.builder import build_sink, check_registry, open_index, schema_registry
    from service.deadletter import ensure_dead_letter_topic
    from service.elastic import check_elasticsearch, elasticsearch_client
    from service.kafka.clients import dead_letter_producer, start_clients, stop_clients

    s = settings
    es = elasticsearch_client(s)
    try:
        await check_elasticsearch(es, s)
        await open_index(build_sink(s, es, encoder), s)
    finally:
        await es.close()
    producer = dead_letter_producer(s, max_request_size=1024 * 1024)
    await start_clients(s, producer)
    try:
        await ensure_dead_letter_topic(s, producer)
    finally:
        await stop_clients(producer)
    registry = schema_registry(s)
    if registry is not None:
        try:
            await check_registry(registry)
        finally:
            await registry.close()  # (again, if check_registry closed it: a no-op)


def _read_committed_transport() -> Any:
    """Faust's aiokafka transport with a consumer that reads ``read_committed``."""
    from faust.transport.drivers import aiokafka as driver

    class ReadCommittedConsumerThread(driver.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            consumer._isolation_level = "read_committed"  # read by its fetcher at start()
            return consumer

    class ReadCommittedConsumer(driver.Consumer):
        def _new_consumer_thread(self) -> Any:
            return ReadCommittedConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class ReadCommittedTransport(driver.Transport):
        Consumer = ReadCommittedConsumer

    return ReadCommittedTransport


def create_app(settings: Settings, encoder: Any = None) -> Any:
    """The Faust app with its ``ingest`` agent; ``encoder``: loaded when None."""
    import faust

    from service.batches import Batch
    from service.builder import (
        build_processor,
        build_sink,
        load_encoder,
        model_info,
        schema_registry,
    )
    from service.deadletter import dead_letter_request_size
    from service.elastic import elasticsearch_client
    from service.kafka import record_guard
    from service.kafka.clients import dead_letter_producer
    from service.metrics import Metrics

    # Faust consumes through aiokafka too: a batch or record the client cannot read becomes a
    # dead letter here as well (the marker records reach processor.add_record with the events).
    record_guard.install()

    brokers = [f"kafka://{h.strip()}" for h in settings.kafka_bootstrap_servers.split(",")]
    app = faust.App(
        settings.kafka_group_id,
        broker=brokers,
        broker_credentials=broker_credentials(settings),
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset=settings.kafka_auto_offset_reset,
        broker_commit_interval=max(0.1, settings.commit_interval_ms / 1000),
        # Do not wait for the batch in progress on stop or rebalance: the wait has no bound
        # and would last as long as an Elasticsearch outage. The batch is not acknowledged,
        # so it is consumed again; its writes are idempotent.
        stream_wait_empty=False,
        store="memory://",
    )
    # Faust's consumer reads uncommitted data unless Faust itself runs transactions: changes
    # from aborted transactions would be indexed. Read committed data only, as `run` does.
    app.transport = _read_committed_transport()(app.conf.broker_consumer, app)
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
    failures: list[str] = []  # why the worker stops (read by `sparse-ingest faust`)
    app.sparse_failures = failures  # type: ignore[attr-defined]

    def stop_worker(why: str) -> None:
        """Stop the worker as SIGTERM does (Faust commits what was acknowledged and leaves
        the group); ``sparse-ingest faust`` then exits with status 1. (``app.crash()``
        would stop Faust's consumer thread before its final commit, and the worker hangs.)"""
        failures.append(why)
        signal.raise_signal(signal.SIGTERM)

    async def consume(stream: Any) -> None:
        loaded = encoder if encoder is not None else await asyncio.to_thread(load_encoder, settings)
        es = elasticsearch_client(settings)
        registry = schema_registry(settings)
        producer = dead_letter_producer(settings, dead_letter_request_size(settings))
        try:
            await producer.start()
            sink = build_sink(settings, es, loaded)
            await sink.ensure_index(create=False)  # made by preflight; resolves the alias
            metrics.model_info.info(model_info(loaded.metadata))
            processor = build_processor(settings, loaded, sink, producer, metrics, registry)
            log.info("faust agent ready: %s -> index %r", settings.kafka_topics, settings.es_index)
            seq = 0
            last_offsets: dict[Any, int] = {}
            async for events in stream.noack_take(
                settings.batch_max_docs, within=max(0.01, settings.batch_linger_ms / 1000)
            ):
                seq += 1
                try:
                    await processor.process(_batch(processor, Batch(seq, time.monotonic()), events))
                except Exception:
                    where = describe_records(events)
                    log.exception(
                        "batch of %d record(s) failed (%s); none is acknowledged: stopping the "
                        "worker so that they are consumed again after a restart",
                        len(events),
                        where,
                    )
                    stop_worker(f"batch failed: {where}")
                    return
                await _mark_skipped_offsets(app.consumer, events, last_offsets)
                for event in events:  # written: now Faust may commit them
                    await stream.ack(event)
        finally:
            await producer.stop()
            await es.close()
            if registry is not None:
                await registry.close()

    @app.agent(source)
    async def ingest(stream: Any) -> None:
        # Faust restarts an agent that returns or raises; after a failure it must take nothing
        # more (a later acknowledgement could commit past the failed batch), so it waits here
        # until the worker's stop cancels it.
        if not failures:
            try:
                await consume(stream)
            except Exception as exc:
                log.exception("the Faust agent failed: stopping the worker")
                stop_worker(f"agent failed: {type(exc).__name__}: {exc}")
        await asyncio.Event().wait()  # the stream ends only when the worker stops

    return app


async def _mark_skipped_offsets(consumer: Any, events: Sequence[Any], last: dict[Any, int]) -> None:
    """Tell Faust's commit about offsets that never reach the agent: transaction markers and
    the records of aborted transactions (read_committed), compacted records. Faust records such
    gaps itself only when the offset before them is not 0 (a falsy check), and its commit
    stops before an unrecorded gap of more than one offset, for good."""
    for event in events:
        tp, offset = event.message.tp, event.message.offset
        prev = last.get(tp)
        if prev is None:
            committed = consumer._committed_offset.get(tp)
            prev = None if committed is None else committed - 1
        if prev is not None and offset > prev + 1:
            await consumer._add_gap(tp, prev + 1, offset - 1)
        last[tp] = offset if prev is None else max(prev, offset)


def _batch(processor: Any, batch: Any, events: Sequence[Any]) -> Any:
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
    return batch


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

    from encoder import ModelError
    from service.builder import load_encoder
    from service.commands import _settings
    from service.errors import StartupError

    settings = _settings()
    try:
        encoder = load_encoder(settings)
        asyncio.run(preflight(settings, encoder))
    except (StartupError, ModelError) as exc:
        print(f"sparse-ingest: {exc}", file=sys.stderr)
        return 1
    app = create_app(settings, encoder)
    start_http_server(settings.http_port, settings.http_host, registry=app.sparse_metrics.registry)
    sys.argv = ["sparse-ingest-faust", "worker", "--loglevel", "info", "--without-web"]
    try:
        app.main()  # ends with SystemExit
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    if app.sparse_failures:
        print(f"sparse-ingest: the Faust worker stopped: {app.sparse_failures[0]}", file=sys.stderr)
        return 1
    return 0 if code is None else code if isinstance(code, int) else 1
