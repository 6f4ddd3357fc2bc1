"""Ingest throughput while a client floods ``POST /encode``, and the API's latency meanwhile.

For each case, a fresh topic gets ``--docs`` documents (a backlog), the service starts in-process
against the given Kafka and Elasticsearch, and ingest docs/s is timed from the first record
consumed until every document is indexed. Cases:

- ``alone``: nothing else;
- ``probe``: one client, one query encode at a time (query latency under full ingest);
- ``flood-B``: ``--workers`` clients each send the next request as soon as the last is
  answered, and a refused one after ``--retry-s`` (default 0: ignoring ``Retry-After``, the worst
  client); ``--flood queries`` (default): query encodes; ``mixed``: half of the clients send a
  document request of 24 texts of ~400 tokens (5 inference calls) instead; with priority burst B
  for each B of ``--bursts`` (default ``4,1000000000``: the default, and the old rule where API
  calls always go first).

The clients run in a subprocess (their own interpreter, as a real client would), for at most
``--max-seconds`` per case. Report: docs/s, /encode p50/p99 of the answered (200) query
requests, answered and refused (429) counts, and the encoder gate's statistics (the longest run of
API calls that passed a waiting ingest call, the ingest calls the burst rule put first).

    .venv/bin/python bench/http_flood_bench.py --kafka 127.0.0.1:9092 \\
        --es-url http://127.0.0.1:9200 [--docs 4000] [--workers 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka.admin import AIOKafkaAdminClient
from elasticsearch import AsyncElasticsearch

from encoder import SparseEncoder, default_model_dir
from encoder.gate import SessionGate
from service.app import Service
from service.config import load_settings
from service.elastic import delete_index
from tooling.demo.corpus import stdlib_documents
from tooling.topics import create_topic, produce

QUERIES = [
    "how do I read a file line by line",
    "parse command line arguments",
    "decimal rounding modes",
    "run coroutines concurrently and wait for all",
    "compress data with bz2",
]


LONG_TEXT = " ".join(["the glacier carved a valley into the mountain over many winters"] * 29)


async def _client(
    url: str, workers: int, stop_file: Path, max_seconds: float, retry_s: float, mixed: bool
) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + max_seconds

    async def worker(n: int, http: aiohttp.ClientSession) -> None:
        i = n
        while time.monotonic() < deadline and not stop_file.exists():
            body: dict[str, Any] = {"text": QUERIES[i % len(QUERIES)], "query": True}
            if mixed and n % 2:
                body = {"texts": [LONG_TEXT] * 24}
            i += 1
            t0 = time.perf_counter()
            async with http.post(url, json=body) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
                if r.status == 200 and "query" in body:
                    latencies.append(time.perf_counter() - t0)
            if r.status == 429 and retry_s:
                await asyncio.sleep(retry_s)
            if workers == 1:
                await asyncio.sleep(0.05)  # the probe: a light, steady user

    connector = aiohttp.TCPConnector(limit=workers)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(worker(n, http) for n in range(workers)))
    return {"latencies": latencies, "statuses": statuses}


async def _clean_up(args: argparse.Namespace, topic: str) -> None:
    es = AsyncElasticsearch(args.es_url)
    try:
        await delete_index(es, topic)
    finally:
        await es.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=args.kafka)
    await admin.start()
    try:
        await admin.delete_topics([topic, f"{topic}.dlq"])
    except Exception:  # the dead-letter topic may not exist
        await admin.delete_topics([topic])
    finally:
        await admin.close()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)


async def run_case(
    args: argparse.Namespace, encoder: SparseEncoder, name: str, workers: int, burst: int
) -> dict[str, Any]:
    topic = f"flood-bench-{name}-{uuid.uuid4().hex[:8]}"
    docs = list(stdlib_documents(args.docs))
    await create_topic(args.kafka, topic, partitions=1)
    await produce(args.kafka, topic, [(d["id"].encode(), orjson.dumps(d)) for d in docs])
    settings = load_settings(
        kafka_bootstrap_servers=args.kafka,
        kafka_topics=[topic],
        kafka_group_id=f"{topic}-group",
        es_url=args.es_url,
        es_index=topic,
        http_port=0,
        encoder_priority_burst=burst,
        skip_unchanged=False,
    )
    encoder._gate = SessionGate(burst)  # fresh statistics for this case
    service = Service(settings, encoder=encoder)
    stop_file = Path(f"/tmp/{topic}.stop")
    await service.start()
    client = None
    try:
        url = f"http://127.0.0.1:{service.http_port}/encode"
        if workers:
            client = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--client", url, "--workers", str(workers),
                "--stop-file", str(stop_file), "--max-seconds", str(args.max_seconds),
                "--retry-s", str(args.retry_s), "--flood", args.flood,
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip

        def sample(name: str) -> float:
            value = service.metrics.registry.get_sample_value(name, {"topic": topic})
            if value is None:
                value = service.metrics.registry.get_sample_value(name)
            return value or 0.0

        deadline = time.monotonic() + args.max_seconds
        while True:  # polls the service's own counters, as Prometheus would
            if sample("sparse_ingest_documents_consumed_total") > 0:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{topic}: nothing consumed in {args.max_seconds} s")
            await asyncio.sleep(0.02)
        t0 = time.monotonic()
        while True:
            if sample("sparse_ingest_documents_indexed_total") >= len(docs):
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        took = time.monotonic() - t0
        indexed = sample("sparse_ingest_documents_indexed_total")
    finally:
        stop_file.touch()
        result: dict[str, Any] = {"latencies": [], "statuses": {}}
        if client is not None:
            out, _ = await asyncio.wait_for(client.communicate(), 60)
            result = json.loads(out)
        stop_file.unlink(missing_ok=True)
        await service.stop()
        await _clean_up(args, topic)
    lat = result["latencies"]
    gate = encoder._gate.snapshot()
    return {
        "case": name,
        "workers": workers,
        "burst": burst,
        "docs_indexed": int(indexed),
        "seconds": round(took, 2),
        "docs_per_s": round(indexed / took, 1) if took else None,
        "encode_p50_ms": _pct(lat, 0.5),
        "encode_p99_ms": _pct(lat, 0.99),
        "answered": len(lat),
        "statuses": result["statuses"],
        "gate_longest_pass": gate.longest_pass,
        "gate_ingest_turns_forced": gate.ingest_turns_forced,
    }


async def main(args: argparse.Namespace) -> None:
    encoder = SparseEncoder.load(args.model)
    cases = [("alone", 0, 4), ("probe", 1, 4)]
    cases += [(f"flood-{b}", args.workers, b) for b in map(int, args.bursts.split(","))]
    results = []
    for _ in range(args.rounds):
        for name, workers, burst in cases:
            res = await run_case(args, encoder, name, workers, burst)
            print(json.dumps(res), flush=True)
            results.append(res)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    for name, _, _ in cases:
        rates = [r["docs_per_s"] for r in results if r["case"] == name and r["docs_per_s"]]
        p50s = [r["encode_p50_ms"] for r in results if r["case"] == name and r["encode_p50_ms"]]
        print(
            f"{name:16s} docs/s median {statistics.median(rates) if rates else None}  "
            f"/encode p50 median {statistics.median(p50s) if p50s else None} ms"
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kafka", default="127.0.0.1:9092")
    p.add_argument("--es-url", default="http://127.0.0.1:9200")
    p.add_argument("--model", default=None)
    p.add_argument("--docs", type=int, default=4000)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--bursts", default="4,1000000000")
    p.add_argument("--retry-s", type=float, default=0.0)
    p.add_argument("--flood", choices=("queries", "mixed"), default="queries")
    p.add_argument("--json", default=None)
    p.add_argument("--client", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stop-file", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.client:
        mixed = a.flood == "mixed"
        res = asyncio.run(
            _client(a.client, a.workers, Path(a.stop_file), a.max_seconds, a.retry_s, mixed)
        )
        sys.stdout.write(json.dumps(res))
    else:
        a.model = a.model or str(default_model_dir())
        asyncio.run(main(a))
