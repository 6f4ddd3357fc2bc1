"""service.registry without a real registry: the wire format, the conversion of decoded values
to JSON data (Avro logical types, Protobuf scalars and well-known types), bad payloads, and the
registry's error answers from a tiny aiohttp fake (404, 500, timeout, 401/403, TLS).

Schemas that need no HTTP are loaded with ``SchemaRegistry._remember(id, answer)``: what
``fetch`` does with the registry's answer for an id. Records of real producers against a real
registry: tests/test_registry_formats.py."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import decimal
import io
import json
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest
from aiohttp import web
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from service import registry as registry_module
from service.messages import BadRecord
from service.registry import RegistryUnavailable, SchemaRegistry, _Ref, wire_schema_id

SECRET = "Jane Q. Secret 555-0100"  # a record's content: never in a BadRecord's detail


def header(schema_id: int) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big")


def avro_bytes(schema: Any, record: Any) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
    return out.getvalue()


def assert_json_data(value: Any) -> None:
    """Only dicts with string keys, lists, str, int, float (finite), bool, None."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str)
            assert_json_data(v)
    elif isinstance(value, list):
        for v in value:
            assert_json_data(v)
    else:
        assert value is None or isinstance(value, str | int | float | bool), type(value)
    json.dumps(value, allow_nan=False)


def bad(reg: SchemaRegistry, data: bytes, expected: Any = "avro") -> BadRecord:
    with pytest.raises(BadRecord) as info:
        reg.decode(data, expected, "the value")
    assert SECRET not in info.value.detail
    assert "the value" in info.value.detail
    return info.value


@pytest.fixture
async def reg() -> AsyncIterator[SchemaRegistry]:
    r = SchemaRegistry("http://127.0.0.1:9/apis/ccompat/v7")  # never asked in these tests
    yield r
    await r.close()


# --- the wire format --------------------------------------------------------------------


def test_wire_schema_id() -> None:
    assert wire_schema_id(None) is None
    assert wire_schema_id(b"") is None
    assert wire_schema_id(b"\x00\x00\x00\x01") is None  # 4 bytes: no room for the id
    assert wire_schema_id(b"\x00\x00\x00\x00\x07") == 7  # an empty payload is a payload
    assert wire_schema_id(b"\x00\x01\x02\x03\x04rest") == 0x01020304
    assert wire_schema_id(b"\x00\xff\xff\xff\xff") == 2**32 - 1
    assert wire_schema_id(b'{"id": 1}') is None
    assert wire_schema_id(b"\x01" + bytes(16)) is None  # magic byte 1: a schema GUID


async def test_decode_not_wire_format(reg: SchemaRegistry) -> None:
    for data in (b"", b"\x00\x00", b'{"name": "' + SECRET.encode() + b'"}'):
        assert bad(reg, data).reason == "not_wire_format"
    guid = bad(reg, b"\x01" + bytes(20))
    assert guid.reason == "not_wire_format" and "magic byte 1" in guid.detail


async def test_decode_before_fetch_is_a_bug_not_a_bad_record(reg: SchemaRegistry) -> None:
    with pytest.raises(RuntimeError, match="not fetched"):
        reg.decode(header(12) + b"x", "avro", "the value")


# --- Avro -------------------------------------------------------------------------------

LOGICAL = {
    "type": "record",
    "name": "Doc",
    "namespace": "t",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "n", "type": "long"},
        {"name": "ok", "type": "boolean"},
        {"name": "score", "type": "double"},
        {"name": "ratio", "type": "float"},
        {"name": "gone", "type": ["null", "string"], "default": None},
        {
            "name": "price",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2},
        },
        {
            "name": "tiny",
            "type": {
                "type": "fixed",
                "name": "Tiny",
                "size": 8,
                "logicalType": "decimal",
                "precision": 12,
                "scale": 9,
            },
        },
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "at_ms", "type": {"type": "int", "logicalType": "time-millis"}},
        {"name": "at_us", "type": {"type": "long", "logicalType": "time-micros"}},
        {"name": "ts_ms", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "ts_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "local_ms", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
        {"name": "uid", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "blob", "type": "bytes"},
        {"name": "digest", "type": {"type": "fixed", "name": "Digest", "size": 4}},
        {"name": "color", "type": {"type": "enum", "name": "Color", "symbols": ["RED", "BLUE"]}},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "counts", "type": {"type": "map", "values": "int"}},
        {"name": "nan", "type": "double"},
        {"name": "inf", "type": "float"},
        {
            "name": "child",
            "type": {
                "type": "record",
                "name": "Child",
                "fields": [{"name": "when", "type": {"type": "int", "logicalType": "date"}}],
            },
        },
    ],
}


