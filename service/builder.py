"""The parts of the service made from :class:`Settings`, one way for both runners (``run``:
:mod:`service.app`; ``faust``: :mod:`service.faust_runner`) and the tools: the encoder, the
message contract, the schema registry client, the sink and its index, the searcher, the batch
processor."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from elasticsearch import ApiError, AsyncElasticsearch, AuthorizationException
from elasticsearch import ConnectionError as EsConnectionError

from service.batches import BatchProcessor
from service.config import DEFAULT_PASSAGE_TOKENS, Settings
from service.deadletter import DeadLetterWriter, dead_letter_max_value
from service.errors import StartupError
from service.messages import MessageContract, TopicFormat, vector_fingerprint
from service.metrics import Metrics
from service.search import Searcher
from service.sink import ElasticsearchSink, IndexConfig

log = logging.getLogger(__name__)


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


def build_processor(
    settings: Settings,
    encoder: Any,
    sink: ElasticsearchSink,
    producer: Any,
    metrics: Metrics,
    registry: Any | None = None,
) -> BatchProcessor:
    """What turns a batch of records into written documents and dead letters (the same for
    both runners): ``producer`` sends the dead letters."""
    s = settings
    try:
        from encoder import EncodeStats

        stats_factory: Any = EncodeStats
    except ImportError:
        stats_factory = None
    return BatchProcessor(
        encoder,
        sink,
        DeadLetterWriter(producer, s.dead_letter_topic, dead_letter_max_value(s)),
        message_contract(s),
        metrics,
        model_name=encoder.metadata.name,
        skip_unchanged=s.skip_unchanged,
        unavailable_backoff_s=s.es_unavailable_backoff_s,
        stats_factory=stats_factory,
        registry=registry,
    )


def model_info(meta: Any) -> dict[str, str]:
    """The model's metadata as the labels of ``sparse_ingest_model_info``."""
    fields = ("name", "architecture", "vocab_size", "max_length", "quantization", "long_text")
    return {f: str(getattr(meta, f, "")) for f in fields}
