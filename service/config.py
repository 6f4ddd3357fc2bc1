"""Service configuration: one frozen settings object, read from ``SPARSE_INGEST_*`` variables.

Every setting can also come from a dotenv-style file named by ``SPARSE_INGEST_ENV_FILE``.
Secrets are ``SecretStr``: they print as ``**********`` in logs, errors and ``repr``.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.messages import META_FIELD, TopicFormat

ENV_PREFIX = "SPARSE_INGEST_"


class ConfigError(ValueError):
    """Bad configuration. The message names the environment variable and what to do."""


def _default_model_dir() -> Path:
    cache = os.environ.get("SPARSE_INGEST_CACHE")
    base = Path(cache) if cache else Path.home() / ".cache" / "sparse-ingest"
    return base / "models" / "splade-tiny-msmarco"


def redact_url(url: str) -> str:
    """``url`` with a password in it masked: ``https://user:**********@host:9200``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, sep, _ = userinfo.partition(":")
    return parts._replace(netloc=f"{user}{':**********' if sep else ''}@{hostport}").geturl()


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]


# Passages of 256 tokens by default: on SciFact (README: Long documents, results/long-text) the
# best sparse and hybrid nDCG@10 of truncate, chunk and passages at 256 and 510 tokens, at
# +32% store and 2x query time over truncation; about the 250 words of semantic_text's chunks.
DEFAULT_PASSAGE_TOKENS = 256