async def test_avro_logical_types_become_json_data(reg: SchemaRegistry) -> None:
    await reg._remember(1, {"schema": json.dumps(LOGICAL), "schemaType": "AVRO", "references": []})
    record = {
        "id": "doc-1",
        "n": 2**40,
        "ok": True,
        "score": 0.25,
        "ratio": 1.5,
        "gone": None,
        "price": decimal.Decimal("1234.50"),
        "tiny": decimal.Decimal("0.000000001"),
        "day": dt.date(2024, 2, 29),
        "at_ms": dt.time(12, 1, 2, 345000),
        "at_us": dt.time(1, 2, 3, 456789),
        "ts_ms": dt.datetime(2024, 1, 2, 3, 4, 5, 6000, tzinfo=dt.UTC),
        "ts_us": dt.datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC),
        "local_ms": dt.datetime(2024, 1, 2, 3, 4, 5, 6000),
        "uid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "blob": b"\x00\xffbin",
        "digest": b"\x01\x02\x03\x04",
        "color": "BLUE",
        "tags": ["a", "b"],
        "counts": {"x": 1},
        "nan": float("nan"),
        "inf": float("-inf"),
        "child": {"when": dt.date(1970, 1, 1)},
    }
    out = reg.decode(header(1) + avro_bytes(LOGICAL, record), "avro", "the value")
    assert out == {
        "id": "doc-1",
        "n": 2**40,
        "ok": True,
        "score": 0.25,
        "ratio": 1.5,
        "gone": None,
        "price": "1234.50",
        "tiny": "0.000000001",  # never "1E-9"
        "day": "2024-02-29",
        "at_ms": "12:01:02.345000",
        "at_us": "01:02:03.456789",
        "ts_ms": "2024-01-02T03:04:05.006000+00:00",
        "ts_us": "2024-01-02T03:04:05.678901+00:00",
        "local_ms": "2024-01-02T03:04:05.006000",
        "uid": "12345678-1234-5678-1234-567812345678",
        "blob": base64.b64encode(b"\x00\xffbin").decode(),
        "digest": "AQIDBA==",
        "color": "BLUE",
        "tags": ["a", "b"],
        "counts": {"x": 1},
        "nan": "NaN",
        "inf": "-Infinity",
        "child": {"when": "1970-01-01"},
    }
    assert_json_data(out)
    orjson.dumps(out)


async def test_avro_payloads_that_do_not_fit_their_schema(reg: SchemaRegistry) -> None:
    schema = {
        "type": "record",
        "name": "P",
        "fields": [{"name": "name", "type": "string"}, {"name": "n", "type": "int"}],
    }
    await reg._remember(2, {"schema": json.dumps(schema)})  # no schemaType: Avro
    good = avro_bytes(schema, {"name": SECRET, "n": 7})
    assert reg.decode(header(2) + good, "avro", "the value") == {"name": SECRET, "n": 7}

    truncated = bad(reg, header(2) + good[:-4])
    assert truncated.reason == "schema_mismatch" and "truncated" in truncated.detail
    extra = bad(reg, header(2) + good + b"\x02\x02")
    assert extra.reason == "schema_mismatch" and "2 byte(s) left over" in extra.detail
    not_utf8 = bad(reg, header(2) + b"\x08" + b"\xffSec" + b"\x02")
    assert not_utf8.reason == "schema_mismatch" and "UTF-8" in not_utf8.detail
    empty = bad(reg, header(2))
    assert empty.reason == "schema_mismatch"
    for expected in ("json-schema", "protobuf"):
        mismatch = bad(reg, header(2) + good, expected)
        assert mismatch.reason == "schema_type_mismatch"
        assert "Avro" in mismatch.detail and expected in mismatch.detail


