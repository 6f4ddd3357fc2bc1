"""Schema-registry formats through the whole service: records written by confluent-kafka's own
Avro serializer (plain, and Debezium change events in Avro with an Avro key) against a real
registry (Apicurio 3.0.9, ``registry_url``), consumed by the service, indexed in Elasticsearch;
a record of an unknown schema and one not in the wire format are dead letters that say so."""

from __future__ import annotations

import json
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from elasticsearch import AsyncElasticsearch
from service_support import (
    create_topic,
    metric,
    produce,
    read_topic,
    running_service,
    service_settings,
    wait_all_committed,
)

DOC = {
    "type": "record",
    "name": "Doc",
    "namespace": "test.formats",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "title", "type": "string"},
        {"name": "body", "type": ["null", "string"], "default": None},
        {
            "name": "price",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 8, "scale": 2},
        },
    ],
}
ROW = {
    "type": "record",
    "name": "Value",
    "namespace": "pg.public.docs",
    "fields": [
        {"name": "id", "type": "int"},
        {"name": "title", "type": "string"},
        {"name": "body", "type": ["null", "string"], "default": None},
    ],
}
ENVELOPE = {
    "type": "record",
    "name": "Envelope",
    "namespace": "pg.public.docs",
    "fields": [
        {"name": "before", "type": ["null", ROW], "default": None},
        {"name": "after", "type": ["null", "Value"], "default": None},
        {
            "name": "source",
            "type": {
                "type": "record",
                "name": "Source",
                "fields": [
                    {"name": "connector", "type": "string"},
                    {"name": "lsn", "type": ["null", "long"], "default": None},
                ],
            },
        },
        {"name": "op", "type": "string"},
        {"name": "ts_ms", "type": ["null", "long"], "default": None},
    ],
}
KEY = {"type": "record", "name": "Key", "namespace": "pg.public.docs", "fields": [{"name": "id", "type": "int"}]}  # fmt: skip


pytestmark = pytest.mark.integration  # needs the local stack


async def test_avro_from_confluents_serializer_is_indexed(
    kafka_bootstrap: str,
    es_url: str,
    es: AsyncElasticsearch,
    topic: str,
    index_name: str,
    registry_url: str,
    default_encoder: Any,
) -> None:
    import decimal

    await create_topic(kafka_bootstrap, topic, 2)
    serialize = AvroSerializer(SchemaRegistryClient({"url": registry_url}), json.dumps(DOC))
    ctx = SerializationContext(topic, MessageField.VALUE)
    docs = [
        {"id": i, "title": f"glacier {i}", "body": "ice moves", "price": decimal.Decimal("12.50")}
        for i in range(8)
    ]
    records: list[Any] = [(str(d["id"]).encode(), serialize(d, ctx), []) for d in docs]
    records.append((b"u", b"\x00" + (987654).to_bytes(4, "big") + b"\x02", []))  # unknown id
    records.append((b"j", b'{"id": 1, "title": "json"}', []))  # not the wire format
    await produce(kafka_bootstrap, topic, records)

    settings = service_settings(
        kafka_bootstrap, es_url, topic, index_name,
        message_format="avro", schema_registry_url=registry_url, text_fields=["title", "body"],
    )  # fmt: skip
    async with running_service(settings, default_encoder):
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
    await es.indices.refresh(index=index_name)
    assert (await es.count(index=index_name))["count"] == 8
    stored = (await es.get(index=index_name, id="3"))["_source"]
    assert stored["title"] == "glacier 3" and stored["price"] == "12.50"
    letters = await read_topic(kafka_bootstrap, settings.dead_letter_topic, 2)
    reasons = sorted(dict(letter.headers)["error.reason"].decode() for letter in letters)
    assert reasons == ["not_wire_format", "unknown_schema"]


