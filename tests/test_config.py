"""Settings validation: errors name the variable and never print secrets."""

from __future__ import annotations

import pytest

from service.config import ConfigError, load_settings


def test_defaults_and_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSE_INGEST_KAFKA_TOPICS", "a, b")
    monkeypatch.setenv("SPARSE_INGEST_TEXT_FIELDS", "title,abstract")
    s = load_settings()
    assert s.kafka_topics == ["a", "b"]
    assert s.text_fields == ["title", "abstract"]
    assert s.dead_letter_topic == "a.dlq"


def test_errors_name_each_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSE_INGEST_ES_INDEX", "Bad Index")
    monkeypatch.setenv("SPARSE_INGEST_BATCH_MAX_DOCS", "0")
    monkeypatch.setenv("SPARSE_INGEST_HTTP_PORT", "http")
    with pytest.raises(ConfigError) as info:
        load_settings()
    text = str(info.value)
    for var in (
        "SPARSE_INGEST_ES_INDEX",
        "SPARSE_INGEST_BATCH_MAX_DOCS",
        "SPARSE_INGEST_HTTP_PORT",
    ):
        assert var in text


def test_secrets_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSE_INGEST_ES_PASSWORD", "hunter2-secret")
    with pytest.raises(ConfigError) as info:
        load_settings()  # password without username
    assert "hunter2-secret" not in str(info.value)
    monkeypatch.setenv("SPARSE_INGEST_ES_USERNAME", "elastic")
    s = load_settings()
    assert "hunter2-secret" not in repr(s)
    assert "hunter2-secret" not in str(s.redacted())


def test_sasl_needs_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSE_INGEST_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    with pytest.raises(ConfigError, match="SASL_MECHANISM"):
        load_settings()


@pytest.mark.parametrize(
    ("topics", "dead_letters"), [("docs,docs.dlq", ""), ("docs", "docs"), ("a,b", "b")]
)
def test_a_consumed_dead_letter_topic_is_refused(
    monkeypatch: pytest.MonkeyPatch, topics: str, dead_letters: str
) -> None:
    """One bad record would be dead-lettered into a topic the service reads, again and again."""
    monkeypatch.setenv("SPARSE_INGEST_KAFKA_TOPICS", topics)
    monkeypatch.setenv("SPARSE_INGEST_KAFKA_DEAD_LETTER_TOPIC", dead_letters)
    with pytest.raises(ConfigError, match="SPARSE_INGEST_KAFKA_DEAD_LETTER_TOPIC"):
        load_settings()


@pytest.mark.parametrize("value", ["-1", str(2**19), "x"])
def test_version_epoch_is_checked(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SPARSE_INGEST_VERSION_EPOCH", value)
    with pytest.raises(ConfigError, match="SPARSE_INGEST_VERSION_EPOCH"):
        load_settings()