async def test_avro_recursive_schema_cannot_crash_the_process(reg: SchemaRegistry) -> None:
    """fastavro's C reader has no depth limit: 200 kB of a linked list overflows its stack
    (a segfault). Recursive schemas are read with its Python reader: a BadRecord."""
    schema = {
        "type": "record",
        "name": "Node",
        "fields": [{"name": "v", "type": "int"}, {"name": "next", "type": ["null", "Node"]}],
    }
    await reg._remember(3, {"schema": json.dumps(schema)})
    three = {"v": 1, "next": {"v": 2, "next": {"v": 3, "next": None}}}
    assert reg.decode(header(3) + avro_bytes(schema, three), "avro", "the value") == three
    deep = b"\x02\x02" * 100_000 + b"\x02\x00"
    too_deep = bad(reg, header(3) + deep)
    assert too_deep.reason == "schema_mismatch" and "too deeply" in too_deep.detail


async def test_avro_schemas_that_cannot_be_used(reg: SchemaRegistry) -> None:
    await reg._remember(
        4, {"schema": '{"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]}'}
    )
    await reg._remember(5, {"schema": "not json"})
    # an array of zero-byte items: a 10-byte record could claim 2^62 of them
    zero = {
        "type": "array",
        "items": {"type": "record", "name": "E", "fields": [{"name": "z", "type": "null"}]},
    }
    await reg._remember(6, {"schema": json.dumps(zero)})
    await reg._remember(7, {"schema": '"string"', "schemaType": "XML"})
    for schema_id in (4, 5, 6, 7):
        assert reg.known(schema_id)
        assert bad(reg, header(schema_id) + b"\x02", "avro").reason in (
            "unsupported_schema",
            "schema_type_mismatch",
        )
    assert "zero bytes" in bad(reg, header(6)).detail
    assert bad(reg, header(7)).reason == "schema_type_mismatch"


# --- JSON Schema ------------------------------------------------------------------------

PERSON = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {"id": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["id"],
}


async def test_json_schema_payloads(reg: SchemaRegistry) -> None:
    await reg._remember(10, {"schema": json.dumps(PERSON), "schemaType": "JSON"})
    ok = {"id": "p1", "age": 3, "extra": [1.5, None, True]}
    assert reg.decode(header(10) + orjson.dumps(ok), "json-schema", "the value") == ok

    fails = bad(reg, header(10) + orjson.dumps({"id": SECRET, "age": -1}), "json-schema")
    assert fails.reason == "schema_mismatch"
    assert "/age" in fails.detail and "minimum" in fails.detail
    missing = bad(reg, header(10) + orjson.dumps({"name": SECRET}), "json-schema")
    assert missing.reason == "schema_mismatch" and "required" in missing.detail
    not_json = bad(reg, header(10) + b'{"id": "' + SECRET.encode() + b'"', "json-schema")
    assert not_json.reason == "schema_mismatch" and "not JSON" in not_json.detail
    assert bad(reg, header(10) + b"{}", "avro").reason == "schema_type_mismatch"


async def test_json_schema_that_cannot_be_used(reg: SchemaRegistry) -> None:
    await reg._remember(11, {"schema": '{"type": 12}', "schemaType": "JSON"})
    await reg._remember(12, {"schema": '{"$ref": "other.json"}', "schemaType": "JSON"})
    assert bad(reg, header(11) + b"{}", "json-schema").reason == "unsupported_schema"
    unresolved = bad(reg, header(12) + b"{}", "json-schema")
    assert unresolved.reason == "unsupported_schema" and "other.json" in unresolved.detail


# --- Protobuf ---------------------------------------------------------------------------


def test_message_indexes() -> None:
    read = registry_module._message_indexes
    assert read(memoryview(b"\x00rest")) == ((0,), 1)  # the first message: a single 0
    assert read(memoryview(b"\x02\x02rest")) == ((1,), 2)  # [1]: count 1, index 1 (zigzag)
    assert read(memoryview(b"\x04\x02\x00")) == ((1, 0), 3)
    assert read(memoryview(b"\x02\xac\x02")) == ((150,), 3)
    for broken in (b"", b"\x04\x02", b"\x01", b"\x02\x01", b"\xff" * 11, b"\xfe\x03" + bytes(200)):
        with pytest.raises(ValueError, match=r"message index|truncated|64 bits"):
            read(memoryview(broken))


