"""End-to-end ingest throughput and latency through real Kafka and Elasticsearch.

For each model, in one run (this machine is shared and noisy: compare the ratios; ``--rounds``
pairs of 1 and 2 alternate and the median ratio is reported):

1. encoder only: the texts encoded in service-sized batches, nothing else (docs/s, tokens/s);
2. end to end: the same texts produced to a topic first (a backlog), then the service started
   in-process; time from the first record consumed until every record is written and committed
   (docs/s), and the ratio to (1) — the pipeline should hide Kafka and Elasticsearch (target
   >= 0.9). Start-up (group join, index creation) is reported apart, and so is the CPU time each
   process used meanwhile (this process, Elasticsearch, Kafka: on 2 shared cores the services'
   own work is what the encoder loses), and how long a query waits for the encoder meanwhile;
3. latency: a producer at a fixed fraction (default 0.5) of the end-to-end rate for a while,
   with a 1 s refresh; end-to-end lag (Kafka record timestamp -> Elasticsearch ack) p50/p99.

    .venv/bin/python bench/pipeline_bench.py --corpus ../shared/eval/scifact \\
        --model ~/.cache/sparse-ingest/models/splade-tiny-msmarco [--model OTHER_DIR] \\
        [--docs 2000] [--json results/pipeline.json]

Starts its own local stack (``deploy.local``) unless ``--kafka``/``--es-url`` are given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from deploy.local.procs import cpu_seconds, group_members
from encoder import EncodeStats, SparseEncoder
from service.app import Service
from service.config import load_settings
from tooling.demo.corpus import stdlib_documents
from tooling.topics import create_topic, produce


def load_corpus(path: str | None, limit: int) -> list[dict[str, str]]:
    if path is None:
        return list(stdlib_documents(limit))
    docs = []
    with (Path(path) / "corpus.jsonl").open() as f:
        for line in f:
            d = json.loads(line)
            docs.append(
                {"id": str(d["_id"]), "title": d.get("title", ""), "body": d.get("text", "")}
            )
            if len(docs) >= limit:
                break
    return docs


def encoder_only(encoder: SparseEncoder, texts: list[str], batch_docs: int) -> dict[str, float]:
    stats = EncodeStats()
    start = time.perf_counter()
    for i in range(0, len(texts), batch_docs):
        encoder.encode_documents(texts[i : i + batch_docs], stats)
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "docs_per_s": len(texts) / elapsed,
        "tokens_per_s": stats.tokens / elapsed,
        "tokens": stats.tokens,
    }


def bench_settings(kafka: str, es_url: str, model_dir: Path, topic: str, **extra: Any) -> Any:
    """The service's settings for one run: its own topic, group and index; 1 s refresh."""
    return load_settings(
        kafka_bootstrap_servers=kafka,
        kafka_topics=[topic],
        kafka_group_id=topic,
        es_url=es_url,
        es_index=topic,
        model_dir=model_dir,
        http_port=0,
        es_refresh_interval="1s",
        **extra,
    )


