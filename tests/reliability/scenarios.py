"""The fault scenarios, each a coroutine returning a :class:`FaultResult`.

Every scenario makes its own topic, index and group, runs a known stream through the real
service while the fault happens, waits until the group has committed the whole topic, and
checks the index and the dead-letter topic exactly (:func:`reliability_harness.verify`).
The CI tests (``tests/reliability/``) call them with small streams; ``bench/reliability.py``
with ~10,000 documents.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elasticsearch import AsyncElasticsearch
from reliability_harness import (
    CommitWatch,
    FaultResult,
    Log,
    ServiceProcess,
    StreamSpec,
    add_stats,
    build_stream,
    create_index,
    create_topic,
    index_stats,
    produce_stream,
    service_env,
    verify,
    wait_committed,
)

from deploy.local import LocalStack
from service.app import Service
from service.config import Settings, load_settings

MB = 1024 * 1024


@dataclass
class Env:
    """Where a scenario runs: the stack, a work dir, the model, a shared encoder."""

    kafka: str
    es_url: str
    work: Path
    model_dir: Path
    encoder: Any = None  # for in-process services (None: each loads the model)
    stack: LocalStack | None = None  # a stack this run owns: faults may stop its services
    es_auth: tuple[str, str] | None = None
    log: Log = print
    seed: int = 1
    kafka_client: dict[str, Any] = field(default_factory=dict)  # security for our own clients

    def es(self) -> AsyncElasticsearch:
        return AsyncElasticsearch(self.es_url, basic_auth=self.es_auth, request_timeout=60)


def names(fault: str) -> tuple[str, str, str]:
    suffix = uuid.uuid4().hex[:8]
    return f"rel-{fault}-{suffix}", f"rel-{fault}-{suffix}", f"rel-{fault}-{suffix}-group"


def settings_for(env: Env, topic: str, index: str, group: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": env.kafka,
        "kafka_topics": [topic],
        "kafka_group_id": group,
        "es_url": env.es_url,
        "es_index": index,
        "http_port": 0,
        "batch_linger_ms": 50,
        "commit_interval_ms": 200,
        "kafka_session_timeout_ms": 6000,
        "model_dir": env.model_dir,
    }
    if env.es_auth:
        values["es_username"], values["es_password"] = env.es_auth
    values.update(overrides)
    return load_settings(**values)


@contextlib.asynccontextmanager
async def in_process(env: Env, settings: Settings) -> AsyncIterator[Service]:
    service = Service(settings, encoder=env.encoder)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def metric(service: Service, name: str, labels: dict[str, str] | None = None) -> float:
    value = service.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


@dataclass
class Run:
    topic: str
    index: str
    group: str
    es: AsyncElasticsearch
    stream: Any

    @property
    def dlq(self) -> str:
        return f"{self.topic}.dlq"


@contextlib.asynccontextmanager
async def setup(env: Env, fault: str, spec: StreamSpec, **topic_config: str) -> AsyncIterator[Run]:
    """A fresh topic (4 partitions), index and group, and the known stream."""
    topic, index, group = names(fault)
    await create_topic(env.kafka, topic, 4, topic_config or None, **env.kafka_client)
    async with env.es() as es:
        await create_index(es, index)
        yield Run(topic, index, group, es, build_stream(spec))


async def finish(
    env: Env, run: Run, result: FaultResult, stats: dict[str, int] | None = None, **verify_kw: Any
) -> FaultResult:
    """Check the index and the dead-letter topic; add Elasticsearch's write counters."""
    result.check, expected = await verify(
        env.kafka, run.es, run.topic, run.index, run.dlq, kafka_client=env.kafka_client, **verify_kw
    )
    result.records = expected.records
    result.es_stats = add_stats(stats or {}, await index_stats(run.es, run.index))
    env.log(result.summary())
    return result


# ------------------------------------------------------------------------------ poison input
async def poison(env: Env, docs: int = 1000, huge: bool = True) -> FaultResult:
    """Bad records of every kind in the stream (plus a 10 MB one): each ends in the dead-letter
    topic with its reason and original bytes, and the good documents around them all land."""
    spec = StreamSpec(docs=docs, seed=env.seed, poison=True, huge=huge)
    # The broker refuses records over ~1 MB unless the topic allows more.
    async with setup(env, "poison", spec, **{"max.message.bytes": str(12 * MB)}) as run:
        return await _poison(env, run)


async def _poison(env: Env, run: Run) -> FaultResult:
    start = time.monotonic()
    result = FaultResult("poison input")
    await produce_stream(
        env.kafka, run.topic, run.stream.records, max_request_size=12 * MB, **env.kafka_client
    )
    settings = settings_for(env, run.topic, run.index, run.group)
    async with in_process(env, settings) as svc:
        await wait_committed(env.kafka, run.group, run.topic, 180, **env.kafka_client)
        result.extra["dead_lettered"] = {
            s.labels["reason"]: s.value
            for m in svc.metrics.registry.collect()
            if m.name == "sparse_ingest_documents_dead_lettered"
            for s in m.samples
            if s.name.endswith("_total")
        }
    result.wall_s = time.monotonic() - start
    return await finish(env, run, result)


# ------------------------------------------------------------------------------ SIGKILL
async def sigkill(
    env: Env, docs: int = 1500, kills: int = 10, seconds_per_kill: float = 6.0
) -> FaultResult:
    """The service (a real ``sparse-ingest run`` process) killed with SIGKILL at a random
    point after it got its partitions, ``kills`` times, restarted at once each time, while
    the stream is produced at a steady rate."""
    async with setup(env, "sigkill", StreamSpec(docs=docs, seed=env.seed)) as run:
        return await _sigkill(env, run, kills, seconds_per_kill)


async def _sigkill(env: Env, run: Run, kills: int, seconds_per_kill: float) -> FaultResult:
    rng = random.Random(env.seed)
    topic, index, group, stream = run.topic, run.index, run.group, run.stream
    result = FaultResult(f"SIGKILL x{kills}")
    service = ServiceProcess(
        service_env(env.kafka, env.es_url, topic, index, group, model_dir=env.model_dir),
        env.work / topic,
        "service",
    )
    rate = len(stream.records) / max(1.0, kills * seconds_per_kill)
    start = time.monotonic()
    kill_times: list[float] = []
    async with CommitWatch(env.kafka, group, topic, **env.kafka_client) as watch:
        producing = asyncio.create_task(
            produce_stream(env.kafka, topic, stream.records, rate=rate, **env.kafka_client)
        )
        service.start()
        try:
            for _ in range(kills):
                await service.wait_log(r"assigned \[", timeout=120)
                await asyncio.sleep(rng.uniform(0.05, 1.5))
                kill_times.append(time.monotonic())
                service.kill()
                service.start()
            await producing
            await wait_committed(env.kafka, group, topic, 240, **env.kafka_client)
            await asyncio.sleep(0.5)  # one more sample of the watch
        finally:
            producing.cancel()
            code = await service.stop()
    result.wall_s = time.monotonic() - start
    result.recovery_s = [r for t in kill_times if (r := watch.progress_after(t)) is not None]
    result.extra["exit_code"] = code
    if code != 0:
        result.notes.append(f"last process exited {code} on SIGTERM")
    if len(result.recovery_s) < kills:
        result.notes.append(
            f"{kills - len(result.recovery_s)} kill(s) with no commit after them (nothing left)"
        )
    return await finish(env, run, result)