class Settings(BaseSettings):
    """All settings of ``sparse-ingest run``. Environment variable = ``SPARSE_INGEST_`` + name."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="ignore",
        case_sensitive=False,
        env_file=os.environ.get("SPARSE_INGEST_ENV_FILE"),
        protected_namespaces=(),
    )

    # --- Kafka -------------------------------------------------------------------------------
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_topics: CsvList = Field(default_factory=lambda: ["documents"])
    kafka_group_id: str = "sparse-ingest"
    kafka_client_id: str = "sparse-ingest"
    kafka_dead_letter_topic: str = ""  # default: "<first topic>.dlq"
    # create the dead-letter topic at start when it is missing (partitions: as the widest source
    # topic); off: a missing one stops the start with an error (clusters without the right ACL)
    kafka_create_dead_letter_topic: bool = True
    kafka_auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_max_poll_records: int = Field(default=2000, ge=1)
    kafka_session_timeout_ms: int = Field(default=30_000, ge=1000)
    kafka_max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    # how often the consumer refreshes topic metadata: a listed topic made after the start,
    # or partitions added, are consumed within this time (aiokafka's default is 5 minutes)
    kafka_metadata_max_age_ms: int = Field(default=5000, ge=100)
    commit_interval_ms: int = Field(default=1000, ge=0)

    # --- Message contract ---------------------------------------------------------------------
    id_field: str = "id"
    text_fields: CsvList = Field(default_factory=lambda: ["title", "body"])
    version_field: str = "version"
    version_header: str = "version"
    # records without a version field or header are versioned by offset: epoch * 2^44 + offset.
    # Raise it after a topic is recreated or restored elsewhere (offsets start again), so that
    # the new records win over every stored version of the old epoch (README: Versions)
    version_epoch: int = Field(default=0, ge=0, le=2**19 - 1)
    # the format of every topic's records: json (default), avro, json-schema, protobuf (the
    # Confluent wire format, schemas from SCHEMA_REGISTRY_URL), debezium (change events, JSON),
    # debezium+avro, ... (README: Message formats); TOPIC_FORMATS: per topic, topic=format,...
    message_format: str = "json"
    topic_formats: CsvList = Field(default_factory=list)
    # where a Debezium change event carries its log position, the version (Postgres)
    cdc_version_field: str = "source.lsn"
    max_message_bytes: int = Field(default=1_000_000, ge=1)
    max_text_chars: int = Field(default=200_000, ge=1)

    # --- Elasticsearch ------------------------------------------------------------------------
    es_url: str = "http://127.0.0.1:9200"
    es_index: str = "documents"
    es_username: str | None = None
    es_password: SecretStr | None = None
    es_api_key: SecretStr | None = None
    es_ca_certs: Path | None = None
    es_verify_certs: bool = True
    es_request_timeout_s: float = Field(default=30.0, gt=0)
    es_create_index: bool = True
    es_vector_field: str = "tokens"
    # long_text=passages: the nested field holding the passages ({start, end, <vector field>})
    es_passage_field: str = "passages"
    es_number_of_shards: int = Field(default=1, ge=1)
    es_number_of_replicas: int = Field(default=0, ge=0)
    es_refresh_interval: str = "1s"
    es_bulk_chunk_size: int = Field(default=500, ge=1)
    es_bulk_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    es_bulk_max_retries: int = Field(default=5, ge=0)
    es_bulk_initial_backoff_s: float = Field(default=0.5, gt=0)
    es_bulk_max_backoff_s: float = Field(default=10.0, gt=0)
    es_unavailable_backoff_s: float = Field(default=2.0, gt=0)
    es_prune_below: float = Field(default=0.0, ge=0.0)

    # --- Schema registry (Confluent-compatible API: Confluent, Apicurio's ccompat, Karapace) ---
    schema_registry_url: str | None = None
    schema_registry_username: str | None = None
    schema_registry_password: SecretStr | None = None
    schema_registry_ca_file: Path | None = None

    # --- Encoder ------------------------------------------------------------------------------
    model_dir: Path = Field(default_factory=_default_model_dir)
    encoder_threads: int | None = Field(default=None, ge=1)
    # padded tokens per inference call; None: the model's default (1024 for BERT-base-wide
    # models, 2048 for narrow ones: encoder.runtime.default_max_batch_tokens)
    encoder_max_batch_tokens: int | None = Field(default=None, ge=64)
    encoder_max_batch_docs: int = Field(default=64, ge=1)
    # API inference calls (POST /encode, /search) that may pass a waiting ingest call in a row;
    # then the ingest call goes (encoder.gate): ingest keeps >= 1 call in every burst + 1
    encoder_priority_burst: int = Field(default=4, ge=1)
    # long texts (README: Long documents): "passages" (each window its own vector, a document
    # scored by its best passage), "chunk" (windows max-merged into one vector), "truncate";
    # None: the model folder's choice (sparse_model.json, "chunk" for our exports). Windows of
    # window_tokens tokens (None: DEFAULT_PASSAGE_TOKENS for passages, else all the model
    # takes), neighbours sharing window_overlap (None: the model folder's 64, at most 1/4 window)
    long_text: Literal["chunk", "truncate", "passages"] | None = "passages"
    window_tokens: int | None = Field(default=None, ge=0)  # 0: all the model takes
    window_overlap: int | None = Field(default=None, ge=0)

    # --- Batching and pipeline ----------------------------------------------------------------
    batch_max_docs: int = Field(default=256, ge=1)
    batch_max_tokens: int = Field(default=65_536, ge=64)
    batch_linger_ms: int = Field(default=200, ge=0)
    max_inflight_batches: int = Field(default=2, ge=1)
    # bytes (key + value + headers) of the records held in batches not yet written; fetching
    # pauses past it (one larger record still goes through alone)
    max_inflight_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    skip_unchanged: bool = True
    shutdown_timeout_s: float = Field(default=30.0, gt=0)

    # --- HTTP ---------------------------------------------------------------------------------
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    http_max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    http_max_query_chars: int = Field(default=2000, ge=1)
    # POST /encode and /search at work at once (encoding or searching); one more gets 429 at once
    http_max_concurrent: int = Field(default=8, ge=1)
    http_bearer_token: SecretStr | None = None

    _split = field_validator("kafka_topics", "text_fields", "topic_formats", mode="before")(
        _split_list
    )

    @field_validator("message_format")
    @classmethod
    def _valid_format(cls, value: str) -> str:
        TopicFormat.parse(value)
        return value

    @field_validator("topic_formats")
    @classmethod
    def _valid_topic_formats(cls, value: list[str]) -> list[str]:
        for item in value:
            topic, sep, fmt = item.partition("=")
            if not sep or not topic.strip():
                raise ValueError(f"expected topic=format, got {item!r}")
            TopicFormat.parse(fmt)
        return value

    @field_validator("kafka_topics", "text_fields")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one (comma-separated)")
        return value

    @field_validator("es_index")
    @classmethod
    def _valid_index(cls, value: str) -> str:
        if not value or value != value.lower() or value.startswith(("-", "_", "+")):
            raise ValueError(
                "Elasticsearch index names are lowercase and do not start with '-', '_' or '+'"
            )
        if any(c in value for c in ' \\/*?"<>|,#:'):
            raise ValueError('must not contain spaces or any of \\ / * ? " < > | , # :')
        if len(value.encode()) > 242:  # + "-<12 hex>" of the versioned index: 255 at most
            raise ValueError("must be at most 242 bytes (the index behind it adds 13)")
        return value

    @field_validator("es_ca_certs", "kafka_ssl_cafile", "schema_registry_ca_file")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("no such file (give the CA certificate, PEM)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                "KAFKA_SECURITY_PROTOCOL is SASL_*: set SPARSE_INGEST_KAFKA_SASL_MECHANISM, "
                "SPARSE_INGEST_KAFKA_SASL_USERNAME and SPARSE_INGEST_KAFKA_SASL_PASSWORD"
            )
        if self.dead_letter_topic in self.kafka_topics:
            raise ValueError(
                f"the dead-letter topic {self.dead_letter_topic!r} is also in "
                "SPARSE_INGEST_KAFKA_TOPICS: a bad record would be dead-lettered again and again; "
                "set SPARSE_INGEST_KAFKA_DEAD_LETTER_TOPIC to a topic that is not consumed"
            )
        passages = self.es_passage_field
        if (
            not passages
            or "." in passages
            or passages in (self.id_field, self.es_vector_field, META_FIELD)
            or any(f == passages or f.startswith(f"{passages}.") for f in self.text_fields)
        ):
            raise ValueError(
                f"SPARSE_INGEST_ES_PASSAGE_FIELD {passages!r} must be a top-level field name "
                "(no dots) that is not the id, vector or text fields (nor holds them) nor "
                f"{META_FIELD!r}: choose another name for the passages"
            )
        if self.window_tokens is not None and 0 < self.window_tokens < 16:
            raise ValueError(
                "SPARSE_INGEST_WINDOW_TOKENS must be at least 16, or 0 for all the model takes"
            )
        if self.es_password is not None and not self.es_username:
            raise ValueError(
                "SPARSE_INGEST_ES_PASSWORD is set but SPARSE_INGEST_ES_USERNAME is not"
            )
        if self.es_ca_certs is not None and not self.es_url.startswith("https://"):
            raise ValueError(
                "SPARSE_INGEST_ES_CA_CERTS is set but SPARSE_INGEST_ES_URL is not https://"
            )
        registry_topics = [t for t, f in self.formats().items() if f.uses_registry]
        if (registry_topics or TopicFormat.parse(self.message_format).uses_registry) and not (
            self.schema_registry_url
        ):
            raise ValueError(
                f"SPARSE_INGEST_MESSAGE_FORMAT / SPARSE_INGEST_TOPIC_FORMATS name a schema-registry "
                f"format ({self.message_format}, {registry_topics}): set "
                "SPARSE_INGEST_SCHEMA_REGISTRY_URL"
            )
        if self.schema_registry_url and not self.schema_registry_url.startswith(
            ("http://", "https://")
        ):
            raise ValueError(
                "SPARSE_INGEST_SCHEMA_REGISTRY_URL must start with http:// or https:// (the "
                "Confluent-compatible API's base URL)"
            )
        if self.schema_registry_password is not None and not self.schema_registry_username:
            raise ValueError(
                "SPARSE_INGEST_SCHEMA_REGISTRY_PASSWORD is set but "
                "SPARSE_INGEST_SCHEMA_REGISTRY_USERNAME is not"
            )
        named = [item.partition("=")[0].strip() for item in self.topic_formats]
        twice = sorted({t for t in named if named.count(t) > 1})
        if twice:
            raise ValueError(f"SPARSE_INGEST_TOPIC_FORMATS names {twice} more than once")
        unknown = sorted(set(self.formats()) - set(self.kafka_topics))
        if unknown:
            raise ValueError(
                f"SPARSE_INGEST_TOPIC_FORMATS names topics not in SPARSE_INGEST_KAFKA_TOPICS: {unknown}"
            )
        if self.es_api_key is not None and self.es_username:
            raise ValueError(
                "set either SPARSE_INGEST_ES_API_KEY or SPARSE_INGEST_ES_USERNAME, not both"
            )
        return self

    @property
    def es_url_redacted(self) -> str:
        """``es_url`` fit for logs and messages (a password in the URL is masked)."""
        return redact_url(self.es_url)

    def formats(self) -> dict[str, TopicFormat]:
        """The per-topic formats of TOPIC_FORMATS (the others: MESSAGE_FORMAT)."""
        out = {}
        for item in self.topic_formats:
            topic, _, fmt = item.partition("=")
            out[topic.strip()] = TopicFormat.parse(fmt)
        return out

    @property
    def dead_letter_topic(self) -> str:
        return self.kafka_dead_letter_topic or f"{self.kafka_topics[0]}.dlq"

    def redacted(self) -> dict[str, object]:
        """The settings as a dict fit for logs: secrets stay masked."""
        out = {k: (str(v) if isinstance(v, SecretStr) else v) for k, v in self}
        out["es_url"] = self.es_url_redacted
        if self.schema_registry_url:
            out["schema_registry_url"] = redact_url(self.schema_registry_url)
        return out


def load_settings(**overrides: object) -> Settings:
    """Read and validate the settings; raise :class:`ConfigError` naming each bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) if err["loc"] else ""
            var = f"{ENV_PREFIX}{name.upper()}" if name else "configuration"
            value = err.get("input")
            secret = not name or name.endswith(("password", "api_key", "token"))
            shown = "" if secret else f" (got {value!r})"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {var}: {msg}{shown}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
