"""Prometheus metrics. Names carry their unit (``_seconds``, ``_total``, ``_bytes``, ``_tokens``).

One :class:`Metrics` object per process holds its own registry, so tests can build several
without clashing with the global default registry.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "sparse_ingest"
# Stage durations: from 0.5 ms to 30 s.
_STAGE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# End-to-end lag, Kafka record timestamp to Elasticsearch acknowledgement.
_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_TOKEN_BUCKETS = (64, 256, 1024, 4096, 8192, 16384, 32768, 65536, 131072, 262144)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=r)

        self.documents_consumed = counter(
            "documents_consumed_total", "Kafka records read", ("topic",)
        )
        self.documents_indexed = counter(
            "documents_indexed_total", "documents written (created or updated) in Elasticsearch"
        )
        self.documents_deleted = counter(
            "documents_deleted_total", "deletes acknowledged by Elasticsearch", ("result",)
        )
        self.documents_stale = counter(
            "documents_stale_total",
            "changes dropped as stale: a newer change of the same id in the batch (source=batch), "
            "or Elasticsearch holds a newer version (source=elasticsearch)",
            ("source", "topic"),
        )
        self.documents_unchanged = counter(
            "documents_skipped_unchanged_total",
            "upserts whose text had not changed: written without encoding again",
        )
        self.documents_ignored = counter(
            "documents_ignored_total",
            "records that change nothing: the tombstone Debezium sends after a delete event",
            ("topic",),
        )
        self.schema_registry_unavailable = counter(
            "schema_registry_unavailable_total",
            "schema look-ups that failed because the registry did not answer (retried)",
        )
        self.documents_dead_lettered = counter(
            "documents_dead_lettered_total", "records sent to the dead-letter topic", ("reason",)
        )
        self.bulk_requests = counter(
            "bulk_requests_total", "bulk write attempts of a batch", ("outcome",)
        )
        self.bulk_item_errors = counter(
            "bulk_item_errors_total", "failed bulk items by reason", ("reason",)
        )
        self.commits = counter("commits_total", "Kafka offset commits", ("outcome",))
        self.encoded_tokens = counter("encoder_tokens_total", "real (non-padding) tokens encoded")
        self.encoded_padded_tokens = counter(
            "encoder_padded_tokens_total", "tokens encoded including padding"
        )
        self.encoder_busy_seconds = counter(
            "encoder_busy_seconds_total", "seconds the encoder spent encoding (utilisation = rate)"
        )
        self.stage_seconds = Histogram(
            f"{PREFIX}_stage_duration_seconds",
            "duration of each pipeline stage per batch",
            ("stage",),
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.end_to_end_lag = Histogram(
            f"{PREFIX}_end_to_end_lag_seconds",
            "Kafka record timestamp to Elasticsearch acknowledgement",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.batch_documents = Histogram(
            f"{PREFIX}_batch_documents",
            "documents per batch",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            f"{PREFIX}_batch_tokens",
            "real tokens encoded per batch",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.document_passages = Histogram(
            f"{PREFIX}_document_passages",
            "passages per document encoded (SPARSE_INGEST_LONG_TEXT=passages); each is a nested "
            "Lucene document in the index",
            buckets=(1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.consumer_lag = Gauge(
            f"{PREFIX}_consumer_lag_records",
            "high watermark minus committed offset, per partition",
            ("topic", "partition"),
            registry=r,
        )
        self.inflight_batches = Gauge(
            f"{PREFIX}_inflight_batches", "batches between fetch and commit", registry=r
        )
        self.paused = Gauge(
            f"{PREFIX}_consumer_paused", "1 while fetching is paused by backpressure", registry=r
        )
        self.inflight_bytes = Gauge(
            f"{PREFIX}_inflight_bytes",
            "bytes (key + value + headers) of the records in batches not yet written "
            "(bound: MAX_INFLIGHT_BYTES)",
            registry=r,
        )
        self.encoder_tokens_per_second = Gauge(
            f"{PREFIX}_encoder_tokens_per_second",
            "real tokens per second of encoder busy time, last batch",
            registry=r,
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 when the service is ready", registry=r)
        self.model_info = Info(f"{PREFIX}_model", "the loaded sparse encoder", registry=r)
        self.cpu_info = Info(f"{PREFIX}_cpu", "CPU features the encoder can use", registry=r)
        self.http_requests = counter(
            "http_requests_total", "HTTP API requests", ("endpoint", "status")
        )
        self.http_rejected = counter(
            "http_rejected_total",
            "POST /encode and /search refused with 429 (reason: max_concurrent)",
            ("endpoint", "reason"),
        )
        self.http_inflight = Gauge(
            f"{PREFIX}_http_inflight_requests",
            "POST /encode and /search at work now (bound: HTTP_MAX_CONCURRENT)",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