def doc_file() -> descriptor_pb2.FileDescriptorProto:
    """t.Doc (nested t.Doc.Part, enum t.Doc.Kind, a map, a Timestamp, a wrapper) and t.Other."""
    T = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="t/doc.proto", package="t", syntax="proto3")
    f.dependency.extend(["google/protobuf/timestamp.proto", "google/protobuf/wrappers.proto"])
    doc = f.message_type.add(name="Doc")
    part = doc.nested_type.add(name="Part")
    part.field.add(name="blob", number=1, type=T.TYPE_BYTES, label=T.LABEL_OPTIONAL)
    kind = doc.enum_type.add(name="Kind")
    kind.value.add(name="KIND_UNSET", number=0)
    kind.value.add(name="ARTICLE", number=1)
    entry = doc.nested_type.add(name="CountsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=T.TYPE_INT32, label=T.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    fields = [
        ("doc_id", 1, T.TYPE_STRING, T.LABEL_OPTIONAL, ""),
        ("big", 2, T.TYPE_INT64, T.LABEL_OPTIONAL, ""),
        ("ratio", 3, T.TYPE_FLOAT, T.LABEL_OPTIONAL, ""),
        ("kind", 4, T.TYPE_ENUM, T.LABEL_OPTIONAL, ".t.Doc.Kind"),
        ("parts", 5, T.TYPE_MESSAGE, T.LABEL_REPEATED, ".t.Doc.Part"),
        ("counts", 6, T.TYPE_MESSAGE, T.LABEL_REPEATED, ".t.Doc.CountsEntry"),
        ("at", 7, T.TYPE_MESSAGE, T.LABEL_OPTIONAL, ".google.protobuf.Timestamp"),
        ("wrapped", 8, T.TYPE_MESSAGE, T.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
        ("unset", 9, T.TYPE_MESSAGE, T.LABEL_OPTIONAL, ".t.Doc.Part"),
        ("score", 10, T.TYPE_DOUBLE, T.LABEL_OPTIONAL, ""),
    ]
    for name, number, type_, label, type_name in fields:
        added = doc.field.add(name=name, number=number, type=type_, label=label)
        if type_name:
            added.type_name = type_name
    other = f.message_type.add(name="Other")
    other.field.add(name="n", number=1, type=T.TYPE_UINT64, label=T.LABEL_OPTIONAL)
    return f


def message_classes(f: descriptor_pb2.FileDescriptorProto) -> Callable[[str], Any]:
    pool = descriptor_pool.DescriptorPool()
    for dep in f.dependency:
        well_known = descriptor_pool.Default().FindFileByName(dep)
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(well_known.serialized_pb))
    pool.Add(f)
    return lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


async def test_protobuf_values_become_json_data(reg: SchemaRegistry) -> None:
    f = doc_file()
    schema = base64.b64encode(f.SerializeToString()).decode()
    await reg._remember(20, {"schema": schema, "schemaType": "PROTOBUF", "references": []})
    cls = message_classes(f)
    doc = cls("t.Doc")(doc_id="d1", big=2**62, ratio=0.1, kind=1, score=float("inf"))
    doc.parts.add(blob=b"\x00\x01")
    doc.counts[3] = "three"
    doc.at.FromJsonString("2024-05-06T07:08:09.250Z")
    doc.wrapped.value = 2**40
    out = reg.decode(header(20) + b"\x00" + doc.SerializeToString(), "protobuf", "the value")
    assert out == {
        "doc_id": "d1",
        "big": 2**62,  # a number, not the JSON mapping's string
        "ratio": 0.1,  # the shortest float32, not 0.10000000149011612
        "kind": "ARTICLE",
        "parts": [{"blob": "AAE="}],
        "counts": {"3": "three"},
        "at": "2024-05-06T07:08:09.250Z",
        "wrapped": 2**40,
        "score": "Infinity",
    }
    assert_json_data(out)
    empty = reg.decode(header(20) + b"\x00", "protobuf", "the value")  # defaults, no presence
    assert empty == {
        "doc_id": "",
        "big": 0,
        "ratio": 0.0,
        "kind": "KIND_UNSET",
        "parts": [],
        "counts": {},
        "score": 0.0,
    }

    other = cls("t.Other")(n=2**64 - 1)
    assert reg.decode(header(20) + b"\x02\x02" + other.SerializeToString(), "protobuf", "v") == {
        "n": 2**64 - 1
    }
    part = cls("t.Doc.Part")(blob=b"\xff")
    assert reg.decode(header(20) + b"\x04\x00\x00" + part.SerializeToString(), "protobuf", "v") == {
        "blob": "/w=="
    }

    for payload in (b"\x02\x04", b"\x04\x00\x08", b"\x03"):  # index 2 of 2, nested 4 of 2, odd
        assert bad(reg, header(20) + payload, "protobuf").reason == "schema_mismatch"
    far = cls("t.Doc")()
    far.at.seconds = 2**62  # past year 9999: no RFC 3339 form
    far_future = bad(reg, header(20) + b"\x00" + far.SerializeToString(), "protobuf")
    assert far_future.reason == "schema_mismatch" and "JSON form" in far_future.detail
    broken = bad(reg, header(20) + b"\x00\x0a\x40" + SECRET.encode(), "protobuf")
    assert broken.reason == "schema_mismatch" and "t.Doc" in broken.detail
    assert bad(reg, header(20) + b"\x00", "avro").reason == "schema_type_mismatch"


