"""The aiokafka clients of the service, made from :class:`Settings`, and what Kafka's errors at
start mean for the user (the setting to check, the ACL to grant)."""

from __future__ import annotations

import contextlib
import logging
import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    TopicAuthorizationFailedError,
)
from aiokafka.helpers import create_ssl_context

from service.config import Settings
from service.errors import StartupError

log = logging.getLogger(__name__)


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


def ingest_consumer(settings: Settings) -> AIOKafkaConsumer:
    """The consumer of the source topics: manual commits, committed data only."""
    s = settings
    return AIOKafkaConsumer(
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
        **kafka_security(s),
    )


def dead_letter_producer(settings: Settings, max_request_size: int) -> AIOKafkaProducer:
    """The producer of dead letters: idempotent, every replica confirms."""
    s = settings
    return AIOKafkaProducer(
        bootstrap_servers=s.kafka_bootstrap_servers,
        client_id=f"{s.kafka_client_id}-dlq",
        acks="all",
        enable_idempotence=True,
        max_request_size=max_request_size,
        **kafka_security(s),
    )


async def start_clients(settings: Settings, *clients: Any) -> None:
    """Start ``clients`` in order; a failure stops those started and is raised as
    :class:`StartupError` saying which setting to check."""
    failures = _LogCapture("aiokafka", "Unable connect to")
    try:
        with failures:
            for client in clients:
                await client.start()
    except KafkaConnectionError as exc:
        await stop_clients(*clients)
        raise StartupError(kafka_connection_error(settings, exc, failures.last)) from None
    except KafkaError as exc:
        await stop_clients(*clients)
        raise StartupError(
            f"Kafka at {settings.kafka_bootstrap_servers} refused the connection "
            f"(check SPARSE_INGEST_KAFKA_SECURITY_PROTOCOL / SASL / SSL settings): {exc}"
        ) from None


async def stop_clients(*clients: Any) -> None:
    """Stop each client that is not None, whatever the others do."""
    for client in clients:
        if client is not None:
            with contextlib.suppress(Exception):
                await client.stop()
