"""The demo on a document stream (``sparse-ingest demo``, the steps described in
:mod:`tooling.demo`): the service in-process on a fresh topic and index, standard-library doc
paragraphs and module manuals streamed through, changes, searches, a metrics summary."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import time
from typing import Any

import orjson

from service.app import Service
from service.config import load_settings
from service.elastic import delete_index, elasticsearch_client
from tooling.demo.corpus import stdlib_documents
from tooling.topics import create_topic, produce

# Paraphrase queries: the words of the query rarely occur in the text that answers them.
CANDIDATE_QUERIES = (
    "leap february",
    "shrink archives",
    "dice roll chance",
    "fingerprint digest",
    "spawn child program",
    "shuffle deck",
    "wait until lock released",
    "square root",
    "internet address",
    "mail sending",
)
_WORD = re.compile(r"[a-z0-9]+")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def run_stream_demo(args: argparse.Namespace) -> int:
    """``sparse-ingest demo`` (without ``--cdc``): start the stack, fetch the model, run, stop."""
    from deploy.local import LocalStack, StackError
    from encoder import fetch_default_model

    started = time.monotonic()
    _say("== 1. local stack: Kafka (KRaft) + Elasticsearch, on loopback")
    stack = LocalStack(name=args.stack_name, log=lambda m: _say(f"   {m}"))
    try:
        info = stack.up(kafka=True, elasticsearch=True)
    except StackError as exc:
        _say(f"sparse-ingest demo: {exc}")
        return 1
    _say(info.describe())
    try:
        _say("\n== 2. default model (SPLADE-tiny-msmarco, INT8 ONNX)")
        model_dir = fetch_default_model()
        _say(f"   {model_dir}")
        assert info.kafka_bootstrap and info.es_url
        return asyncio.run(_run(args, info.kafka_bootstrap, info.es_url, model_dir, started))
    finally:
        if not args.keep:
            _say("\n== stopping the local stack")
            stack.down()
            _say(f"   done in {time.monotonic() - started:.0f}s total")


def _m(svc: Service, name: str, labels: dict[str, str] | None = None) -> float:
    return svc.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def _sum(svc: Service, name: str) -> float:
    total = 0.0
    for family in svc.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def _quantile(svc: Service, name: str, q: float) -> float | None:
    buckets: list[tuple[float, float]] = []
    for family in svc.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    target = q * buckets[-1][1]
    for le, count in buckets:
        if count >= target:
            return le
    return None


async def _wait_done(svc: Service, expected: int, t0: float, label: str) -> None:
    last = -1.0
    while True:
        consumed = _m(
            svc, "sparse_ingest_documents_consumed_total", {"topic": svc.settings.kafka_topics[0]}
        )
        pipeline = svc.pipeline
        if consumed >= expected and pipeline is not None and pipeline.idle:
            await pipeline.commit()
            break
        if time.monotonic() - last >= 1.0:
            last = time.monotonic()
            indexed = _m(svc, "sparse_ingest_documents_indexed_total")
            rate = indexed / max(1e-9, time.monotonic() - t0)
            _say(
                f"   {label}: consumed {consumed:5.0f}/{expected}  indexed {indexed:5.0f}  "
                f"({rate:5.0f} docs/s)  in flight {_m(svc, 'sparse_ingest_inflight_batches'):.0f}"
            )
        await asyncio.sleep(0.1)


def manual_documents(documents: list[dict[str, str]], count: int = 2) -> list[dict[str, str]]:
    """Long documents: the ``count`` modules with the most text, each as one document of all
    its paragraphs (a module's manual, thousands of tokens)."""
    by_module: dict[str, list[str]] = {}
    for d in documents:
        by_module.setdefault(d["module"], []).append(d["body"])
    largest = sorted(by_module, key=lambda m: -sum(len(p) for p in by_module[m]))[:count]
    return [
        {"id": f"manual:{m}", "title": f"{m} (the whole manual)",
         "body": "\n\n".join(by_module[m]), "module": m}
        for m in largest
    ]  # fmt: skip


async def _long_document_search(svc: Service, manual: dict[str, str]) -> bool:
    """Search for a paragraph deep inside a module manual: the manual is found by its best
    passage, past the first 512 tokens (where truncation, ELSER's limit, stops reading)."""
    assert svc.searcher is not None and svc.encoder is not None
    encoder = svc.encoder
    _say("\n== 7. long documents: the passage that matched")
    if svc.searcher.passage_field is None:
        _say(
            f"   (SPARSE_INGEST_LONG_TEXT={encoder.long_text}: one vector a document, no passages)"
        )
        return True
    text = f"{manual['title']} {manual['body']}"  # the text fields, joined as encoded
    total = encoder.count_tokens([text])[0]
    # paragraphs that start past the first 600 tokens; the one two thirds of the way through
    deep = []
    for paragraph in manual["body"].split("\n\n"):
        if encoder.count_tokens([text[: text.index(paragraph)]])[0] > 600:
            deep.append(paragraph)
    if not deep:
        _say(
            f"   ({manual['id']} is {total} tokens long: too short to show; stream more documents)"
        )
        return True
    target = deep[len(deep) * 2 // 3]
    words = [w for w in dict.fromkeys(_WORD.findall(target.lower())) if len(w) > 4][:6]
    query = " ".join(words)
    vector = encoder.encode_queries([query])[0]
    hits = await svc.searcher.search("sparse", query, vector, 5)
    _say(
        f"   {manual['id']}: one document of {len(text):,} characters, {total:,} tokens, "
        f"indexed as passages of up to {encoder.window_tokens} tokens"
    )
    _say(f"   query (words of a paragraph deep inside): {query!r}")
    for rank, hit in enumerate(hits, 1):
        passage = hit.passage
        if hit.id != manual["id"] or passage is None or passage.text is None:
            _say(f"     {rank}. {hit.score:6.2f}  {hit.id}")
            continue
        before = encoder.count_tokens([text[: passage.start]])[0] - 2
        _say(
            f"     {rank}. {hit.score:6.2f}  {hit.id}: best passage {passage.ordinal + 1}, "
            f"characters {passage.start:,}-{passage.end:,}, from token {before:,} of {total:,}"
        )
        snippet = " ".join(passage.text.split())
        at = snippet.find(" ".join(target.split())[:40])
        _say(f'        "...{snippet[max(0, at - 60) : at + 200]}..."')
        past = before > 512
        _say(
            "        past the first 512 tokens, all that truncation (ELSER's limit) reads"
            if past
            else "        (this passage starts within the first 512 tokens)"
        )
        return past
    _say("   the manual was not among the top 5 hits this time")
    return False


async def _run(
    args: argparse.Namespace, kafka: str, es_url: str, model_dir: Any, started: float
) -> int:
    stamp = time.strftime("%Y%m%d%H%M%S")
    topic = f"demo-docs-{stamp}"
    settings = load_settings(
        kafka_bootstrap_servers=kafka,
        kafka_topics=[topic],
        kafka_group_id=f"demo-{stamp}",
        es_url=es_url,
        es_index="demo-docs",
        model_dir=model_dir,
        http_port=args.http_port,
        text_fields=["title", "body"],
    )
    documents = list(stdlib_documents(args.documents))
    paragraphs = list(documents)
    manuals = manual_documents(paragraphs)
    documents += manuals
    await create_topic(kafka, topic, 4)

    svc = Service(settings)
    assert svc.es is None
    _say(f"\n== 3. ingest service: topic {topic!r} -> index 'demo-docs' (recreated)")
    es = elasticsearch_client(settings)
    with contextlib.suppress(Exception):
        await delete_index(es, "demo-docs")
    await svc.start()
    _say(f"   HTTP API on http://127.0.0.1:{svc.http_port} (/metrics /readyz /encode /search)")
    try:
        t0 = time.monotonic()
        records: list[tuple[bytes | None, bytes | None]] = [
            (d["id"].encode(), orjson.dumps(d)) for d in documents
        ]
        bad = [
            (b"bad-1", b"{this is not json"),
            (b"bad-2", orjson.dumps({"id": "bad-2", "body": 42})),
        ]
        records[len(records) // 2 : len(records) // 2] = bad
        _say(
            f"\n== 4. streaming {len(documents) - len(manuals)} standard-library doc paragraphs, "
            f"{len(manuals)} whole module manuals (long documents) and {len(bad)} malformed records"
        )
        producer = asyncio.create_task(produce(kafka, topic, records))
        await _wait_done(svc, len(records), t0, "stream")
        await producer
        first_pass = time.monotonic() - t0
        indexed = _m(svc, "sparse_ingest_documents_indexed_total")
        _say(
            f"   {indexed:.0f} documents indexed in {first_pass:.1f}s ({indexed / first_pass:.0f} docs/s end to end)"
        )

        changed = paragraphs[:5]  # (the manuals stay as they are: step 7 searches them)
        touched = paragraphs[5:25]
        deleted = paragraphs[25:30]
        _say(
            f"\n== 5. changes: {len(changed)} rewrites, {len(touched)} metadata-only updates, "
            f"{len(deleted)} deletes"
        )
        updates: list[tuple[bytes | None, bytes | None]] = []
        for d in changed:
            updates.append(
                (d["id"].encode(), orjson.dumps({**d, "body": d["body"] + " (revised)"}))
            )
        for d in touched:
            updates.append((d["id"].encode(), orjson.dumps({**d, "reviewed": True})))
        for d in deleted:
            updates.append((d["id"].encode(), None))
        t1 = time.monotonic()
        await produce(kafka, topic, updates)
        await _wait_done(svc, len(records) + len(updates), t1, "changes")
        await es.indices.refresh(index="demo-docs")
        count = (await es.count(index="demo-docs"))["count"]
        gone = [d["id"] for d in deleted if await es.exists(index="demo-docs", id=d["id"])]
        revised = [
            d["id"]
            for d in changed
            if (await es.get(index="demo-docs", id=d["id"]))["_source"]["body"].endswith(
                "(revised)"
            )
        ]
        ok = count == len(documents) - len(deleted) and not gone and len(revised) == len(changed)
        _say(
            f"   index holds {count} documents (expected {len(documents) - len(deleted)}); "
            f"deleted still present: {len(gone)}; rewrites applied: {len(revised)}/{len(changed)}; "
            f"unchanged texts not re-encoded: {_m(svc, 'sparse_ingest_documents_skipped_unchanged_total'):.0f}"
        )

        _say("\n== 6. semantic search (sparse, default model)")
        assert svc.searcher is not None and svc.encoder is not None
        shown = False
        for query in CANDIDATE_QUERIES:
            vector = svc.encoder.encode_queries([query])[0]
            hits = await svc.searcher.search("sparse", query, vector, 3)
            if not hits:
                continue
            best = hits[0]
            text = f"{best.source.get('title', '')} {best.source.get('body', '')}"
            shared = _words(query) & _words(text)
            if shared and shown:
                continue
            bm25 = await svc.searcher.search("bm25", query, None, 1)
            _say(f"   query: {query!r}")
            for rank, hit in enumerate(hits, 1):
                _say(
                    f"     {rank}. {hit.score:6.2f}  {hit.source.get('title')}: {str(hit.source.get('body'))[:110]}"
                )
            _say(f"     words shared by the query and the best hit: {sorted(shared) or 'none'}")
            _say(
                f"     BM25's best hit: {bm25[0].source.get('title') if bm25 else 'nothing (no word matches)'}"
            )
            if not shared:
                shown = True
                break
        if not shown:
            _say("   (no candidate query had a best hit without a shared word this time)")

        if manuals:
            ok = await _long_document_search(svc, manuals[0]) and ok

        _say("\n== 8. metrics summary (also at /metrics)")
        dead = _sum(svc, "sparse_ingest_documents_dead_lettered_total")
        p50 = _quantile(svc, "sparse_ingest_end_to_end_lag_seconds", 0.5)
        p99 = _quantile(svc, "sparse_ingest_end_to_end_lag_seconds", 0.99)
        busy = _m(svc, "sparse_ingest_encoder_busy_seconds_total")
        tokens = _m(svc, "sparse_ingest_encoder_tokens_total")
        _say(
            f"   consumed {_sum(svc, 'sparse_ingest_documents_consumed_total'):.0f}, indexed {_m(svc, 'sparse_ingest_documents_indexed_total'):.0f}, "
            f"deleted {_sum(svc, 'sparse_ingest_documents_deleted_total'):.0f}, dead-lettered {dead:.0f} "
            f"(to {settings.dead_letter_topic}), stale {_sum(svc, 'sparse_ingest_documents_stale_total'):.0f}"
        )
        _say(
            f"   encoder: {tokens:.0f} tokens in {busy:.1f}s busy = {tokens / max(busy, 1e-9):,.0f} tokens/s"
        )
        _say(
            f"   end-to-end lag (Kafka timestamp -> Elasticsearch ack): p50 <= {p50}s, p99 <= {p99}s"
        )
        _say(
            f"   first pass {first_pass:.1f}s; whole demo so far {time.monotonic() - started:.0f}s"
        )
        if args.keep:
            _say(f"\n   --keep: serving on http://127.0.0.1:{svc.http_port} until Ctrl-C")
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        return 0 if ok and dead == len(bad) else 1
    finally:
        await svc.stop()
        await es.close()


if __name__ == "__main__":
    from service.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