PROTO_TEXT = """
syntax = "proto3";
package shop.v1;
import "google/protobuf/timestamp.proto";

message Order {
  string order_id = 1;
  repeated Line lines = 2;
  google.protobuf.Timestamp placed = 3;
  optional string note = 4;
  oneof payment { string card = 5; string invoice = 6; }
  message Line { string sku = 1; uint32 qty = 2; }
}
"""


async def test_protobuf_text_schema_is_compiled_with_protoc(reg: SchemaRegistry) -> None:
    """.proto text (what Apicurio answers, whatever ``format`` says) goes through protoc."""
    await reg._remember(21, {"schema": PROTO_TEXT, "schemaType": "PROTOBUF"})
    entry = reg._cache[21]
    assert isinstance(entry, registry_module._Proto)
    order_cls = message_factory.GetMessageClass(entry.top[0])
    order = order_cls(order_id="o1", card="visa")
    order.lines.add(sku="a", qty=2)
    order.placed.FromJsonString("2024-01-01T00:00:00Z")
    out = reg.decode(header(21) + b"\x00" + order.SerializeToString(), "protobuf", "the value")
    assert out == {
        "order_id": "o1",
        "lines": [{"sku": "a", "qty": 2}],
        "placed": "2024-01-01T00:00:00Z",
        "card": "visa",
    }


async def test_protobuf_schemas_that_cannot_be_used(reg: SchemaRegistry) -> None:
    await reg._remember(
        22, {"schema": 'syntax = "proto3"; message X { strin a = 1; }', "schemaType": "PROTOBUF"}
    )
    await reg._remember(
        23,
        {
            "schema": 'syntax = "proto3"; import "other.proto"; message X { Y y = 1; }',
            "schemaType": "PROTOBUF",
        },
    )
    f = descriptor_pb2.FileDescriptorProto(
        name="x.proto", syntax="proto3", dependency=["missing.proto"]
    )
    f.message_type.add(name="X")
    await reg._remember(
        24, {"schema": base64.b64encode(f.SerializeToString()).decode(), "schemaType": "PROTOBUF"}
    )
    compile_error = bad(reg, header(22) + b"\x00", "protobuf")
    assert (
        compile_error.reason == "unsupported_schema"
        and '"strin" is not defined' in compile_error.detail
    )
    assert "sparse-ingest-protoc-" not in compile_error.detail  # no temp paths
    assert bad(reg, header(23) + b"\x00", "protobuf").reason == "unsupported_schema"
    missing = bad(reg, header(24) + b"\x00", "protobuf")
    assert missing.reason == "unsupported_schema" and "missing.proto" in missing.detail


# --- the registry's error answers (a fake registry) -------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Fake:
    url: str = ""
    handler: Handler | None = None
    paths: list[str] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)


def registry_error(status: int, code: int, message: str) -> web.Response:
    return web.json_response({"error_code": code, "message": message}, status=status)


async def not_found(request: web.Request) -> web.StreamResponse:
    return registry_error(404, 40403, "Schema not found")


