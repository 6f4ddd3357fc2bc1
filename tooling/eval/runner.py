"""The eval's run: for each variant, the corpus through Kafka and the service (in-process) into
a fresh index, every judged query as BM25, sparse and hybrid against it, the metrics, and the
scores checked against brute force (:mod:`tooling.eval.checks`)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from elasticsearch import AsyncElasticsearch

from service.app import Service
from service.builder import long_text_options, message_contract
from service.config import Settings, load_settings
from service.elastic import delete_index, elasticsearch_client
from service.messages import BadRecord, RecordRef, Upsert, decode_record
from service.search import Searcher, best_passage_query, rrf, sparse_query
from service.sink import es_features
from tooling.eval.beir import BeirData
from tooling.eval.checks import Ranked, SparseVector, check_scores
from tooling.eval.metrics import evaluate
from tooling.eval.report import REFERENCE_NDCG
from tooling.eval.variants import Variant
from tooling.topics import create_topic, produce, wait_committed

log = logging.getLogger(__name__)

MODES = ("bm25", "sparse", "hybrid", "sparse_exact", "hybrid_exact")
DEPTH = 100  # retrieved per query and mode: recall@100, and the RRF depth the Searcher uses


class RecordingEncoder:
    """Wraps a :class:`encoder.SparseEncoder`; keeps every document vector the pipeline made."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.vectors: dict[str, list[SparseVector]] = {}  # text -> its vector, or passages'

    @property
    def metadata(self) -> Any:
        return self.inner.metadata

    async def aencode_documents(
        self, texts: Sequence[str], stats: Any = None
    ) -> list[SparseVector]:
        out: list[SparseVector] = await self.inner.aencode_documents(texts, stats)
        for text, vec in zip(texts, out, strict=True):
            self.vectors[text] = [vec]
        return out

    async def aencode_passages(self, texts: Sequence[str], stats: Any = None) -> list[Any]:
        out: list[Any] = await self.inner.aencode_passages(texts, stats)
        for text, passages in zip(texts, out, strict=True):
            self.vectors[text] = [p.vector for p in passages]
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# ------------------------------------------------------------------------------ indexing


def corpus_records(data: BeirData) -> list[tuple[bytes, bytes]]:
    """One record per document, keyed by id: ``{"id", "title", "body"}``."""
    return [
        (doc_id.encode(), orjson.dumps({"id": doc_id, "title": title, "body": text}))
        for doc_id, (title, text) in data.corpus.items()
    ]


@dataclass
class IndexReport:
    index: str
    docs: int
    seconds: float  # service start to everything committed
    docs_per_s: float
    store_bytes: int  # primaries store.size_in_bytes after refresh, flush, force merge to 1
    vector_field_bytes: int | None  # the sparse_vector field's share (_disk_usage), if known
    avg_nonzeros: float  # per document, as written (after pruning)
    long_docs: int  # documents longer than one window
    passages: int  # vectors written (one a document, or one a passage)
    skipped_docs: int  # documents without text (dead-lettered by the service, not indexed)
    vectors: dict[str, list[SparseVector]] = field(repr=False)  # doc id -> vector(s) as written

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("vectors")
        return out


