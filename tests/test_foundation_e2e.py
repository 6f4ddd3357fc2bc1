"""First end-to-end test through the real services: Kafka -> consumer group -> ES sparse_vector.

Also records what this Elasticsearch accepts (see docs/local-stack.md): the ``sparse_vector``
query, which feature names and weights a ``sparse_vector`` value may hold, and what ``_source``
returns for such a field.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition
from elasticsearch import AsyncElasticsearch, BadRequestError
from elasticsearch.helpers import async_bulk

pytestmark = pytest.mark.integration

# sparse_vector keeps 9 significant bits of each weight: relative error <= 2**-9 ~ 0.2%.
REL_TOL = 0.004
MAPPINGS = {"properties": {"id": {"type": "keyword"}, "tokens": {"type": "sparse_vector"}}}
# BERT-ish tokens, including the awkward ones an encoder emits.
VOCAB = [".", "##.", "a.b", "[CLS]", "é", "日", "search", "##ing", "kafka", "elastic", "sparse"]


def dot(query: dict[str, float], doc: dict[str, float]) -> float:
    return sum(w * doc[k] for k, w in query.items() if k in doc)


def term_query(query: dict[str, float]) -> dict[str, Any]:
    should = [{"term": {"tokens": {"value": k, "boost": w}}} for k, w in query.items()]
    return {"bool": {"should": should}}


def make_docs(n: int, seed: int = 20260) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        keys = rng.sample(VOCAB, rng.randint(2, 6))
        tokens = {k: round(rng.uniform(0.05, 3.0), 4) for k in keys}
        docs.append({"id": f"doc-{i:03d}", "tokens": tokens})
    return docs


async def produce(bootstrap: str, topic: str, docs: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for doc in docs:
            await producer.send(topic, json.dumps(doc).encode(), key=doc["id"].encode())
        await producer.flush()
    finally:
        await producer.stop()


async def consume_and_index(
    bootstrap: str, topic: str, es: AsyncElasticsearch, index: str, expected: int
) -> dict[TopicPartition, tuple[int | None, int]]:
    """Consume in a group with manual commits, index each batch, then commit it.

    Returns {partition: (committed offset, end offset)}.
    """
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"{topic}-indexer",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        seen = 0
        deadline = time.monotonic() + 90
        while seen < expected:
            assert time.monotonic() < deadline, f"consumed only {seen}/{expected} messages"
            batch = await consumer.getmany(timeout_ms=1000, max_records=10)
            if not batch:
                continue
            actions = []
            for records in batch.values():
                for record in records:
                    assert record.value is not None
                    doc = json.loads(record.value)
                    actions.append({"_index": index, "_id": doc["id"], "_source": doc})
            ok, errors = await async_bulk(es, actions, raise_on_error=False)
            assert errors == [], errors
            assert ok == len(actions)
            # Commit only what is indexed: at-least-once.
            await consumer.commit({tp: records[-1].offset + 1 for tp, records in batch.items()})
            seen += len(actions)
        assert seen == expected
        partitions = consumer.assignment()
        ends = await consumer.end_offsets(list(partitions))
        return {tp: (await consumer.committed(tp), ends[tp]) for tp in partitions}
    finally:
        await consumer.stop()


async def test_kafka_to_elasticsearch_sparse_vectors(
    kafka_bootstrap: str, topic: str, es: AsyncElasticsearch, index_name: str
) -> None:
    docs = make_docs(40)
    by_id = {d["id"]: d["tokens"] for d in docs}
    await es.indices.create(index=index_name, mappings=MAPPINGS)
    await produce(kafka_bootstrap, topic, docs)
    offsets = await asyncio.wait_for(
        consume_and_index(kafka_bootstrap, topic, es, index_name, len(docs)), timeout=150
    )
    # The broker auto-created the topic with num.partitions=4; all committed to the end.
    assert len(offsets) == 4, offsets
    assert all(committed == end for committed, end in offsets.values()), offsets
    assert sum(end for _, end in offsets.values()) == len(docs)

    await es.indices.refresh(index=index_name)
    assert (await es.count(index=index_name))["count"] == len(docs)

    queries = [
        {".": 1.0, "##.": 0.5},
        {"a.b": 2.0, "[CLS]": 0.25, "search": 1.5},
        {"é": 1.0, "日": 3.0, "kafka": 0.7, "elastic": 0.3, "sparse": 1.1, "##ing": 0.9},
        {"nothing-matches": 1.0},
    ]
    for query in queries:
        response = await es.search(
            index=index_name, query=term_query(query), size=len(docs), source=False
        )
        hits = {h["_id"]: h["_score"] for h in response["hits"]["hits"]}
        expected = {i: dot(query, t) for i, t in by_id.items() if dot(query, t) > 0}
        assert set(hits) == set(expected), query
        for doc_id, score in hits.items():
            assert score == pytest.approx(expected[doc_id], rel=REL_TOL), (query, doc_id)


async def test_sparse_vector_query_exists_and_scores_dot_product(
    es: AsyncElasticsearch, index_name: str
) -> None:
    """Recorded: the 9.5.3 integ-test zip *has* the ``sparse_vector`` query (x-pack-core)."""
    docs = make_docs(12, seed=7)
    await es.indices.create(index=index_name, mappings=MAPPINGS)
    for doc in docs:
        await es.index(index=index_name, id=doc["id"], document=doc)
    await es.indices.refresh(index=index_name)
    query = {"a.b": 1.25, ".": 0.5, "search": 2.0}
    response = await es.search(
        index=index_name,
        query={"sparse_vector": {"field": "tokens", "query_vector": query}},
        size=len(docs),
    )
    hits = {h["_id"]: h["_score"] for h in response["hits"]["hits"]}
    expected = {d["id"]: dot(query, d["tokens"]) for d in docs if dot(query, d["tokens"]) > 0}
    assert set(hits) == set(expected)
    for doc_id, score in hits.items():
        assert score == pytest.approx(expected[doc_id], rel=REL_TOL)


# (feature name, weight, accepted?, fragment of the error reason when rejected)
FEATURE_CASES: list[tuple[str, str, float, bool, str]] = [
    ("dot", ".", 1.5, True, ""),
    ("hash-dot", "##.", 1.5, True, ""),
    ("a.b", "a.b", 1.5, True, ""),
    ("cls", "[CLS]", 1.5, True, ""),
    ("e-acute", "é", 1.5, True, ""),
    ("cjk", "日", 1.5, True, ""),
    ("space", "a b", 1.5, True, ""),
    ("300-chars", "x" * 300, 1.5, True, ""),
    ("empty", "", 1.5, True, ""),
    ("32766-bytes", "y" * 32766, 1.5, True, ""),
    ("32767-bytes", "y" * 32767, 1.5, False, "immense term"),
    ("zero-weight", "zero", 0.0, False, "featureValue must be a positive normal float, got: 0.0"),
    ("negative", "neg", -1.0, False, "featureValue must be a positive normal float, got: -1.0"),
    ("subnormal", "tiny", 1e-39, False, "less than the minimum positive normal float"),
]


@pytest.mark.parametrize(
    ("key", "weight", "accepted", "error"),
    [pytest.param(k, w, a, e, id=i) for i, k, w, a, e in FEATURE_CASES],
)
async def test_sparse_vector_feature_names(
    es: AsyncElasticsearch, index_name: str, key: str, weight: float, accepted: bool, error: str
) -> None:
    await es.indices.create(index=index_name, mappings=MAPPINGS)
    doc = {"tokens": {key: weight}}
    if not accepted:
        with pytest.raises(BadRequestError) as info:
            await es.index(index=index_name, id="1", document=doc, refresh=True)
        assert error in json.dumps(info.value.body)
        return
    await es.index(index=index_name, id="1", document=doc, refresh=True)
    response = await es.search(
        index=index_name, query={"term": {"tokens": {"value": key, "boost": 2.0}}}
    )
    assert [h["_id"] for h in response["hits"]["hits"]] == ["1"]
    assert response["hits"]["hits"][0]["_score"] == pytest.approx(2 * weight, rel=REL_TOL)


async def test_sparse_vector_source_is_excluded_by_default(
    es: AsyncElasticsearch, index_name: str
) -> None:
    """ES 9 leaves vectors out of ``_source`` (index.mapping.exclude_source_vectors=true);
    ``_source_exclude_vectors=false`` brings them back, as stored (9-bit weights)."""
    await es.indices.create(index=index_name, mappings=MAPPINGS)
    await es.index(
        index=index_name, id="1", document={"id": "1", "tokens": {"a.b": 1.0, "c": 1e30}}
    )
    plain = await es.get(index=index_name, id="1")
    assert plain["_source"] == {"id": "1"}
    full = await es.perform_request(
        "GET",
        f"/{index_name}/_doc/1",
        params={"_source_exclude_vectors": "false"},
        headers={"accept": "application/json"},
    )
    tokens = full.body["_source"]["tokens"]
    assert tokens["a.b"] == 1.0
    assert tokens["c"] != 1e30
    assert tokens["c"] == pytest.approx(1e30, rel=REL_TOL)
