"""Ingest scaling across processes: 1 replica x 2 encoder threads against 2 replicas x 1 thread.

    .venv/bin/python bench/replicas_bench.py ../shared/eval/scifact --docs 3000 --rounds 2 \\
        --out results/scale

Both configurations run the real service as separate OS processes (``sparse-ingest run``,
settings as ``SPARSE_INGEST_*`` variables: ``ENCODER_THREADS``, its own ``KAFKA_GROUP_ID`` and
``ES_INDEX`` per run, a ``KAFKA_CLIENT_ID`` and ``HTTP_PORT`` per replica, everything else the
service's defaults) against a real Kafka and Elasticsearch (a ``LocalStack`` named
``replicas``, or ``--kafka``/``--es-url``):

1. one topic (``--partitions``, default 4) gets a backlog of ``--docs`` documents first: the
   BEIR folder's documents in file order, cycled with unique ids (``<id>-<cycle>``);
2. per run: a fresh consumer group and a fresh index; the replica processes are started
   together (same group: Kafka splits the partitions between them). The bench's Kafka runs
   with Kafka's default ``group.initial.rebalance.delay.ms`` of 3 s (``--rebalance-delay-ms``;
   the local stack's own default is 0, for fast tests), so that replicas starting together
   join one generation, as in a deployment; a replica that misses it joins a busy group, and
   the partitions move only once the first member has drained what it holds (eager
   rebalance: up to ``SHUTDOWN_TIMEOUT_S``), which the assignment history and the consumed
   counts per member show. A warm-up run of the first configuration on a topic of its own
   (``--warmup-docs``, default 300; not counted) comes first;
3. the run is timed from the **first record consumed** by any replica (its
   ``sparse_ingest_documents_consumed_total`` on ``/metrics``, polled every 0.1 s) until the
   group's committed offsets reach the topic's end offsets (polled every 0.25 s; the service
   commits every ``COMMIT_INTERVAL_MS``, 1 s, so the end is late by up to ~1.25 s in both
   configurations) **and** ``_count`` after a ``_refresh`` of the index is ``--docs``.
   Start-up (process start to the first record consumed: model load, Elasticsearch and Kafka
   checks, group join) is reported apart, and so is docs/s counted from the process start;
4. CPU seconds in that same interval: the replica processes (summed; ``/proc/<pid>/stat``),
   Elasticsearch's and Kafka's process groups, and this bench process; per document;
5. the group's members and assignments (``DescribeGroups``), sampled every second and at the
   end: whether every replica got partitions, and what each consumed (records consumed again
   after a rebalance, by the partition's next owner, are counted as ``re-consumed``);
6. every replica is stopped with SIGTERM and waited for (exit status reported; SIGKILL only
   after ``--stop-timeout``); the index is deleted before the next run.

The configurations (``--configs``, replicas x threads, default ``1x2,2x1``) alternate within a
round and the order flips every round (ABBA...), so that machine drift hits both; medians over
``--rounds`` and the ratio of the second to the first (also per round) are printed as a markdown
table and written to ``--out`` as ``replicas.json`` and ``replicas.md``. Replica logs go to a
temporary folder, printed at the start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from deploy.local.procs import cpu_seconds, free_port, group_members, tail
from encoder.cpu import available_cpus, cpu_name
from tooling.eval.beir import load_beir
from tooling.topics import create_topic, produce

ROOT = Path(__file__).resolve().parents[1]
STACK_NAME = "replicas"
FIRST_POLL_S = 0.1  # /metrics polled this often until the first record is consumed
OFFSETS_POLL_S = 0.25  # committed offsets polled this often
GROUP_POLL_S = 1.0  # the group's assignment sampled this often


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    replicas: int
    threads: int

    @property
    def name(self) -> str:
        return f"{self.replicas}x{self.threads}"

    @property
    def label(self) -> str:
        r, t = self.replicas, self.threads
        return f"{r} replica{'s' if r > 1 else ''} x {t} thread{'s' if t > 1 else ''}"

    @classmethod
    def parse(cls, text: str) -> Config:
        replicas, sep, threads = text.strip().partition("x")
        if not sep or not replicas.isdigit() or not threads.isdigit():
            raise argparse.ArgumentTypeError(f"expected REPLICASxTHREADS (e.g. 2x1), got {text!r}")
        return cls(int(replicas), int(threads))


@dataclass
class Context:
    """What every run shares: the stack, the topic and its backlog."""

    kafka: str
    es_url: str
    topic: str
    partitions: int
    docs: int
    end_offsets: dict[TopicPartition, int]
    groups: dict[str, int]  # stack service -> process group, for CPU accounting
    command: list[str]  # how a replica is started
    model_dir: Path | None
    log_dir: Path
    run_timeout_s: float
    stop_timeout_s: float
    http: aiohttp.ClientSession
    admin: AIOKafkaAdminClient


@dataclass
class Replica:
    index: int
    client_id: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    up_at: float | None = None  # /metrics first answered (the service started)
    first_at: float | None = None  # its first record consumed
    samples: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the backlog
def backlog(dataset: str, n: int) -> list[tuple[bytes, bytes]]:
    """``n`` records from the BEIR folder's documents, cycled, each with a unique id."""
    corpus = list(load_beir(dataset).corpus.items())
    if not corpus:
        raise SystemExit(f"{dataset}: no documents")
    out = []
    for i in range(n):
        doc_id, (title, text) = corpus[i % len(corpus)]
        uid = f"{doc_id}-{i // len(corpus)}"
        out.append((uid.encode(), orjson.dumps({"id": uid, "title": title, "body": text})))
    return out


