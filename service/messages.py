"""The message contract: Kafka record -> an upsert or a delete, or a reason it is bad.

Value: a JSON object with an id field, one or more text fields, an optional integer version
field, and any other fields (passed through to ``_source``). The Kafka key is the id when the
value has none. A tombstone (null value) deletes the document named by the key.

Version order (newest wins in Elasticsearch, with external versioning): the value's version
field, else the version header, else the record's offset within its partition (as Kafka
Connect's Elasticsearch sink does: then the key must be the id, so that every change of one
document lands in one partition, in order).

This module is pure: no I/O, so every rule is unit-tested without a broker.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import orjson
import xxhash

if TYPE_CHECKING:
    from encoder.passages import Passage

# Elasticsearch's limits: _id is at most 512 bytes; external versions are non-negative longs.
MAX_ID_BYTES = 512
MAX_VERSION = 2**63 - 1
OFFSET_VERSION_BITS = 44  # offsets up to 1.7e13 per partition; epochs up to 2^19 - 1
MAX_VERSION_EPOCH = MAX_VERSION >> OFFSET_VERSION_BITS
# JSON nesting: orjson reads up to 1024 levels but writes at most 255 (the bulk request would
# fail for the whole batch); Elasticsearch maps at most 20 levels of objects by default.
MAX_DEPTH = 64
_ASCII_DIGITS = re.compile(r"[0-9]{1,19}")
_BOM = b"\xef\xbb\xbf"
META_FIELD = "sparse_ingest"
# Debezium's unavailable.value.placeholder (default): a large unchanged column Postgres left out
UNAVAILABLE_VALUE = "__debezium_unavailable_value"


@dataclass(frozen=True, slots=True)
class RecordRef:
    """Where a record came from: enough to find it again (and to report it)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}@{self.offset}"


@dataclass(slots=True)
class Upsert:
    ref: RecordRef
    doc_id: str
    version: int
    text: str
    source: dict[str, Any]
    content_hash: str = ""
    vector: dict[str, float] | None = None
    passages: list[Passage] | None = None  # long_text=passages: instead of vector


@dataclass(slots=True)
class Delete:
    ref: RecordRef
    doc_id: str
    version: int


Action = Upsert | Delete