async def start_fake(ssl_context: ssl.SSLContext | None = None) -> tuple[Fake, web.AppRunner]:
    fake = Fake(handler=not_found)

    async def handle(request: web.Request) -> web.StreamResponse:
        fake.paths.append(request.path_qs)
        fake.auth.append(request.headers.get("Authorization"))
        assert fake.handler is not None
        return await fake.handler(request)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    scheme = "https" if ssl_context else "http"
    fake.url = f"{scheme}://127.0.0.1:{port}/apis/ccompat/v7"
    return fake, runner


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    fake, runner = await start_fake()
    yield fake
    await runner.cleanup()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., SchemaRegistry]]:
    made: list[SchemaRegistry] = []

    def make(url: str, **kwargs: Any) -> SchemaRegistry:
        made.append(SchemaRegistry(url, **kwargs))
        return made[-1]

    yield make
    for r in made:
        await r.close()


async def test_404_is_remembered_as_unknown(
    fake: Fake, clients: Callable[..., SchemaRegistry], monkeypatch: pytest.MonkeyPatch
) -> None:
    r = clients(fake.url)
    assert not r.known(42)
    await r.fetch([42, 42])
    assert fake.paths == ["/apis/ccompat/v7/schemas/ids/42"]
    assert r.known(42)
    await r.fetch([42])
    assert len(fake.paths) == 1  # remembered
    unknown = bad(r, header(42) + b"\x02")
    assert unknown.reason == "unknown_schema" and "42" in unknown.detail
    # asked again after a while (a registry restored from a backup, the right one at last)
    monkeypatch.setattr(registry_module, "UNKNOWN_RETRY_S", 0.0)
    await r.fetch([43])
    assert not r.known(43)
    await r.fetch([43])
    assert len(fake.paths) == 3


async def test_404_without_a_registry_error_is_a_wrong_url(
    fake: Fake, clients: Callable[..., SchemaRegistry]
) -> None:
    async def plain_404(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text="Not Found")

    fake.handler = plain_404
    r = clients(fake.url)
    with pytest.raises(RegistryUnavailable, match="ccompat/v7"):
        await r.fetch([1])
    assert not r.known(1)


async def test_500_is_an_outage_and_nothing_is_remembered(
    fake: Fake, clients: Callable[..., SchemaRegistry]
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        return registry_error(500, 50001, "Error in the backend datastore")

    fake.handler = broken
    r = clients(fake.url)
    with pytest.raises(RegistryUnavailable, match=r"HTTP 500.*backend datastore"):
        await r.fetch([1, 2, 3])
    assert not any(r.known(i) for i in (1, 2, 3))
    fake.handler = not_found  # it is back: the same ids are asked again
    await r.fetch([1, 2, 3])
    assert all(r.known(i) for i in (1, 2, 3))


async def test_timeout_is_an_outage(fake: Fake, clients: Callable[..., SchemaRegistry]) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.6)
        return await not_found(request)

    fake.handler = slow
    r = clients(fake.url, timeout_s=0.2)
    with pytest.raises(RegistryUnavailable, match=r"did not answer within 0.2 s"):
        await r.fetch([1])
    assert not r.known(1)


async def test_unreachable_registry_is_an_outage(clients: Callable[..., SchemaRegistry]) -> None:
    r = clients("http://user:hunter2@127.0.0.1:9/apis/ccompat/v7")
    with pytest.raises(RegistryUnavailable, match="could not be reached") as info:
        await r.fetch([1])
    assert "hunter2" not in str(info.value) and "127.0.0.1:9" in str(info.value)


async def test_401_403_name_the_credential_settings(
    fake: Fake, clients: Callable[..., SchemaRegistry]
) -> None:
    async def guarded(request: web.Request) -> web.StreamResponse:
        expected = "Basic " + base64.b64encode(b"svc:s3cret").decode()
        got = request.headers.get("Authorization")
        if got is None:
            return registry_error(401, 40101, "Unauthorized")
        if got != expected:
            return registry_error(403, 40301, "Forbidden")
        return await not_found(request)

    fake.handler = guarded
    for kwargs, status in (({}, 401), ({"username": "svc", "password": "wrong"}, 403)):
        r = clients(fake.url, **kwargs)
        with pytest.raises(RegistryUnavailable, match=f"HTTP {status}") as info:
            await r.fetch([1])
        assert "SPARSE_INGEST_SCHEMA_REGISTRY_USERNAME" in str(info.value)
        assert "SPARSE_INGEST_SCHEMA_REGISTRY_PASSWORD" in str(info.value)
        assert "wrong" not in str(info.value)
        assert not r.known(1)
    r = clients(fake.url, username="svc", password="s3cret")
    await r.fetch([1])
    assert r.known(1)
    r = clients(fake.url.replace("http://", "http://svc:s3cret@"))  # credentials in the URL
    await r.fetch([1])
    assert r.known(1)


