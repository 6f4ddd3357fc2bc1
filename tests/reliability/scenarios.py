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

import aiohttp
from elasticsearch import AsyncElasticsearch
from reliability_harness import (
    CommitWatch,
    FaultResult,
    Log,
    Production,
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
from service.elastic import delete_index

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
    es_ca: Path | None = None

    def es(self) -> AsyncElasticsearch:
        return AsyncElasticsearch(
            self.es_url,
            basic_auth=self.es_auth,
            ca_certs=str(self.es_ca) if self.es_ca else None,
            request_timeout=60,
        )


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
    if env.es_ca:
        values["es_ca_certs"] = env.es_ca
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
        try:
            yield Run(topic, index, group, es, build_stream(spec))
        finally:  # keep the shared node lean (the figures are in the result)
            with contextlib.suppress(Exception):
                async with env.es() as fresh:
                    await asyncio.wait_for(delete_index(fresh, index), 30)


async def finish(
    env: Env, run: Run, result: FaultResult, stats: dict[str, int] | None = None, **verify_kw: Any
) -> FaultResult:
    """Check the index and the dead-letter topic; add Elasticsearch's write counters.

    With a client of its own: connections opened before a fault (a node stopped or frozen
    while they were idle) are not trusted. Bounded, so that a stuck node fails the scenario
    instead of hanging it."""
    async with env.es() as es:
        result.check, expected = await asyncio.wait_for(
            verify(
                env.kafka, es, run.topic, run.index, run.dlq, kafka_client=env.kafka_client,
                **verify_kw,
            ),
            300,
        )  # fmt: skip
        result.records = expected.records
        result.es_stats = add_stats(
            stats or {}, await asyncio.wait_for(index_stats(es, run.index), 60)
        )
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
    # Recovery of a kill: until the next commit, if the replacement made one before it was
    # killed in turn (otherwise the next kill's recovery covers it).
    ends = [*kill_times[1:], float("inf")]
    result.recovery_s = [
        r for t, end in zip(kill_times, ends, strict=True)
        if (r := watch.progress_after(t, settle=0.6)) is not None and t + r <= end
    ]  # fmt: skip
    result.extra["exit_code"] = code
    if code != 0:
        result.notes.append(f"last process exited {code} on SIGTERM")
    if len(result.recovery_s) < kills:
        result.notes.append(
            f"{kills - len(result.recovery_s)} replacement(s) killed before their first commit"
        )
    return await finish(env, run, result)


# ------------------------------------------------------------------------------ helpers
async def _when_committed(watch: CommitWatch, share: float, total: int, timeout: float) -> None:
    """Until the group has committed ``share`` of ``total`` records."""
    await watch.wait_progress(int(total * share) - 1, timeout)


def _stack(env: Env) -> LocalStack:
    if env.stack is None:
        raise RuntimeError("this scenario stops and starts services: give it its own stack")
    return env.stack


# ------------------------------------------------------------------------------ ES down
async def es_restart(
    env: Env,
    docs: int = 1500,
    outage_s: float = 30.0,
    stream_s: float | None = None,
    freeze: bool = False,
) -> FaultResult:
    """Elasticsearch really stopped (SIGTERM to the node) for ``outage_s`` mid-stream, then
    started again on the same data; the service (in-process, default backoff) keeps going.
    ``freeze``: SIGSTOP instead, SIGCONT after ``outage_s`` (a hung node: connections stay
    open, requests time out; the service gets a 2 s request timeout). The stream is produced
    evenly over ``stream_s`` (default: the outage + 30 s)."""
    spec = StreamSpec(docs=docs, seed=env.seed + 3)
    async with setup(env, "es-restart", spec) as run:
        stack = _stack(env)
        what = "frozen (SIGSTOP)" if freeze else "stopped"
        result = FaultResult(f"Elasticsearch {what} {outage_s:.0f}s")
        total = len(run.stream.records)
        rate = total / (stream_s or outage_s + 30.0)
        timeout = {"es_request_timeout_s": 2.0} if freeze else {}
        settings = settings_for(env, run.topic, run.index, run.group, **timeout)
        start = time.monotonic()
        async with (
            CommitWatch(env.kafka, run.group, run.topic, **env.kafka_client) as watch,
            in_process(env, settings) as svc,
        ):
            producing = asyncio.create_task(
                produce_stream(env.kafka, run.topic, run.stream.records, rate=rate)
            )
            try:
                await _when_committed(watch, 0.2, total, 120)
                before = await index_stats(run.es, run.index)
                if freeze:
                    stack.pause_service("elasticsearch")
                    stopped = time.monotonic()
                    await asyncio.sleep(outage_s)
                    stack.resume_service("elasticsearch")
                    before = {}  # the node kept its counters
                    await asyncio.to_thread(stack.wait_ready, "elasticsearch")
                else:
                    await asyncio.to_thread(stack.stop_service, "elasticsearch")
                    stopped = time.monotonic()
                    await asyncio.sleep(outage_s)
                    await asyncio.to_thread(stack.start_service, "elasticsearch")
                back = time.monotonic()
                result.extra["es_start_s"] = round(back - stopped - outage_s, 1)
                await producing
                await wait_committed(env.kafka, run.group, run.topic, 240, **env.kafka_client)
                await asyncio.sleep(0.5)
            finally:
                producing.cancel()
            result.extra["unavailable"] = metric(
                svc, "sparse_ingest_bulk_requests_total", {"outcome": "unavailable"}
            )
        result.wall_s = time.monotonic() - start
        if (r := watch.progress_after(back)) is not None:
            result.recovery_s = [r]
        back_how = "thawed" if freeze else f"took {result.extra['es_start_s']}s to be ready again"
        result.notes.append(
            f"Elasticsearch {back_how}; {result.extra['unavailable']:.0f} bulk attempts failed "
            "while it was away; recovery counted from ready (from SIGCONT when frozen)"
        )
        return await finish(env, run, result, before)


# ------------------------------------------------------------------------------ ES 429
async def _noise(
    es: AsyncElasticsearch, index: str, stop: asyncio.Event, stats: dict[str, int]
) -> None:
    """Bulk-write small documents as fast as possible (to fill Elasticsearch's write queue)."""
    body: list[dict[str, Any]] = []
    for i in range(300):
        body += [{"index": {"_index": index}}, {"n": i, "text": "noise " * 20}]
    while not stop.is_set():
        try:
            resp = await es.bulk(operations=body)
            stats["requests"] += 1
            stats["rejected_items"] += sum(
                1 for item in resp["items"] if item["index"].get("status") == 429
            )
        except Exception as exc:
            stats["rejected_requests"] += "429" in str(exc)
            await asyncio.sleep(0.01)


async def es_rejections(
    env: Env,
    docs: int = 1500,
    writers: int = 4,
    noise_s: float = 15.0,
    enough: int = 200,
    client_retries: int = 0,
    at_least: int = 0,
    max_noise_s: float = 120.0,
) -> FaultResult:
    """Elasticsearch rejecting bulk requests (429, es_rejected_execution_exception) because
    other writers keep its write queue full: the stack runs with ``thread_pool.write.size: 1``
    and ``queue_size: 1``. The noise lasts ``noise_s`` seconds or until the service has had
    ``enough`` items refused, and in any case until it has had ``at_least`` refused (at most
    ``max_noise_s``: on a busy machine the service may take longer to meet the noise); the
    service retries (``client_retries`` retries of the client's bulk helper, then its own
    backoff) until all is written."""
    spec = StreamSpec(docs=docs, seed=env.seed + 4)
    async with setup(env, "es-429", spec) as run:
        result = FaultResult("Elasticsearch 429s")
        noise_index = f"{run.index}-noise"
        stop = asyncio.Event()
        noise_stats = {"requests": 0, "rejected_items": 0, "rejected_requests": 0}
        settings = settings_for(
            env,
            run.topic,
            run.index,
            run.group,
            es_bulk_max_retries=client_retries,
            es_bulk_initial_backoff_s=0.2,
            es_unavailable_backoff_s=0.5,
            batch_max_docs=64,
        )
        pool_before = await _write_rejections(run.es)
        start = time.monotonic()
        async with env.es() as noise_es:
            await noise_es.indices.create(
                index=noise_index, settings={"number_of_replicas": 0, "refresh_interval": "30s"}
            )
            noise = [
                asyncio.create_task(_noise(noise_es, noise_index, stop, noise_stats))
                for _ in range(writers)
            ]
            try:
                await asyncio.sleep(0.5)  # the queue is busy before the stream starts
                async with in_process(env, settings) as svc:
                    producing = asyncio.create_task(
                        produce_stream(env.kafka, run.topic, run.stream.records, rate=None)
                    )
                    began = time.monotonic()
                    while (elapsed := time.monotonic() - began) < max_noise_s:
                        refused = sum(_labelled(svc, "sparse_ingest_bulk_item_errors").values())
                        if refused >= enough or (elapsed >= noise_s and refused >= at_least):
                            break
                        await asyncio.sleep(0.2)
                    result.extra["noise_s"] = round(time.monotonic() - start, 1)
                    stop.set()
                    await producing
                    await wait_committed(env.kafka, run.group, run.topic, 240, **env.kafka_client)
                    errors = _labelled(svc, "sparse_ingest_bulk_item_errors")
                    retries = metric(svc, "sparse_ingest_bulk_requests_total", {"outcome": "retry"})
            finally:
                stop.set()
                await asyncio.gather(*noise, return_exceptions=True)
                await delete_index(noise_es, noise_index)
        result.wall_s = time.monotonic() - start
        rejected = await _write_rejections(run.es) - pool_before
        result.extra.update(
            node_write_rejections=rejected,
            service_item_errors=errors,
            service_batch_retries=retries,
            noise=noise_stats,
        )
        result.notes.append(
            f"{writers} other writers for {result.extra['noise_s']}s: the write thread pool "
            f"rejected {rejected} requests; the service had {sum(errors.values()):.0f} items "
            f"refused after {client_retries} client retries ({', '.join(errors)}) and retried "
            "batches "
            f"{retries:.0f} times"
        )
        return await finish(env, run, result)


async def _write_rejections(es: AsyncElasticsearch) -> int:
    stats = await es.nodes.stats(metric="thread_pool")
    return sum(int(n["thread_pool"]["write"]["rejected"]) for n in stats["nodes"].values())


def _labelled(service: Service, family: str) -> dict[str, float]:
    return {
        ",".join(s.labels.values()): s.value
        for m in service.metrics.registry.collect()
        if m.name == family
        for s in m.samples
        if s.name.endswith("_total")
    }


# ------------------------------------------------------------------------------ Kafka down
async def kafka_restart(
    env: Env, docs: int = 1500, downtime_s: float = 10.0, stream_s: float | None = None
) -> FaultResult:
    """The Kafka broker stopped (controlled shutdown) mid-stream and started again on the same
    data ``downtime_s`` later, while the producer keeps sending and the service consumes.
    The stream is produced evenly over ``stream_s`` (default: the downtime + 30 s)."""
    spec = StreamSpec(docs=docs, seed=env.seed + 5)
    async with setup(env, "kafka-restart", spec) as run:
        stack = _stack(env)
        result = FaultResult(f"Kafka restarted ({downtime_s:.0f}s down)")
        total = len(run.stream.records)
        rate = total / (stream_s or downtime_s + 30.0)
        settings = settings_for(env, run.topic, run.index, run.group)
        start = time.monotonic()
        async with (
            CommitWatch(env.kafka, run.group, run.topic, **env.kafka_client) as watch,
            in_process(env, settings) as svc,
        ):
            production = Production()
            producing = asyncio.create_task(
                produce_stream(
                    env.kafka,
                    run.topic,
                    run.stream.records,
                    rate=rate,
                    state=production,
                    log=env.log,
                )
            )
            try:
                await _when_committed(watch, 0.2, total, 120)
                began = time.monotonic()
                result.extra["stop"] = await asyncio.to_thread(stack.stop_service, "kafka")
                await asyncio.sleep(downtime_s)
                await asyncio.to_thread(stack.start_service, "kafka")
                back = time.monotonic()
                result.extra["restart_s"] = round(back - began, 1)
                await producing
                await wait_committed(env.kafka, run.group, run.topic, 240, **env.kafka_client)
                await asyncio.sleep(0.5)
            finally:
                producing.cancel()
            result.extra["commit_failures"] = metric(
                svc, "sparse_ingest_commits_total", {"outcome": "failed"}
            )
        result.wall_s = time.monotonic() - start
        if (r := watch.progress_after(back)) is not None:
            result.recovery_s = [r]
        result.notes.append(
            f"broker {result.extra['stop']} and back in {result.extra['restart_s']}s; "
            f"{result.extra['commit_failures']:.0f} commits failed meanwhile; producer chunks "
            f"sent again: {production.resent_chunks}; recovery counted from ready"
        )
        return await finish(env, run, result)


# ------------------------------------------------------------------------------ group churn
async def group_churn(env: Env, docs: int = 1500, step_s: float = 3.0) -> FaultResult:
    """Consumers joining and leaving the group during the stream (in-process services, one
    group): A; +B; +C; -A; +D; -B; -C; D ends it. Every leave is a clean stop (drain, commit,
    leave the group); every change is a rebalance with partitions moving between members.
    Explicit versions (field and header) in this stream."""
    spec = StreamSpec(docs=docs, seed=env.seed + 6, explicit_versions=True)
    async with setup(env, "churn", spec) as run:
        result = FaultResult("group churn (4 joins, 3 leaves)")
        total = len(run.stream.records)
        plan = ["+A", "+B", "+C", "-A", "+D", "-B", "-C"]
        # One slice of the stream per membership, produced over ``step_s`` after the change
        # (so every configuration of the group sees records, however slow a join or leave).
        n = len(plan) + 1
        slices = [run.stream.records[i * total // n : (i + 1) * total // n] for i in range(n)]
        settings = settings_for(env, run.topic, run.index, run.group)
        members: dict[str, Service] = {}
        consumed: dict[str, float] = {}
        changes: list[float] = []
        start = time.monotonic()
        async with CommitWatch(env.kafka, run.group, run.topic, **env.kafka_client) as watch:
            try:
                for step, part in zip([*plan, ""], slices, strict=True):
                    name = step[1:]
                    changes.append(time.monotonic())
                    if step.startswith("+"):
                        members[name] = Service(settings, encoder=env.encoder)
                        await members[name].start()
                    elif step.startswith("-"):
                        svc = members.pop(name)
                        await svc.stop()
                        consumed[name] = _consumed(svc, run.topic)
                    await produce_stream(
                        env.kafka, run.topic, part, rate=len(part) / step_s, chunk=20
                    )
                await wait_committed(env.kafka, run.group, run.topic, 240, **env.kafka_client)
                await asyncio.sleep(0.5)
            finally:
                for name, svc in members.items():
                    await svc.stop()
                    consumed[name] = _consumed(svc, run.topic)
        result.wall_s = time.monotonic() - start
        result.recovery_s = [r for t in changes[1:-1] if (r := watch.progress_after(t)) is not None]
        result.extra["consumed"] = consumed
        result.notes.append(
            f"records consumed per member {consumed} (sum {sum(consumed.values()):.0f} for "
            f"{total} records: the excess was re-read after a rebalance); recovery = from a "
            "membership change to the next commit"
        )
        return await finish(env, run, result)


def _consumed(service: Service, topic: str) -> float:
    return metric(service, "sparse_ingest_documents_consumed_total", {"topic": topic})


# ------------------------------------------------------------------------------ security
@dataclass
class SecureRun:
    result: FaultResult
    logs: str
    metrics: str
    readyz: str
    search_status: int
    leaks: list[str]


async def secure_ingest(
    env: Env,
    label: str,
    service_kafka: str,
    service_overrides: dict[str, Any],
    secrets: list[str],
    docs: int = 300,
) -> SecureRun:
    """The real service (a subprocess) with the given security settings: a small stream with
    poison records goes through (the dead-letter producer uses the same security), /search
    works with the bearer token; then its whole log output, /metrics and /readyz are searched
    for every one of ``secrets``."""
    spec = StreamSpec(docs=docs, seed=env.seed + 7, poison=True)
    async with setup(env, "secure", spec) as run:
        result = FaultResult(label)
        token = "bearer-" + uuid.uuid4().hex
        secrets = [*secrets, token]
        overrides = dict(service_overrides)
        service_env_vars = service_env(
            service_kafka,
            overrides.pop("es_url", env.es_url),
            run.topic,
            run.index,
            run.group,
            model_dir=env.model_dir,
            http_bearer_token=token,
            **overrides,
        )
        service = ServiceProcess(service_env_vars, env.work / run.topic, "secure")
        start = time.monotonic()
        await produce_stream(env.kafka, run.topic, run.stream.records, **env.kafka_client)
        service.start()
        try:
            port = await service.http_port(120)
            await wait_committed(env.kafka, run.group, run.topic, 180, **env.kafka_client)
            base = f"http://127.0.0.1:{port}"
            await run.es.indices.refresh(index=run.index)
            writes_before = await index_stats(run.es, run.index)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/metrics") as r:
                    metrics = await r.text()
                async with http.get(f"{base}/readyz") as r:
                    readyz = await r.text()
                async with http.post(
                    f"{base}/search",
                    json={"query": "glacier", "mode": "hybrid"},
                    headers={"Authorization": f"Bearer {token}"},
                ) as r:
                    search_status = r.status
                async with http.post(f"{base}/search", json={"query": "wrong token"}) as r:
                    assert r.status == 401
                for body in ({"texts": ["a", "b"]}, {"text": "x", "query": True}):
                    async with http.post(
                        f"{base}/encode", json=body, headers={"Authorization": f"Bearer {token}"}
                    ) as r:
                        assert r.status == 200
            # Nothing the HTTP API did wrote to Elasticsearch.
            result.extra["http_writes"] = {
                k: v - writes_before[k]
                for k, v in (await index_stats(run.es, run.index)).items()
                if v != writes_before[k]
            }
        finally:
            code = await service.stop()
        result.wall_s = time.monotonic() - start
        result.extra["exit_code"] = code
        logs = service.all_logs()
        leaks = [
            f"{where}: {secret[:4]}..."
            for secret in secrets
            if secret
            for where, text in (("log", logs), ("metrics", metrics), ("readyz", readyz))
            if secret in text
        ]
        await finish(env, run, result)
        return SecureRun(result, logs, metrics, readyz, search_status, leaks)


# ------------------------------------------------------------------------------ soak
async def soak(
    env: Env,
    minutes: float = 2.0,
    rate: float = 50.0,
    warmup_s: float = 30.0,
    sample_s: float = 5.0,
    service_overrides: dict[str, Any] | None = None,
) -> FaultResult:
    """The real service (a subprocess) fed at a steady ``rate`` records/s for ``minutes``;
    its resident memory (VmRSS) sampled every ``sample_s``; at the end the index and the
    dead-letter topic are checked exactly like every other scenario. ``extra``: rss samples,
    rss at warm-up end and at the end, growth, catch-up time after the last record."""
    seconds = minutes * 60
    records_wanted = int(seconds * rate)
    spec = StreamSpec(docs=max(100, int(records_wanted / 1.6)), seed=env.seed + 8)
    async with setup(env, "soak", spec) as run:
        records = run.stream.records[:records_wanted]
        result = FaultResult(f"soak {minutes:g} min at {rate:g}/s")
        overrides = {"model_dir": env.model_dir, **(service_overrides or {})}
        service = ServiceProcess(
            service_env(env.kafka, env.es_url, run.topic, run.index, run.group, **overrides),
            env.work / run.topic,
            "soak",
        )
        samples: list[tuple[float, int]] = []
        start = time.monotonic()
        service.start()
        try:
            port = await service.http_port(120)
            producing = asyncio.create_task(
                produce_stream(env.kafka, run.topic, records, rate=rate, chunk=max(1, int(rate)))
            )
            while not producing.done():
                if not service.running():
                    raise AssertionError(f"the service died:\n{service.log_text()[-3000:]}")
                samples.append((time.monotonic() - start, service.rss_bytes()))
                await asyncio.wait([producing], timeout=sample_s)
            await producing
            produced_at = time.monotonic()
            await wait_committed(env.kafka, run.group, run.topic, 300, **env.kafka_client)
            result.extra["catch_up_s"] = round(time.monotonic() - produced_at, 1)
            samples.append((time.monotonic() - start, service.rss_bytes()))
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/metrics") as r,
            ):
                result.extra["metrics"] = _scalar_metrics(await r.text())
        finally:
            code = await service.stop()
        result.wall_s = time.monotonic() - start
        after_warmup = next((rss for t, rss in samples if t >= warmup_s), samples[0][1])
        end = samples[-1][1]
        result.extra.update(
            rss_samples=samples,
            rss_warm=after_warmup,
            rss_end=end,
            rss_max=max(rss for _, rss in samples),
            growth=end / after_warmup - 1 if after_warmup else 0.0,
            exit_code=code,
        )
        mb = 1024 * 1024
        result.notes.append(
            f"RSS {samples[0][1] / mb:.0f} MB at start, {after_warmup / mb:.0f} MB after "
            f"{warmup_s:.0f}s warm-up, {end / mb:.0f} MB at the end "
            f"({result.extra['growth']:+.1%}), max {result.extra['rss_max'] / mb:.0f} MB; "
            f"caught up {result.extra['catch_up_s']}s after the last record"
        )
        return await finish(env, run, result)


def _scalar_metrics(text: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus text page (name -> value)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out
