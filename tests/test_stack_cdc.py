"""The CDC infrastructure of the local stack (deploy.local.cdc) against real processes: Postgres
-> Debezium on Kafka Connect -> Kafka, Connect restarted, and Apicurio Registry's
Confluent-compatible API. Infrastructure only: what the events look like, not what the service
does with them."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import support
from aiokafka import AIOKafkaConsumer, TopicPartition

from deploy.local import LocalStack, StackError, debezium_postgres_config
from deploy.local.cdc import PostgresParams, http
from deploy.local.cli import build_parser

pytestmark = pytest.mark.integration

Record = tuple[Any, Any]  # (key, value) as JSON, value None for a tombstone


async def _read(bootstrap: str, topic: str, count: int, timeout: float = 60.0) -> list[Record]:
    """The first ``count`` records of ``topic`` (all partitions, no group), per partition in
    order; fails after ``timeout`` seconds with what came."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        metadata_max_age_ms=1000,  # the topic appears with the first event
    )
    await consumer.start()
    records: list[Record] = []
    try:
        deadline = time.monotonic() + timeout
        while len(records) < count and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=1000)).values():
                for m in messages:
                    value = json.loads(m.value) if m.value is not None else None
                    records.append((json.loads(m.key), value))
        assert len(records) >= count, f"{len(records)} of {count} records came: {records}"
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        total = sum((await consumer.end_offsets(partitions)).values())
        assert total == count, f"{total} records in {topic}, expected {count}: {records}"
    finally:
        await consumer.stop()
    return records


def _of(records: list[Record], key: Any) -> list[Any]:
    """The values of one key, in order (one key is one partition)."""
    return [value for k, value in records if k == key]


async def test_debezium_change_events_and_connect_restart(cdc_stack: LocalStack) -> None:
    name = support.unique_name("cdc", 24).replace("-", "_")
    table, topic = f"items_{name}", f"{name}.public.items_{name}"
    cdc_stack.postgres_exec(
        f"CREATE TABLE {table} (id int PRIMARY KEY, name text, qty int);"
        f"ALTER TABLE {table} REPLICA IDENTITY FULL;"
    )
    config = cdc_stack.debezium_postgres_config(name, [f"public.{table}"])
    status = cdc_stack.connect_add_connector(name, config)
    assert status["connector"]["state"] == "RUNNING"
    assert [t["state"] for t in status["tasks"]] == ["RUNNING"]
    try:
        for sql in (
            f"INSERT INTO {table} VALUES (1, 'a', 2)",
            f"UPDATE {table} SET qty = 3 WHERE id = 1",
            f"DELETE FROM {table} WHERE id = 1",
            f"INSERT INTO {table} VALUES (2, 'b', 5)",
        ):
            cdc_stack.postgres_exec(sql)  # one transaction each
        bootstrap = cdc_stack.info.kafka_bootstrap
        assert bootstrap
        records = await _read(bootstrap, topic, 5)
        created, updated, deleted, tombstone = _of(records, {"id": 1})
        (second,) = _of(records, {"id": 2})
        row = {"id": 1, "name": "a", "qty": 2}
        assert (created["op"], created["before"], created["after"]) == ("c", None, row)
        assert (updated["op"], updated["before"]) == ("u", row)  # REPLICA IDENTITY FULL
        assert updated["after"] == {**row, "qty": 3}
        assert (deleted["op"], deleted["before"], deleted["after"]) == ("d", updated["after"], None)
        assert tombstone is None
        assert second["op"] == "c" and second["after"]["id"] == 2
        events = [created, updated, deleted, second]
        for event in events:
            source = event["source"]
            assert type(source["lsn"]) is int and type(source["ts_ms"]) is int
            assert type(event["ts_ms"]) is int and event["ts_ms"] >= source["ts_ms"]
            assert (source["db"], source["schema"], source["table"]) == ("sparse", "public", table)
            assert (source["connector"], source["name"], source["snapshot"]) == (
                "postgresql",
                name,
                "false",
            )
        lsns = [e["source"]["lsn"] for e in events]
        assert lsns == sorted(lsns) and len(set(lsns)) == 4, lsns

        # A restart resumes from the offsets file: no snapshot again, nothing repeated.
        cdc_stack.restart_service("connect")
        assert {s.service: s.healthy for s in cdc_stack.status().services} == {
            "kafka": True,
            "postgres": True,
            "connect": True,
        }
        cdc_stack.postgres_exec(f"INSERT INTO {table} VALUES (3, 'c', 1)")
        after = await _read(bootstrap, topic, 6)
        (third,) = _of(after, {"id": 3})
        assert third["op"] == "c" and third["source"]["lsn"] > max(lsns)
        assert sorted(map(str, after)) == sorted(map(str, [*records, ({"id": 3}, third)]))
    finally:
        cdc_stack.connect_delete_connector(name)


