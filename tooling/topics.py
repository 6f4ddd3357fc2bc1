"""Kafka topic helpers for the demo, the eval, the benchmarks and the tests: create a topic,
produce records and wait for the broker's acknowledgement, wait until a consumer group has
committed a whole topic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic


async def create_topic(kafka: str, topic: str, partitions: int = 4) -> None:
    """Create a topic (replication 1: the local stack's single broker)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def produce(
    kafka: str, topic: str, records: Sequence[tuple[bytes | None, bytes | None]]
) -> None:
    """Send (key, value) records and wait until the broker acknowledged all (None value: tombstone)."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all", linger_ms=20)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def wait_committed(
    kafka: str, group: str, topic: str, partitions: int, timeout_s: float
) -> None:
    """Until the group's committed offsets reach the topic's end offsets (as Kafka says)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await consumer.start()
    await admin.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while True:
            got = await admin.list_consumer_group_offsets(group, partitions=tps)
            if all(got.get(tp) is not None and got[tp].offset >= ends[tp] for tp in tps):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"group {group} did not commit {topic} within {timeout_s:.0f}s")
            await asyncio.sleep(0.25)
    finally:
        await admin.close()
        await consumer.stop()
