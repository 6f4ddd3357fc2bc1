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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import xxhash

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


def decode_record(
    contract: MessageContract,
    ref: RecordRef,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]] = (),
) -> Action:
    """Turn one Kafka record into an action, or raise :class:`BadRecord` saying why not."""
    if value is None:
        if not key:
            raise BadRecord(
                "tombstone_without_key", "a null value (delete) needs the id as the key"
            )
        try:
            doc_id = _check_id(key.decode("utf-8"), "the key")
        except UnicodeDecodeError:
            raise BadRecord("invalid_utf8", "the key is not valid UTF-8") from None
        version = _header_version(headers, contract.version_header)
        if version is None:
            version = offset_version(contract.version_epoch, ref.offset)
        return Delete(ref, doc_id, version)

    if len(value) > contract.max_message_bytes:
        raise BadRecord(
            "too_large",
            f"value is {len(value)} bytes, over SPARSE_INGEST_MAX_MESSAGE_BYTES={contract.max_message_bytes}",
        )
    if value.startswith(_BOM):  # RFC 8259 lets a parser ignore one; some producers send it
        value = value[len(_BOM) :]
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(
            "invalid_utf8", f"value is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadRecord("invalid_json", f"value is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRecord("not_an_object", f"value must be a JSON object, got {type(doc).__name__}")
    if _deeper_than(doc, MAX_DEPTH):
        raise BadRecord(
            "too_deep", f"value nests objects and arrays more than {MAX_DEPTH} levels deep"
        )

    clash = contract.reserved_fields().intersection(doc)
    if clash:
        raise BadRecord("reserved_field", f"field(s) {sorted(clash)} are written by the service")

    raw_id = doc.get(contract.id_field)
    if raw_id is not None:
        doc_id = _check_id(raw_id, f"field {contract.id_field!r}")
    elif key:
        try:
            doc_id = _check_id(key.decode("utf-8"), "the key")
        except UnicodeDecodeError:
            raise BadRecord("invalid_utf8", "the key is not valid UTF-8") from None
    else:
        raise BadRecord("missing_id", f"no {contract.id_field!r} field and no key")

    raw_version = doc.get(contract.version_field)
    if raw_version is not None:
        version = _parse_version(raw_version, f"field {contract.version_field!r}")
    else:
        version = _header_version(headers, contract.version_header)
        if version is None:
            version = offset_version(contract.version_epoch, ref.offset)

    parts: list[str] = []
    for name in contract.text_fields:
        text = doc.get(name)
        if text is None:
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
    text = " ".join(parts)
    if len(text) > contract.max_text_chars:
        raise BadRecord(
            "text_too_long",
            f"text is {len(text)} characters, over SPARSE_INGEST_MAX_TEXT_CHARS={contract.max_text_chars}",
        )
    return Upsert(ref, doc_id, version, text, doc)


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