async def index_corpus(
    data: BeirData,
    variant: Variant,
    encoder: Any,
    *,
    kafka: str,
    settings: Settings,
    partitions: int = 4,
    timeout_s: float = 3600.0,
) -> IndexReport:
    """Produce the corpus, run the service in-process until committed, settle the index."""
    topic = settings.kafka_topics[0]
    await create_topic(kafka, topic, partitions)
    records = corpus_records(data)
    await produce(kafka, topic, records)
    recorder = RecordingEncoder(encoder)
    svc = Service(settings, encoder=recorder)
    start = time.perf_counter()
    await svc.start(consume=True, http=False)
    try:
        await wait_committed(kafka, settings.kafka_group_id, topic, partitions, timeout_s)
        elapsed = time.perf_counter() - start
    finally:
        await svc.stop()

    contract = message_contract(settings)
    vectors: dict[str, list[SparseVector]] = {}
    ref = RecordRef(topic, 0, 0)
    skipped = 0
    for key, value in records:
        try:
            action = decode_record(contract, ref, key, value)
        except BadRecord:  # e.g. an empty document: the service dead-lettered it too
            skipped += 1
            continue
        assert isinstance(action, Upsert)
        vec = recorder.vectors.get(action.text)
        if vec is None:
            raise RuntimeError(f"document {action.doc_id} was not encoded by the pipeline")
        vectors[action.doc_id] = [es_features(v, variant.prune_below) for v in vec]
    window = encoder.window_tokens + 2  # with [CLS] and [SEP]
    long_docs = sum(1 for n in encoder.count_tokens(list(recorder.vectors)) if n > window)

    es = elasticsearch_client(settings)
    index = settings.es_index
    try:
        await es.indices.refresh(index=index)
        await es.indices.flush(index=index)
        await es.indices.forcemerge(index=index, max_num_segments=1)
        await es.indices.refresh(index=index)
        count = (await es.count(index=index))["count"]
        if count != len(data.corpus) - skipped:
            raise RuntimeError(
                f"{index}: {count} documents, expected {len(data.corpus) - skipped} "
                f"({len(data.corpus)} less {skipped} without text)"
            )
        stats = await es.indices.stats(index=index, metric="store")
        # keyed by the index behind the alias: take the total
        store = int(stats["_all"]["primaries"]["store"]["size_in_bytes"])
        vector_path = (
            f"{settings.es_passage_field}.{settings.es_vector_field}"
            if variant_passages(encoder)
            else settings.es_vector_field
        )
        field_bytes = await _field_bytes(es, index, vector_path)
    finally:
        await es.close()
    nnz = sum(len(p) for v in vectors.values() for p in v) / max(1, len(vectors))
    return IndexReport(
        index=index,
        docs=len(data.corpus),
        seconds=elapsed,
        docs_per_s=len(data.corpus) / elapsed,
        store_bytes=store,
        vector_field_bytes=field_bytes,
        avg_nonzeros=nnz,
        long_docs=long_docs,
        passages=sum(len(v) for v in vectors.values()),
        skipped_docs=skipped,
        vectors=vectors,
    )


def variant_passages(encoder: Any) -> bool:
    return getattr(encoder, "long_text", "") == "passages"


async def _field_bytes(es: AsyncElasticsearch, index: str, field_name: str) -> int | None:
    try:
        with warnings.catch_warnings():  # "technical preview"
            warnings.simplefilter("ignore")
            resp = await es.indices.disk_usage(index=index, run_expensive_tasks=True)
        # keyed by the index behind the alias
        fields = next(v for k, v in resp.body.items() if k != "_shards")["fields"]
        return int(fields[field_name]["total_in_bytes"])
    except Exception as exc:  # the API is a technical preview; sizes are a bonus
        log.info("no _disk_usage for %s: %s", index, exc)
        return None


# ------------------------------------------------------------------------------ searching


async def search_all(
    es: AsyncElasticsearch,
    settings: Settings,
    queries: dict[str, str],
    vectors: dict[str, SparseVector],
    *,
    passages: bool = False,
    concurrency: int = 4,
    latency: dict[str, list[float]] | None = None,
) -> dict[str, dict[str, Ranked]]:
    """mode -> query id -> [(doc id, score)] (top ``DEPTH``) for every mode of ``MODES``.
    ``latency``: filled with the seconds of each query, one at a time, as the service sends
    them (top 10), per mode (bm25, sparse, hybrid)."""
    searcher = Searcher(
        es,
        settings.es_index,
        settings.es_vector_field,
        settings.text_fields,
        passage_field=settings.es_passage_field if passages else None,
    )
    native = await searcher.native_sparse()
    gate = asyncio.Semaphore(concurrency)
    runs: dict[str, dict[str, Ranked]] = {m: {} for m in MODES}

    async def exact(vec: SparseVector) -> Ranked:
        if not vec:
            return []
        query = sparse_query(searcher.vector_path, vec, native)
        if native:
            query["sparse_vector"]["prune"] = False
        if searcher.passage_field:
            query = best_passage_query(searcher.passage_field, query, inner_hits=False)
        resp = await es.search(
            index=settings.es_index, query=query, size=DEPTH, source=False, track_total_hits=False
        )
        return [(h["_id"], float(h["_score"])) for h in resp["hits"]["hits"]]

    async def one(qid: str, text: str) -> None:
        async with gate:
            vec = vectors[qid]
            bm25 = await searcher.search("bm25", text, None, DEPTH)
            sparse = await searcher.search("sparse", text, vec, DEPTH)
            runs["bm25"][qid] = [(h.id, h.score) for h in bm25]
            runs["sparse"][qid] = [(h.id, h.score) for h in sparse]
            runs["sparse_exact"][qid] = await exact(vec)
        # Searcher's hybrid with size <= 100: RRF of the top 100 of each.
        bm25_ids = [d for d, _ in runs["bm25"][qid]]
        runs["hybrid"][qid] = rrf([[d for d, _ in runs["sparse"][qid]], bm25_ids])[:DEPTH]
        runs["hybrid_exact"][qid] = rrf([[d for d, _ in runs["sparse_exact"][qid]], bm25_ids])[
            :DEPTH
        ]

    await asyncio.gather(*(one(q, t) for q, t in queries.items()))
    if latency is not None:
        for mode in ("bm25", "sparse", "hybrid"):
            spent = latency.setdefault(mode, [])
            for qid, text in queries.items():
                started = time.perf_counter()
                await searcher.search(mode, text, vectors[qid], 10)
                spent.append(time.perf_counter() - started)
    return runs


