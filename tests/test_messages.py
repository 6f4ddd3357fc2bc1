"""The message contract (pure logic: no broker needed)."""

from __future__ import annotations

import orjson
import pytest

from service.messages import (
    BadRecord,
    Delete,
    MessageContract,
    RecordRef,
    Upsert,
    content_hash,
    decode_record,
    newest_per_id,
)

C = MessageContract(text_fields=("title", "body"), max_message_bytes=10_000, max_text_chars=5_000)


def ref(offset: int = 7) -> RecordRef:
    return RecordRef("docs", 2, offset, 1_700_000_000_000)


def decode(value: object, key: bytes | None = b"k1", headers=(), offset: int = 7):
    raw = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
    return decode_record(C, ref(offset), key, raw, list(headers))


def test_upsert_with_id_version_and_passthrough_fields() -> None:
    action = decode({"id": "a", "title": "T", "body": "B", "version": 3, "lang": "en"})
    assert isinstance(action, Upsert)
    assert (action.doc_id, action.version, action.text) == ("a", 3, "T B")
    assert action.source["lang"] == "en"


def test_key_is_the_id_when_the_value_has_none_and_offset_is_the_version() -> None:
    action = decode({"body": "only body"}, key=b"from-key", offset=42)
    assert isinstance(action, Upsert)
    assert (action.doc_id, action.version, action.text) == ("from-key", 42, "only body")


def test_version_header_used_when_no_version_field() -> None:
    action = decode({"id": 5, "body": "x"}, headers=[("version", b"99")])
    assert (action.doc_id, action.version) == ("5", 99)


def test_tombstone_deletes_the_key() -> None:
    action = decode(None, key=b"gone", offset=11)
    assert isinstance(action, Delete)
    assert (action.doc_id, action.version) == ("gone", 11)
    action = decode(None, key=b"gone", headers=[("version", b"12")])
    assert action.version == 12


@pytest.mark.parametrize(
    ("value", "key", "reason"),
    [
        (b"{not json", b"k", "invalid_json"),
        (b"\xff\xfe{}", b"k", "invalid_utf8"),
        (b"[1, 2]", b"k", "not_an_object"),
        ({"title": "t"}, None, "missing_id"),
        ({"id": "", "title": "t"}, None, "missing_id"),
        ({"id": {"x": 1}, "title": "t"}, None, "invalid_id"),
        ({"id": True, "title": "t"}, None, "invalid_id"),
        ({"id": "x" * 513, "title": "t"}, None, "invalid_id"),
        ({"id": "a"}, None, "missing_text"),
        ({"id": "a", "title": "  ", "body": ""}, None, "missing_text"),
        ({"id": "a", "title": 5}, None, "wrong_type"),
        ({"id": "a", "title": "t", "version": -1}, None, "invalid_version"),
        ({"id": "a", "title": "t", "version": "v2"}, None, "invalid_version"),
        ({"id": "a", "title": "t", "tokens": {"x": 1}}, None, "reserved_field"),
        ({"id": "a", "title": "t", "sparse_ingest": {}}, None, "reserved_field"),
        ({"id": "a", "body": "x" * 5_001}, None, "text_too_long"),
        (b'{"id": "a", "body": "' + b"x" * 10_000 + b'"}', None, "too_large"),
        (b"[" * 5000 + b"]" * 5000, b"k", "invalid_json"),
        (None, None, "tombstone_without_key"),
    ],
)
def test_bad_records_say_why(value: object, key: bytes | None, reason: str) -> None:
    with pytest.raises(BadRecord) as info:
        decode(value, key=key)
    assert info.value.reason == reason
    assert info.value.detail


def test_odd_ids_are_kept_verbatim() -> None:
    for odd in ["a/b", "über ✓", "with space", "_underscore", "..", "%2F"]:
        assert decode({"id": odd, "body": "x"}).doc_id == odd


def test_newest_per_id_keeps_highest_version_then_latest_offset() -> None:
    a1 = Upsert(ref(1), "a", 5, "t", {})
    a2 = Upsert(ref(2), "a", 4, "t", {})  # older version arriving later
    b1 = Upsert(ref(3), "b", 1, "t", {})
    b2 = Delete(ref(4), "b", 1)  # same version, later offset
    kept = newest_per_id([a1, a2, b1, b2])
    assert kept == [a1, b2]


def test_content_hash_depends_on_model_and_text() -> None:
    assert content_hash("m", "t") == content_hash("m", "t")
    assert content_hash("m", "t") != content_hash("m2", "t")
    assert content_hash("m", "t") != content_hash("m", "t ")
