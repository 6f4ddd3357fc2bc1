"""Property-based: whatever bytes a producer sends as key, value and headers, ``decode_record``
gives an upsert, a delete or a ``BadRecord``, never another exception; an upsert can be hashed
and serialized for Elasticsearch; and a ``BadRecord`` message never copies the record's content.

Examples per run: ``EXAMPLES`` per test (``HYPOTHESIS_EXAMPLES`` overrides it).
"""

from __future__ import annotations

import json
import os
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.messages import (
    MAX_ID_BYTES,
    MAX_VERSION,
    BadRecord,
    Delete,
    MessageContract,
    RecordRef,
    Upsert,
    content_hash,
    decode_record,
)

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "1500"))
CONTRACT = MessageContract(max_message_bytes=20_000, max_text_chars=5_000)
SECRET = "SeCrEt-7f3a"  # planted in values: must never show up in a BadRecord message
RUN = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Every Unicode digit and number category (Nd: "٣", No: "²", Nl: "Ⅻ"), plus the
# troublemakers: NUL, BOM, lone surrogates, the replacement character, separators.
numberish = st.text(
    alphabet=st.characters(categories=["Nd", "No", "Nl"]) | st.sampled_from("0123456789 +-_.e"),
    max_size=25,
)
nasty_text = st.lists(
    st.text(
        alphabet=st.characters(codec=None, categories=["L", "N", "P", "S", "Z", "C"])
        | st.sampled_from(["\x00", "\ufeff", "\ud800", "\udfff", "\ufffd", "\u2028"]),
        max_size=12,
    )
    | st.just(SECRET),
    max_size=4,
).map("".join)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, MAX_VERSION, MAX_VERSION + 1, 2**64, -(2**63)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)
scalars = st.one_of(st.none(), numbers, nasty_text, numberish)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(nasty_text, children, max_size=4)
    ),
    max_leaves=20,
)


def deep(depth: int) -> Any:
    value: Any = SECRET
    for i in range(depth):
        value = [value] if i % 2 else {"x": value}
    return value


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = draw(st.dictionaries(nasty_text, json_values, max_size=4))
    for name, values in (
        ("id", st.one_of(scalars, json_values, st.text(min_size=500, max_size=600))),
        ("title", st.one_of(nasty_text, json_values)),
        ("body", st.one_of(nasty_text, scalars, st.text(min_size=4990, max_size=5010))),
        ("version", st.one_of(numbers, numberish, scalars, json_values)),
        ("tokens", json_values),
        ("sparse_ingest", json_values),
        ("nested", st.integers(min_value=1, max_value=1100).map(deep)),
    ):
        if draw(st.booleans()):
            doc[name] = draw(values)
    return doc


def encode_json(doc: Any, ensure_ascii: bool) -> bytes:
    # Python's json writes what orjson refuses: lone surrogates (\ud800), NaN, Infinity
    return json.dumps(doc, ensure_ascii=ensure_ascii, allow_nan=True).encode(
        "utf-8", "surrogatepass"
    )


values = st.one_of(
    st.none(),
    st.binary(max_size=200),
    st.builds(encode_json, documents(), st.booleans()),
    st.builds(encode_json, documents(), st.just(False)).map(lambda b: b"\xef\xbb\xbf" + b),
    st.just(b"x" * 20_001),
)
keys = st.one_of(
    st.none(),
    st.binary(max_size=40),
    nasty_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
    numberish.map(str.encode),
)
header_values = st.one_of(
    st.none(), st.binary(max_size=30), numberish.map(lambda t: t.encode("utf-8"))
)
headers = st.lists(
    st.tuples(st.sampled_from(["version", "Version", "h", "", "\x00"]) | nasty_text, header_values),
    max_size=4,
)


def decode(
    ref: RecordRef, key: bytes | None, value: bytes | None, hdrs: list[Any]
) -> Upsert | Delete | BadRecord:
    """The action, or the BadRecord raised (any other exception propagates: a failure)."""
    try:
        return decode_record(CONTRACT, ref, key, value, hdrs)
    except BadRecord as bad:
        return bad