async def bm25_beir_setup(
    es: AsyncElasticsearch, index: str, data: BeirData, *, concurrency: int = 4
) -> dict[str, Any]:
    """BM25 as BEIR ran it (``english`` analyzer on title and text, ``multi_match``
    best_fields with tie_breaker 0.5), on the same Elasticsearch: explains the gap between
    our BM25 (standard analyzer, tie_breaker 0) and the published 0.665.

    Minimal Elasticsearch builds (the local stack's) lack the analysis-common module, hence the
    ``english`` analyzer and every stemmer; then the closest: the standard analyzer with English
    stop words. ``analyzer`` in the result says which ran.
    """
    from elasticsearch import BadRequestError
    from elasticsearch.helpers import async_bulk

    analyzers: list[tuple[str, dict[str, Any]]] = [
        ("english", {}),
        ("standard + _english_ stop words (no stemming: no analysis-common module)",
         {"analysis": {"analyzer": {"en": {"type": "standard", "stopwords": "_english_"}}}}),
    ]  # fmt: skip
    used = ""
    for label, analysis in analyzers:
        text = {"type": "text", "analyzer": "english" if not analysis else "en"}
        try:
            await es.indices.create(
                index=index,
                settings={"number_of_shards": 1, "number_of_replicas": 0, **analysis},
                mappings={"properties": {"title": text, "txt": text}},
            )
            used = label
            break
        except BadRequestError as exc:
            if "analyzer" not in str(exc):
                raise
    if not used:
        raise RuntimeError("no usable analyzer for the BM25 reference")
    try:
        await async_bulk(
            es,
            (
                {"_index": index, "_id": d, "_source": {"title": title, "txt": body}}
                for d, (title, body) in data.corpus.items()
            ),
            chunk_size=1000,
        )
        await es.indices.refresh(index=index)
        gate = asyncio.Semaphore(concurrency)
        run: dict[str, list[str]] = {}

        async def one(qid: str, query: str) -> None:
            async with gate:
                resp = await es.search(
                    index=index,
                    size=DEPTH,
                    source=False,
                    query={
                        "multi_match": {
                            "query": query,
                            "type": "best_fields",
                            "fields": ["title", "txt"],
                            "tie_breaker": 0.5,
                        }
                    },
                )
            run[qid] = [h["_id"] for h in resp["hits"]["hits"]]

        await asyncio.gather(*(one(q, t) for q, t in data.queries.items()))
        return {**evaluate(run, data.qrels), "analyzer": used}
    finally:
        await delete_index(es, index)


# ------------------------------------------------------------------------------ the run


@dataclass
class EvalConfig:
    kafka: str
    es_url: str
    model_dir: Path
    variants: Sequence[Variant]
    check_queries: int = 50
    prefix: str = "eval"
    keep_indices: bool = False
    bm25_reference: bool = True  # also BM25 as BEIR set it up (english analyzer)
    settings: dict[str, Any] = field(default_factory=dict)  # extra Settings overrides


def _metrics(
    runs: dict[str, dict[str, Ranked]], qrels: dict[str, dict[str, int]]
) -> dict[str, Any]:
    return {
        mode: evaluate({q: [d for d, _ in r] for q, r in run.items()}, qrels)
        for mode, run in runs.items()
    }