async def test_debezium_change_events_in_avro(
    kafka_bootstrap: str,
    es_url: str,
    es: AsyncElasticsearch,
    topic: str,
    index_name: str,
    registry_url: str,
    default_encoder: Any,
) -> None:
    await create_topic(kafka_bootstrap, topic, 1)
    client = SchemaRegistryClient({"url": registry_url})
    value = AvroSerializer(client, json.dumps(ENVELOPE))
    key = AvroSerializer(client, json.dumps(KEY))
    vctx = SerializationContext(topic, MessageField.VALUE)
    kctx = SerializationContext(topic, MessageField.KEY)

    def change(op: str, row_id: int, lsn: int, title: str | None) -> Any:
        row = {"id": row_id, "title": title or "", "body": "river delta"}
        event = {
            "before": row if op in ("u", "d") else None,
            "after": row if op != "d" else None,
            "source": {"connector": "postgresql", "lsn": lsn},
            "op": op,
            "ts_ms": 1,
        }
        return (key({"id": row_id}, kctx), value(event, vctx), [])

    records = [
        change("r", 1, 100, "snapshot one"),
        change("c", 2, 200, "created two"),
        change("u", 1, 300, "updated one"),
        change("c", 3, 310, "created three"),
        change("d", 3, 320, None),
        (key({"id": 3}, kctx), None, []),  # the tombstone after the delete
    ]
    await produce(kafka_bootstrap, topic, records)
    settings = service_settings(
        kafka_bootstrap, es_url, topic, index_name,
        message_format="debezium+avro", schema_registry_url=registry_url,
    )  # fmt: skip
    async with running_service(settings, default_encoder) as svc:
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        assert metric(svc, "sparse_ingest_documents_ignored_total", {"topic": topic}) == 1
    await es.indices.refresh(index=index_name)
    resp = await es.search(index=index_name, size=10, version=True)
    got = {h["_id"]: (h["_source"]["title"], h["_version"]) for h in resp["hits"]["hits"]}
    assert got == {"1": ("updated one", 300), "2": ("created two", 200)}


ARTICLE_JSON_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "title": {"type": "string"},
        "body": {"type": "string"},
    },
    "required": ["id", "title"],
}


def article_proto(package: str) -> Any:
    """A message class ``Article {string id = 1; string title = 2; string body = 3;}`` built from
    a FileDescriptorProto (no protoc, no generated code)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(name=f"{package}/article.proto", package=package, syntax="proto3")  # fmt: skip
    message = f.message_type.add(name="Article")
    for number, name in enumerate(("id", "title", "body"), 1):
        message.field.add(
            name=name,
            number=number,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.Article"))


async def test_json_schema_and_protobuf_topics_in_one_service(
    kafka_bootstrap: str,
    es_url: str,
    es: AsyncElasticsearch,
    topic: str,
    index_name: str,
    registry_url: str,
    default_encoder: Any,
) -> None:
    """Two topics, two formats (TOPIC_FORMATS), one service; a JSON payload that breaks its
    JSON Schema is a dead letter."""
    import uuid

    from confluent_kafka.schema_registry.json_schema import JSONSerializer
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer

    json_topic, proto_topic = f"{topic}-js", f"{topic}-pb"
    for name in (json_topic, proto_topic):
        await create_topic(kafka_bootstrap, name, 1)
    client = SchemaRegistryClient({"url": registry_url})
    as_json = JSONSerializer(json.dumps(ARTICLE_JSON_SCHEMA), client)
    lenient = JSONSerializer(json.dumps(ARTICLE_JSON_SCHEMA), client, conf={"validate": False})
    jctx = SerializationContext(json_topic, MessageField.VALUE)
    await produce(
        kafka_bootstrap,
        json_topic,
        [
            (b"j1", as_json({"id": "j1", "title": "json one", "body": "volcano"}, jctx), []),
            (b"j2", as_json({"id": "j2", "title": "json two", "body": "lava"}, jctx), []),
            (b"j3", lenient({"id": "j3", "body": "no title"}, jctx), []),  # breaks "required"
        ],
    )
    article = article_proto(f"news.v{uuid.uuid4().hex[:6]}")
    as_proto = ProtobufSerializer(article, client, {"use.deprecated.format": False})
    pctx = SerializationContext(proto_topic, MessageField.VALUE)
    await produce(
        kafka_bootstrap,
        proto_topic,
        [
            (b"p1", as_proto(article(id="p1", title="proto one", body="desert"), pctx), []),
            (b"p2", as_proto(article(id="p2", title="proto two", body="dune"), pctx), []),
        ],
    )
    settings = service_settings(
        kafka_bootstrap, es_url, json_topic, index_name,
        kafka_topics=[json_topic, proto_topic],
        topic_formats=[f"{json_topic}=json-schema", f"{proto_topic}=protobuf"],
        schema_registry_url=registry_url,
    )  # fmt: skip
    async with running_service(settings, default_encoder):
        for name in (json_topic, proto_topic):
            await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, name)
    await es.indices.refresh(index=index_name)
    resp = await es.search(index=index_name, size=10)
    got = {h["_id"]: h["_source"]["title"] for h in resp["hits"]["hits"]}
    assert got == {"j1": "json one", "j2": "json two", "p1": "proto one", "p2": "proto two"}
    letters = await read_topic(kafka_bootstrap, settings.dead_letter_topic, 1)
    assert [dict(letter.headers)["error.reason"] for letter in letters] == [b"schema_mismatch"]