def check_outcome(key: bytes | None, value: bytes | None, hdrs: list[Any], offset: int) -> None:
    action = decode(RecordRef("t", 0, offset, None), key, value, hdrs)
    if isinstance(action, BadRecord):
        assert action.reason and action.reason.isidentifier()
        assert SECRET not in action.detail, "a BadRecord message copies the record's content"
        return
    assert isinstance(action, Upsert | Delete)
    assert 0 <= action.version <= MAX_VERSION
    assert action.doc_id and len(action.doc_id.encode("utf-8")) <= MAX_ID_BYTES
    if isinstance(action, Upsert):
        assert action.text.strip()
        assert len(action.text) <= CONTRACT.max_text_chars
        content_hash("model", action.text)  # the prepare stage hashes the text
        orjson.dumps(action.source)  # the sink serializes the source


@RUN
@given(key=keys, value=values, hdrs=headers, offset=st.integers(0, 2**62))
def test_any_record_decodes_to_an_action_or_a_bad_record(
    key: bytes | None, value: bytes | None, hdrs: list[Any], offset: int
) -> None:
    check_outcome(key, value, hdrs, offset)


@RUN
@given(doc=documents(), key=keys, hdrs=headers)
def test_any_json_object_decodes_to_an_action_or_a_bad_record(
    doc: dict[str, Any], key: bytes | None, hdrs: list[Any]
) -> None:
    check_outcome(key, encode_json(doc, ensure_ascii=False), hdrs, 7)


@RUN
@given(version=numberish, where=st.sampled_from(["field", "header"]))
def test_versions_are_ascii_digits_or_bad(version: str, where: str) -> None:
    doc: dict[str, Any] = {"id": "d", "body": "text"}
    hdrs: list[tuple[str, bytes | None]] = []
    if where == "field":
        doc["version"] = version
    else:
        hdrs.append(("version", version.encode("utf-8")))
    ref = RecordRef("t", 0, 3, None)
    stripped = version.strip()
    plain = stripped.isascii() and stripped.isdigit() and int(stripped) <= MAX_VERSION
    action = decode(ref, b"d", orjson.dumps(doc), hdrs)
    if isinstance(action, BadRecord):
        assert not plain, f"{version!r} is a valid version"
        assert action.reason == "invalid_version"
        return
    assert plain, f"{version!r} was taken as a version"
    assert action.version == int(stripped)


def test_unicode_digits_are_bad_versions_not_crashes() -> None:
    """The finding of issue 12: "²".isdigit() is True and int("²") raises ValueError."""
    for text in ("²", "٣", "১২", "Ⅻ", "1²"):
        for doc, hdrs in (
            ({"id": "d", "body": "b", "version": text}, []),
            ({"id": "d", "body": "b"}, [("version", text.encode())]),
        ):
            bad = decode(RecordRef("t", 0, 0), b"d", orjson.dumps(doc), hdrs)
            assert isinstance(bad, BadRecord), f"{text!r} accepted as a version"
            assert bad.reason == "invalid_version"
            assert text not in bad.detail


def test_a_bom_in_front_of_the_json_is_ignored() -> None:
    action = decode_record(
        CONTRACT, RecordRef("t", 0, 0), None, b'\xef\xbb\xbf{"id": "a", "body": "x"}'
    )
    assert isinstance(action, Upsert) and action.doc_id == "a"


def test_text_without_a_letter_or_digit_is_missing_text() -> None:
    """Zero-width spaces, punctuation, emoji alone: the encoder would see only its special
    tokens and give every such text the same vector."""
    for body in ("\u200b\u200b", "...", "\ufeff", "❄ 🧊", " \u2028 "):
        bad = decode(RecordRef("t", 0, 0), b"d", orjson.dumps({"id": "d", "body": body}), [])
        assert isinstance(bad, BadRecord) and bad.reason == "missing_text", body
    ok = decode(RecordRef("t", 0, 0), b"d", orjson.dumps({"id": "d", "body": "❄ ice"}), [])
    assert isinstance(ok, Upsert)
