"""Wires the service together from :class:`Settings`: encoder, Kafka, Elasticsearch, HTTP.

``Service`` is used both by ``sparse-ingest run`` and, in-process, by the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    TopicAuthorizationFailedError,
)
from aiokafka.helpers import create_ssl_context
from elastic_transport import TlsError
from elasticsearch import (
    ApiError,
    AsyncElasticsearch,
    AuthenticationException,
    AuthorizationException,
    OrjsonSerializer,
)
from elasticsearch import (
    ConnectionError as EsConnectionError,
)

from service import record_guard
from service.config import DEFAULT_PASSAGE_TOKENS, Settings
from service.deadletter import DeadLetterWriter
from service.elastic import ClusterInfo, CompatibleTransport, accepted_versions, describe_cluster
from service.http import HttpApi, HttpLimits
from service.messages import MessageContract, TopicFormat, vector_fingerprint
from service.metrics import Metrics
from service.pipeline import Pipeline, PipelineConfig
from service.processing import BatchProcessor
from service.search import Searcher
from service.sink import ElasticsearchSink, IndexConfig

log = logging.getLogger(__name__)


def message_contract(settings: Settings) -> MessageContract:
    return MessageContract(
        id_field=settings.id_field,
        text_fields=tuple(settings.text_fields),
        version_field=settings.version_field,
        version_header=settings.version_header,
        version_epoch=settings.version_epoch,
        vector_field=settings.es_vector_field,
        max_message_bytes=settings.max_message_bytes,
        max_text_chars=settings.max_text_chars,
        default_format=TopicFormat.parse(settings.message_format),
        formats=settings.formats(),
        cdc_version_field=settings.cdc_version_field,
    )


async def check_registry(registry: Any) -> None:
    """A wrong registry URL or refused credentials stop the start (else every record of a
    registry topic would wait for ever); an outage only warns: the records wait for it."""
    from service.registry import RegistryUnavailable

    try:
        problem = await registry.probe()
    except RegistryUnavailable as exc:
        log.warning("%s: records of the registry formats wait until it answers", exc)
        return
    if problem:
        await registry.close()
        raise StartupError(f"{problem} (SPARSE_INGEST_SCHEMA_REGISTRY_URL)")


def schema_registry(settings: Settings) -> Any | None:
    """The registry client when a topic's format needs one (service.registry)."""
    s = settings
    formats = [TopicFormat.parse(s.message_format), *s.formats().values()]
    if not any(f.uses_registry for f in formats) or not s.schema_registry_url:
        return None
    from service.registry import SchemaRegistry

    return SchemaRegistry(
        s.schema_registry_url,
        username=s.schema_registry_username,
        password=s.schema_registry_password.get_secret_value()
        if s.schema_registry_password
        else None,
        ca_file=str(s.schema_registry_ca_file) if s.schema_registry_ca_file else None,
    )


def build_sink(settings: Settings, es: AsyncElasticsearch, encoder: Any) -> ElasticsearchSink:
    """The sink for ``encoder``'s vectors (its name and fingerprint go with each document and
    in the index's ``_meta``)."""
    s = settings
    model_name = str(encoder.metadata.name)
    sink = ElasticsearchSink(
        es,
        IndexConfig(
            index=s.es_index,
            vector_field=s.es_vector_field,
            text_fields=tuple(s.text_fields),
            number_of_shards=s.es_number_of_shards,
            number_of_replicas=s.es_number_of_replicas,
            refresh_interval=s.es_refresh_interval,
            prune_below=s.es_prune_below,
            passage_field=(
                s.es_passage_field if getattr(encoder, "long_text", "") == "passages" else None
            ),
        ),
        model_name=model_name,
        chunk_size=s.es_bulk_chunk_size,
        max_chunk_bytes=s.es_bulk_max_bytes,
        max_retries=s.es_bulk_max_retries,
        initial_backoff=s.es_bulk_initial_backoff_s,
        max_backoff=s.es_bulk_max_backoff_s,
    )
    sink.fingerprint = vector_fingerprint(
        model_name, str(getattr(encoder, "fingerprint", "")), s.es_prune_below
    )
    sink.long_text = describe_long_text(encoder)
    if sink.config.passage_field:
        check_passage_bound(s, encoder)
    return sink


# Elasticsearch's index.mapping.nested_objects.limit (default): nested objects a document may
# hold; a document with more passages would be refused (and dead-lettered)
NESTED_OBJECTS_LIMIT = 10_000