def records(docs: list[dict[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(d["id"].encode(), orjson.dumps(d)) for d in docs]


async def produce_at_rate(
    kafka: str, topic: str, recs: list[tuple[bytes, bytes]], rate: float
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all", linger_ms=5)
    await producer.start()
    try:
        start = time.monotonic()
        for i, (k, v) in enumerate(recs):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await producer.send(topic, key=k, value=v)
        await producer.flush()
    finally:
        await producer.stop()


def _sample(svc: Service, name: str, labels: dict[str, str] | None = None) -> float:
    return svc.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def wait_done(
    svc: Service, topic: str, expected: int, limit_s: float = 1800
) -> dict[str, float]:
    """Wait until every record is consumed, written and committed; perf_counter times of the
    first record consumed and of the end."""
    deadline = time.monotonic() + limit_s
    first = None
    while time.monotonic() < deadline:
        consumed = _sample(svc, "sparse_ingest_documents_consumed_total", {"topic": topic})
        if consumed and first is None:
            first = time.perf_counter()
        if consumed >= expected and svc.pipeline is not None and svc.pipeline.idle:
            await svc.pipeline.commit()
            end = time.perf_counter()
            return {"first": first or end, "end": end}
        await asyncio.sleep(0.02)
    raise TimeoutError(f"not done after {limit_s}s")


async def probe_queries(encoder: SparseEncoder, stop: asyncio.Event, out: list[float]) -> None:
    """A query encoded every 0.5 s while the service ingests: how long /search waits for the
    encoder under full ingest load."""
    while not stop.is_set():
        t = time.perf_counter()
        await encoder.aencode_queries(["what causes inflammation of the airways"])
        out.append(time.perf_counter() - t)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


def _group_tasks(pgid: int) -> list[int]:
    """Every thread of every process in a process group."""
    tids = []
    for pid in group_members(pgid):
        with contextlib.suppress(OSError):  # a process that just ended
            tids += [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    return tids


def pin(groups: dict[str, int], stack_cpus: set[int]) -> set[int]:
    """Pin the stack's services (every thread) to ``stack_cpus`` and this process to the other
    CPUs; returns the CPUs left to this process."""
    ours = os.sched_getaffinity(0) - stack_cpus
    if not ours or not stack_cpus <= os.sched_getaffinity(0):
        raise SystemExit(f"--stack-cpus {sorted(stack_cpus)}: leaves no CPU for the encoder")
    for pgid in groups.values():
        for tid in _group_tasks(pgid):
            with contextlib.suppress(OSError):  # a thread that just ended
                os.sched_setaffinity(tid, stack_cpus)
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        os.sched_setaffinity(int(task.name), ours)
    return ours


def cpu_snapshot(groups: dict[str, int]) -> dict[str, float]:
    t = os.times()
    snap = {"this process": t.user + t.system}
    for name, pgid in groups.items():
        # the service's whole process group: Elasticsearch's launcher and server JVMs
        snap[name] = sum(cpu_seconds(pid) for pid in group_members(pgid))
    return snap


def lag_quantiles(svc: Service, qs: tuple[float, ...]) -> dict[str, float | None]:
    """Quantiles of the end-to-end lag histogram, interpolated inside the bucket."""
    buckets: list[tuple[float, float]] = []
    for family in svc.metrics.registry.collect():
        for s in family.samples:
            if s.name == "sparse_ingest_end_to_end_lag_seconds_bucket":
                buckets.append((float(s.labels["le"]), s.value))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    out: dict[str, float | None] = {}
    for q in qs:
        if not total:
            out[f"p{int(q * 100)}"] = None
            continue
        target, prev_le, prev_n = q * total, 0.0, 0.0
        value = None
        for le, n in buckets:
            if n >= target:
                if le == float("inf"):
                    value = prev_le
                else:
                    frac = (target - prev_n) / (n - prev_n) if n > prev_n else 1.0
                    value = prev_le + frac * (le - prev_le)
                break
            prev_le, prev_n = le, n
        out[f"p{int(q * 100)}"] = value
    return out


async def end_to_end(
    kafka: str,
    es_url: str,
    model_dir: Path,
    encoder: SparseEncoder,
    docs: list[dict[str, str]],
    tag: str,
    groups: dict[str, int],
) -> dict[str, Any]:
    topic = f"bench-e2e-{tag}-{int(time.time())}"
    await create_topic(kafka, topic)
    await produce(kafka, topic, records(docs))
    settings = bench_settings(kafka, es_url, model_dir, topic)
    svc = Service(settings, encoder=encoder)
    start = time.perf_counter()
    await svc.start()
    started = time.perf_counter()
    cpu0 = cpu_snapshot(groups)
    stop, query_seconds = asyncio.Event(), list[float]()
    prober = asyncio.create_task(probe_queries(encoder, stop, query_seconds))
    times = await wait_done(svc, topic, len(docs))
    cpu1 = cpu_snapshot(groups)
    stop.set()
    await prober
    elapsed = times["end"] - times["first"]
    busy = _sample(svc, "sparse_ingest_encoder_busy_seconds_total")
    stages = {
        stage: _sample(svc, "sparse_ingest_stage_duration_seconds_sum", {"stage": stage})
        for stage in ("prepare", "tokenize", "inference", "encode", "bulk")
    }
    await svc.stop()
    return {
        "seconds": elapsed,
        "docs_per_s": len(docs) / elapsed,
        "startup_seconds": times["first"] - start,
        "service_start_seconds": started - start,
        "seconds_from_start": times["end"] - start,
        "encoder_busy_fraction": busy / elapsed,
        "cpu_seconds": {k: cpu1[k] - cpu0[k] for k in cpu0},
        "query_encode_seconds": {
            "n": len(query_seconds),
            "p50": statistics.median(query_seconds) if query_seconds else None,
            "max": max(query_seconds, default=None),
        },
        **{f"stage_{k}_seconds": v for k, v in stages.items()},
    }


async def latency(
    kafka: str,
    es_url: str,
    model_dir: Path,
    encoder: SparseEncoder,
    docs: list[dict[str, str]],
    rate: float,
    tag: str,
) -> dict[str, Any]:
    topic = f"bench-lat-{tag}-{int(time.time())}"
    await create_topic(kafka, topic)
    settings = bench_settings(kafka, es_url, model_dir, topic, batch_linger_ms=50)
    svc = Service(settings, encoder=encoder)
    await svc.start()
    await asyncio.sleep(2)  # group join
    start = time.perf_counter()
    await produce_at_rate(kafka, topic, records(docs), rate)
    await wait_done(svc, topic, len(docs))
    elapsed = time.perf_counter() - start
    quantiles = lag_quantiles(svc, (0.5, 0.9, 0.99))
    await svc.stop()
    return {"offered_docs_per_s": rate, "seconds": elapsed, **quantiles}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from deploy.local import LocalStack

    stack = None
    kafka, es_url = args.kafka, args.es_url
    groups: dict[str, int] = {}  # stack service -> process group, for CPU accounting
    if not (kafka and es_url):
        stack = LocalStack(name="bench")
        info = stack.up()
        kafka, es_url = info.kafka_bootstrap, info.es_url
        groups = {s.service: s.pid for s in stack.status().services if s.pid}
    threads = None
    if args.stack_cpus:
        if not groups:
            raise SystemExit("--stack-cpus needs the bench's own stack (no --kafka/--es-url)")
        ours = pin(groups, {int(c) for c in args.stack_cpus.split(",")})
        threads = len(ours)
        print(f"stack pinned to CPUs {args.stack_cpus}; encoder and service on {sorted(ours)}")
    assert kafka
    assert es_url
    results: dict[str, Any] = {"corpus": args.corpus or "stdlib docstrings", "models": {}}
    results["stack_cpus"] = args.stack_cpus
    try:
        for i, model in enumerate(args.model):
            model_dir = Path(model).expanduser()
            encoder = SparseEncoder.load(model_dir, threads=threads)
            docs = load_corpus(args.corpus, args.docs)
            texts = [f"{d['title']} {d['body']}".strip() for d in docs]
            encoder.encode_documents(texts[:64])  # warm up
            row: dict[str, Any] = {"docs": len(docs), "rounds": []}
            for r in range(args.rounds):  # side by side, alternating: the machine drifts
                enc = encoder_only(encoder, texts, 256)
                e2e = await end_to_end(kafka, es_url, model_dir, encoder, docs, f"m{i}r{r}", groups)
                ratio = e2e["docs_per_s"] / enc["docs_per_s"]
                row["rounds"].append({"encoder_only": enc, "end_to_end": e2e, "ratio": ratio})
            ranked = sorted(row["rounds"], key=lambda x: x["ratio"])
            median = ranked[(len(ranked) - 1) // 2]  # the lower median
            row["ratios"] = [x["ratio"] for x in row["rounds"]]
            row["ratio_e2e_to_encoder"] = median["ratio"]
            row["encoder_only"], row["end_to_end"] = median["encoder_only"], median["end_to_end"]
            rate = args.load_fraction * median["end_to_end"]["docs_per_s"]
            n_lat = max(50, min(len(docs), int(rate * args.latency_seconds)))
            row["latency"] = await latency(
                kafka, es_url, model_dir, encoder, docs[:n_lat], rate, f"m{i}"
            )
            results["models"][encoder.metadata.name + f" ({model_dir.name})"] = row
            print_row(encoder.metadata.name, row)
    finally:
        if stack is not None:
            stack.down()
    return results


def print_row(name: str, row: dict[str, Any]) -> None:
    enc, e2e, lat = row["encoder_only"], row["end_to_end"], row["latency"]
    print(f"\n{name}: {row['docs']} docs, {len(row['rounds'])} rounds (the median round below)")
    print("  ratios e2e / encoder-only by round: " + ", ".join(f"{r:.2f}" for r in row["ratios"]))
    print(f"  encoder only : {enc['docs_per_s']:8.1f} docs/s  {enc['tokens_per_s']:9.0f} tokens/s")
    print(
        f"  end to end   : {e2e['docs_per_s']:8.1f} docs/s  = {row['ratio_e2e_to_encoder']:.2f} x encoder-only"
        f"  (encoder busy {e2e['encoder_busy_fraction']:.0%} of the wall time)"
    )
    cpu = "  ".join(f"{k} {v:.1f}" for k, v in e2e["cpu_seconds"].items())
    print(
        f"                 start-up {e2e['startup_seconds']:.1f}s apart;"
        f" CPU seconds over {e2e['seconds']:.1f}s: {cpu}"
    )
    q = e2e["query_encode_seconds"]
    if q["n"]:
        print(
            f"                 a query encoded meanwhile every 0.5 s: p50 {q['p50'] * 1000:.0f} ms"
            f"  max {q['max'] * 1000:.0f} ms ({q['n']} queries)"
        )
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}s"  # noqa: E731
    print(
        f"  latency      : at {lat['offered_docs_per_s']:.1f} docs/s offered: p50 {fmt(lat['p50'])}"
        f"  p90 {fmt(lat['p90'])}  p99 {fmt(lat['p99'])}"
    )


def markdown(paths: list[str]) -> str:
    """One markdown table of the runs saved with --json (``--report a.json b.json ...``)."""
    lines = [
        "| model | cores | docs | encoder only docs/s | end to end docs/s | e2e / encoder"
        " (median; rounds) | CPU s: service / ES / Kafka | query wait p50 / max | lag p50 / p99"
        " at half rate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in paths:
        run = json.loads(Path(path).read_text())
        cores = f"stack on CPU {run['stack_cpus']}" if run.get("stack_cpus") else "shared"
        for name, row in run["models"].items():
            enc, e2e, lat = row["encoder_only"], row["end_to_end"], row["latency"]
            cpu = e2e["cpu_seconds"]
            q = e2e.get("query_encode_seconds") or {}
            qtxt = f"{q['p50'] * 1000:.0f} / {q['max'] * 1000:.0f} ms" if q.get("n") else "-"
            ratios = ", ".join(f"{r:.2f}" for r in row.get("ratios", [row["ratio_e2e_to_encoder"]]))
            lines.append(
                f"| {name.split(' (')[0]} | {cores} | {row['docs']} | {enc['docs_per_s']:.1f}"
                f" | {e2e['docs_per_s']:.1f} | **{row['ratio_e2e_to_encoder']:.2f}** ({ratios})"
                f" | {cpu.get('this process', 0):.1f} / {cpu.get('elasticsearch', 0):.1f}"
                f" / {cpu.get('kafka', 0):.1f} | {qtxt}"
                f" | {lat['p50']:.2f} / {lat['p99']:.2f} s |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", help="BEIR folder (corpus.jsonl); default: stdlib docstrings")
    parser.add_argument("--model", action="append", help="model folder (repeatable)")
    parser.add_argument(
        "--report", nargs="+", metavar="JSON", help="print a markdown table of saved runs and exit"
    )
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument(
        "--rounds", type=int, default=3, help="encoder-only / end-to-end pairs, alternating"
    )
    parser.add_argument("--load-fraction", type=float, default=0.5)
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    parser.add_argument(
        "--stack-cpus",
        help="pin Kafka and Elasticsearch to these CPUs (e.g. 1) and the encoder and service to"
        " the others: the pipeline's own overhead, without the services' CPU on the same cores",
    )
    parser.add_argument("--kafka")
    parser.add_argument("--es-url")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.report:
        print(markdown(args.report))
        return 0
    if not args.model:
        parser.error("--model is required")
    logging.basicConfig(level=logging.WARNING)
    results = asyncio.run(run(args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
