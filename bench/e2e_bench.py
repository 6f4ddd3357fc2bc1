"""End-to-end ingest benchmark, ours against a naive baseline, through real Kafka and Elasticsearch.

Everything runs in one process and one run, side by side (the machine is shared and noisy:
read the ratios, not the absolute figures):

1. **max throughput** — a backlog of documents in a fresh topic, drained by

   - *ours*: the service (``service.app.Service``, in-process, INT8 encoder, pipelined stages)
     at several pipeline batch sizes (``SPARSE_INGEST_BATCH_MAX_DOCS``);
   - *baseline*, what a user might write instead: a plain aiokafka consumer loop, ONNX Runtime
     FP32 on a graph that outputs the masked-LM logits [batch, seq, vocab] with the SPLADE
     pooling in numpy (the fastembed way), ``elasticsearch.helpers.bulk``; sequential, one
     document batch at a time, committing after each batch; at several batch sizes.

   Rate = documents / (last commit - first record consumed); the headline ratio comes from
   adjacent (ours, baseline) pairs at the default batch sizes, repeated.
2. **per-stage time** — ours: the sums of ``sparse_ingest_stage_duration_seconds`` (stages
   overlap, so they may add up to more than the wall time); baseline: its sequential steps.
3. **latency under offered load** — a producer in another process at 25/50/75/100% of ours'
   best rate (and the baseline at 50% of its own); per-document lag = Kafka record timestamp
   to the Elasticsearch bulk acknowledgement.
4. **encoder only** — ours and the baseline's encoder on the same texts, to split the gain
   between the model runtime and the pipeline; and a check that the baseline computes the same
   vectors as our FP32 model (cosine).

    .venv/bin/python bench/e2e_bench.py --corpus ../shared/eval/scifact --out results

Writes ``e2e_bench.json``, ``e2e_bench.md`` and PNG plots into ``--out``. Starts its own local
stack unless ``--kafka`` and ``--es-url`` are given. Reuses ``bench/pipeline_bench.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
from aiokafka import AIOKafkaConsumer
from elasticsearch import Elasticsearch, helpers
from pipeline_bench import (
    _sample,
    bench_settings,
    encoder_only,
    load_corpus,
    produce_at_rate,
    wait_done,
)
from tokenizers import Tokenizer

from encoder import SparseEncoder, cache_root, fetch_default_model
from service.app import Service
from service.builder import load_encoder
from tooling.topics import create_topic, produce

STAGES = ("prepare", "tokenize", "inference", "encode", "bulk")
MAPPING = {
    "properties": {
        "tokens": {"type": "sparse_vector"},
        "title": {"type": "text"},
        "body": {"type": "text"},
    }
}


def say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------- baseline


def baseline_model(model_dir: Path) -> Path:
    """The default model as a plain FP32 ONNX graph with a logits head [batch, seq, vocab].

    The encoder benchmark's ``ort-fp32-numpy`` model (``bench/encoder_bench.py``
    ``logits_model``) when that module is there, else built here the same way: the project's
    exporter with ``head="logits"``, same weights as ``model_dir``.
    """
    try:
        from encoder_bench import logits_model

        path: Path = logits_model(model_dir)
        return path
    except (ImportError, AttributeError):
        pass
    from encoder.checkpoint import load_masked_lm
    from encoder.fetch import fetch_source
    from encoder.graph import GraphOptions, build_graph
    from encoder.metadata import read_metadata

    name = read_metadata(model_dir).name
    out = cache_root() / "bench" / "baseline" / f"{name}.logits.fp32.onnx"
    if out.is_file():
        return out
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    onnx.save(
        build_graph(load_masked_lm(fetch_source(name)), GraphOptions(head="logits")), str(tmp)
    )
    tmp.rename(out)
    return out


class NaiveEncoder:
    """ORT FP32 logits + SPLADE pooling in numpy, the way fastembed does it."""

    def __init__(self, model_path: Path, tokenizer_path: Path) -> None:
        self.tok = Tokenizer.from_file(str(tokenizer_path))
        self.tok.enable_truncation(512)
        self.tok.enable_padding()
        self.sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        vocab = self.tok.get_vocab()
        self.names = [""] * len(vocab)
        for token, i in vocab.items():
            self.names[i] = token
        self.special = [
            vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]") if t in vocab
        ]

    def encode(self, texts: list[str], times: dict[str, float]) -> list[dict[str, float]]:
        t0 = time.perf_counter()
        enc = self.tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        t1 = time.perf_counter()
        logits = self.sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        t2 = time.perf_counter()
        relu_log = np.log(1 + np.maximum(logits, 0))
        weighted = relu_log * np.expand_dims(mask, axis=-1)
        scores = np.max(weighted, axis=1)
        scores[:, self.special] = 0
        out = [{self.names[i]: float(row[i]) for i in np.nonzero(row)[0]} for row in scores]
        t3 = time.perf_counter()
        times["tokenize"] += t1 - t0
        times["inference"] += t2 - t1
        times["pooling"] += t3 - t2
        return out


def peak_bytes_estimate(batch: int) -> int:
    """Logits [batch, 512, 30522] float32 and the numpy temporaries: ~16 GB at 32 here."""
    return int(batch * 512 * 30522 * 4 * 8)  # measured: 15.5 GB RSS at 32


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


async def baseline_drain(
    kafka: str,
    es_url: str,
    naive: NaiveEncoder,
    topic: str,
    expected: int,
    batch_size: int,
    lags: list[float] | None = None,
) -> dict[str, Any]:
    """The naive loop: poll a batch, encode, helpers.bulk, commit; until ``expected`` records."""
    es = Elasticsearch(es_url, request_timeout=120)
    es.indices.create(index=topic, mappings=MAPPING)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka,
        group_id=topic,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    times: dict[str, float] = defaultdict(float)
    start = time.perf_counter()
    await consumer.start()
    first: float | None = None
    done = 0
    try:
        while done < expected:
            t0 = time.perf_counter()
            polled = await consumer.getmany(timeout_ms=1000, max_records=batch_size)
            msgs = [m for part in polled.values() for m in part]
            t1 = time.perf_counter()
            if not msgs:
                continue
            if first is None:
                first = t1
            else:
                times["poll"] += t1 - t0
            docs = [json.loads(m.value) for m in msgs]
            texts = [f"{d['title']} {d['body']}" for d in docs]
            times["decode"] += time.perf_counter() - t1
            vectors = naive.encode(texts, times)
            t2 = time.perf_counter()
            helpers.bulk(
                es,
                (
                    {
                        "_index": topic,
                        "_id": d["id"],
                        "_source": {"title": d["title"], "body": d["body"], "tokens": v},
                    }
                    for d, v in zip(docs, vectors, strict=True)
                ),
            )
            t3 = time.perf_counter()
            times["bulk"] += t3 - t2
            if lags is not None:
                now = time.time()
                lags.extend(now - m.timestamp / 1000 for m in msgs)
            await consumer.commit()
            times["commit"] += time.perf_counter() - t3
            done += len(msgs)
    finally:
        await consumer.stop()
        es.close()
    end = time.perf_counter()
    assert first is not None
    steady = end - first
    return {
        "docs": done,
        "batch_size": batch_size,
        "seconds_total": end - start,
        "seconds_steady": steady,
        "docs_per_s": done / steady,
        "step_seconds": dict(times),
    }


# ---------------------------------------------------------------------------------- ours


class LagRecorder:
    """Stands in for the end-to-end lag histogram: keeps every observation, forwards it."""

    def __init__(self, histogram: Any) -> None:
        self.histogram = histogram
        self.samples: list[float] = []

    def observe(self, value: float) -> None:
        self.samples.append(value)
        self.histogram.observe(value)


ours_settings = bench_settings


async def _first_consumed(svc: Service, topic: str) -> float:
    while _sample(svc, "sparse_ingest_documents_consumed_total", {"topic": topic}) == 0:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    return time.perf_counter()


async def ours_drain(
    kafka: str,
    es_url: str,
    model_dir: Path,
    encoder: SparseEncoder,
    topic: str,
    expected: int,
    batch_docs: int,
    lags: list[float] | None = None,
) -> dict[str, Any]:
    settings = ours_settings(kafka, es_url, model_dir, topic, batch_max_docs=batch_docs)
    svc = Service(settings, encoder=encoder)
    recorder = LagRecorder(svc.metrics.end_to_end_lag)
    svc.metrics.end_to_end_lag = recorder  # type: ignore[assignment]
    start = time.perf_counter()
    await svc.start(http=False)
    try:
        watcher = asyncio.create_task(_first_consumed(svc, topic))
        await wait_done(svc, topic, expected)
        end = time.perf_counter()
        first = await watcher
        busy = _sample(svc, "sparse_ingest_encoder_busy_seconds_total")
        stages = {
            s: _sample(svc, "sparse_ingest_stage_duration_seconds_sum", {"stage": s})
            for s in STAGES
        }
        tokens = _sample(svc, "sparse_ingest_encoder_tokens_total")
    finally:
        await svc.stop()
    if lags is not None:
        lags.extend(recorder.samples)
    steady = end - first
    return {
        "docs": expected,
        "batch_size": batch_docs,
        "seconds_total": end - start,
        "seconds_steady": steady,
        "docs_per_s": expected / steady,
        "tokens_per_s": tokens / steady,
        "encoder_busy_fraction": busy / steady,
        "stage_seconds": stages,
    }


# ---------------------------------------------------------------------------------- runs


def _produce_process(kafka: str, topic: str, recs: list[tuple[bytes, bytes]], rate: float) -> None:
    asyncio.run(produce_at_rate(kafka, topic, recs, rate))


def corpus_records(docs: list[dict[str, str]], n: int, tag: str) -> list[tuple[bytes, bytes]]:
    """``n`` records cycling through ``docs`` (ids made unique)."""
    out = []
    for i in range(n):
        d = dict(docs[i % len(docs)])
        if i >= len(docs):
            d["id"] = f"{d['id']}-{tag}{i // len(docs)}"
        out.append((d["id"].encode(), orjson.dumps(d)))
    return out


async def backlog(kafka: str, topic: str, recs: list[tuple[bytes, bytes]]) -> None:
    await create_topic(kafka, topic)
    await produce(kafka, topic, recs)


async def offered_load(
    kafka: str, topic: str, recs: list[tuple[bytes, bytes]], rate: float, drain: Any
) -> tuple[dict[str, Any], float]:
    """Start ``drain`` (a coroutine factory), then a producer process at ``rate`` docs/s."""
    await create_topic(kafka, topic)
    task = asyncio.create_task(drain())
    await asyncio.sleep(5)  # consumer start and group join
    proc = multiprocessing.get_context("spawn").Process(
        target=_produce_process, args=(kafka, topic, recs, rate)
    )
    t0 = time.perf_counter()
    proc.start()
    result: dict[str, Any] = await task
    await asyncio.to_thread(proc.join)
    return result, len(recs) / (time.perf_counter() - t0)


def quantiles(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(samples)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


def cosine(a: dict[str, float], b: dict[str, float]) -> float:
    d = sum(w * b.get(k, 0.0) for k, w in a.items())
    na = sum(w * w for w in a.values()) ** 0.5
    nb = sum(w * w for w in b.values()) ** 0.5
    return d / (na * nb) if na and nb else 0.0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from deploy.local import LocalStack

    stack = None
    kafka, es_url = args.kafka, args.es_url
    if not (kafka and es_url):
        stack = LocalStack(name="e2e-bench")
        info = stack.up()
        kafka, es_url = info.kafka_bootstrap, info.es_url
    assert kafka and es_url
    model_dir = Path(args.model).expanduser() if args.model else fetch_default_model()
    stamp = str(int(time.time()))
    docs = load_corpus(args.corpus, max(args.docs, args.baseline_docs))
    texts = [f"{d['title']} {d['body']}".strip() for d in docs]
    ours_sizes = [int(x) for x in args.batch_sizes.split(",")]
    base_sizes = [int(x) for x in args.baseline_batch_sizes.split(",")]
    results: dict[str, Any] = {
        "corpus": args.corpus or "stdlib docstrings",
        "model_dir": str(model_dir),
        "cpus": len(__import__("os").sched_getaffinity(0)),
        "ours_default_batch": args.batch_default,
        "baseline_default_batch": args.baseline_batch_default,
    }
    n_run = 0

    def name(kind: str) -> str:
        nonlocal n_run
        n_run += 1
        return f"e2e-{kind}-{stamp}-{n_run}"

    try:
        settings = ours_settings(kafka, es_url, model_dir, "x")
        encoder = load_encoder(settings)
        results["model"] = encoder.metadata.name
        logits_path = baseline_model(model_dir)
        results["baseline_model"] = str(logits_path)
        naive = NaiveEncoder(logits_path, model_dir / "tokenizer.json")
        say(f"model {encoder.metadata.name}: ours INT8 {model_dir}, baseline FP32 logits graph")

        # 4. encoder only + same-vectors check (short texts: the baseline truncates)
        sample = texts[: args.encoder_docs]
        encoder.encode_documents(sample[:16])
        naive.encode(sample[:8], defaultdict(float))
        enc_ours = encoder_only(encoder, sample, 64)
        times: dict[str, float] = defaultdict(float)
        t0 = time.perf_counter()
        for i in range(0, len(sample), args.baseline_batch_default):
            naive.encode(sample[i : i + args.baseline_batch_default], times)
        enc_base = {"seconds": time.perf_counter() - t0}
        enc_base["docs_per_s"] = len(sample) / enc_base["seconds"]
        fp32 = SparseEncoder.load(model_dir, model_file=encoder.metadata.files.get("model_fp32"))
        short = [t for t, n in zip(sample, fp32.count_tokens(sample), strict=True) if n <= 512][:32]
        # small batches: the logits of 32 x 512 tokens and the numpy temporaries are ~10 GB
        base_vecs = []
        for i in range(0, len(short), 4):
            base_vecs += naive.encode(short[i : i + 4], defaultdict(float))
        cos = [cosine(a, b) for a, b in zip(base_vecs, fp32.encode_documents(short), strict=True)]
        fp32.close()
        results["encoder_only"] = {
            "docs": len(sample),
            "ours_int8": enc_ours,
            "baseline_fp32_numpy": enc_base,
            "ratio": enc_ours["docs_per_s"] / enc_base["docs_per_s"],
            "baseline_vs_our_fp32_cosine_min": min(cos),
            "baseline_vs_our_fp32_cosine_mean": sum(cos) / len(cos),
        }
        say(
            f"encoder only ({len(sample)} docs): ours {enc_ours['docs_per_s']:.1f} docs/s, "
            f"baseline {enc_base['docs_per_s']:.1f} docs/s = {results['encoder_only']['ratio']:.1f}x; "
            f"baseline vs our FP32 cosine min {min(cos):.5f}"
        )

        # 1. headline pairs, adjacent
        pairs = []
        for rep in range(args.repeats):
            t = name("ours")
            recs = corpus_records(docs[: args.docs], args.docs, "o")
            await backlog(kafka, t, recs)
            o = await ours_drain(
                kafka, es_url, model_dir, encoder, t, len(recs), args.batch_default
            )
            t = name("base")
            recs = corpus_records(docs[: args.baseline_docs], args.baseline_docs, "b")
            await backlog(kafka, t, recs)
            b = await baseline_drain(
                kafka, es_url, naive, t, len(recs), args.baseline_batch_default
            )
            pairs.append({"ours": o, "baseline": b, "ratio": o["docs_per_s"] / b["docs_per_s"]})
            say(
                f"pair {rep + 1}: ours {o['docs_per_s']:.1f} docs/s (batch {args.batch_default}), "
                f"baseline {b['docs_per_s']:.1f} docs/s (batch {args.baseline_batch_default}) "
                f"= {pairs[-1]['ratio']:.1f}x"
            )
        results["pairs"] = pairs
        results["ratio_median"] = statistics.median(p["ratio"] for p in pairs)

        # batch-size sweeps (the defaults reuse the pairs' first run)
        sweep: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": []}
        for size in ours_sizes:
            if size == args.batch_default:
                runs = [p["ours"] for p in pairs]
            else:
                t = name("ours")
                recs = corpus_records(docs[: args.docs], args.docs, "o")
                await backlog(kafka, t, recs)
                runs = [await ours_drain(kafka, es_url, model_dir, encoder, t, len(recs), size)]
            rate = statistics.median(r["docs_per_s"] for r in runs)
            sweep["ours"].append({"batch_size": size, "docs_per_s": rate, "runs": len(runs)})
            say(f"ours, batch {size}: {rate:.1f} docs/s")
        for size in base_sizes:
            if size == args.baseline_batch_default:
                runs = [p["baseline"] for p in pairs]
            elif mem_available() < 1.3 * peak_bytes_estimate(size):
                sweep["baseline"].append({"batch_size": size, "skipped": "not enough free memory"})
                say(f"baseline, batch {size}: skipped (memory)")
                continue
            else:
                t = name("base")
                recs = corpus_records(docs[: args.baseline_docs], args.baseline_docs, "b")
                await backlog(kafka, t, recs)
                runs = [await baseline_drain(kafka, es_url, naive, t, len(recs), size)]
            rate = statistics.median(r["docs_per_s"] for r in runs)
            sweep["baseline"].append({"batch_size": size, "docs_per_s": rate, "runs": len(runs)})
            say(f"baseline, batch {size}: {rate:.1f} docs/s")
        results["batch_sweep"] = sweep
        best_ours = max(r["docs_per_s"] for r in sweep["ours"])
        best_base = max(r["docs_per_s"] for r in sweep["baseline"] if "docs_per_s" in r)
        results["best"] = {"ours": best_ours, "baseline": best_base, "ratio": best_ours / best_base}

        # 3. latency under offered load
        max_rate = statistics.median(p["ours"]["docs_per_s"] for p in pairs)
        latency = []
        for frac in (float(x) for x in args.load_fractions.split(",")):
            rate = frac * max_rate
            n = max(50, int(rate * args.latency_seconds))
            t = name("lat")
            lags: list[float] = []
            recs = corpus_records(docs, n, "l")
            res, offered = await offered_load(
                kafka,
                t,
                recs,
                rate,
                lambda t=t, n=n, lags=lags: ours_drain(
                    kafka, es_url, model_dir, encoder, t, n, args.batch_default, lags
                ),
            )
            row = {"system": "ours", "fraction": frac, "offered_docs_per_s": rate,
                   "achieved_produce_rate": offered, "drained_docs_per_s": res["docs_per_s"], "docs": n, **quantiles(lags), "samples": lags}  # fmt: skip
            latency.append(row)
            say(
                f"ours at {frac:.0%} ({rate:.1f} docs/s): p50 {row['p50']:.2f}s p99 {row['p99']:.2f}s"
            )
        base_rate = statistics.median(p["baseline"]["docs_per_s"] for p in pairs)
        for frac in (float(x) for x in args.baseline_load_fractions.split(",") if x):
            rate = frac * base_rate
            n = max(20, int(rate * args.latency_seconds))
            t = name("blat")
            lags = []
            recs = corpus_records(docs, n, "l")
            res, offered = await offered_load(
                kafka,
                t,
                recs,
                rate,
                lambda t=t, n=n, lags=lags: baseline_drain(
                    kafka, es_url, naive, t, n, args.baseline_batch_default, lags
                ),
            )
            row = {"system": "baseline", "fraction": frac, "offered_docs_per_s": rate,
                   "achieved_produce_rate": offered, "drained_docs_per_s": res["docs_per_s"], "docs": n, **quantiles(lags), "samples": lags}  # fmt: skip
            latency.append(row)
            say(
                f"baseline at {frac:.0%} ({rate:.1f} docs/s): p50 {row['p50']:.2f}s p99 {row['p99']:.2f}s"
            )
        results["latency"] = latency
    finally:
        if stack is not None:
            stack.down()
    return results


# ---------------------------------------------------------------------------------- output


def markdown(r: dict[str, Any]) -> str:
    e = r["encoder_only"]
    lines = [
        f"### End to end: {r['model']} on {r['cpus']} CPUs, corpus {Path(r['corpus']).name}",
        "",
        "Max throughput (backlog drained; steady state from first record consumed to last commit). "
        f"Ours: the service, INT8, pipeline batch {r['ours_default_batch']}, long docs chunked. "
        f"Baseline: aiokafka loop + ORT FP32 logits + numpy pooling + helpers.bulk, batch "
        f"{r['baseline_default_batch']}, sequential, commit per batch, long docs truncated.",
        "",
        "| run | ours docs/s | baseline docs/s | ours / baseline |",
        "|---|---|---|---|",
    ]
    for i, p in enumerate(r["pairs"], 1):
        lines.append(
            f"| pair {i} | {p['ours']['docs_per_s']:.1f} | {p['baseline']['docs_per_s']:.1f} "
            f"| **{p['ratio']:.1f}x** |"
        )
    b = r["best"]
    lines.append(
        f"| best batch size of each | {b['ours']:.1f} | {b['baseline']:.1f} | {b['ratio']:.1f}x |"
    )
    lines.append(
        f"| encoder only ({e['docs']} docs) | {e['ours_int8']['docs_per_s']:.1f} "
        f"| {e['baseline_fp32_numpy']['docs_per_s']:.1f} | {e['ratio']:.1f}x |"
    )
    lines += [
        "",
        f"Baseline vectors vs our FP32 model (32 texts ≤ 512 tokens): cosine min "
        f"{e['baseline_vs_our_fp32_cosine_min']:.5f} (same model, same pooling).",
        "",
        "Throughput against batch size (docs/s):",
        "",
        "| system | "
        + " | ".join(f"batch {x['batch_size']}" for x in r["batch_sweep"]["ours"])
        + " |",
        "|---|" + "---|" * len(r["batch_sweep"]["ours"]),
        "| ours | " + " | ".join(f"{x['docs_per_s']:.1f}" for x in r["batch_sweep"]["ours"]) + " |",
        "",
        "| system | "
        + " | ".join(f"batch {x['batch_size']}" for x in r["batch_sweep"]["baseline"])
        + " |",
        "|---|" + "---|" * len(r["batch_sweep"]["baseline"]),
        "| baseline | "
        + " | ".join(
            f"{x['docs_per_s']:.1f}" if "docs_per_s" in x else x.get("skipped", "")
            for x in r["batch_sweep"]["baseline"]
        )
        + " |",
        "",
        "Time per stage, seconds per 1,000 documents (first pair; ours' stages overlap):",
        "",
    ]
    o, base = r["pairs"][0]["ours"], r["pairs"][0]["baseline"]
    ko, kb = 1000 / o["docs"], 1000 / base["docs"]
    lines.append(
        "| ours | wall "
        + f"{o['seconds_steady'] * ko:.1f} | "
        + " | ".join(f"{s} {v * ko:.1f}" for s, v in o["stage_seconds"].items())
        + f" | encoder busy {o['encoder_busy_fraction']:.0%} |"
    )
    lines.append("|---|---|" + "---|" * (len(o["stage_seconds"]) + 1))
    lines.append(
        "| baseline | wall "
        + f"{base['seconds_steady'] * kb:.1f} | "
        + " | ".join(f"{s} {v * kb:.1f}" for s, v in base["step_seconds"].items())
        + " |"
    )
    lines += [
        "",
        "Latency under offered load (Kafka record timestamp → Elasticsearch bulk ack):",
        "",
        "| system | offered | docs/s | docs | p50 s | p90 s | p99 s | max s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["latency"]:
        lines.append(
            f"| {row['system']} | {row['fraction']:.0%} of its max | {row['offered_docs_per_s']:.1f} "
            f"| {row['docs']} | {row['p50']:.2f} | {row['p90']:.2f} | {row['p99']:.2f} | {row['max']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plots(r: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, marker in (("ours", "o"), ("baseline", "s")):
        pts = [x for x in r["batch_sweep"][system] if "docs_per_s" in x]
        ax.plot([x["batch_size"] for x in pts], [x["docs_per_s"] for x in pts], marker=marker,
                label=system)  # fmt: skip
        for x in pts:
            ax.annotate(f"{x['docs_per_s']:.1f}", (x["batch_size"], x["docs_per_s"]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("documents per batch (ours: SPARSE_INGEST_BATCH_MAX_DOCS)")
    ax.set_ylabel("docs/s end to end")
    ratios = [p["ratio"] for p in r["pairs"]]
    ax.set_title(
        "Throughput against batch size; ours / baseline in adjacent pairs: "
        + ", ".join(f"{x:.1f}x" for x in ratios),
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(
        title="ours: service INT8 pipelined; baseline: naive loop FP32",
        fontsize=8,
        title_fontsize=8,
    )
    fig.tight_layout()
    path = out / "e2e_throughput.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in r["latency"]:
        s = np.sort(np.asarray(row["samples"]))
        if not len(s):
            continue
        y = np.arange(1, len(s) + 1) / len(s)
        style = "-" if row["system"] == "ours" else "--"
        ax.plot(
            s,
            y,
            style,
            label=f"{row['system']} at {row['fraction']:.0%} ({row['offered_docs_per_s']:.1f} docs/s)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end lag, seconds (record timestamp → Elasticsearch ack, log)")
    ax.set_ylabel("fraction of documents")
    ax.set_title("Latency CDF under offered load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "e2e_latency_cdf.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", help="BEIR folder (corpus.jsonl); default: stdlib docstrings")
    parser.add_argument("--model", help="model folder (default: the default model)")
    parser.add_argument("--docs", type=int, default=2000, help="backlog for ours")
    parser.add_argument("--baseline-docs", type=int, default=300, help="backlog for the baseline")
    parser.add_argument("--encoder-docs", type=int, default=128)
    parser.add_argument("--batch-sizes", default="32,64,128,256,512")
    parser.add_argument("--batch-default", type=int, default=256)
    parser.add_argument("--baseline-batch-sizes", default="4,8,16")
    parser.add_argument("--baseline-batch-default", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="adjacent (ours, baseline) pairs")
    parser.add_argument("--load-fractions", default="0.25,0.5,0.75,1.0")
    parser.add_argument("--baseline-load-fractions", default="0.5")
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    parser.add_argument("--kafka")
    parser.add_argument("--es-url")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    results = asyncio.run(run(args))
    results["seconds"] = time.perf_counter() - started
    results["command"] = "python bench/e2e_bench.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e_bench.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (out / "e2e_bench.md").write_text(table)
    try:
        written = plots(results, out)
    except ImportError:
        written = []
    print()
    print(table)
    print("wrote", out / "e2e_bench.json", out / "e2e_bench.md", *written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