def check_passage_bound(settings: Settings, encoder: Any) -> None:
    """The most passages a document of ``MAX_TEXT_CHARS`` characters can make (a token per
    character at worst, as in CJK text) must stay within Elasticsearch's nested-object limit:
    else refuse the start, naming the settings, rather than dead-letter long documents."""
    window = int(encoder.window_tokens)
    overlap = min(int(encoder.metadata.window_overlap), window // 2)
    stride = max(1, window - overlap)
    worst = -(-max(0, settings.max_text_chars - window) // stride) + 1
    if worst > NESTED_OBJECTS_LIMIT:
        raise StartupError(
            f"passages of {window} tokens overlapping by {overlap} can make up to {worst:,} "
            f"passages from a document of SPARSE_INGEST_MAX_TEXT_CHARS={settings.max_text_chars:,} "
            f"characters, over Elasticsearch's limit of {NESTED_OBJECTS_LIMIT:,} nested objects "
            "a document: raise SPARSE_INGEST_WINDOW_TOKENS, lower SPARSE_INGEST_WINDOW_OVERLAP "
            "or SPARSE_INGEST_MAX_TEXT_CHARS"
        )


def describe_long_text(encoder: Any) -> str:
    """How ``encoder`` turns long texts into vectors, in words (``passages of 510 tokens,
    overlap 64``)."""
    mode = getattr(encoder, "long_text", None)
    window = getattr(encoder, "window_tokens", None)
    if mode is None or window is None:
        return ""
    if mode == "truncate":
        return f"truncate at {window} tokens"
    what = "passages" if mode == "passages" else "chunk (windows max-merged)"
    return f"{what} of {window} tokens, overlap {encoder.metadata.window_overlap}"


def searcher_for(sink: ElasticsearchSink, index: str | None = None) -> Searcher:
    """The searcher of what ``sink`` writes (its vector field or passages), on ``index``
    (default: the alias or index of the settings)."""
    cfg = sink.config
    return Searcher(
        sink.client,
        index or cfg.index,
        cfg.vector_field,
        cfg.text_fields,
        passage_field=cfg.passage_field,
    )


async def open_index(sink: ElasticsearchSink, settings: Settings) -> str:
    """:meth:`ElasticsearchSink.ensure_index` and a check that this user may read and write
    it; the errors as :class:`StartupError`."""
    try:
        index = await sink.ensure_index(create=settings.es_create_index)
    except ValueError as exc:  # missing and not to be created, wrong mapping, other model
        raise StartupError(str(exc)) from None
    except AuthorizationException as exc:
        raise StartupError(
            f"Elasticsearch refused this user {exc.message} on index {settings.es_index!r}: "
            "grant the index privileges of README: Least privilege (read, write, "
            "view_index_metadata; create_index and manage to create it), or create the index "
            "and alias as an administrator and set SPARSE_INGEST_ES_CREATE_INDEX=false"
        ) from None
    except ApiError as exc:
        raise StartupError(
            f"Elasticsearch refused to open index {settings.es_index!r}: {exc.message}"
        ) from None
    missing = await missing_privileges(sink.client, [settings.es_index, index])
    if missing:
        raise StartupError(
            f"this Elasticsearch user lacks the index privilege(s) {', '.join(missing)} on "
            f"{settings.es_index!r} ({index}): documents could be neither written nor checked. "
            "Grant them (README: Least privilege)"
        )
    return index


async def missing_privileges(
    client: AsyncElasticsearch, names: list[str], wanted: tuple[str, ...] = ("read", "write")
) -> list[str]:
    """The index privileges of ``wanted`` this user lacks on ``names`` (``_has_privileges``,
    which any user may call); none when the cluster cannot say (security off)."""
    try:
        resp = await client.options(max_retries=0).security.has_privileges(
            index=[{"names": sorted(set(names)), "privileges": list(wanted)}]
        )
    except (ApiError, EsConnectionError):
        return []
    if resp.get("has_all_requested", True):
        return []
    lacking = {
        privilege
        for privileges in resp.get("index", {}).values()
        for privilege, granted in privileges.items()
        if not granted
    }
    return sorted(lacking)


class StartupError(RuntimeError):
    """The service cannot start; the message says which setting to check."""


def elasticsearch_client(settings: Settings) -> AsyncElasticsearch:
    kwargs: dict[str, Any] = {
        "request_timeout": settings.es_request_timeout_s,
        "serializer": OrjsonSerializer(),  # bulk bodies are mostly float maps: ~5x faster
    }
    if settings.es_username:
        password = settings.es_password.get_secret_value() if settings.es_password else ""
        kwargs["basic_auth"] = (settings.es_username, password)
    if settings.es_api_key is not None:
        kwargs["api_key"] = settings.es_api_key.get_secret_value()
    if settings.es_ca_certs is not None:
        kwargs["ca_certs"] = str(settings.es_ca_certs)
    if settings.es_url.startswith("https"):
        kwargs["verify_certs"] = settings.es_verify_certs
    # negotiates the REST API version with 8.x and 9.x servers (service.elastic)
    return AsyncElasticsearch(settings.es_url, transport_class=CompatibleTransport, **kwargs)


def kafka_security(settings: Settings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        cafile = str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        context: ssl.SSLContext = create_ssl_context(cafile=cafile)
        kwargs["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        assert settings.kafka_sasl_password is not None
        kwargs["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return kwargs


def dead_letter_max_value(settings: Settings) -> int:
    """Dead letters carry the original value up to this length (longer ones, ``too_large``
    records, are cut to it): what the service accepts, and at least ~1 MB."""
    return max(settings.max_message_bytes, 960 * 1024)


def dead_letter_request_size(settings: Settings) -> int:
    """The dead-letter producer's ``max_request_size``: the value plus key and headers."""
    return dead_letter_max_value(settings) + 64 * 1024


class _LogCapture(logging.Handler):
    """Keeps the last record of ``logger`` that contains ``text`` while in the ``with``."""

    def __init__(self, logger: str, text: str) -> None:
        super().__init__(logging.ERROR)
        self.logger = logging.getLogger(logger)
        self.text = text
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            self.last = message

    def __enter__(self) -> _LogCapture:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


def kafka_connection_error(settings: Settings, exc: Exception, cause: str) -> str:
    """Why the Kafka clients could not start, with the setting to check. aiokafka raises
    "Unable to bootstrap" whatever went wrong and logs the cause (a refused password, an
    unknown CA): ``cause`` is that log line."""
    reason = cause.split('": ', 1)[-1] if cause else f"{type(exc).__name__}: {exc}"
    where = f"Kafka at {settings.kafka_bootstrap_servers}"
    if "SaslAuthentication" in reason or "SASL" in reason.upper().split(":")[0]:
        return (
            f"{where} refused the SASL credentials ({reason}): check "
            "SPARSE_INGEST_KAFKA_SASL_MECHANISM / SPARSE_INGEST_KAFKA_SASL_USERNAME / "
            "SPARSE_INGEST_KAFKA_SASL_PASSWORD"
        )
    if "CERTIFICATE" in reason.upper() or "SSL" in reason.upper():
        return (
            f"TLS with {where} failed ({reason}): check SPARSE_INGEST_KAFKA_SSL_CAFILE and "
            "SPARSE_INGEST_KAFKA_SECURITY_PROTOCOL"
        )
    return (
        f"cannot reach {where} (SPARSE_INGEST_KAFKA_BOOTSTRAP_SERVERS; "
        f"SPARSE_INGEST_KAFKA_SECURITY_PROTOCOL is {settings.kafka_security_protocol}): {reason}"
    )


def kafka_authorization_error(settings: Settings, exc: BaseException) -> str | None:
    """What to grant when Kafka refused an operation to this user (None for other errors)."""
    s = settings
    who = f"user {s.kafka_sasl_username!r}" if s.kafka_sasl_username else "this client"
    if isinstance(exc, GroupAuthorizationFailedError):
        return (
            f"Kafka refused consumer group {s.kafka_group_id!r} to {who} ({exc}): grant Read "
            "on the group (README: Least privilege), or set SPARSE_INGEST_KAFKA_GROUP_ID"
        )
    if isinstance(exc, TopicAuthorizationFailedError | ClusterAuthorizationFailedError):
        return (
            f"Kafka refused {who} an operation ({exc}): grant Read and Describe on "
            f"{', '.join(s.kafka_topics)} and Write and Describe on {s.dead_letter_topic} "
            "(README: Least privilege)"
        )
    return None


def long_text_options(settings: Settings) -> dict[str, Any]:
    """How the settings have long texts encoded: ``long_text``, ``window_tokens`` and
    ``window_overlap`` for :meth:`encoder.SparseEncoder.load` (passages are
    ``DEFAULT_PASSAGE_TOKENS`` long unless ``SPARSE_INGEST_WINDOW_TOKENS`` says otherwise, or
    the model takes fewer)."""
    window = settings.window_tokens
    if window is None and settings.long_text == "passages":
        from encoder.metadata import read_metadata

        # (an unreadable folder: SparseEncoder.load says what is wrong with it)
        with contextlib.suppress(Exception):
            window = min(DEFAULT_PASSAGE_TOKENS, read_metadata(settings.model_dir).max_length - 2)
    return {
        "long_text": settings.long_text,
        "window_tokens": window,
        "window_overlap": settings.window_overlap,
    }


def load_encoder(settings: Settings) -> Any:
    from encoder import SparseEncoder

    return SparseEncoder.load(
        settings.model_dir,
        threads=settings.encoder_threads,
        max_batch_tokens=settings.encoder_max_batch_tokens,
        max_batch_docs=settings.encoder_max_batch_docs,
        **long_text_options(settings),
    )


async def check_elasticsearch(client: AsyncElasticsearch, settings: Settings) -> ClusterInfo:
    """The server's version, or :class:`StartupError` saying what to fix. Needs no cluster
    privilege (README: Least privilege): without ``monitor`` only the major version is known."""
    try:
        # One attempt, no retries: the client logs a traceback per retry, which would bury
        # the one line that says what to fix.
        info = await describe_cluster(client)
    except AuthenticationException:
        raise StartupError(
            f"Elasticsearch at {settings.es_url_redacted} refused the credentials: check "
            "SPARSE_INGEST_ES_USERNAME / SPARSE_INGEST_ES_PASSWORD or SPARSE_INGEST_ES_API_KEY"
        ) from None
    except EsConnectionError as exc:
        # str(exc) is just "TLS error" / "Connection error"; the cause is in .message.
        detail = str(getattr(exc, "message", "") or exc)
        hint = ""
        if isinstance(exc, TlsError) or "CERTIFICATE" in detail.upper():
            hint = " (TLS: set SPARSE_INGEST_ES_CA_CERTS to the cluster's CA file)"
        elif settings.es_url.startswith("http:") and "disconnected" in detail:
            hint = " (does it want https://?)"
        raise StartupError(
            f"cannot reach Elasticsearch at {settings.es_url_redacted} (SPARSE_INGEST_ES_URL){hint}: "
            f"{type(exc).__name__}: {detail}"
        ) from None
    except ApiError as exc:
        refused = accepted_versions(exc.meta.status, exc.body)
        why = (
            f"it speaks REST API versions {'/'.join(map(str, refused))} only"
            if refused
            else f"{exc.meta.status} {exc.message}"
        )
        raise StartupError(
            f"Elasticsearch at {settings.es_url_redacted} refused the client ({why}): "
            "sparse-ingest works with Elasticsearch 8.11 and later (8.x, 9.x)"
        ) from None
    if info.too_old():
        raise StartupError(
            f"{info.describe()} at {settings.es_url_redacted} is too old: sparse_vector fields "
            "need Elasticsearch 8.11 or later (8.x, 9.x); upgrade the cluster"
        )
    return info


async def ensure_dead_letter_topic(settings: Settings, producer: AIOKafkaProducer) -> None:
    """The dead-letter topic must exist before the first bad record: a broker without topic
    auto-creation would otherwise hold that record's partition. Created when missing (as
    many partitions as the widest source topic, replication up to 3), unless switched off."""
    s = settings
    topic = s.dead_letter_topic
    metadata = await producer.client.fetch_all_metadata()
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
        self._es_monitor = True  # the user may read cluster health (else: index checks)
        self._runner: web.AppRunner | None = None
        self._pipeline_task: asyncio.Task[None] | None = None
        self.http_port: int | None = None

    async def start(self, *, consume: bool = True, http: bool = True) -> None:
        s = self.settings
        if self.encoder is None:
            self.encoder = await asyncio.to_thread(load_encoder, s)
        encoder: Any = self.encoder
        meta = encoder.metadata
        self.metrics.model_info.info({k: str(v) for k, v in _metadata_fields(meta).items()})
        with contextlib.suppress(Exception):
            from encoder import cpu_features

            self.metrics.cpu_info.info({k: str(v).lower() for k, v in cpu_features().items()})

        self.es = elasticsearch_client(s)
        self.cluster = await check_elasticsearch(self.es, s)
        log.info("%s at %s", self.cluster.describe(), s.es_url_redacted)
        sink = build_sink(s, self.es, encoder)
        self.index = await open_index(sink, s)
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
        security = kafka_security(s)
        record_guard.install()  # a batch or record the client cannot read becomes a dead letter
        self.producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            client_id=f"{s.kafka_client_id}-dlq",
            acks="all",
            enable_idempotence=True,
            max_request_size=dead_letter_request_size(s),
            **security,
        )
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            group_id=s.kafka_group_id,
            client_id=s.kafka_client_id,
            enable_auto_commit=False,
            auto_offset_reset=s.kafka_auto_offset_reset,
            max_poll_records=s.kafka_max_poll_records,
            session_timeout_ms=s.kafka_session_timeout_ms,
            max_poll_interval_ms=s.kafka_max_poll_interval_ms,
            isolation_level="read_committed",
            # a topic made (or partitions added) after the start is consumed within seconds,
            # not after aiokafka's default 5 minutes
            metadata_max_age_ms=s.kafka_metadata_max_age_ms,
            **security,
        )
        failures = _LogCapture("aiokafka", "Unable connect to")
        try:
            with failures:
                await self.producer.start()
                await self.consumer.start()
        except KafkaConnectionError as exc:
            await self._stop_kafka_clients()
            raise StartupError(kafka_connection_error(s, exc, failures.last)) from None
        except KafkaError as exc:
            await self._stop_kafka_clients()
            raise StartupError(
                f"Kafka at {s.kafka_bootstrap_servers} refused the connection "
                f"(check SPARSE_INGEST_KAFKA_SECURITY_PROTOCOL / SASL / SSL settings): {exc}"
            ) from None
        try:
            await ensure_dead_letter_topic(s, self.producer)
        except StartupError:
            await self._stop_kafka_clients()
            raise
        self.registry = schema_registry(s)
        if self.registry is not None:
            try:
                await check_registry(self.registry)
            except StartupError:
                self.registry = None
                await self._stop_kafka_clients()
                raise
        try:
            from encoder import EncodeStats

            stats_factory: Any = EncodeStats
        except ImportError:
            stats_factory = None
        processor = BatchProcessor(
            encoder,
            sink,
            DeadLetterWriter(self.producer, s.dead_letter_topic, dead_letter_max_value(s)),
            message_contract(s),
            self.metrics,
            model_name=encoder.metadata.name,
            skip_unchanged=s.skip_unchanged,
            unavailable_backoff_s=s.es_unavailable_backoff_s,
            stats_factory=stats_factory,
            registry=self.registry,
        )
        self.pipeline = Pipeline(
            self.consumer,
            processor,
            self.metrics,
            PipelineConfig(
                batch_max_docs=s.batch_max_docs,
                batch_max_tokens=s.batch_max_tokens,
                batch_linger_ms=s.batch_linger_ms,
                max_inflight_batches=s.max_inflight_batches,
                max_poll_records=s.kafka_max_poll_records,
                commit_interval_ms=s.commit_interval_ms,
                shutdown_timeout_s=s.shutdown_timeout_s,
                max_inflight_bytes=s.max_inflight_bytes,
            ),
        )
        self.consumer.subscribe(s.kafka_topics, listener=self.pipeline)
        self._pipeline_task = asyncio.create_task(self.pipeline.run(), name="pipeline")

    async def _start_http(self) -> None:
        s = self.settings
        # The API is the encoder's only priority caller: bound how long ingest waits behind it.
        if self.encoder is not None:
            self.encoder.priority_burst = s.encoder_priority_burst
        api = HttpApi(
            self.metrics,
            self.encoder,
            self.searcher,
            {
                "model": self._check_model,
                "elasticsearch": self._check_es,
                "kafka": self._check_kafka,
            },
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

    async def _check_model(self) -> tuple[bool, str]:
        return self.encoder is not None, getattr(
            self.encoder.metadata, "name", ""
        ) if self.encoder else "not loaded"

    async def _check_es(self) -> tuple[bool, str]:
        assert self.es is not None
        where = self.settings.es_url_redacted
        if self._es_monitor:
            try:
                health = await asyncio.wait_for(self.es.cluster.health(), 5)
            except AuthorizationException:
                self._es_monitor = False  # least privilege: no cluster health, check the index
            else:
                status = str(health.get("status"))
                return status in ("green", "yellow"), f"{where} cluster {status}"
        await asyncio.wait_for(
            self.es.search(
                index=self.index or self.settings.es_index, size=0, track_total_hits=False
            ),
            5,
        )
        return True, f"{where} index {self.index} answers (no monitor privilege: health unknown)"

    async def _check_kafka(self) -> tuple[bool, str]:
        if self.consumer is None:
            return True, "not consuming"
        topics = await asyncio.wait_for(self.consumer.topics(), 5)
        missing = [t for t in self.settings.kafka_topics if t not in topics]
        if self._pipeline_task is not None and self._pipeline_task.done():
            return False, "pipeline stopped"
        return True, f"assigned {len(self.consumer.assignment())} partition(s)" + (
            f"; topics not created yet: {missing}" if missing else ""
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
        for client in (self.consumer, self.producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()


def _metadata_fields(meta: Any) -> dict[str, Any]:
    fields = ("name", "architecture", "vocab_size", "max_length", "quantization", "long_text")
    return {f: getattr(meta, f, "") for f in fields}


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
