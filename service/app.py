"""The service's lifecycle: start (encoder, Elasticsearch, Kafka, HTTP), serve, stop.

``Service`` is used both by ``sparse-ingest run`` (:func:`run_forever`) and, in-process, by
the tests. What it starts is made by :mod:`service.builder` (the same for the Faust runner),
:mod:`service.elastic` and :mod:`service.kafka.clients`; what it runs is
:class:`service.kafka.pipeline.Pipeline`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from elasticsearch import AsyncElasticsearch

from service.builder import (
    build_processor,
    build_sink,
    check_registry,
    load_encoder,
    model_info,
    open_index,
    schema_registry,
    searcher_for,
)
from service.config import Settings
from service.deadletter import dead_letter_request_size, ensure_dead_letter_topic
from service.elastic import ClusterInfo, check_elasticsearch, elasticsearch_client
from service.errors import StartupError
from service.http import HttpApi, HttpLimits
from service.kafka import record_guard
from service.kafka.clients import (
    dead_letter_producer,
    ingest_consumer,
    kafka_authorization_error,
    start_clients,
    stop_clients,
)
from service.kafka.pipeline import Pipeline, pipeline_config
from service.metrics import Metrics
from service.readiness import Readiness
from service.search import Searcher
from service.sink import ElasticsearchSink

log = logging.getLogger(__name__)


class Service:
    def __init__(self, settings: Settings, *, encoder: Any | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.encoder = encoder
        self.es: AsyncElasticsearch | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.pipeline: Pipeline | None = None
        self.searcher: Searcher | None = None
        self.cluster: ClusterInfo | None = None
        self.index: str | None = None  # the index written (settings.es_index or behind it)
        self.registry: Any | None = None  # service.registry.SchemaRegistry, when one is needed
        self.readiness: Readiness | None = None
        self._runner: web.AppRunner | None = None
        self._pipeline_task: asyncio.Task[None] | None = None
        self.http_port: int | None = None

    async def start(self, *, consume: bool = True, http: bool = True) -> None:
        s = self.settings
        if self.encoder is None:
            self.encoder = await asyncio.to_thread(load_encoder, s)
        encoder: Any = self.encoder
        self.metrics.model_info.info(model_info(encoder.metadata))
        with contextlib.suppress(Exception):
            from encoder import cpu_features

            self.metrics.cpu_info.info({k: str(v).lower() for k, v in cpu_features().items()})

        self.es = elasticsearch_client(s)
        self.readiness = Readiness(s, encoder, self.es)
        self.cluster = await check_elasticsearch(self.es, s)
        log.info("%s at %s", self.cluster.describe(), s.es_url_redacted)
        sink = build_sink(s, self.es, encoder)
        self.index = self.readiness.index = await open_index(sink, s)
        if self.index != s.es_index:
            log.info("writing and searching index %s (alias %s)", self.index, s.es_index)
        # search the index written, whose vectors come from this model (not what the alias
        # may point at after a reindex)
        self.searcher = searcher_for(sink, self.index)

        if consume:
            await self._start_kafka(sink, encoder)
        if http:
            await self._start_http()
        self.metrics.ready.set(1)

    async def _start_kafka(self, sink: ElasticsearchSink, encoder: Any) -> None:
        s = self.settings
        record_guard.install()  # a batch or record the client cannot read becomes a dead letter
        self.producer = dead_letter_producer(s, dead_letter_request_size(s))
        self.consumer = ingest_consumer(s)
        await start_clients(s, self.producer, self.consumer)
        try:
            await ensure_dead_letter_topic(s, self.producer)
            self.registry = schema_registry(s)
            if self.registry is not None:
                await check_registry(self.registry)
        except StartupError:
            self.registry = None  # (check_registry closed it)
            await self._stop_kafka_clients()
            raise
        processor = build_processor(
            s, encoder, sink, self.producer, self.metrics, registry=self.registry
        )
        self.pipeline = Pipeline(self.consumer, processor, self.metrics, pipeline_config(s))
        self.consumer.subscribe(s.kafka_topics, listener=self.pipeline)
        self._pipeline_task = asyncio.create_task(self.pipeline.run(), name="pipeline")
        assert self.readiness is not None
        self.readiness.consumer = self.consumer
        self.readiness.pipeline_running = lambda: self.pipeline_running

    async def _start_http(self) -> None:
        s = self.settings
        # The API is the encoder's only priority caller: bound how long ingest waits behind it.
        if self.encoder is not None:
            self.encoder.priority_burst = s.encoder_priority_burst
        assert self.readiness is not None
        api = HttpApi(
            self.metrics,
            self.encoder,
            self.searcher,
            self.readiness.checks(),
            HttpLimits(
                max_body_bytes=s.http_max_body_bytes,
                max_query_chars=s.http_max_query_chars,
                bearer_token=s.http_bearer_token,
                max_concurrent=s.http_max_concurrent,
            ),
        )
        self._runner = web.AppRunner(api.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.http_host, s.http_port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.http_port = sockets[0].getsockname()[1] if sockets else s.http_port
        log.info(
            "HTTP on http://%s:%s (/metrics /healthz /readyz /encode /search)",
            s.http_host,
            self.http_port,
        )

    @property
    def pipeline_running(self) -> bool:
        """The ingest pipeline is running (it ends only after :meth:`stop`, or on a fatal
        error)."""
        return self._pipeline_task is not None and not self._pipeline_task.done()

    async def wait(self) -> None:
        """Until the pipeline ends (after :meth:`stop`, or on a fatal error, which is raised:
        Kafka refusing this user a group or topic as :class:`StartupError`, saying what to
        grant)."""
        if self._pipeline_task is not None:
            try:
                await self._pipeline_task
            except KafkaError as exc:
                message = kafka_authorization_error(self.settings, exc)
                if message is None:
                    raise
                raise StartupError(message) from None

    def request_stop(self) -> None:
        if self.pipeline is not None:
            self.pipeline.stop()

    async def stop(self) -> None:
        self.request_stop()
        try:
            if self._pipeline_task is not None and not self._pipeline_task.done():
                await self._pipeline_task
        finally:
            await self._stop_kafka_clients()
            if self.registry is not None:
                await self.registry.close()
            if self._runner is not None:
                await self._runner.cleanup()
            if self.es is not None:
                await self.es.close()

    async def _stop_kafka_clients(self) -> None:
        await stop_clients(self.consumer, self.producer)


async def run_forever(settings: Settings) -> int:
    """``sparse-ingest run``: start, serve until SIGTERM/SIGINT, drain, commit, exit."""
    service = Service(settings)
    loop = asyncio.get_running_loop()
    # A signal during the start (model load, checks: seconds) cancels it: as PID 1 in a
    # container a SIGTERM without a handler is ignored, and the stop would wait for SIGKILL.
    starting = asyncio.ensure_future(service.start())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, starting.cancel)
    try:
        await starting
    except asyncio.CancelledError:
        await service.stop()
        log.info("stopped during the start")
        return 0
    except BaseException:
        await service.stop()  # close what did start (clients, sockets) before exiting
        raise
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    log.info(
        "consuming %s as group %r -> index %r (dead letters: %s)",
        settings.kafka_topics,
        settings.kafka_group_id,
        settings.es_index,
        settings.dead_letter_topic,
    )
    try:
        await service.wait()
    finally:
        await service.stop()
    log.info("stopped cleanly")
    return 0
