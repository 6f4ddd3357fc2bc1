"""``sparse-ingest eval``: retrieval quality on a BEIR dataset, measured through the real pipeline.

For each variant (model file x long-text mode x index-time pruning):

1. the corpus is produced to a fresh Kafka topic, the :class:`~service.app.Service` runs
   in-process on it until Kafka says the group has committed every record, and the index is
   refreshed, flushed and force-merged to one segment (so store sizes compare);
2. every test query runs against that index as BM25, sparse and hybrid (RRF), the sparse ones
   both as :class:`~service.search.Searcher` sends them (Elasticsearch's default query-time
   token pruning of the ``sparse_vector`` field applies) and exactly (``"prune": false``);
3. nDCG@10, recall@100 and MRR@10 (``service.eval_metrics``);
4. the scores Elasticsearch returns are checked against a brute-force dot product of the query
   vector with the document vectors the pipeline's encoder produced (captured in-process),
   with and without emulating Lucene's 9-significant-bit weight encoding.

Writes ``eval_<dataset>.json`` and ``.md`` (and a ``.png`` when matplotlib is installed) into
``--out``. Starts its own local stack unless ``--kafka`` and ``--es-url`` are given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import struct
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from elasticsearch import AsyncElasticsearch

from service.app import Service, elasticsearch_client, long_text_options, message_contract
from service.config import Settings, load_settings
from service.elastic import delete_index
from service.eval_metrics import evaluate
from service.messages import BadRecord, RecordRef, Upsert, decode_record
from service.search import Searcher, best_passage_query, rrf, sparse_query
from service.sink import es_features

log = logging.getLogger(__name__)

LongText = Literal["chunk", "truncate", "passages"]
LONG_TEXT_MODES: tuple[LongText, ...] = ("chunk", "truncate", "passages")
SparseVector = dict[str, float]
MODES = ("bm25", "sparse", "hybrid", "sparse_exact", "hybrid_exact")
DEPTH = 100  # retrieved per query and mode: recall@100, and the RRF depth the Searcher uses
# Published nDCG@10 figures the results are read against, per dataset (none for the others).
REFERENCE_NDCG = {"scifact": {"bm25_beir": 0.665, "elser_v2": 0.718}}
# Lucene's FeatureField keeps the upper 16 bits of the float32: 9 significant bits.
FEATURE_REL_PRECISION = 2.0**-8


# ------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class BeirData:
    name: str
    corpus: dict[str, tuple[str, str]]  # doc id -> (title, text), in file order
    queries: dict[str, str]  # judged queries only
    qrels: dict[str, dict[str, int]]


def load_beir(path: str | Path, split: str = "test") -> BeirData:
    """A BEIR folder: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``."""
    root = Path(path)
    for need in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (root / need).is_file():
            raise FileNotFoundError(f"{root / need}: missing (BEIR layout expected)")
    qrels: dict[str, dict[str, int]] = {}
    with (root / "qrels" / f"{split}.tsv").open() as f:
        for n, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or (n == 0 and not parts[2].lstrip("-").isdigit()):
                continue  # header
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    queries: dict[str, str] = {}
    with (root / "queries.jsonl").open() as f:
        for line in f:
            q = orjson.loads(line)
            if str(q["_id"]) in qrels:
                queries[str(q["_id"])] = str(q["text"])
    corpus: dict[str, tuple[str, str]] = {}
    with (root / "corpus.jsonl").open() as f:
        for line in f:
            d = orjson.loads(line)
            corpus[str(d["_id"])] = (str(d.get("title") or ""), str(d.get("text") or ""))
    qrels = {q: rel for q, rel in qrels.items() if q in queries}
    return BeirData(root.name, corpus, queries, qrels)


def subset(
    data: BeirData,
    *,
    limit_docs: int | None = None,
    max_queries: int | None = None,
    seed: int = 0,
) -> BeirData:
    """Queries (in file order, at most ``max_queries``) whose relevant documents all fit in
    ``limit_docs``, those documents, and other documents (a seeded sample) up to ``limit_docs``.

    Scores on a subset are higher than on the full corpus (fewer distractors).
    """
    if limit_docs is None and max_queries is None:
        return data
    budget = limit_docs if limit_docs is not None else len(data.corpus)
    keep_docs: dict[str, None] = {}
    keep_queries: list[str] = []
    for q, rel in data.qrels.items():
        if max_queries is not None and len(keep_queries) >= max_queries:
            break
        needed = [d for d, r in rel.items() if r > 0 and d in data.corpus and d not in keep_docs]
        if len(keep_docs) + len(needed) > budget:
            continue
        keep_queries.append(q)
        keep_docs.update(dict.fromkeys(needed))
    others = [d for d in data.corpus if d not in keep_docs]
    random.Random(seed).shuffle(others)
    keep_docs.update(dict.fromkeys(others[: max(0, budget - len(keep_docs))]))
    corpus = {d: t for d, t in data.corpus.items() if d in keep_docs}  # file order
    return BeirData(
        data.name,
        corpus,
        {q: data.queries[q] for q in keep_queries},
        {q: {d: r for d, r in data.qrels[q].items() if d in corpus} for q in keep_queries},
    )


# ------------------------------------------------------------------------------ variants


@dataclass(frozen=True)
class Variant:
    name: str
    model_file: str | None = None  # None: the folder's model.onnx (INT8)
    long_text: LongText | None = None  # None: the service's default
    prune_below: float = 0.0
    window_tokens: int | None = None  # None: the service's default; 0: all the model takes


def default_variants(fp32_file: str | None, prunes: Sequence[float] = (0.1, 0.3)) -> list[Variant]:
    out = [Variant("int8")]
    if fp32_file:
        out.append(Variant("fp32", model_file=fp32_file))
    out.append(Variant("int8-truncate", long_text="truncate"))
    out += [Variant(f"int8-prune{p:g}", prune_below=p) for p in prunes if p > 0]
    return out


def long_text_variant(name: str) -> Variant | None:
    """``int8-<mode>[<window tokens>]`` (``int8-passages256``; ``int8-chunk``: windows of all
    the model takes), else None."""
    for mode in LONG_TEXT_MODES:
        rest = name.removeprefix(f"int8-{mode}")
        if rest != name and (rest == "" or rest.isdigit()):
            return Variant(name, long_text=mode, window_tokens=int(rest) if rest else 0)
    return None


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


async def create_topic(kafka: str, topic: str, partitions: int = 4) -> None:
    """Create a topic (replication 1: the local stack's single broker)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


def corpus_records(data: BeirData) -> list[tuple[bytes, bytes]]:
    """One record per document, keyed by id: ``{"id", "title", "body"}``."""
    return [
        (doc_id.encode(), orjson.dumps({"id": doc_id, "title": title, "body": text}))
        for doc_id, (title, text) in data.corpus.items()
    ]


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

Ranked = list[tuple[str, float]]


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


# ------------------------------------------------------------------------------ brute force


def lucene_feature(weight: float) -> float:
    """``weight`` as Lucene's FeatureField stores it (float32 bits >> 15 << 15: truncation)."""
    bits = struct.unpack("<I", struct.pack("<f", weight))[0]
    return float(struct.unpack("<f", struct.pack("<I", (bits >> 15) << 15))[0])


def lucene_vector(vec: SparseVector) -> SparseVector:
    """:func:`lucene_feature` of every weight (vectorised)."""
    weights = np.fromiter(vec.values(), dtype=np.float32, count=len(vec))
    stored = ((weights.view(np.uint32) >> 15) << 15).view(np.float32)
    return dict(zip(vec.keys(), stored.tolist(), strict=True))


def dot(query: SparseVector, doc: SparseVector) -> float:
    return sum(w * doc.get(t, 0.0) for t, w in query.items())


def query_as_sent(vec: SparseVector) -> SparseVector:
    """The query vector as :func:`service.search.sparse_query` sends it (top tokens only)."""
    q = sparse_query("f", vec, native=True)["sparse_vector"]["query_vector"]
    return {str(k): float(v) for k, v in q.items()}


def best_dot(query: SparseVector, doc: list[SparseVector]) -> float:
    """A document's score: its best passage's dot product (its one vector's, without)."""
    return max((dot(query, p) for p in doc), default=0.0)


Inverted = dict[str, list[tuple[tuple[str, int], float]]]


def brute_force_top(query: SparseVector, index: Inverted, k: int) -> Ranked:
    """The ``k`` best documents by :func:`best_dot`, over an :func:`inverted` index."""
    scores: dict[tuple[str, int], float] = {}
    for token, qw in query.items():
        for key, w in index.get(token, ()):
            scores[key] = scores.get(key, 0.0) + qw * w
    best: dict[str, float] = {}
    for (doc, _), score in scores.items():
        best[doc] = max(score, best.get(doc, score))
    return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def inverted(vectors: dict[str, list[SparseVector]]) -> Inverted:
    """token -> [((doc, passage), weight)]."""
    inv: Inverted = {}
    for doc, passages in vectors.items():
        for i, vec in enumerate(passages):
            for token, w in vec.items():
                inv.setdefault(token, []).append(((doc, i), w))
    return inv


def check_scores(
    runs: dict[str, dict[str, Ranked]],
    query_vectors: dict[str, SparseVector],
    doc_vectors: dict[str, list[SparseVector]],
    *,
    sample: int = 50,
    k: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Elasticsearch's ``_score`` of the top ``k`` hits of ``sample`` queries against the
    brute-force dot product of the query vector (as sent) and the documents' vectors (as
    written; a document with passages scores as its best): raw, and with the stored weights
    truncated to 9 significant bits as Lucene does. Also whether the brute-force top ``k`` over the whole corpus is what Elasticsearch returned.
    """
    qids = sorted(query_vectors)
    random.Random(seed).shuffle(qids)
    qids = [q for q in qids if query_vectors[q]][:sample]
    lucene_docs = {doc: [lucene_vector(p) for p in vec] for doc, vec in doc_vectors.items()}
    inv = inverted(doc_vectors)
    inv_lucene = inverted(lucene_docs)
    out: dict[str, Any] = {"queries": len(qids), "k": k}
    for mode in ("sparse_exact", "sparse"):
        rel, rel_lucene = [], []
        same_top, overlap, same_scores = 0, 0.0, 0
        for q in qids:
            qv = query_as_sent(query_vectors[q])
            hits = runs[mode][q][:k]
            for doc, score in hits:
                bf = best_dot(qv, doc_vectors[doc])
                bf_l = best_dot(qv, lucene_docs[doc])
                rel.append(abs(score - bf) / bf if bf else math.inf)
                rel_lucene.append(abs(score - bf_l) / bf_l if bf_l else math.inf)
            top = brute_force_top(qv, inv, k)
            es_ids = [d for d, _ in hits]
            bf_ids = [d for d, _ in top]
            same_top += es_ids == bf_ids
            overlap += len(set(es_ids) & set(bf_ids)) / max(1, len(bf_ids))
            # Ranking up to exact ties: the k best scores are the same numbers.
            top_l = brute_force_top(qv, inv_lucene, k)
            same_scores += len(top_l) == len(hits) and all(
                abs(s - b) <= 1e-5 * max(abs(b), 1e-9)
                for (_, s), (_, b) in zip(hits, top_l, strict=True)
            )
        n = max(1, len(rel))
        out[mode] = {
            "hits": len(rel),
            "max_rel_err": max(rel, default=0.0),
            "mean_rel_err": sum(rel) / n,
            "within_1pct": sum(r <= 0.01 for r in rel) / n,
            "within_field_precision": sum(r <= FEATURE_REL_PRECISION for r in rel) / n,
            "max_rel_err_lucene_emulated": max(rel_lucene, default=0.0),
            "same_top_k_as_brute_force": same_top / max(1, len(qids)),
            "top_k_overlap_with_brute_force": overlap / max(1, len(qids)),
            "same_top_k_scores_lucene_emulated": same_scores / max(1, len(qids)),
        }
    return out


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


# ------------------------------------------------------------------------------ output


def markdown(report: dict[str, Any]) -> str:
    ref = report["reference_ndcg@10"]
    lines = [
        f"### {report['dataset']}: {report['docs']:,} documents, {report['queries']} queries, "
        f"model {report.get('model', '?')}",
        "",
        "nDCG@10 / recall@100 / MRR@10. *sparse* and *hybrid* are the queries as the service "
        "sends them (Elasticsearch's default query-time token pruning applies); *exact* adds "
        '`"prune": false`. Hybrid = RRF (k=60) of the top 100 sparse and BM25 hits.'
        + (
            f" Published nDCG@10: BM25 (BEIR) {ref['bm25_beir']}, ELSER v2 {ref['elser_v2']}."
            if ref
            else ""
        ),
        "",
        "| variant | BM25 | sparse | sparse exact | hybrid | hybrid exact | store MB | vector field MB | non-zeros/doc | vectors/doc | store bytes/doc | index docs/s | sparse ms p50/p99 | hybrid ms p50/p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(v: dict[str, Any], mode: str) -> str:
        q = v.get("query_ms", {}).get(mode)
        return f"{q['p50']:.1f} / {q['p99']:.1f}" if q else "n/a"

    def cell(m: dict[str, float]) -> str:
        return f"{m['ndcg@10']:.3f} / {m['recall@100']:.3f} / {m['mrr@10']:.3f}"

    for v in report["variants"]:
        m, ix = v["metrics"], v["index"]
        field_mb = (
            "n/a" if ix["vector_field_bytes"] is None else f"{ix['vector_field_bytes'] / 1e6:.1f}"
        )
        window = f" {v['window_tokens']}" if v.get("window_tokens") else ""
        per_doc = ix.get("passages", ix["docs"]) / max(1, ix["docs"])
        lines.append(
            f"| {v['name']} ({v['quantization']}, {v['long_text']}{window}, "
            f"prune < {v['prune_below']:g}) "
            f"| {cell(m['bm25'])} | {cell(m['sparse'])} | {cell(m['sparse_exact'])} "
            f"| {cell(m['hybrid'])} | {cell(m['hybrid_exact'])} "
            f"| {ix['store_bytes'] / 1e6:.1f} | {field_mb} | {ix['avg_nonzeros']:.0f} "
            f"| {per_doc:.2f} | {ix['store_bytes'] / max(1, ix['docs']):,.0f} "
            f"| {ix['docs_per_s']:.0f} | {ms(v, 'sparse')} | {ms(v, 'hybrid')} |"
        )
    beir = report.get("bm25_beir_setup")
    if beir:
        lines += [
            "",
            "BM25 with BEIR's query (`multi_match` best_fields, tie_breaker 0.5) and analyzer "
            f"{beir['analyzer']} (BEIR: `english`), same Elasticsearch and documents: "
            f"{cell(beir)}. Our BM25 column uses the service's mapping (standard analyzer) and "
            "query (tie_breaker 0).",
        ]
    lines += ["", "Elasticsearch `_score` against the brute-force dot product (top 10 hits):", ""]
    lines += [
        "| variant | query | hits | max rel. error | within 1% | max error, 9-bit emulated "
        "| same top-10 ids | same top-10 scores, 9-bit emulated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in report["variants"]:
        c = v["es_vs_brute_force"]
        for mode, label in (("sparse_exact", "exact"), ("sparse", "as sent (pruned)")):
            r = c[mode]
            lines.append(
                f"| {v['name']} | {label} | {r['hits']} | {r['max_rel_err']:.3%} "
                f"| {r['within_1pct']:.1%} | {r['max_rel_err_lucene_emulated']:.2e} "
                f"| {r['same_top_k_as_brute_force']:.0%} "
                f"| {r['same_top_k_scores_lucene_emulated']:.0%} |"
            )
    return "\n".join(lines) + "\n"


def plot_quality(report: dict[str, Any], path: Path) -> bool:
    """nDCG@10 per variant and mode, and index size against quality; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    variants = report["variants"]
    modes = [("bm25", "BM25"), ("sparse", "sparse"), ("sparse_exact", "sparse exact"),
             ("hybrid", "hybrid"), ("hybrid_exact", "hybrid exact")]  # fmt: skip
    ref = report["reference_ndcg@10"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(modes)
    values = []
    for j, (mode, label) in enumerate(modes):
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(variants))]
        ys = [v["metrics"][mode]["ndcg@10"] for v in variants]
        values += ys
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    if ref:
        ax.axhline(
            ref["bm25_beir"], color="grey", ls="--", lw=1, label=f"BEIR BM25 {ref['bm25_beir']}"
        )
        ax.axhline(
            ref["elser_v2"], color="black", ls=":", lw=1, label=f"ELSER v2 {ref['elser_v2']}"
        )
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels([v["name"] for v in variants], fontsize=8)
    ax.set_ylabel("nDCG@10")
    low = min([*values, *ref.values()])
    high = max([*values, *ref.values()])
    ax.set_ylim(max(0.0, low - 0.08), min(1.0, high + 0.05))
    ax.set_title(
        f"{report['dataset']} ({report['docs']:,} docs, {report['queries']} queries), "
        f"{report.get('model', '')}",
        fontsize=10,
    )
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    # pruning compared on the first variant's model file and long-text handling (the default):
    # one point per threshold
    first = variants[0]
    pruned = [
        v
        for v in variants
        if v["model_file"] is None
        and (v["long_text"], v.get("window_tokens"))
        == (first["long_text"], first.get("window_tokens"))
    ]
    pruned = pruned or variants
    for v in pruned:
        ix = v["index"]
        size = ix["vector_field_bytes"] or ix["store_bytes"]
        y = v["metrics"]["sparse_exact"]["ndcg@10"]
        ax2.scatter(size / 1e6, y)
        ax2.annotate(
            f"prune < {v['prune_below']:g}\n{ix['avg_nonzeros']:.0f} nnz/doc",
            (size / 1e6, y),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    field_known = all(v["index"]["vector_field_bytes"] for v in pruned)
    ax2.set_xlabel(("sparse_vector field" if field_known else "index store") + " size, MB")
    ax2.set_ylabel("sparse exact nDCG@10")
    ax2.set_title(f"Index-time pruning (INT8, {first['long_text']})", fontsize=10)
    ax2.grid(True, alpha=0.3)
    ys2 = [v["metrics"]["sparse_exact"]["ndcg@10"] for v in pruned]
    ax2.set_ylim(min(ys2) - 0.02, max(ys2) + 0.02)
    ax2.margins(x=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ CLI


def add_subcommands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="retrieval quality (nDCG@10, recall@100, MRR@10) on a BEIR dataset, end to end",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("beir_dir", metavar="BEIR_DIR", help="corpus.jsonl, queries.jsonl, qrels/")
    p.add_argument("--model", help="model folder (default: the default model, fetched once)")
    p.add_argument("--limit-docs", type=int, help="a subset: judged docs first, then a sample")
    p.add_argument("--max-queries", type=int)
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="results", help="folder for JSON, markdown and PNG")
    p.add_argument(
        "--variants",
        help="comma-separated subset of: int8 (the service's default), fp32, int8-truncate, "
        "int8-prune<X>, int8-<chunk|truncate|passages>[<window tokens>] "
        "(default: int8, fp32, int8-truncate and the --prune ones)",
    )
    p.add_argument("--prune", default="0.1,0.3", help="index-time pruning thresholds to compare")
    p.add_argument(
        "--check-queries", type=int, default=50, help="queries for the brute-force check"
    )
    p.add_argument("--kafka", help="bootstrap servers (default: start a local stack)")
    p.add_argument("--es-url", help="Elasticsearch URL (default: start a local stack)")
    p.add_argument("--keep-indices", action="store_true")
    p.set_defaults(handler=_eval)


def select_variants(
    fp32_file: str | None, prunes: Sequence[float], names: str | None
) -> list[Variant]:
    prunes = list(prunes)
    wanted = [n.strip() for n in names.split(",")] if names else None
    if wanted:
        prunes += [
            float(n.removeprefix("int8-prune")) for n in wanted if n.startswith("int8-prune")
        ]
    variants = default_variants(fp32_file, sorted(set(prunes)))
    if wanted is None:
        return variants
    by_name = {v.name: v for v in variants}
    for n in wanted:
        extra = long_text_variant(n)
        if extra is not None and n not in by_name:
            by_name[n] = extra
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(
            f"sparse-ingest eval: unknown variant(s) {unknown}; known: {list(by_name)}"
        )
    return [by_name[n] for n in wanted]


def _eval(args: argparse.Namespace) -> int:
    from encoder import fetch_default_model
    from encoder.metadata import read_metadata

    model_dir = Path(args.model).expanduser() if args.model else fetch_default_model()
    meta = read_metadata(model_dir)
    prunes = [float(x) for x in args.prune.split(",") if x.strip()]
    variants = select_variants(meta.files.get("model_fp32"), prunes, args.variants)
    data = subset(load_beir(args.beir_dir, args.split), limit_docs=args.limit_docs,
                  max_queries=args.max_queries)  # fmt: skip
    stack = None
    kafka, es_url = args.kafka, args.es_url
    if not (kafka and es_url):
        from deploy.local import LocalStack

        stack = LocalStack(name="eval")
        info = stack.up(kafka=not kafka, elasticsearch=not es_url)
        kafka, es_url = kafka or info.kafka_bootstrap, es_url or info.es_url
    assert kafka and es_url
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval_{data.name}" + (f"_{len(data.corpus)}docs" if args.limit_docs else "")
    command = "sparse-ingest " + " ".join(sys.argv[1:])

    def save(report: dict[str, Any]) -> str:
        report["command"] = command
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        table = markdown(report)
        (out / f"{stem}.md").write_text(table)
        return table

    try:
        config = EvalConfig(kafka, es_url, model_dir, variants, args.check_queries,
                            keep_indices=args.keep_indices)  # fmt: skip
        started = time.perf_counter()
        report = asyncio.run(run_eval(data, config, checkpoint=save))
        report["seconds"] = time.perf_counter() - started
    finally:
        if stack is not None:
            stack.down()
    table = save(report)
    png = plot_quality(report, out / f"{stem}.png")
    print()
    print(table)
    print(f"wrote {out / stem}.json, .md" + (", .png" if png else " (no matplotlib: no plot)"))
    return 0