async def end_offsets(kafka: str, topic: str, partitions: int) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


# ----------------------------------------------------------------------------- processes
def service_command() -> list[str]:
    """``sparse-ingest run`` from this interpreter's environment."""
    script = Path(sys.executable).parent / "sparse-ingest"
    if script.exists():
        return [str(script), "run"]
    return [sys.executable, "-m", "service.cli", "run"]


def spawn(ctx: Context, cfg: Config, run_id: str, i: int) -> Replica:
    """One replica as its own process (own session: a Ctrl-C of the bench does not reach it;
    the bench stops it with SIGTERM)."""
    client_id = f"{run_id}-replica{i}"
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "SPARSE_INGEST_KAFKA_BOOTSTRAP_SERVERS": ctx.kafka,
            "SPARSE_INGEST_KAFKA_TOPICS": ctx.topic,
            "SPARSE_INGEST_KAFKA_GROUP_ID": run_id,
            "SPARSE_INGEST_KAFKA_CLIENT_ID": client_id,
            "SPARSE_INGEST_ES_URL": ctx.es_url,
            "SPARSE_INGEST_ES_INDEX": run_id,
            "SPARSE_INGEST_ENCODER_THREADS": str(cfg.threads),
            "SPARSE_INGEST_HTTP_HOST": "127.0.0.1",
            "SPARSE_INGEST_HTTP_PORT": str(port),
        }
    )
    if ctx.model_dir is not None:
        env["SPARSE_INGEST_MODEL_DIR"] = str(ctx.model_dir)
    log_path = ctx.log_dir / f"{client_id}.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        ctx.command,
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Replica(i, client_id, port, proc, log_path, log_file)