async def test_fetch_is_concurrent_bounded_and_shared(
    fake: Fake, clients: Callable[..., SchemaRegistry]
) -> None:
    running = 0
    most = 0

    async def slowish(request: web.Request) -> web.StreamResponse:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)
        running -= 1
        return await not_found(request)

    fake.handler = slowish
    r = clients(fake.url)
    ids = list(range(100, 130))
    await asyncio.gather(r.fetch(ids), r.fetch(ids[::-1]))  # two batches, the same ids
    assert 1 < most <= registry_module.MAX_CONCURRENT_REQUESTS
    assert sorted(fake.paths) == sorted(f"/apis/ccompat/v7/schemas/ids/{i}" for i in ids)


async def test_cache_is_bounded_but_keeps_the_batch(
    fake: Fake, clients: Callable[..., SchemaRegistry]
) -> None:
    r = clients(fake.url, max_cached=2)
    await r.fetch([1, 2, 3])  # a batch larger than the bound: all stay until the next fetch
    assert all(r.known(i) for i in (1, 2, 3))
    await r.fetch([4])
    assert [i for i in (1, 2, 3, 4) if r.known(i)] == [3, 4]


async def test_missing_reference_is_unsupported_schema(
    fake: Fake, clients: Callable[..., SchemaRegistry]
) -> None:
    async def no_subject(request: web.Request) -> web.StreamResponse:
        return registry_error(404, 40401, "Subject not found")

    fake.handler = no_subject
    r = clients(fake.url)
    schema = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "com.acme.Address"}]}
    refs = [{"name": "com.acme.Address", "subject": "addr/v", "version": 2}]
    await r._remember(5, {"schema": json.dumps(schema), "references": refs})
    assert fake.paths == ["/apis/ccompat/v7/subjects/addr%2Fv/versions/2"]
    missing = bad(r, header(5) + b"\x00")
    assert missing.reason == "unsupported_schema" and "com.acme.Address" in missing.detail

    async def down(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503)

    fake.handler = down  # an outage while fetching a reference: nothing remembered
    with pytest.raises(RegistryUnavailable, match="HTTP 503"):
        await r._remember(6, {"schema": json.dumps(schema), "references": refs})
    assert not r.known(6)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            *(
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
            ),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_with_a_ca_file(
    tls_files: tuple[Path, Path], clients: Callable[..., SchemaRegistry]
) -> None:
    cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    fake, runner = await start_fake(context)
    try:
        with pytest.raises(RegistryUnavailable, match="could not be reached"):
            await clients(fake.url).fetch([1])  # a private CA: not trusted by default
        trusting = clients(fake.url, ca_file=str(cert))
        await trusting.fetch([1])
        assert trusting.known(1)
        unverified = clients(fake.url, verify=False)
        await unverified.fetch([2])
        assert unverified.known(2)
    finally:
        await runner.cleanup()
    with pytest.raises((FileNotFoundError, ssl.SSLError)):
        SchemaRegistry(fake.url, ca_file=str(cert.parent / "missing.pem"))


