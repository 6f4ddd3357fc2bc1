"""Helpers for tests that run the service in-process against the real local stack."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from service.app import Service
from service.config import Settings, load_settings
from tooling.topics import create_topic  # noqa: F401  (re-exported for the tests)

Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


def doc(doc_id: str | None, body: str, **extra: Any) -> Record:
    """A JSON document record keyed by its id."""
    value: dict[str, Any] = {"body": body, **extra}
    if doc_id is not None:
        value["id"] = doc_id
    return (doc_id.encode() if doc_id else None, orjson.dumps(value), [])


def tombstone(doc_id: str, version: int | None = None) -> Record:
    headers = [] if version is None else [("version", str(version).encode())]
    return (doc_id.encode(), None, headers)


def service_settings(kafka: str, es_url: str, topic: str, index: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": kafka,
        "kafka_topics": [topic],
        "kafka_group_id": f"{topic}-group",
        "es_url": es_url,
        "es_index": index,
        "http_port": 0,
        "batch_linger_ms": 50,
        "commit_interval_ms": 200,
        "es_refresh_interval": "200ms",
    }
    values.update(overrides)
    return load_settings(**values)


async def produce(
    kafka: str, topic: str, records: Iterable[Record], partition: int | None = None
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value=v, key=k, headers=h, partition=partition)
            for k, v, h in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def partitions(kafka: str, topic: str) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        for _ in range(50):
            described = await admin.describe_topics([topic])
            parts = [
                p["partition"] for t in described if t["topic"] == topic for p in t["partitions"]
            ]
            if parts:
                return [TopicPartition(topic, p) for p in sorted(parts)]
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
    raise AssertionError(f"topic {topic} has no partitions")


async def end_offsets(kafka: str, topic: str) -> dict[TopicPartition, int]:
    tps = await partitions(kafka, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


async def committed(
    kafka: str, group: str, tps: Sequence[TopicPartition]
) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group, partitions=list(tps))
        return {tp: meta.offset for tp, meta in offsets.items()}
    finally:
        await admin.close()


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float = 60.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():
                return
        except KafkaError as exc:  # e.g. the group coordinator is still loading
            if not exc.retriable:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


async def wait_all_committed(kafka: str, group: str, topic: str, timeout: float = 90.0) -> None:
    ends = await end_offsets(kafka, topic)

    async def done() -> bool:
        got = await committed(kafka, group, list(ends))
        return all(got.get(tp, -1) >= end for tp, end in ends.items())

    await wait_until(done, timeout, f"group {group} to commit {topic} to the end")


async def read_topic(kafka: str, topic: str, count: int, timeout: float = 30.0) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for recs in batch.values():
                out.extend(recs)
    finally:
        await consumer.stop()
    return out


@contextlib.asynccontextmanager
async def running_service(settings: Settings, encoder: Any) -> AsyncIterator[Service]:
    service = Service(settings, encoder=encoder)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


# What to name in source_includes for a document's vectors (Elasticsearch 9 returns vectors only
# when named): one vector a document, or passages.
VECTOR_SOURCE = ["tokens", "passages.tokens", "passages.start", "passages.end"]


def stored_vector(source: dict[str, Any]) -> dict[str, float] | None:
    """A stored document's vector: its ``tokens``, or with passages their element-wise max
    (a short document's one passage). None when it has neither."""
    if isinstance(source.get("tokens"), dict):
        return dict(source["tokens"])
    passages = source.get("passages")
    if not isinstance(passages, list) or not passages:
        return None
    merged: dict[str, float] = {}
    for passage in passages:
        for token, weight in (passage.get("tokens") or {}).items():
            merged[token] = max(weight, merged.get(token, 0.0))
    return merged


def cosine(a: dict[str, float], b: dict[str, float]) -> float:
    dot = sum(w * b.get(k, 0.0) for k, w in a.items())
    na = sum(w * w for w in a.values()) ** 0.5
    nb = sum(w * w for w in b.values()) ** 0.5
    return dot / (na * nb) if na and nb else 0.0


def metric(service: Service, name: str, labels: dict[str, str] | None = None) -> float:
    value = service.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``sparse-ingest ARGS`` in a child process with ``env`` on top of ours."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