def test_failed_connector_says_why(cdc_stack: LocalStack) -> None:
    """A refused config names the setting at fault, a failed task gives its trace; neither
    connector is left behind (nor restarted with Connect)."""
    name = support.unique_name("cdc_bad", 24).replace("-", "_")
    wrong = {"database.password": "wrong-password"}
    config = cdc_stack.debezium_postgres_config(name, ["public.nothing"], extra=wrong)
    with pytest.raises(StackError, match=r"database\.hostname: .*password authentication failed"):
        cdc_stack.connect_add_connector(name, config, timeout=60)
    no_publication = {"publication.autocreate.mode": "disabled"}
    config = cdc_stack.debezium_postgres_config(name, ["public.nothing"], extra=no_publication)
    with pytest.raises(StackError, match=r"(?s)task 0 FAILED:\n.*ConnectException: Publication"):
        cdc_stack.connect_add_connector(name, config, timeout=60)
    status, _ = http("GET", f"{cdc_stack.info.connect_url}/connectors/{name}")
    assert status == 404
    assert cdc_stack.status().healthy


def test_registry_registers_and_serves_schemas(registry_url: str) -> None:
    subject = support.unique_name("registry", 40) + "-value"
    schema = {
        "type": "record",
        "name": "Doc",
        "namespace": "t",
        "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "int"}],
    }
    status, body = http(
        "POST", f"{registry_url}/subjects/{subject}/versions", {"schema": json.dumps(schema)}
    )
    assert status == 200 and isinstance(body["id"], int), (status, body)
    schema_id = body["id"]
    status, body = http("GET", f"{registry_url}/schemas/ids/{schema_id}")
    assert status == 200 and json.loads(body["schema"]) == schema, (status, body)
    status, body = http("GET", f"{registry_url}/subjects/{subject}/versions/latest")
    assert status == 200 and (body["id"], body["version"]) == (schema_id, 1), (status, body)
    status, body = http("GET", f"{registry_url}/subjects")
    assert status == 200 and subject in body


def test_cli_flags_and_connector_config() -> None:
    """No services: the CLI takes the flags, the Debezium config is what the docs say."""
    args = build_parser().parse_args(["up", "--cdc", "--registry", "--no-elasticsearch"])
    assert (args.cdc, args.registry, args.no_elasticsearch) == (True, True, True)
    args = build_parser().parse_args(["fetch", "--cdc", "--registry"])
    assert (args.cdc, args.registry) == (True, True)
    assert build_parser().parse_args(["restart", "connect"]).service == "connect"
    params = PostgresParams("127.0.0.1", 5433, "sparse", "p@ss/word", "sparse")
    assert params.dsn == "postgresql://sparse:p%40ss%2Fword@127.0.0.1:5433/sparse"
    config = debezium_postgres_config(params, "Shop-1", ("public.a", "public.b"))
    assert config["slot.name"] == config["publication.name"] == "shop_1"
    assert config["table.include.list"] == "public.a,public.b"
    assert (config["plugin.name"], config["publication.autocreate.mode"]) == (
        "pgoutput",
        "filtered",
    )
    assert config["database.port"] == "5433" and "snapshot.mode" not in config