async def test_protobuf_serialized_and_text_files_mixed(reg: SchemaRegistry) -> None:
    """A serialized schema importing a text one and the other way round: protoc takes the
    serialized files as a descriptor set (``--descriptor_set_in``)."""
    money_text = 'syntax = "proto3";\npackage m;\nmessage Money { int64 cents = 1; }\n'
    order = descriptor_pb2.FileDescriptorProto(name="o/order.proto", package="o", syntax="proto3")
    order.dependency.append("m/money.proto")
    total = order.message_type.add(name="Order").field.add(name="total", number=1)
    total.type, total.label, total.type_name = total.TYPE_MESSAGE, total.LABEL_OPTIONAL, ".m.Money"
    serialized_order = base64.b64encode(order.SerializeToString()).decode()
    entry = await reg._parse_protobuf(
        1, serialized_order, [_Ref("m/money.proto", "PROTOBUF", money_text)]
    )
    assert [d.full_name for d in entry.top] == ["o.Order"]

    money = descriptor_pb2.FileDescriptorProto(name="elsewhere.proto", package="m", syntax="proto3")
    cents = money.message_type.add(name="Money").field.add(name="cents", number=1)
    cents.type, cents.label = cents.TYPE_INT64, cents.LABEL_OPTIONAL
    serialized_money = base64.b64encode(money.SerializeToString()).decode()
    text_order = 'syntax = "proto3";\npackage o;\nimport "m/money.proto";\nmessage Order { m.Money total = 1; }\n'
    entry = await reg._parse_protobuf(
        2, text_order, [_Ref("m/money.proto", "PROTOBUF", serialized_money)]
    )
    order_cls = message_factory.GetMessageClass(entry.top[0])
    reg._cache[2] = entry
    message = order_cls()
    message.total.cents = 7
    assert reg.decode(header(2) + b"\x00" + message.SerializeToString(), "protobuf", "v") == {
        "total": {"cents": 7}
    }


async def test_deeply_nested_schemas_are_unsupported_not_fatal(reg: SchemaRegistry) -> None:
    """Past jsonschema's recursion (330 levels), past orjson's depth limit (3000 levels)."""
    avro = '{"type": "record", "name": "R%d", "fields": [{"name": "f", "type": '
    for schema_id, depth in ((30, 330), (32, 3000)):
        avro_text = "".join(avro % i for i in range(depth)) + '"string"' + "}]}" * depth
        json_text = '{"type": "object", "properties": {"f": ' * depth + "{}" + "}}" * depth
        await reg._remember(schema_id, {"schema": avro_text})
        await reg._remember(schema_id + 1, {"schema": json_text, "schemaType": "JSON"})
        assert bad(reg, header(schema_id + 1) + b"{}", "json-schema").reason == "unsupported_schema"
    assert "too deeply" in bad(reg, header(31) + b"{}", "json-schema").detail
    value = reg.decode(header(30) + b"\x02a", "avro", "the value")  # 330 levels of Avro: fine
    for _ in range(330):
        assert isinstance(value, dict)
        value = value["f"]
    assert value == "a"
    assert bad(reg, header(32) + b"\x02a").reason == "unsupported_schema"


# --- review cases: what must not stall the stream -----------------------------------------


async def test_an_id_past_int32_is_unknown_without_asking(reg: SchemaRegistry) -> None:
    # the fixture's registry is unreachable: asking would raise RegistryUnavailable
    await reg.fetch([2**31, 2**32 - 1])
    assert bad(reg, header(2**31) + b"x").reason == "unknown_schema"


def zigzag(n: int) -> bytes:
    """An Avro long."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


@pytest.mark.timeout(120)  # before the bounds: 110 s for the decimal, hours for the array
async def test_hostile_payloads_are_refused_without_minutes_of_cpu(reg: SchemaRegistry) -> None:
    dec = {"type": "record", "name": "D", "fields": [{"name": "d", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}}]}  # fmt: skip
    await reg._remember(31, {"schema": json.dumps(dec)})
    size = 900_000
    assert bad(reg, header(31) + zigzag(size) + b"\x01" * size).reason == "schema_mismatch"
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "uniqueItems": True},
            "mail": {"type": "string", "pattern": "^([a-zA-Z0-9]+)*@x$"},
        },
    }
    await reg._remember(32, {"schemaType": "JSON", "schema": json.dumps(schema)})
    tags = [i if i % 2 else str(i) for i in range(20_000)]
    assert reg.decode(header(32) + json.dumps({"tags": tags}).encode(), "json-schema", "v")
    slow = bad(reg, header(32) + json.dumps({"mail": "a" * 40 + "!"}).encode(), "json-schema")
    assert slow.reason == "schema_mismatch"
    dup = bad(reg, header(32) + json.dumps({"tags": [1, "1", 1.0]}).encode(), "json-schema")
    assert dup.reason == "schema_mismatch"