def stop_replicas(replicas: list[Replica], timeout_s: float) -> list[dict[str, Any]]:
    """SIGTERM every replica still running, wait for each (SIGKILL after ``timeout_s``)."""
    t0 = time.perf_counter()
    for r in replicas:
        if r.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                r.proc.send_signal(signal.SIGTERM)
    out = []
    for r in replicas:
        killed = False
        try:
            r.proc.wait(timeout=max(0.1, timeout_s - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            killed = True
            r.proc.kill()
            r.proc.wait()
        r.log_file.close()
        out.append(
            {
                "replica": r.client_id,
                "exit_status": r.proc.returncode,
                "killed": killed,
                "stop_seconds": time.perf_counter() - t0,
            }
        )
    return out


def check_alive(replicas: list[Replica]) -> None:
    for r in replicas:
        if r.proc.poll() is not None:
            raise RuntimeError(
                f"replica {r.client_id} exited with status {r.proc.returncode}; its log "
                f"({r.log_path}):\n{tail(r.log_path)}"
            )


# ----------------------------------------------------------------------------- probes
def parse_metrics(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each named metric summed over its labels."""
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            with contextlib.suppress(ValueError, IndexError):
                out[name] += float(line.rsplit(" ", 1)[1])
    return out


METRICS = (
    "sparse_ingest_documents_consumed_total",
    "sparse_ingest_documents_indexed_total",
    "sparse_ingest_documents_dead_lettered_total",
)


async def scrape(http: aiohttp.ClientSession, r: Replica) -> dict[str, float] | None:
    """The replica's counters, or None while its HTTP server is not up."""
    try:
        async with http.get(
            f"http://127.0.0.1:{r.port}/metrics", timeout=aiohttp.ClientTimeout(total=2)
        ) as resp:
            if resp.status != 200:
                return None
            return parse_metrics(await resp.text(), METRICS)
    except (aiohttp.ClientError, TimeoutError):
        return None


def cpu_snapshot(replicas: list[Replica], groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far: the replicas (summed), each stack service's process group,
    this process."""
    t = os.times()
    snap = {"service": sum(cpu_seconds(r.proc.pid) for r in replicas)}
    for name, pgid in groups.items():
        snap[name] = sum(cpu_seconds(pid) for pid in group_members(pgid))
    snap["bench"] = t.user + t.system
    return snap


async def committed_done(ctx: Context, group: str) -> bool:
    """The group's committed offsets are at the topic's end offsets, every partition."""
    tps = list(ctx.end_offsets)
    got = await ctx.admin.list_consumer_group_offsets(group, partitions=tps)
    for tp, end in ctx.end_offsets.items():
        meta = got.get(tp)
        offset = meta.offset if meta is not None else -1
        if offset < end and end > 0:
            return False
    return True


async def es_count(ctx: Context, index: str) -> int:
    """Documents in ``index`` after a refresh (nested passages are not counted)."""
    async with ctx.http.post(f"{ctx.es_url}/{index}/_refresh") as resp:
        resp.raise_for_status()
    async with ctx.http.get(f"{ctx.es_url}/{index}/_count") as resp:
        resp.raise_for_status()
        return int((await resp.json())["count"])


async def es_delete(ctx: Context, alias: str) -> None:
    """The index behind ``alias`` (the service made ``<alias>-<fingerprint>``), and the alias."""
    async with ctx.http.get(f"{ctx.es_url}/_alias/{alias}") as resp:
        if resp.status == 404:
            return
        indices = list(await resp.json())
    if indices:
        async with ctx.http.delete(f"{ctx.es_url}/{','.join(indices)}") as resp:
            resp.raise_for_status()


async def assignment(ctx: Context, group: str) -> dict[str, list[int]]:
    """Each member's partitions, by client id (the coordinator's view)."""
    out: dict[str, list[int]] = {}
    for response in await ctx.admin.describe_consumer_groups([group]):
        for described in response.groups:
            if described[1] != group:
                continue
            for member in described[5]:
                client_id, raw = member[1], member[4]
                parts: list[int] = []
                if raw:
                    decoded = ConsumerProtocolMemberAssignment.decode(raw)
                    parts = sorted(tp.partition for tp in decoded.partitions())
                out[client_id] = parts
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- one run
async def one_run(ctx: Context, cfg: Config, run_id: str) -> dict[str, Any]:
    """Start ``cfg.replicas`` processes on a fresh group and index, time the backlog through
    them, stop them; the figures of the run."""
    replicas: list[Replica] = []
    stopped: list[dict[str, Any]] | None = None
    try:
        t_spawn = time.perf_counter()
        replicas = [spawn(ctx, cfg, run_id, i) for i in range(cfg.replicas)]
        t_first: float | None = None
        cpu_first: dict[str, float] = {}
        history: list[dict[str, Any]] = []  # assignment changes, seconds from the first record
        last_scrape = last_group = last_offsets = 0.0
        committed_at: float | None = None
        while True:
            await asyncio.sleep(FIRST_POLL_S)
            check_alive(replicas)
            now = time.perf_counter()
            if now - t_spawn > ctx.run_timeout_s:
                raise TimeoutError(f"{run_id}: not done {ctx.run_timeout_s:.0f}s after the start")
            waiting = [r for r in replicas if r.first_at is None]
            # until the first record: every 0.1 s; then every 0.5 s until each replica has
            # consumed (its own first record), then not at all (a scrape costs the replica CPU)
            if waiting and (t_first is None or now - last_scrape >= 0.5):
                last_scrape = now
                for r, got in zip(
                    waiting,
                    await asyncio.gather(*(scrape(ctx.http, r) for r in waiting)),
                    strict=True,
                ):
                    if got is None:
                        continue
                    r.up_at = r.up_at or now
                    if got["sparse_ingest_documents_consumed_total"] > 0:
                        r.first_at = now
                if t_first is None and any(r.first_at for r in replicas):
                    t_first = now
                    cpu_first = cpu_snapshot(replicas, ctx.groups)
            if t_first is None:
                continue
            if now - last_group >= GROUP_POLL_S:
                last_group = now
                current = await assignment(ctx, run_id)
                if not history or history[-1]["members"] != current:
                    history.append({"at_seconds": round(now - t_first, 2), "members": current})
            if committed_at is None and now - last_offsets >= OFFSETS_POLL_S:
                last_offsets = now
                if await committed_done(ctx, run_id):
                    committed_at = now
            if committed_at is not None:
                count = await es_count(ctx, run_id)
                if count >= ctx.docs:
                    break
        t_end = time.perf_counter()
        cpu_end = cpu_snapshot(replicas, ctx.groups)
        assert t_first is not None
        final = await assignment(ctx, run_id)
        totals = await asyncio.gather(*(scrape(ctx.http, r) for r in replicas))
        stopped = await asyncio.to_thread(stop_replicas, replicas, ctx.stop_timeout_s)
    finally:
        if stopped is None and replicas:
            await asyncio.to_thread(stop_replicas, replicas, ctx.stop_timeout_s)
    with contextlib.suppress(aiohttp.ClientError):
        await es_delete(ctx, run_id)

    seconds = t_end - t_first
    cpu = {k: cpu_end[k] - cpu_first.get(k, 0.0) for k in cpu_end}
    consumed = {
        r.client_id: (t or {}).get("sparse_ingest_documents_consumed_total")
        for r, t in zip(replicas, totals, strict=True)
    }
    indexed = {
        r.client_id: (t or {}).get("sparse_ingest_documents_indexed_total")
        for r, t in zip(replicas, totals, strict=True)
    }
    dead = sum((t or {}).get("sparse_ingest_documents_dead_lettered_total", 0.0) for t in totals)
    with_partitions = sum(1 for r in replicas if final.get(r.client_id))
    firsts = [r.first_at for r in replicas]
    return {
        "config": cfg.name,
        "run": run_id,
        "seconds": seconds,
        "docs_per_s": ctx.docs / seconds,
        "startup_seconds": t_first - t_spawn,
        "replicas_up_seconds": [
            None if r.up_at is None else r.up_at - t_spawn for r in replicas
        ],  # process start -> /metrics answers (service started)
        "replica_first_record_seconds": [
            None if r.first_at is None else r.first_at - t_spawn for r in replicas
        ],
        "seconds_from_start": t_end - t_spawn,
        "docs_per_s_from_start": ctx.docs / (t_end - t_spawn),
        "commit_seen_seconds": (committed_at or t_end) - t_first,
        "cpu_seconds": cpu,
        "cpu_ms_per_doc": {k: 1000 * v / ctx.docs for k, v in cpu.items()},
        "service_cpu_seconds_from_start": cpu_end["service"],
        "members_final": final,
        "members_with_partitions": with_partitions,
        "all_replicas_assigned": with_partitions == cfg.replicas and len(final) == cfg.replicas,
        "assignment_history": history,
        "consumed": consumed,
        "indexed": indexed,
        "re_consumed": sum(v or 0.0 for v in consumed.values()) - ctx.docs,
        "all_replicas_consumed": all(v for v in consumed.values()),
        # first record -> every replica has consumed (polled every 0.5 s); None: one never did
        "all_consuming_after_seconds": None
        if None in firsts
        else max(f for f in firsts if f is not None) - t_first,
        "dead_lettered": dead,
        "stopped": stopped,
        "logs": [str(r.log_path) for r in replicas],
    }


# ----------------------------------------------------------------------------- the bench
async def bench(args: argparse.Namespace, kafka: str, es_url: str, groups: dict[str, int]) -> Any:
    tag = time.strftime("%Y%m%d-%H%M%S")
    topic = f"replicas-bench-{tag}"
    print(f"producing {args.docs:,} documents to {topic} ({args.partitions} partitions) ...")
    t0 = time.perf_counter()
    await create_topic(kafka, topic, args.partitions)
    await produce(kafka, topic, backlog(args.dataset, args.docs))
    ends = await end_offsets(kafka, topic, args.partitions)
    if sum(ends.values()) != args.docs:
        raise RuntimeError(f"{topic} holds {sum(ends.values())} records, not {args.docs}")
    print(f"   {time.perf_counter() - t0:.1f} s; per partition: {sorted(ends.values())}")
    log_dir = Path(tempfile.mkdtemp(prefix="replicas-bench-"))
    print(f"replica logs: {log_dir}")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    runs: list[dict[str, Any]] = []
    try:
        async with aiohttp.ClientSession() as http:
            ctx = Context(
                kafka=kafka, es_url=es_url, topic=topic, partitions=args.partitions,
                docs=args.docs, end_offsets=ends, groups=groups, command=service_command(),
                model_dir=args.model, log_dir=log_dir, run_timeout_s=args.run_timeout,
                stop_timeout_s=args.stop_timeout, http=http, admin=admin,
            )  # fmt: skip
            if args.warmup_docs:
                # Elasticsearch's and the service's first minutes (JIT, page cache, the
                # model file) must not count against the first configuration only
                wtopic = f"{topic}-warmup"
                await create_topic(kafka, wtopic, args.partitions)
                await produce(kafka, wtopic, backlog(args.dataset, args.warmup_docs))
                warm = dataclasses.replace(
                    ctx,
                    topic=wtopic,
                    docs=args.warmup_docs,
                    end_offsets=await end_offsets(kafka, wtopic, args.partitions),
                )
                cfg = args.configs[0]
                print(f"warm-up: {cfg.label}, {args.warmup_docs} documents (not counted) ...")
                print("   " + run_line(await one_run(warm, cfg, f"{wtopic}-{cfg.name}")))
                await asyncio.sleep(args.pause)
            for rnd in range(args.rounds):
                order = args.configs if rnd % 2 == 0 else args.configs[::-1]
                for cfg in order:
                    run_id = f"{topic}-{cfg.name}-r{rnd}"
                    print(f"round {rnd + 1}/{args.rounds}: {cfg.label} ...", flush=True)
                    result = await one_run(ctx, cfg, run_id)
                    result["round"] = rnd
                    runs.append(result)
                    print("   " + run_line(result), flush=True)
                    await asyncio.sleep(args.pause)  # let merges and flushes of this run settle
    finally:
        await admin.close()
    return {
        "topic": topic,
        "end_offsets": {tp.partition: o for tp, o in ends.items()},
        "runs": runs,
    }


def run_line(r: dict[str, Any]) -> str:
    cpu = r["cpu_ms_per_doc"]
    stack = "  ".join(f"{k} {v:.1f}" for k, v in cpu.items() if k not in ("service", "bench"))
    return (
        f"{r['docs_per_s']:.1f} docs/s over {r['seconds']:.1f} s (start-up {r['startup_seconds']:.1f} s"
        f" apart); CPU ms/doc: service {cpu['service']:.1f}  {stack}; partitions "
        + " ".join(f"{k.rsplit('-', 1)[-1]}={v}" for k, v in r["members_final"].items())
        + "; consumed "
        + ", ".join(f"{v:.0f}" if v is not None else "?" for v in r["consumed"].values())
        + f" (re-consumed {r['re_consumed']:.0f}); exit "
        + ",".join(str(s["exit_status"]) for s in r["stopped"])
    )


def summarize(configs: list[Config], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per configuration and the ratios of the second configuration to the first."""
    out: dict[str, Any] = {}
    for cfg in configs:
        mine = [r for r in runs if r["config"] == cfg.name]
        if not mine:
            continue
        keys = mine[0]["cpu_ms_per_doc"].keys()
        out[cfg.name] = {
            "label": cfg.label,
            "replicas": cfg.replicas,
            "threads": cfg.threads,
            "rounds": len(mine),
            "docs_per_s": statistics.median(r["docs_per_s"] for r in mine),
            "docs_per_s_rounds": [r["docs_per_s"] for r in mine],
            "docs_per_s_from_start": statistics.median(r["docs_per_s_from_start"] for r in mine),
            "startup_seconds": statistics.median(r["startup_seconds"] for r in mine),
            "cpu_ms_per_doc": {
                k: statistics.median(r["cpu_ms_per_doc"][k] for r in mine) for k in keys
            },
            "all_replicas_assigned": all(r["all_replicas_assigned"] for r in mine),
            "all_replicas_consumed": all(r["all_replicas_consumed"] for r in mine),
            "members_with_partitions": [r["members_with_partitions"] for r in mine],
            "re_consumed": [r["re_consumed"] for r in mine],
            "clean_stops": all(
                s["exit_status"] == 0 and not s["killed"] for r in mine for s in r["stopped"]
            ),
        }
    ratios: dict[str, Any] = {}
    if len(configs) >= 2 and all(c.name in out for c in configs[:2]):
        a, b = configs[0].name, configs[1].name
        per_round = []
        for rnd in sorted({r["round"] for r in runs}):
            ra = [r for r in runs if r["round"] == rnd and r["config"] == a]
            rb = [r for r in runs if r["round"] == rnd and r["config"] == b]
            if ra and rb:
                per_round.append(rb[0]["docs_per_s"] / ra[0]["docs_per_s"])
        ratios = {
            "of": f"{b} / {a}",
            "docs_per_s": out[b]["docs_per_s"] / out[a]["docs_per_s"],
            "docs_per_s_per_round": per_round,
            "service_cpu_per_doc": out[b]["cpu_ms_per_doc"]["service"]
            / out[a]["cpu_ms_per_doc"]["service"],
        }
    return {"configs": out, "ratio": ratios}


def markdown(head: str, summary: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    stack = [k for k in runs[0]["cpu_ms_per_doc"] if k not in ("service", "bench")] if runs else []
    lines = [
        head,
        "",
        "| configuration | docs/s (median; rounds) | docs/s from process start | start-up s |"
        " CPU ms/doc: service | " + " | ".join(stack) + (" | " if stack else "")
        + "all (+ bench) | every replica got partitions / consumed | re-consumed |",
        "|" + "---|" * (8 + len(stack)),
    ]  # fmt: skip
    for name, c in summary["configs"].items():
        cpu = c["cpu_ms_per_doc"]
        everything = sum(v for k, v in cpu.items() if k != "bench")
        rounds = ", ".join(f"{v:.1f}" for v in c["docs_per_s_rounds"])
        lines.append(
            f"| {c['label']} ({name}) | **{c['docs_per_s']:.1f}** ({rounds}) |"
            f" {c['docs_per_s_from_start']:.1f} | {c['startup_seconds']:.1f} |"
            f" {cpu['service']:.1f} | " + "".join(f"{cpu[k]:.1f} | " for k in stack)
            + f"{everything:.1f} (+{cpu['bench']:.1f}) |"
            f" {'yes' if c['all_replicas_assigned'] else 'NO'}"
            f" / {'yes' if c['all_replicas_consumed'] else 'NO'}"
            f" ({', '.join(map(str, c['members_with_partitions']))} of {c['replicas']}) |"
            f" {', '.join(f'{v:.0f}' for v in c['re_consumed'])} |"
        )  # fmt: skip
    ratio = summary["ratio"]
    if ratio:
        per_round = ", ".join(f"{v:.2f}" for v in ratio["docs_per_s_per_round"])
        lines += [
            "",
            f"{ratio['of']}: docs/s **x{ratio['docs_per_s']:.2f}** (medians; per round:"
            f" {per_round}); service CPU per document x{ratio['service_cpu_per_doc']:.2f}.",
        ]
    lines += [
        "",
        "| round | configuration | seconds | docs/s | start-up s | all consuming after s |"
        " CPU s: service / "
        + " / ".join(stack) + " / bench | partitions per member | consumed per member |"
        " exit status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in runs:
        cpu = r["cpu_seconds"]
        parts = "; ".join(f"{k.rsplit('-', 1)[-1]}: {v}" for k, v in r["members_final"].items())
        consumed = ", ".join(f"{v:.0f}" if v is not None else "?" for v in r["consumed"].values())
        a = r["all_consuming_after_seconds"]
        after = "never" if a is None else f"{a:.1f}"
        lines.append(
            f"| {r['round'] + 1} | {r['config']} | {r['seconds']:.1f} | {r['docs_per_s']:.1f} |"
            f" {r['startup_seconds']:.1f} | {after} | {cpu['service']:.1f} / "
            + "".join(f"{cpu[k]:.1f} / " for k in stack)
            + f"{cpu['bench']:.1f} | {parts} | {consumed} |"
            f" {', '.join(str(s['exit_status']) for s in r['stopped'])} |"
        )  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", help="a BEIR folder (corpus.jsonl), e.g. ../shared/eval/scifact")
    parser.add_argument("--docs", type=int, default=3000, help="the backlog (default 3000)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument(
        "--configs",
        default="1x2,2x1",
        help="REPLICASxTHREADS, comma-separated; the ratio is the second over the first",
    )
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--model", type=Path, help="model folder (default: the service's)")
    parser.add_argument("--es-heap", default="1g", help="heap of the bench's Elasticsearch")
    parser.add_argument("--kafka", help="a Kafka to use (with --es-url; else a private stack)")
    parser.add_argument("--es-url", help="an Elasticsearch to use (with --kafka)")
    parser.add_argument(
        "--rebalance-delay-ms",
        type=int,
        default=3000,
        help="the bench's Kafka's group.initial.rebalance.delay.ms (Kafka's default: 3000)",
    )
    parser.add_argument(
        "--warmup-docs", type=int, default=300, help="an uncounted first run (0: none)"
    )
    parser.add_argument("--pause", type=float, default=5.0, help="seconds between runs")
    parser.add_argument("--run-timeout", type=float, default=1800.0)
    parser.add_argument("--stop-timeout", type=float, default=60.0, help="SIGTERM -> SIGKILL")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "scale")
    args = parser.parse_args(argv)
    args.configs = [Config.parse(c) for c in args.configs.split(",") if c.strip()]
    if bool(args.kafka) != bool(args.es_url):
        parser.error("--kafka and --es-url go together")
    command = "python bench/replicas_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    stack = None
    kafka, es_url = args.kafka, args.es_url
    groups: dict[str, int] = {}
    es_version = "(given)"
    try:
        if not kafka:
            from deploy.local import LocalStack

            stack = LocalStack(
                name=STACK_NAME,
                kafka_partitions=args.partitions,
                es_heap=args.es_heap,
                kafka_settings={"group.initial.rebalance.delay.ms": args.rebalance_delay_ms},
            )
            info = stack.up()
            kafka, es_url = info.kafka_bootstrap, info.es_url
            es_version = info.versions.get("elasticsearch", "?")
            groups = {s.service: s.pid for s in stack.status().services if s.pid}
        assert kafka
        assert es_url
        result = asyncio.run(bench(args, kafka, es_url, groups))
    finally:
        if stack is not None:
            stack.down(remove_data=True)
    wall = time.perf_counter() - started
    summary = summarize(args.configs, result["runs"])
    heap = args.es_heap if stack is not None else "(given)"
    head = (
        f"{cpu_name()}, {available_cpus()} cores; Kafka ({args.partitions} partitions) +"
        f" Elasticsearch {es_version} (heap {heap}) on the same cores; model"
        f" {args.model or 'the default'}; {args.docs:,} documents of {Path(args.dataset).name};"
        f" `{command}`, {wall:,.0f} s in all"
    )
    text = markdown(head, summary, result["runs"])
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replicas.md").write_text(text + "\n")
    payload = {
        "setup": head,
        "command": command,
        "cpu": cpu_name(),
        "cores": available_cpus(),
        "docs": args.docs,
        "partitions": args.partitions,
        "rounds": args.rounds,
        "elasticsearch": es_version,
        "es_heap": heap,
        "wall_seconds": wall,
        **summary,
        **result,
    }
    (args.out / "replicas.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