async def run_eval(
    data: BeirData,
    config: EvalConfig,
    say: Callable[[str], None] = print,
    checkpoint: Callable[[dict[str, Any]], object] | None = None,
) -> dict[str, Any]:
    """Every variant in turn; ``checkpoint(report)`` after each (partial results survive)."""
    from encoder import SparseEncoder

    stamp = f"{int(time.time())}-{random.Random().randrange(16**6):06x}"
    encoders: dict[tuple[str | None, str | None, int | None], Any] = {}
    report: dict[str, Any] = {
        "dataset": data.name,
        "docs": len(data.corpus),
        "queries": len(data.queries),
        "model_dir": str(config.model_dir),
        "reference_ndcg@10": REFERENCE_NDCG.get(data.name.lower(), {}),
        "variants": [],
    }
    for i, variant in enumerate(config.variants):
        name = f"{config.prefix}-{data.name}-{i}-{variant.name}-{stamp}".lower()
        name = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
        mode = {"long_text": variant.long_text} if variant.long_text else {}  # else the default
        settings = load_settings(
            **{
                "kafka_bootstrap_servers": config.kafka,
                "kafka_topics": [name],
                "kafka_group_id": name,
                "es_url": config.es_url,
                "es_index": name,
                "model_dir": config.model_dir,
                **mode,
                "window_tokens": variant.window_tokens,
                "es_prune_below": variant.prune_below,
                "es_refresh_interval": "30s",
                "commit_interval_ms": 200,
                "http_port": 0,
                **config.settings,
            }
        )
        options = long_text_options(settings)  # as the service has them
        key = (variant.model_file, options["long_text"], options["window_tokens"])
        if key not in encoders:
            encoders[key] = await asyncio.to_thread(
                SparseEncoder.load, config.model_dir, model_file=variant.model_file, **options
            )
        encoder = encoders[key]
        report.setdefault("model", encoder.metadata.name)
        say(f"[{variant.name}] indexing {len(data.corpus)} documents through Kafka -> service")
        indexed = await index_corpus(data, variant, encoder, kafka=config.kafka, settings=settings)
        say(
            f"[{variant.name}] indexed in {indexed.seconds:.1f}s ({indexed.docs_per_s:.0f} docs/s), "
            f"store {indexed.store_bytes / 1e6:.1f} MB, {indexed.avg_nonzeros:.0f} non-zeros/doc"
        )
        qids = list(data.queries)
        qvecs = dict(
            zip(qids, encoder.encode_queries([data.queries[q] for q in qids]), strict=True)
        )
        es = elasticsearch_client(settings)
        try:
            latency: dict[str, list[float]] = {}
            runs = await search_all(
                es,
                settings,
                data.queries,
                qvecs,
                passages=variant_passages(encoder),
                latency=latency,
            )
            if not config.keep_indices:
                await delete_index(es, name)
        finally:
            await es.close()
        metrics = _metrics(runs, data.qrels)
        check = check_scores(runs, qvecs, indexed.vectors, sample=config.check_queries)
        say(
            f"[{variant.name}] nDCG@10 bm25 {metrics['bm25']['ndcg@10']:.3f}  "
            f"sparse {metrics['sparse']['ndcg@10']:.3f} (exact {metrics['sparse_exact']['ndcg@10']:.3f})  "
            f"hybrid {metrics['hybrid']['ndcg@10']:.3f}; ES vs brute force max rel. error "
            f"{check['sparse_exact']['max_rel_err']:.2%}"
        )
        report["variants"].append(
            {
                **asdict(variant),
                "long_text": encoder.long_text,
                "window_tokens": encoder.window_tokens,
                "query_ms": {
                    mode: {
                        "p50": 1000 * float(np.percentile(spent, 50)),
                        "p99": 1000 * float(np.percentile(spent, 99)),
                    }
                    for mode, spent in latency.items()
                },
                "quantization": encoder.metadata.quantization.label,
                "index": indexed.summary(),
                "metrics": metrics,
                "es_vs_brute_force": check,
            }
        )
        if checkpoint is not None:
            checkpoint(report)
    for enc in encoders.values():
        enc.close()
    if config.bm25_reference:
        es = elasticsearch_client(load_settings(es_url=config.es_url))
        try:
            ref_index = f"{config.prefix}-{data.name}-bm25-beir-{stamp}".lower()
            ref = await bm25_beir_setup(es, ref_index, data)
            report["bm25_beir_setup"] = ref
            say(f"BM25, BEIR's query, analyzer {ref['analyzer']}: nDCG@10 {ref['ndcg@10']:.3f}")
        except Exception as exc:  # a reference only: never lose the run for it
            log.warning("BM25 reference failed: %s", exc)
            report["bm25_beir_setup_error"] = str(exc)
        finally:
            await es.close()
    return report
