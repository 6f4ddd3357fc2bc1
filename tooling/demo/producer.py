"""Publish the demo stream (standard-library doc paragraphs) to a Kafka topic.

Used by the compose stack's producer container:
``python -m tooling.demo.producer --bootstrap kafka:9092 --topic documents [--rate 50]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson
from aiokafka import AIOKafkaProducer

from tooling.demo.corpus import stdlib_documents


async def produce(bootstrap: str, topic: str, rate: float, limit: int | None) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    sent = 0
    try:
        for document in stdlib_documents(limit):
            await producer.send(topic, key=document["id"].encode(), value=orjson.dumps(document))
            sent += 1
            if rate > 0:
                await asyncio.sleep(1.0 / rate)
        await producer.flush()
    finally:
        await producer.stop()
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="documents")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="documents per second (0: as fast as possible)"
    )
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    sent = asyncio.run(produce(args.bootstrap, args.topic, args.rate, args.limit))
    print(f"sent {sent} documents to {args.topic}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