class BadRecord(Exception):
    """A record that breaks the contract. ``reason`` is a short stable code (a metric label)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


Serialization = Literal["json", "avro", "json-schema", "protobuf"]
Envelope = Literal["plain", "debezium"]
SERIALIZATIONS: tuple[Serialization, ...] = ("json", "avro", "json-schema", "protobuf")


@dataclass(frozen=True, slots=True)
class TopicFormat:
    """How a topic's records are written: the serialization of key and value (JSON, or a
    schema-registry format in the Confluent wire format) and the envelope around the document
    (``plain``: the value is the document; ``debezium``: a Debezium change event)."""

    envelope: Envelope = "plain"
    serialization: Serialization = "json"

    @classmethod
    def parse(cls, text: str) -> TopicFormat:
        """``json``, ``avro``, ``json-schema``, ``protobuf``, ``debezium`` (JSON) or
        ``debezium+<serialization>`` (e.g. ``debezium+avro``)."""
        parts = text.strip().lower().split("+")
        envelope: Envelope = "plain"
        if parts[0] == "debezium":
            envelope = "debezium"
            parts = parts[1:] or ["json"]
        if len(parts) != 1 or parts[0] not in SERIALIZATIONS:
            raise ValueError(
                f"unknown format {text!r}: one of {', '.join(SERIALIZATIONS)}, debezium, "
                "or debezium+<one of those>"
            )
        return cls(envelope, parts[0])

    @property
    def uses_registry(self) -> bool:
        return self.serialization != "json"

    def __str__(self) -> str:
        if self.envelope == "debezium":
            return "debezium" + ("" if self.serialization == "json" else f"+{self.serialization}")
        return self.serialization


class Loads(Protocol):
    """Decodes a schema-registry payload (service.registry.SchemaRegistry.decode)."""

    def __call__(self, data: bytes, expected: Serialization, where: str) -> object: ...


@dataclass(frozen=True, slots=True)
class MessageContract:
    id_field: str = "id"
    text_fields: Sequence[str] = ("title", "body")
    version_field: str = "version"
    version_header: str = "version"
    vector_field: str = "tokens"
    max_message_bytes: int = 1_000_000
    max_text_chars: int = 200_000
    # versions taken from offsets are epoch * 2^44 + offset: a higher epoch wins over every
    # offset of a lower one (after a topic is recreated or restored, or to replay on purpose)
    version_epoch: int = 0
    reserved: frozenset[str] = field(default_factory=frozenset)
    default_format: TopicFormat = TopicFormat()
    formats: Mapping[str, TopicFormat] = field(default_factory=dict)  # per topic
    # where a Debezium change event carries its log position (Postgres: source.lsn); in the
    # flattened form (ExtractNewRecordState, add.fields) the same with "__" and "_": __source_lsn
    cdc_version_field: str = "source.lsn"

    def format_for(self, topic: str) -> TopicFormat:
        return self.formats.get(topic, self.default_format)

    def reserved_fields(self) -> frozenset[str]:
        return self.reserved | {self.vector_field, META_FIELD}


def _parse_version(raw: object, where: str) -> int:
    """An integer from 0 to 2^63-1, or a string of ASCII digits of one. Nothing else: not a
    float, not a bool, not digits of other scripts ("²" and "٣" are digits to ``str.isdigit``)."""
    if isinstance(raw, str) and _ASCII_DIGITS.fullmatch(raw.strip()):
        raw = int(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise BadRecord(
            "invalid_version",
            f"{where} must be a non-negative integer or a string of ASCII digits, "
            f"got a {_kind(raw)}",
        )
    if not 0 <= raw <= MAX_VERSION:
        raise BadRecord("invalid_version", f"{where} must be in 0..2^63-1")
    return raw


def _kind(raw: object) -> str:
    """What a bad value is, without the value (it may be personal data)."""
    if isinstance(raw, str):
        return f"string of {len(raw)} character(s) that is not ASCII digits"
    return type(raw).__name__


def offset_version(epoch: int, offset: int) -> int:
    """The version of a change that carries none: its offset, in the configured epoch."""
    if not 0 <= offset < 1 << OFFSET_VERSION_BITS:
        raise BadRecord(
            "invalid_version",
            "the offset is past 2^44 and can no longer serve as a version: send a version field "
            "or header",
        )
    return (epoch << OFFSET_VERSION_BITS) | offset


def _header_version(headers: Sequence[tuple[str, bytes]], name: str) -> int | None:
    for key, value in headers:
        if key == name and value is not None:
            try:
                return _parse_version(value.decode("ascii"), f"header {name!r}")
            except UnicodeDecodeError:
                raise BadRecord(
                    "invalid_version", f"header {name!r} is not a string of ASCII digits"
                ) from None
    return None


def _deeper_than(doc: object, limit: int) -> bool:
    """Does ``doc`` nest dicts and lists more than ``limit`` levels deep? (No recursion.)"""
    level: list[object] = [doc]
    for _ in range(limit):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else cast(list[object], node))
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def _has_content(text: str) -> bool:
    """A letter or a digit somewhere: whitespace, zero-width characters, punctuation and
    symbols alone give the encoder nothing but its special tokens (the same vector for all)."""
    return any(c.isalnum() for c in text)


def _check_id(raw: object, where: str) -> str:
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise BadRecord(
            "invalid_id", f"{where} must be a string or an integer, got {type(raw).__name__}"
        )
    doc_id = str(raw)
    if not doc_id:
        raise BadRecord("missing_id", f"{where} is empty")
    if len(doc_id.encode("utf-8")) > MAX_ID_BYTES:
        raise BadRecord("invalid_id", f"{where} is longer than {MAX_ID_BYTES} bytes")
    return doc_id


_MISSING: Any = object()


def get_path(doc: Mapping[str, Any], path: str) -> Any:
    """``doc[path]``, else the dotted path into nested objects (``after.title``); ``_MISSING``
    when neither is there."""
    if path in doc:
        return doc[path]
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _unwrap(obj: object) -> object:
    """The payload of Kafka Connect's JsonConverter with ``schemas.enable=true``."""
    if isinstance(obj, dict) and len(obj) == 2 and "schema" in obj and "payload" in obj:
        return obj["payload"]
    return obj


