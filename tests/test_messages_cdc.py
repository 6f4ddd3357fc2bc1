"""Debezium change events and formats per topic (service.messages): pure logic, no broker. The
real Postgres -> Debezium -> service path is in test_cdc.py."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import ConfigError, load_settings
from service.messages import (
    BadRecord,
    Delete,
    MessageContract,
    RecordRef,
    TopicFormat,
    Upsert,
    decode_record,
)

CDC = MessageContract(text_fields=("title", "body"), default_format=TopicFormat("debezium"))
REF = RecordRef("pg.public.docs", 0, 7)


def event(op: str, before: Any = None, after: Any = None, lsn: Any = 123456, **extra: Any) -> bytes:
    return orjson.dumps(
        {
            "before": before,
            "after": after,
            "source": {"connector": "postgresql", "db": "app", "table": "docs", "lsn": lsn},
            "op": op,
            "ts_ms": 1_700_000_000_000,
            "transaction": None,
            **extra,
        }
    )


def decode(value: bytes | None, key: bytes | None = b'{"id": 42}', **kw: Any) -> Any:
    return decode_record(kw.pop("contract", CDC), REF, key, value, kw.pop("headers", ()))


ROW = {"id": 42, "title": "Glaciers", "body": "ice moves slowly", "views": 3}


@pytest.mark.parametrize("op", ["c", "r", "u"])
def test_create_read_update_upsert_the_new_row_versioned_by_the_lsn(op: str) -> None:
    action = decode(event(op, before=ROW if op == "u" else None, after=ROW))
    assert isinstance(action, Upsert)
    assert (action.doc_id, action.version, action.text) == (
        "42",
        123456,
        "Glaciers ice moves slowly",
    )
    assert action.source == ROW  # the row, not the envelope


def test_delete_and_its_tombstone() -> None:
    action = decode(event("d", before=ROW, lsn=123999))
    assert isinstance(action, Delete) and (action.doc_id, action.version) == ("42", 123999)
    assert decode(None) is None  # the tombstone after it: for compaction, nothing to do


def test_the_json_converter_schema_wrapper_is_unwrapped_in_key_and_value() -> None:
    payload = orjson.loads(event("u", after=ROW))
    value = orjson.dumps({"schema": {"type": "struct"}, "payload": payload})
    key = orjson.dumps({"schema": {"type": "struct"}, "payload": {"id": 42}})
    action = decode(value, key)
    assert isinstance(action, Upsert) and action.doc_id == "42" and action.version == 123456


def test_the_id_comes_from_the_key_then_the_row() -> None:
    assert decode(event("c", after=ROW), key=b'{"pk": "a-1"}').doc_id == "a-1"
    assert decode(event("c", after=ROW), key=None).doc_id == "42"
    composite = decode(event("c", after=ROW), key=b'{"b": 2, "a": "x"}')
    assert composite.doc_id == '{"a":"x","b":2}'  # a composite key: sorted JSON, exact
    assert decode(event("d", before=ROW), key=None).doc_id == "42"
    with pytest.raises(BadRecord) as bad:
        decode(event("d", before=None), key=None)
    assert bad.value.reason == "missing_id"


def test_paths_name_fields_of_the_row_with_or_without_after() -> None:
    contract = MessageContract(
        text_fields=("after.title", "meta.summary"), default_format=TopicFormat("debezium")
    )
    row = {"id": 1, "title": "T", "meta": {"summary": "nested text"}}
    action = decode(event("c", after=row), contract=contract)
    assert action.text == "T nested text"
    with pytest.raises(BadRecord) as bad:
        decode(event("c", after={"id": 1, "other": "x"}), contract=contract)
    assert bad.value.reason == "missing_text" and "after.title" in bad.value.detail


def test_the_flattened_form_of_extract_new_record_state() -> None:
    flat = {**ROW, "__op": "u", "__lsn": 555, "__deleted": "false"}
    action = decode(orjson.dumps(flat))
    assert isinstance(action, Upsert) and action.version == 555 and action.source == ROW
    gone = decode(orjson.dumps({**ROW, "__deleted": "true", "__source_lsn": 556}))
    assert isinstance(gone, Delete) and gone.version == 556
    # no position in the event: the version header, else the offset (as for plain JSON)
    plain_row = decode(orjson.dumps(ROW), headers=[("version", b"9")])
    assert plain_row.version == 9


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (event("t"), "unsupported_change"),
        (event("m"), "unsupported_change"),
        (event("x", after=ROW), "invalid_change_event"),
        (event("u", after=None, before=ROW), "invalid_change_event"),
        (event("u", after=ROW, lsn="0/16B3748"), "invalid_version"),
        (event("u", after=ROW, lsn=-1), "invalid_version"),
        (event("c", after={**ROW, "tokens": {}}), "reserved_field"),
        (event("c", after={"id": 1, "title": 5}), "wrong_type"),
        (b"[1, 2]", "not_an_object"),
        (b"\xff", "invalid_utf8"),
        (b"{", "invalid_json"),
    ],
)
def test_bad_change_events_say_why(value: bytes, reason: str) -> None:
    with pytest.raises(BadRecord) as bad:
        decode(value)
    assert bad.value.reason == reason


def test_formats_per_topic() -> None:
    assert TopicFormat.parse("debezium+avro") == TopicFormat("debezium", "avro")
    assert TopicFormat.parse("AVRO") == TopicFormat("plain", "avro")
    assert str(TopicFormat.parse("debezium")) == "debezium"
    with pytest.raises(ValueError, match="unknown format"):
        TopicFormat.parse("xml")
    contract = MessageContract(formats={"cdc": TopicFormat("debezium")})
    plain = decode_record(contract, RecordRef("docs", 0, 1), b"k", b'{"body": "text"}')
    assert isinstance(plain, Upsert) and plain.doc_id == "k"
    assert decode_record(contract, RecordRef("cdc", 0, 1), b'{"id": 1}', None) is None


def test_format_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SPARSE_INGEST_MESSAGE_FORMAT", "SPARSE_INGEST_TOPIC_FORMATS"):
        monkeypatch.delenv(name, raising=False)
    ok = load_settings(kafka_topics=["a", "b"], topic_formats="b=debezium")
    assert ok.formats() == {"b": TopicFormat("debezium")}
    with pytest.raises(ConfigError, match="SPARSE_INGEST_MESSAGE_FORMAT"):
        load_settings(message_format="xml")
    with pytest.raises(ConfigError, match="SPARSE_INGEST_SCHEMA_REGISTRY_URL"):
        load_settings(message_format="avro")
    with pytest.raises(ConfigError, match="not in SPARSE_INGEST_KAFKA_TOPICS"):
        load_settings(kafka_topics=["a"], topic_formats="z=debezium")
    with pytest.raises(ConfigError, match="topic=format"):
        load_settings(topic_formats="debezium")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(["c", "r", "u", "d", "t", "?", None]),
    before=json_values,
    after=json_values,
    lsn=json_values,
    key=st.none() | st.binary(max_size=12) | json_values.map(orjson.dumps),
)
def test_any_change_event_decodes_to_an_action_nothing_or_a_bad_record(
    op: Any, before: Any, after: Any, lsn: Any, key: bytes | None
) -> None:
    try:
        value = orjson.dumps({"op": op, "before": before, "after": after, "source": {"lsn": lsn}})
    except orjson.JSONEncodeError:
        return
    try:
        action = decode_record(CDC, REF, key, value)
    except BadRecord:
        return
    assert isinstance(action, Upsert | Delete)
    assert action.doc_id and 0 <= action.version < 2**63


def test_review_cases_composite_keys_placeholders_and_json_null_tombstones() -> None:
    # a composite key with an "id" column among others is the whole key, not that id
    two = [decode(event("c", after=ROW), key=k).doc_id for k in (b'{"tenant": 1, "id": 1}', b'{"tenant": 2, "id": 1}')]  # fmt: skip
    assert two == ['{"id":1,"tenant":1}', '{"id":1,"tenant":2}']
    # Postgres left out an unchanged TOASTed column (no REPLICA IDENTITY FULL)
    with pytest.raises(BadRecord) as bad:
        decode(event("u", after={**ROW, "body": "__debezium_unavailable_value"}))
    assert bad.value.reason == "unavailable_value" and "REPLICA IDENTITY FULL" in bad.value.detail
    # the JsonConverter writes a tombstone as JSON null, with or without the schema wrapper
    assert decode(b"null") is None
    assert decode(b'{"schema": {"type": "struct"}, "payload": null}') is None
    # a message event has neither before nor after
    with pytest.raises(BadRecord) as bad:
        decode(orjson.dumps({"op": "m", "source": {"lsn": 5}, "message": {"prefix": "x"}}))
    assert bad.value.reason == "unsupported_change"


def test_registry_settings_are_checked_and_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SPARSE_INGEST_MESSAGE_FORMAT", "SPARSE_INGEST_TOPIC_FORMATS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="http:// or https://"):
        load_settings(message_format="avro", schema_registry_url="localhost:8081")
    with pytest.raises(ConfigError, match="SCHEMA_REGISTRY_USERNAME is not"):
        load_settings(schema_registry_url="http://r:8081", schema_registry_password="p")
    with pytest.raises(ConfigError, match="more than once"):
        load_settings(kafka_topics=["a"], topic_formats="a=json,a=debezium")
    shown = load_settings(schema_registry_url="http://alice:s3cr3t@reg:8081").redacted()
    assert "s3cr3t" not in str(shown["schema_registry_url"])
