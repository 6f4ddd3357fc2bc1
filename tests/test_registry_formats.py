"""service.registry against a real registry: Apicurio Registry 3.0.9 (its Confluent-compatible
API, the ``registry_url`` session fixture), with records written by confluent-kafka's own
serializers (AvroSerializer, JSONSerializer, ProtobufSerializer) and decoded by SchemaRegistry.

Apicurio answers a Protobuf schema as it was registered: base64 of a FileDescriptorProto when
confluent-kafka's Python serializer registered it, ``.proto`` text when a Java producer (or a
person) did; it ignores ``?format=serialized``. Both are covered; the text goes through protoc.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from confluent_kafka.schema_registry import (
    Schema,
    SchemaReference,
    SchemaRegistryClient,
    prefix_schema_id_serializer,
)
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.schema_registry.serde import SchemaId
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2
from yarl import URL

from service.messages import BadRecord
from service.registry import RegistryUnavailable, SchemaRegistry, wire_schema_id

pytestmark = pytest.mark.integration

SECRET = "Jane Q. Secret 555-0100"  # a record's content: never in a BadRecord's detail
PROTOBUF_CONF = {"use.deprecated.format": False}


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """Unique per test: subjects are ``<topic>-value`` / ``<topic>-key``."""
    return f"{request.node.name.replace('_', '-')[:40]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(registry_url: str) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": registry_url})


@pytest.fixture
async def registry(registry_url: str) -> AsyncIterator[SchemaRegistry]:
    r = SchemaRegistry(registry_url, timeout_s=5.0)
    yield r
    await r.close()


def value_of(topic: str) -> SerializationContext:
    return SerializationContext(topic, MessageField.VALUE)


async def decode(
    registry: SchemaRegistry, data: bytes, expected: Any, where: str = "the value"
) -> object:
    schema_id = wire_schema_id(data)
    assert schema_id is not None
    await registry.fetch([schema_id])
    return registry.decode(data, expected, where)


def bad(registry: SchemaRegistry, data: bytes, expected: Any) -> BadRecord:
    with pytest.raises(BadRecord) as info:
        registry.decode(data, expected, "the value")
    assert SECRET not in info.value.detail
    return info.value


# --- Avro -------------------------------------------------------------------------------

ARTICLE_V1 = {
    "type": "record",
    "name": "Article",
    "namespace": "com.acme.news",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "title", "type": "string"},
        {"name": "body", "type": ["null", "string"], "default": None},
        {"name": "version", "type": "long"},
        {
            "name": "price",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 8, "scale": 2},
        },
        {"name": "published", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "uid", "type": {"type": "string", "logicalType": "uuid"}},
        {
            "name": "status",
            "type": {"type": "enum", "name": "Status", "symbols": ["DRAFT", "LIVE"]},
        },
        {"name": "thumb", "type": "bytes"},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "scores", "type": {"type": "map", "values": "double"}},
    ],
}
ARTICLE_V2 = {
    **ARTICLE_V1,
    "fields": [*ARTICLE_V1["fields"], {"name": "lang", "type": "string", "default": "en"}],
}


def article(**extra: Any) -> dict[str, Any]:
    return {
        "id": "a-1",
        "title": "Sparse retrieval",
        "body": None,
        "version": 3,
        "price": decimal.Decimal("12.50"),
        "published": dt.datetime(2024, 3, 1, 12, 30, 15, 123000, tzinfo=dt.UTC),
        "day": dt.date(2024, 3, 1),
        "uid": uuid.UUID("9b2a6f0e-5f4c-4c7a-9d1e-0b1c2d3e4f50"),
        "status": "LIVE",
        "thumb": b"\x89PNG",
        "tags": ["ir", "splade"],
        "scores": {"bm25": 1.25},
        **extra,
    }


ARTICLE_JSON = {
    "id": "a-1",
    "title": "Sparse retrieval",
    "body": None,
    "version": 3,
    "price": "12.50",
    "published": "2024-03-01T12:30:15.123000+00:00",
    "day": "2024-03-01",
    "uid": "9b2a6f0e-5f4c-4c7a-9d1e-0b1c2d3e4f50",
    "status": "LIVE",
    "thumb": "iVBORw==",
    "tags": ["ir", "splade"],
    "scores": {"bm25": 1.25},
}


async def test_avro_values_keys_and_evolution(
    client: SchemaRegistryClient, registry: SchemaRegistry, topic_name: str
) -> None:
    v1 = AvroSerializer(client, json.dumps(ARTICLE_V1))(article(), value_of(topic_name))
    v2 = AvroSerializer(client, json.dumps(ARTICLE_V2))(article(lang="de"), value_of(topic_name))
    key = AvroSerializer(client, '"string"')(
        "a-1", SerializationContext(topic_name, MessageField.KEY)
    )
    assert v1 is not None and v2 is not None and key is not None
    assert wire_schema_id(v1) != wire_schema_id(v2)
    assert client.get_versions(f"{topic_name}-value") == [1, 2]

    assert await decode(registry, v1, "avro") == ARTICLE_JSON
    assert await decode(registry, v2, "avro") == {**ARTICLE_JSON, "lang": "de"}
    assert await decode(registry, key, "avro", "the key") == "a-1"
    json.dumps(registry.decode(v2, "avro", "the value"), allow_nan=False)

    truncated = bad(registry, v1[:-3], "avro")
    assert truncated.reason == "schema_mismatch" and "truncated" in truncated.detail
    assert bad(registry, v1, "protobuf").reason == "schema_type_mismatch"


async def test_avro_named_type_from_another_subject(
    client: SchemaRegistryClient, registry: SchemaRegistry, topic_name: str
) -> None:
    address = {
        "type": "record",
        "name": "Address",
        "namespace": "com.acme",
        "fields": [{"name": "city", "type": "string"}, {"name": "zip", "type": ["null", "string"]}],
    }
    address_subject = f"{topic_name}-com.acme.Address"
    client.register_schema(address_subject, Schema(json.dumps(address), "AVRO"))
    person = {
        "type": "record",
        "name": "Person",
        "namespace": "com.acme",
        "fields": [{"name": "id", "type": "string"}, {"name": "home", "type": "com.acme.Address"}],
    }
    schema = Schema(
        json.dumps(person), "AVRO", [SchemaReference("com.acme.Address", address_subject, 1)]
    )
    record = {"id": "p-1", "home": {"city": "Oslo", "zip": None}}
    data = AvroSerializer(client, schema)(record, value_of(topic_name))
    assert data is not None
    assert await decode(registry, data, "avro") == record


# --- JSON Schema ------------------------------------------------------------------------

PRODUCT_V1 = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "Product",
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "title": {"type": "string"},
        "stock": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["id", "title"],
}
PRODUCT_V2 = {**PRODUCT_V1, "properties": {**PRODUCT_V1["properties"], "price": {"type": "number"}}}


async def test_json_schema_values_evolution_and_violations(
    client: SchemaRegistryClient, registry: SchemaRegistry, topic_name: str
) -> None:
    one = {"id": "p-1", "title": "Lamp", "stock": 4, "tags": ["home"]}
    two = {"id": "p-2", "title": "Desk", "stock": 0, "tags": [], "price": 99.5}
    v1 = JSONSerializer(json.dumps(PRODUCT_V1), client)(one, value_of(topic_name))
    v2 = JSONSerializer(json.dumps(PRODUCT_V2), client)(two, value_of(topic_name))
    assert v1 is not None and v2 is not None
    assert wire_schema_id(v1) != wire_schema_id(v2)
    assert await decode(registry, v1, "json-schema") == one
    assert await decode(registry, v2, "json-schema") == two

    # a producer that does not validate: the record breaks its own schema
    lenient = JSONSerializer(json.dumps(PRODUCT_V1), client, conf={"validate": False})
    broken = lenient({"id": "p-3", "title": SECRET, "stock": -2}, value_of(topic_name))
    missing = lenient({"id": "p-4", "name": SECRET}, value_of(topic_name))
    assert broken is not None and missing is not None
    assert wire_schema_id(broken) == wire_schema_id(v1)
    below = bad(registry, broken, "json-schema")
    assert (
        below.reason == "schema_mismatch" and "/stock" in below.detail and "minimum" in below.detail
    )
    assert bad(registry, missing, "json-schema").reason == "schema_mismatch"
    assert bad(registry, v1[:-5], "json-schema").reason == "schema_mismatch"  # truncated JSON
    assert bad(registry, v1, "avro").reason == "schema_type_mismatch"


async def test_json_schema_reference_to_another_subject(
    client: SchemaRegistryClient, registry: SchemaRegistry, topic_name: str
) -> None:
    address = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$id": "https://acme.example/schemas/address.json",
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    address_subject = f"{topic_name}-address"
    client.register_schema(address_subject, Schema(json.dumps(address), "JSON"))
    person = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {"id": {"type": "string"}, "home": {"$ref": "address.json"}},
        "required": ["id"],
    }
    schema = Schema(
        json.dumps(person), "JSON", [SchemaReference("address.json", address_subject, 1)]
    )
    good = JSONSerializer(schema, client)(
        {"id": "p", "home": {"city": "Oslo"}}, value_of(topic_name)
    )
    lenient = JSONSerializer(schema, client, conf={"validate": False})
    wrong = lenient({"id": "p", "home": {"town": SECRET}}, value_of(topic_name))
    assert good is not None and wrong is not None
    assert await decode(registry, good, "json-schema") == {"id": "p", "home": {"city": "Oslo"}}
    violation = bad(registry, wrong, "json-schema")
    assert violation.reason == "schema_mismatch" and "/home" in violation.detail


# --- Protobuf ---------------------------------------------------------------------------

F = descriptor_pb2.FieldDescriptorProto


def add_field(
    message: Any, name: str, number: int, kind: int, type_name: str = "", repeated: bool = False
) -> None:
    added = message.field.add(name=name, number=number, type=kind)
    added.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
    if type_name:
        added.type_name = type_name


def catalog_file(package: str, with_rating: bool = False) -> descriptor_pb2.FileDescriptorProto:
    """``Item`` (a nested ``Variant``, an enum, a map, a Timestamp, int64, bytes) and ``Shelf``:
    what protoc would make of a .proto file, built here (no protoc, no generated code)."""
    f = descriptor_pb2.FileDescriptorProto(
        name=f"{package.replace('.', '/')}/catalog.proto", package=package, syntax="proto3"
    )
    f.dependency.append("google/protobuf/timestamp.proto")
    item = f.message_type.add(name="Item")
    variant = item.nested_type.add(name="Variant")
    add_field(variant, "sku", 1, F.TYPE_STRING)
    add_field(variant, "image", 2, F.TYPE_BYTES)
    state = item.enum_type.add(name="State")
    state.value.add(name="STATE_UNSPECIFIED", number=0)
    state.value.add(name="ACTIVE", number=1)
    entry = item.nested_type.add(name="AttrsEntry")
    entry.options.map_entry = True
    add_field(entry, "key", 1, F.TYPE_STRING)
    add_field(entry, "value", 2, F.TYPE_STRING)
    add_field(item, "item_id", 1, F.TYPE_STRING)
    add_field(item, "views", 2, F.TYPE_INT64)
    add_field(item, "state", 3, F.TYPE_ENUM, f".{package}.Item.State")
    add_field(item, "variants", 4, F.TYPE_MESSAGE, f".{package}.Item.Variant", repeated=True)
    add_field(item, "attrs", 5, F.TYPE_MESSAGE, f".{package}.Item.AttrsEntry", repeated=True)
    add_field(item, "updated", 6, F.TYPE_MESSAGE, ".google.protobuf.Timestamp")
    if with_rating:
        add_field(item, "rating", 7, F.TYPE_DOUBLE)
    shelf = f.message_type.add(name="Shelf")
    add_field(shelf, "name", 1, F.TYPE_STRING)
    return f


def classes(*files: descriptor_pb2.FileDescriptorProto) -> Callable[[str], Any]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(timestamp_pb2.DESCRIPTOR.serialized_pb))
    for f in files:
        pool.Add(f)
    return lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


async def test_protobuf_serialized_schema_messages_and_evolution(
    client: SchemaRegistryClient, registry: SchemaRegistry, topic_name: str
) -> None:
    package = f"shop.v{uuid.uuid4().hex[:6]}"
    v1 = classes(catalog_file(package))
    item_cls = v1(f"{package}.Item")
    item = item_cls(item_id="i-1", views=2**40, state=1)
    item.variants.add(sku="s-1", image=b"\x00\x01")
    item.attrs["color"] = "red"
    item.updated.FromJsonString("2024-03-01T12:00:00Z")
    expected = {
        "item_id": "i-1",
        "views": 2**40,
        "state": "ACTIVE",
        "variants": [{"sku": "s-1", "image": "AAE="}],
        "attrs": {"color": "red"},
        "updated": "2024-03-01T12:00:00Z",
    }
    data = ProtobufSerializer(item_cls, client, PROTOBUF_CONF)(item, value_of(topic_name))
    assert data is not None
    assert await decode(registry, data, "protobuf") == expected

    # other messages of the file: the message indexes ([1]; [0, 0] for Item.Variant)
    shelf_topic, variant_topic = f"{topic_name}-shelf", f"{topic_name}-variant"
    shelf_cls, variant_cls = v1(f"{package}.Shelf"), v1(f"{package}.Item.Variant")
    shelf = ProtobufSerializer(shelf_cls, client, PROTOBUF_CONF)(
        shelf_cls(name="top"), value_of(shelf_topic)
    )
    variant = ProtobufSerializer(variant_cls, client, PROTOBUF_CONF)(
        variant_cls(sku="s-2"), value_of(variant_topic)
    )
    assert shelf is not None and variant is not None
    assert await decode(registry, shelf, "protobuf") == {"name": "top"}
    assert await decode(registry, variant, "protobuf") == {"sku": "s-2", "image": ""}

    # v2 of the subject adds a field: records of both versions decode
    v2_item_cls = classes(catalog_file(package, with_rating=True))(f"{package}.Item")
    newer = v2_item_cls(item_id="i-2", rating=4.5)
    data2 = ProtobufSerializer(v2_item_cls, client, PROTOBUF_CONF)(newer, value_of(topic_name))
    assert data2 is not None and wire_schema_id(data2) != wire_schema_id(data)
    assert client.get_versions(f"{topic_name}-value") == [1, 2]
    assert await decode(registry, data2, "protobuf") == {
        "item_id": "i-2",
        "views": 0,
        "state": "STATE_UNSPECIFIED",
        "variants": [],
        "attrs": {},
        "rating": 4.5,
    }
    assert await decode(registry, data, "protobuf") == expected

    assert bad(registry, data[:-4], "protobuf").reason == "schema_mismatch"
    assert bad(registry, data, "avro").reason == "schema_type_mismatch"


async def test_protobuf_import_registered_as_a_reference(
    client: SchemaRegistryClient, registry: SchemaRegistry, topic_name: str
) -> None:
    """ProtobufSerializer registers the imported file as a subject of its own (named after the
    file) and the schema with a reference to it."""
    package = f"billing.v{uuid.uuid4().hex[:6]}"
    common = descriptor_pb2.FileDescriptorProto(
        name=f"{package.replace('.', '/')}/money.proto", package=package, syntax="proto3"
    )
    money = common.message_type.add(name="Money")
    add_field(money, "cents", 1, F.TYPE_INT64)
    add_field(money, "currency", 2, F.TYPE_STRING)
    order_file = descriptor_pb2.FileDescriptorProto(
        name=f"{package.replace('.', '/')}/order.proto", package=package, syntax="proto3"
    )
    order_file.dependency.append(common.name)
    order = order_file.message_type.add(name="Order")
    add_field(order, "order_id", 1, F.TYPE_STRING)
    add_field(order, "total", 2, F.TYPE_MESSAGE, f".{package}.Money")
    order_cls = classes(common, order_file)(f"{package}.Order")
    message = order_cls(order_id="o-1")
    message.total.cents = 1999
    message.total.currency = "EUR"
    data = ProtobufSerializer(order_cls, client, PROTOBUF_CONF)(message, value_of(topic_name))
    assert data is not None
    registered = client.get_latest_version(f"{topic_name}-value")
    assert [r.name for r in registered.schema.references] == [common.name]
    assert await decode(registry, data, "protobuf") == {
        "order_id": "o-1",
        "total": {"cents": 1999, "currency": "EUR"},
    }


async def test_protobuf_text_schema_with_a_text_import(
    client: SchemaRegistryClient, registry: SchemaRegistry, topic_name: str
) -> None:
    """.proto text, as a Java producer registers it: Apicurio answers it as text (it ignores
    ``format=serialized``), so it is compiled with protoc. confluent-kafka's Python serializer
    cannot use a text schema it did not register (it expects Confluent's ``serialized`` form):
    the record is framed by its ``prefix_schema_id_serializer`` and ``SchemaId``, the message
    serialized by the protobuf runtime."""
    package = f"acme.text{uuid.uuid4().hex[:6]}"
    money_name = f"{package.replace('.', '/')}/money.proto"
    money_text = f'syntax = "proto3";\npackage {package};\n\nmessage Money {{\n  int64 cents = 1;\n  string currency = 2;\n}}\n'
    invoice_text = (
        f'syntax = "proto3";\npackage {package};\n\nimport "{money_name}";\n'
        'import "google/protobuf/timestamp.proto";\n\n'
        "message Invoice {\n  string number = 1;\n  Money total = 2;\n"
        "  google.protobuf.Timestamp due = 3;\n  repeated string lines = 4;\n}\n"
    )
    money_subject = f"{topic_name}-money"
    client.register_schema(money_subject, Schema(money_text, "PROTOBUF"))
    schema_id = client.register_schema(
        f"{topic_name}-value",
        Schema(invoice_text, "PROTOBUF", [SchemaReference(money_name, money_subject, 1)]),
    )
    # the same messages, built for the producer (what protoc would generate from the text)
    money_file = descriptor_pb2.FileDescriptorProto(
        name=money_name, package=package, syntax="proto3"
    )
    money = money_file.message_type.add(name="Money")
    add_field(money, "cents", 1, F.TYPE_INT64)
    add_field(money, "currency", 2, F.TYPE_STRING)
    invoice_file = descriptor_pb2.FileDescriptorProto(
        name="invoice.proto", package=package, syntax="proto3"
    )
    invoice_file.dependency.extend([money_name, "google/protobuf/timestamp.proto"])
    invoice = invoice_file.message_type.add(name="Invoice")
    add_field(invoice, "number", 1, F.TYPE_STRING)
    add_field(invoice, "total", 2, F.TYPE_MESSAGE, f".{package}.Money")
    add_field(invoice, "due", 3, F.TYPE_MESSAGE, ".google.protobuf.Timestamp")
    add_field(invoice, "lines", 4, F.TYPE_STRING, repeated=True)
    invoice_cls = classes(money_file, invoice_file)(f"{package}.Invoice")
    message = invoice_cls(number="INV-7", lines=["a", "b"])
    message.total.cents = 120
    message.due.FromJsonString("2024-12-31T23:59:59Z")
    data = prefix_schema_id_serializer(
        message.SerializeToString(),
        value_of(topic_name),
        SchemaId("PROTOBUF", schema_id=schema_id, message_indexes=[0]),
    )
    assert await decode(registry, data, "protobuf") == {
        "number": "INV-7",
        "total": {"cents": 120, "currency": ""},
        "due": "2024-12-31T23:59:59Z",
        "lines": ["a", "b"],
    }


# --- ids the registry does not have, outages --------------------------------------------


async def test_unknown_id_and_not_wire_format(registry: SchemaRegistry) -> None:
    unknown = b"\x00\x7f\xff\xff\xf0" + SECRET.encode()
    await registry.fetch([wire_schema_id(unknown) or 0])
    assert registry.known(0x7FFFFFF0)
    assert bad(registry, unknown, "avro").reason == "unknown_schema"
    assert bad(registry, b'{"id": "' + SECRET.encode() + b'"}', "avro").reason == "not_wire_format"


class Proxy:
    """A TCP forwarder to the registry that can be stopped and started again on its port:
    an outage of the registry as its clients see it (connection refused, then back)."""

    def __init__(self, target: URL) -> None:
        self.target = target
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.pipes:
            task.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.pipes.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self.pipes.discard(task)
            writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()


async def test_outage_then_recovery(
    client: SchemaRegistryClient, registry_url: str, topic_name: str
) -> None:
    schema = {"type": "record", "name": "Ping", "fields": [{"name": "n", "type": "int"}]}
    data = AvroSerializer(client, json.dumps(schema))({"n": 1}, value_of(topic_name))
    assert data is not None
    schema_id = wire_schema_id(data)
    assert schema_id is not None
    target = URL(registry_url)
    proxy = Proxy(target)
    r = SchemaRegistry(str(target.with_port(proxy.port).with_host("127.0.0.1")), timeout_s=2.0)
    try:
        with pytest.raises(RegistryUnavailable, match="could not be reached"):
            await r.fetch([schema_id])  # down from the start
        assert not r.known(schema_id)
        await proxy.start()
        await r.fetch([schema_id])
        assert r.decode(data, "avro", "the value") == {"n": 1}
        await proxy.stop()  # down again: a new id cannot be fetched, nothing is remembered
        with pytest.raises(RegistryUnavailable):
            await r.fetch([schema_id + 1000])
        assert not r.known(schema_id + 1000)
        assert r.decode(data, "avro", "the value") == {"n": 1}  # what it had stays
        await proxy.start()
        await r.fetch([schema_id + 1000])  # back: answered (unknown, but answered)
        assert r.known(schema_id + 1000)
    finally:
        await r.close()
        if proxy.server is not None and proxy.server.is_serving():
            await proxy.stop()