def _load(
    contract: MessageContract, fmt: TopicFormat, data: bytes, where: str, loads: Loads | None
) -> object:
    """Bytes -> Python data: JSON (UTF-8, one BOM allowed), or a schema-registry format."""
    if fmt.uses_registry:
        if loads is None:  # the settings make a registry when a format needs one
            raise BadRecord("unsupported_schema", f"no schema registry to read {where} with")
        obj = loads(data, fmt.serialization, where)
    else:
        if data.startswith(_BOM):  # RFC 8259 lets a parser ignore one; some producers send it
            data = data[len(_BOM) :]
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRecord(
                "invalid_utf8", f"{where} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise BadRecord("invalid_json", f"{where} is not JSON: {exc}") from None
    if isinstance(obj, dict | list) and _deeper_than(obj, MAX_DEPTH):
        raise BadRecord(
            "too_deep", f"{where} nests objects and arrays more than {MAX_DEPTH} levels deep"
        )
    return obj


def _key_id(
    contract: MessageContract, fmt: TopicFormat, key: bytes | None, loads: Loads | None
) -> str | None:
    """The document id the key gives: the key as text (plain JSON topics), or, for change
    events and schema-registry keys, the key's id field, its only field (Debezium's
    ``{"id": 42}``), or all its fields (a composite primary key, as sorted JSON)."""
    if not key:
        return None
    if fmt.uses_registry and key[:1] == b"\x00" and len(key) >= 5:
        obj: object = _load(contract, fmt, key, "the key", loads)
    else:
        try:
            text = key.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRecord("invalid_utf8", "the key is not valid UTF-8") from None
        obj = text
        if fmt.envelope == "debezium":
            try:
                obj = orjson.loads(text)
            except orjson.JSONDecodeError:
                obj = text
    obj = _unwrap(obj)
    if isinstance(obj, dict):
        # a Debezium key is the primary key: its only column, or all of them (a composite key
        # that has an "id" column among others is not that id alone)
        value = _MISSING if fmt.envelope == "debezium" else get_path(obj, contract.id_field)
        if value is _MISSING:
            if len(obj) == 1:
                value = next(iter(obj.values()))
            else:
                value = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()
        obj = value
    return _check_id(obj, "the key")


def _version(
    contract: MessageContract,
    ref: RecordRef,
    raw: object,
    where: str,
    headers: Sequence[tuple[str, bytes]],
) -> int:
    """The version field's value when there is one, else the version header, else the offset."""
    if raw is not _MISSING and raw is not None:
        return _parse_version(raw, where)
    version = _header_version(headers, contract.version_header)
    if version is None:
        version = offset_version(contract.version_epoch, ref.offset)
    return version


def _in_row(path: str) -> str:
    """A path into a change event's new row: ``after.title`` and ``title`` both name it."""
    return path.removeprefix("after.")


def _upsert(
    contract: MessageContract,
    ref: RecordRef,
    row: dict[str, Any],
    doc_id: str,
    version: int,
    in_row: bool = False,
) -> Upsert:
    reserved = contract.reserved_fields()
    # a dotted key is a path to Elasticsearch ({"passages.tokens": ...} writes passages.tokens)
    clash = {k for k in row if k in reserved or k.split(".", 1)[0] in reserved}
    if clash:
        raise BadRecord("reserved_field", f"field(s) {sorted(clash)} are written by the service")
    parts: list[str] = []
    for name in contract.text_fields:
        text = get_path(row, _in_row(name) if in_row else name)
        if text is None or text is _MISSING:
            continue
        if not isinstance(text, str):
            raise BadRecord(
                "wrong_type", f"field {name!r} must be a string, got {type(text).__name__}"
            )
        if _has_content(text):
            parts.append(text)
    if not parts:
        raise BadRecord(
            "missing_text", f"none of the text fields {list(contract.text_fields)} has any text"
        )
    if in_row and any(UNAVAILABLE_VALUE in part for part in parts):
        raise BadRecord(
            "unavailable_value",
            "a text field holds Debezium's placeholder for a value Postgres did not send (an "
            "unchanged TOASTed column): set REPLICA IDENTITY FULL on the table",
        )
    text = " ".join(parts)
    if len(text) > contract.max_text_chars:
        raise BadRecord(
            "text_too_long",
            f"text is {len(text)} characters, over SPARSE_INGEST_MAX_TEXT_CHARS={contract.max_text_chars}",
        )
    return Upsert(ref, doc_id, version, text, row)


def _row_id(contract: MessageContract, row: object, key_id: str | None, what: str) -> str:
    """A change event's document id: the record key (Debezium keys a row's events by its
    primary key), else the id field of the row."""
    if key_id is not None:
        return key_id
    path = _in_row(contract.id_field)
    raw = get_path(row, path) if isinstance(row, dict) else _MISSING
    if raw is not _MISSING and raw is not None:
        return _check_id(raw, f"field {contract.id_field!r}")
    raise BadRecord("missing_id", f"no key and no {contract.id_field!r} field in {what}")


def _change_event(
    contract: MessageContract,
    ref: RecordRef,
    key_id: str | None,
    event: object,
    headers: Sequence[tuple[str, bytes]],
) -> Action | None:
    """A Debezium change event: the envelope (``op``, ``before``, ``after``, ``source``), or
    the flattened row of ExtractNewRecordState (``__deleted``, ``__op``, added ``__*`` fields).
    The version is the event's log position (``cdc_version_field``, Postgres: ``source.lsn``),
    which only grows for a row; without one, the version header, else the offset."""
    event = _unwrap(event)
    if event is None:  # {"schema": ..., "payload": null}: a tombstone
        return None
    if not isinstance(event, dict):
        raise BadRecord(
            "not_an_object", f"a change event must be an object, got {type(event).__name__}"
        )
    path = contract.cdc_version_field
    if event.get("op") == "m" or (event.get("op") == "t" and "after" not in event):
        raise BadRecord(
            "unsupported_change",
            f"op {event.get('op')!r} ({'truncate' if event.get('op') == 't' else 'message'}) "
            "changes no single row: after a TRUNCATE delete the documents or reindex",
        )
    if "op" in event and ("after" in event or "before" in event):
        op = event.get("op")
        version = _version(contract, ref, get_path(event, path), f"field {path!r}", headers)
        if op in ("c", "r", "u"):
            after = event.get("after")
            if not isinstance(after, dict):
                raise BadRecord(
                    "invalid_change_event", f"op {op!r} needs an 'after' object (the new row)"
                )
            doc_id = _row_id(contract, after, key_id, "'after'")
            return _upsert(contract, ref, after, doc_id, version, in_row=True)
        if op == "d":
            return Delete(ref, _row_id(contract, event.get("before"), key_id, "'before'"), version)
        if op in ("t", "m"):  # (a message event has neither before nor after: see below)
            raise BadRecord(
                "unsupported_change",
                f"op {op!r} ({'truncate' if op == 't' else 'message'}) changes no single row: "
                "after a TRUNCATE delete the documents or reindex",
            )
        raise BadRecord("invalid_change_event", "field 'op' must be one of c, r, u, d")
    # the flattened form
    flat_path = "__" + path.replace(".", "_")
    raw = event.get(flat_path, event.get("__" + path.rsplit(".", 1)[-1], _MISSING))
    version = _version(contract, ref, raw, f"field {flat_path!r}", headers)
    row = {k: v for k, v in event.items() if not k.startswith("__")}
    if event.get("__deleted") in (True, "true") or event.get("__op") == "d":
        return Delete(ref, _row_id(contract, row, key_id, "the row"), version)
    doc_id = _row_id(contract, row, key_id, "the row")
    return _upsert(contract, ref, row, doc_id, version, in_row=True)


def decode_record(
    contract: MessageContract,
    ref: RecordRef,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]] = (),
    loads: Loads | None = None,
) -> Action | None:
    """Turn one Kafka record into an action, or raise :class:`BadRecord` saying why not.
    None: nothing to do (the tombstone Debezium sends after a delete event, for compaction).
    ``loads`` decodes schema-registry payloads (topics whose format needs one)."""
    fmt = contract.format_for(ref.topic)
    if value is not None and len(value) > contract.max_message_bytes:
        raise BadRecord(
            "too_large",
            f"value is {len(value)} bytes, over SPARSE_INGEST_MAX_MESSAGE_BYTES={contract.max_message_bytes}",
        )
    if fmt.envelope == "debezium":
        if value is None or value.strip() == b"null":  # the JsonConverter writes b"null" too
            return None
        key_id = _key_id(contract, fmt, key, loads)
        return _change_event(
            contract, ref, key_id, _load(contract, fmt, value, "the value", loads), headers
        )

    if value is None:
        if not key:
            raise BadRecord(
                "tombstone_without_key", "a null value (delete) needs the id as the key"
            )
        doc_id = _key_id(contract, fmt, key, loads)
        assert doc_id is not None
        return Delete(ref, doc_id, _version(contract, ref, _MISSING, "", headers))

    doc = _load(contract, fmt, value, "value", loads)
    if not isinstance(doc, dict):
        raise BadRecord("not_an_object", f"value must be a JSON object, got {type(doc).__name__}")
    raw_id = get_path(doc, contract.id_field)
    if raw_id is not _MISSING and raw_id is not None:
        doc_id = _check_id(raw_id, f"field {contract.id_field!r}")
    else:
        key_id = _key_id(contract, fmt, key, loads)
        if key_id is None:
            raise BadRecord("missing_id", f"no {contract.id_field!r} field and no key")
        doc_id = key_id
    version = _version(
        contract,
        ref,
        get_path(doc, contract.version_field),
        f"field {contract.version_field!r}",
        headers,
    )
    return _upsert(contract, ref, doc, doc_id, version)


