"""Pure logic of the dead-letter headers."""

from __future__ import annotations

import pytest

from service.deadletter import DeadLetter
from service.messages import RecordRef


def test_the_records_own_error_and_source_headers_are_replaced_by_ours() -> None:
    """A replayed dead letter (or a producer's own header named like ours) must not carry a
    stale error.reason or source.offset in front of the real ones."""
    letter = DeadLetter(
        RecordRef("t", 2, 41, 1_700_000_000_000),
        b"k",
        b"v",
        [
            ("error.reason", b"spoofed"),
            ("source.offset", b"999"),
            ("trace", b"abc"),
            ("source.system", b"crm"),  # not one of ours: kept
        ],
        "invalid_json",
        "value is not JSON",
    )
    headers = letter.kafka_headers()
    keys = [k for k, _ in headers]
    assert keys.count("error.reason") == 1 and keys.count("source.offset") == 1
    assert dict(headers)["error.reason"] == b"invalid_json"
    assert dict(headers)["source.offset"] == b"41"
    assert headers[:2] == [("trace", b"abc"), ("source.system", b"crm")]  # kept, in front


def test_a_bare_letter_keeps_only_our_headers_and_says_what_was_left_out() -> None:
    letter = DeadLetter(RecordRef("t", 0, 5), b"K" * 10, b"v", [("a", b"1"), ("b", None)], "x", "y")
    headers = dict(letter.kafka_headers(truncated_from=1, bare=True))
    assert "a" not in headers and "b" not in headers
    assert headers["error.key.bytes"] == b"10" and headers["error.headers.dropped"] == b"2"


async def test_no_topic_metadata_at_start_is_a_startup_error_not_a_traceback() -> None:
    """Both runners (``run``, ``faust``) check the dead-letter topic at start: a cluster that
    gives no metadata is a one-line error saying what to check."""
    from types import SimpleNamespace

    from aiokafka.errors import KafkaError

    from service.config import load_settings
    from service.deadletter import ensure_dead_letter_topic
    from service.errors import StartupError

    async def no_metadata() -> None:
        raise KafkaError("Unable to get cluster metadata")

    producer = SimpleNamespace(client=SimpleNamespace(fetch_all_metadata=no_metadata))
    settings = load_settings(kafka_bootstrap_servers="broker:9092")
    with pytest.raises(StartupError, match=r"broker:9092 gave no topic metadata .*Describe"):
        await ensure_dead_letter_topic(settings, producer)  # type: ignore[arg-type]