def indexed_text(source: Mapping[str, Any], text_fields: Sequence[str]) -> str | None:
    """The text a stored document was encoded from, rebuilt from its ``_source`` as
    :func:`decode_record` built it (its text fields with content, joined by spaces; a change
    event's row names ``after.title`` as ``title``). None when no field gives text."""
    parts = []
    for name in text_fields:
        text = get_path(source, name)
        if text is _MISSING and name != _in_row(name):
            text = get_path(source, _in_row(name))
        if isinstance(text, str) and _has_content(text):
            parts.append(text)
    return " ".join(parts) if parts else None


def vector_fingerprint(model_name: str, encoder_fingerprint: str, prune_below: float) -> str:
    """What the stored vectors depend on besides the text: the model (its name and its files'
    fingerprint: weights, quantization, tokenizer, long-text mode) and index-time pruning."""
    return xxhash.xxh3_64_hexdigest(
        f"{model_name}\x1f{encoder_fingerprint}\x1f{prune_below!r}".encode()
    )


def content_hash(fingerprint: str, text: str) -> str:
    """Identifies what the vector was computed from: the text and :func:`vector_fingerprint`.
    (``surrogatepass``: a text never holds lone surrogates, but a hash must not raise.)"""
    return xxhash.xxh3_128_hexdigest(f"{fingerprint}\x1f{text}".encode("utf-8", "surrogatepass"))


def newest_per_id(actions: Sequence[Action]) -> list[Action]:
    """Keep only the newest change of each id (highest version, then latest offset).

    The order of first appearance is kept, so output is deterministic.
    """
    best: dict[str, Action] = {}
    for action in actions:
        current = best.get(action.doc_id)
        if current is None or (action.version, action.ref.offset) >= (
            current.version,
            current.ref.offset,
        ):
            best[action.doc_id] = action
    return list(best.values())
