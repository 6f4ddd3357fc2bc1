"""The ingest service against the real local Kafka and Elasticsearch, with the default model."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from elasticsearch import AsyncElasticsearch
from service_support import (
    committed,
    cosine,
    create_topic,
    doc,
    end_offsets,
    metric,
    partitions,
    produce,
    read_topic,
    running_service,
    service_settings,
    stored_vector,
    tombstone,
    wait_all_committed,
)

from service.app import Service
from service.errors import StartupError
from service.messages import META_FIELD
from service.search import best_passage_query, sparse_query

pytestmark = pytest.mark.integration

WORDS = [
    "ocean",
    "glacier",
    "volcano",
    "desert",
    "forest",
    "river",
    "mountain",
    "island",
    "canyon",
    "valley",
    "prairie",
    "swamp",
    "tundra",
    "reef",
    "lagoon",
    "delta",
    "plateau",
    "savanna",
    "meadow",
    "marsh",
]


def body_text(i: int, rev: int = 0) -> str:
    a, b, c = WORDS[i % 20], WORDS[(i * 7 + rev) % 20], WORDS[(i * 13 + 3 * rev) % 20]
    return f"Document {i} revision {rev} is about the {a} near a {b} and a {c}."


async def get_all(es: AsyncElasticsearch, index: str) -> dict[str, dict[str, Any]]:
    await es.indices.refresh(index=index)
    resp = await es.search(
        index=index,
        size=10_000,
        query={"match_all": {}},
        version=True,
        source_exclude_vectors=False,
    )
    return {h["_id"]: {**h["_source"], "_version": h["_version"]} for h in resp["hits"]["hits"]}


async def test_stream_with_updates_and_deletes_ends_in_the_right_state(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_encoder: Any,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=4)
    n = 120
    records = [doc(f"d{i}", body_text(i)) for i in range(n)]
    records += [doc(f"d{i}", body_text(i, rev=1)) for i in range(0, n, 3)]  # updates
    records += [tombstone(f"d{i}") for i in range(0, n, 10)]  # deletes
    await produce(kafka_bootstrap, topic, records)
    settings = service_settings(kafka_bootstrap, es_url, topic, index_name)

    async with running_service(settings, default_encoder) as svc:
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        consumed = metric(svc, "sparse_ingest_documents_consumed_total", {"topic": topic})
        indexed = metric(svc, "sparse_ingest_documents_indexed_total")
        assert consumed == len(records)
        assert indexed >= n - n // 10  # every final document written at least once

    stored = await get_all(es, index_name)
    expected_ids = {f"d{i}" for i in range(n) if i % 10 != 0}
    assert set(stored) == expected_ids
    texts = {f"d{i}": body_text(i, rev=1 if i % 3 == 0 else 0) for i in range(n)}
    sample = sorted(expected_ids)[:40]
    fresh = default_encoder.encode_documents([texts[i] for i in sample])
    for doc_id, vec in zip(sample, fresh, strict=True):
        got = stored[doc_id]
        assert got["body"] == texts[doc_id]
        # INT8 activations are quantized per inference call (the batch changes the scales) and
        # Elasticsearch keeps 9 bits of each weight: 0.989 measured for one document here
        assert cosine(stored_vector(got) or {}, vec) > 0.98, doc_id
        assert len(got["passages"]) == 1  # short texts: one passage
        assert got[META_FIELD]["model"] == default_encoder.metadata.name

    # Searching with a document's own vector ranks it first, scored as the dot product.
    target = stored_vector(stored["d7"]) or {}
    terms = sparse_query("passages.tokens", target, native=False)
    resp = await es.search(
        index=index_name, size=3, query=best_passage_query("passages", terms, inner_hits=False)
    )
    top = resp["hits"]["hits"][0]
    assert top["_id"] == "d7"
    expected = sum(w * w for w in target.values())
    assert top["_score"] == pytest.approx(expected, rel=0.01)


async def test_stale_and_duplicate_versions_never_win(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_encoder: Any,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=1)
    settings = service_settings(kafka_bootstrap, es_url, topic, index_name)
    async with running_service(settings, default_encoder) as svc:
        # In one batch: v5 then v3 (late) then v5 again (duplicate).
        await produce(
            kafka_bootstrap,
            topic,
            [
                doc("x", "fifth version", version=5),
                doc("x", "third version", version=3),
                doc("x", "fifth version", version=5),
                doc("y", "version one", version=1),
            ],
        )
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        # In later batches: an older version and a duplicate of the current one arrive.
        await produce(kafka_bootstrap, topic, [doc("x", "fourth version", version=4)])
        await produce(kafka_bootstrap, topic, [doc("y", "version one", version=1)])
        await produce(kafka_bootstrap, topic, [tombstone("y", version=0)])  # stale delete
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        labels = {"topic": topic}
        stale_es = metric(
            svc, "sparse_ingest_documents_stale_total", {"source": "elasticsearch", **labels}
        )
        stale_batch = metric(
            svc, "sparse_ingest_documents_stale_total", {"source": "batch", **labels}
        )
    stored = await get_all(es, index_name)
    assert stored["x"]["body"] == "fifth version"
    assert stored["x"]["_version"] == 5
    assert stored["y"]["_version"] == 1
    # Two superseded inside the first burst (in one batch or across two), two older ones later
    # (x v4, the delete of y at v0). The repeated y v1 is written again (external_gte: a
    # replay replaces itself), not dropped.
    assert stale_batch + stale_es == 4


async def test_bad_records_go_to_the_dead_letter_topic_and_the_stream_goes_on(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_encoder: Any,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=1)
    bad: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = [
        (b"k1", b"{not json", []),
        (b"k2", b"\xff\xfe\xfd", []),
        (None, orjson.dumps({"body": "no id and no key"}), []),
        (b"k4", orjson.dumps({"id": "k4", "body": ""}), []),
        (b"k5", orjson.dumps({"id": "k5", "body": 42}), []),
        (b"k6", b"[" * 3000 + b"]" * 3000, []),
        (b"k7", orjson.dumps({"id": "k7", "body": "x" * 200_000}), [("trace", b"abc")]),
        # Valid JSON the index rejects ("when" is mapped as a date by g0): Elasticsearch says why.
        (b"k8", orjson.dumps({"id": "k8", "body": "fine text", "when": "not a date"}), []),
    ]
    reasons = [
        "invalid_json", "invalid_utf8", "missing_id", "missing_text", "wrong_type",
        "invalid_json", "too_large", "document_parsing_exception",
    ]  # fmt: skip
    good = [doc(f"g{i}", body_text(i), when="2024-01-01") for i in range(20)]
    stream = [r for pair in zip(good, bad, strict=False) for r in pair] + good[len(bad) :]
    await produce(kafka_bootstrap, topic, stream)
    settings = service_settings(
        kafka_bootstrap, es_url, topic, index_name, max_message_bytes=100_000
    )
    async with running_service(settings, default_encoder) as svc:
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        dead_total = sum(
            metric(svc, "sparse_ingest_documents_dead_lettered_total", {"reason": r})
            for r in set(reasons)
        )
    assert dead_total == len(bad)
    stored = await get_all(es, index_name)
    assert set(stored) == {f"g{i}" for i in range(20)}

    letters = await read_topic(kafka_bootstrap, settings.dead_letter_topic, len(bad))
    assert len(letters) == len(bad)
    offsets = await end_offsets(kafka_bootstrap, topic)
    assert sum(offsets.values()) == len(stream)
    by_key = {r.key: r for r in letters}
    for (key, value, _), reason in zip(bad, reasons, strict=True):
        letter = by_key[key]
        headers = {k: v.decode() for k, v in letter.headers}
        assert letter.value == value  # the original bytes
        assert headers["error.reason"] == reason
        assert headers["source.topic"] == topic
        assert headers["source.partition"] == "0"
        assert int(headers["source.offset"]) == stream.index((key, value, _))
        assert headers["error.message"]
    assert dict(by_key[b"k7"].headers)["trace"] == b"abc"  # the record's own headers are kept


async def test_dead_letter_topic_is_made_at_start_or_named_in_the_error(
    kafka_bootstrap: str, es_url: str, topic: str, index_name: str, default_encoder: Any
) -> None:
    """Before the first bad record: created (partitions as the source topic), or, with creation
    off, a start-up error that names the topic and the setting."""
    await create_topic(kafka_bootstrap, topic, partitions=3)
    settings = service_settings(
        kafka_bootstrap, es_url, topic, index_name, kafka_dead_letter_topic=f"{topic}.letters"
    )
    async with running_service(settings, default_encoder):
        assert len(await partitions(kafka_bootstrap, f"{topic}.letters")) == 3
    async with running_service(settings, default_encoder):  # exists now: started as it is
        pass

    missing = service_settings(
        kafka_bootstrap,
        es_url,
        topic,
        index_name,
        kafka_dead_letter_topic=f"{topic}.nowhere",
        kafka_create_dead_letter_topic=False,
    )
    svc = Service(missing, encoder=default_encoder)
    try:
        with pytest.raises(StartupError) as err:
            await svc.start()
    finally:
        await svc.stop()
    assert f"{topic}.nowhere" in str(err.value)
    assert "SPARSE_INGEST_KAFKA_CREATE_DEAD_LETTER_TOPIC" in str(err.value)


async def test_restart_resumes_without_loss_or_rework(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_encoder: Any,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=2)
    settings = service_settings(kafka_bootstrap, es_url, topic, index_name)
    await produce(kafka_bootstrap, topic, [doc(f"a{i}", body_text(i)) for i in range(60)])
    async with running_service(settings, default_encoder) as first:
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        assert metric(first, "sparse_ingest_documents_consumed_total", {"topic": topic}) == 60
    await produce(kafka_bootstrap, topic, [doc(f"b{i}", body_text(i, 2)) for i in range(40)])
    async with running_service(settings, default_encoder) as second:
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        assert metric(second, "sparse_ingest_documents_consumed_total", {"topic": topic}) == 40
    stored = await get_all(es, index_name)
    assert len(stored) == 100


async def test_two_replicas_share_the_partitions(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_encoder: Any,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=4)
    settings = service_settings(kafka_bootstrap, es_url, topic, index_name)
    async with (
        running_service(settings, default_encoder) as one,
        running_service(settings, default_encoder) as two,
    ):
        for _ in range(100):  # both in the group, each with partitions
            if (
                one.consumer
                and two.consumer
                and one.consumer.assignment()
                and two.consumer.assignment()
            ):
                break
            await asyncio.sleep(0.2)
        assert one.consumer is not None and two.consumer is not None
        assert one.consumer.assignment() and two.consumer.assignment()
        assert not (one.consumer.assignment() & two.consumer.assignment())
        await produce(kafka_bootstrap, topic, [doc(f"s{i}", body_text(i)) for i in range(200)])
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        c1 = metric(one, "sparse_ingest_documents_consumed_total", {"topic": topic})
        c2 = metric(two, "sparse_ingest_documents_consumed_total", {"topic": topic})
    assert c1 > 0 and c2 > 0 and c1 + c2 >= 200
    assert len(await get_all(es, index_name)) == 200


async def test_unchanged_text_is_not_encoded_again(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_encoder: Any,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=1)
    settings = service_settings(kafka_bootstrap, es_url, topic, index_name)
    async with running_service(settings, default_encoder) as svc:
        await produce(
            kafka_bootstrap, topic, [doc(f"u{i}", body_text(i), views=0) for i in range(10)]
        )
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        before = await get_all(es, index_name)
        tokens_before = metric(svc, "sparse_ingest_encoder_tokens_total")
        # Metadata-only updates for all ten, a real text change for one.
        updates = [doc(f"u{i}", body_text(i), views=i + 1) for i in range(10)]
        updates[3] = doc("u3", "an entirely different text about volcanoes", views=4)
        await produce(kafka_bootstrap, topic, updates)
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        skipped = metric(svc, "sparse_ingest_documents_skipped_unchanged_total")
        tokens_after = metric(svc, "sparse_ingest_encoder_tokens_total")
    after = await get_all(es, index_name)
    assert skipped == 9
    assert 0 < tokens_after - tokens_before < tokens_before / 5
    for i in range(10):
        assert after[f"u{i}"]["views"] == i + 1
        if i != 3:
            assert after[f"u{i}"]["passages"] == before[f"u{i}"]["passages"]
    changed = stored_vector(after["u3"]) or {}
    assert "volcano" in changed or "volcanoes" in changed


async def test_http_api(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_encoder: Any,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=1)
    settings = service_settings(
        kafka_bootstrap,
        es_url,
        topic,
        index_name,
        http_bearer_token="s3cret-token",
        http_max_body_bytes=4096,
    )
    await produce(
        kafka_bootstrap,
        topic,
        [
            doc(
                "cat", "The domestic cat is a small carnivorous mammal kept as a pet.", title="Cats"
            ),
            doc(
                "tax",
                "Income tax returns must be filed before the deadline in April.",
                title="Taxes",
            ),
            doc(
                "sea",
                "Whales and dolphins are marine mammals living in the ocean.",
                title="Sea life",
            ),
        ],
    )
    async with running_service(settings, default_encoder) as svc:
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        await es.indices.refresh(index=index_name)
        base = f"http://127.0.0.1:{svc.http_port}"
        auth = {"Authorization": "Bearer s3cret-token"}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200
            async with http.get(f"{base}/readyz") as r:
                body = await r.json()
                assert r.status == 200, body
                assert set(body["checks"]) == {"model", "elasticsearch", "kafka"}
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
                assert "sparse_ingest_documents_indexed_total 3.0" in text
                assert "s3cret-token" not in text
            async with http.post(f"{base}/encode", json={"text": "kitten"}) as r:
                assert r.status == 401
            async with http.post(
                f"{base}/encode", json={"text": "a kitten", "query": True}, headers=auth
            ) as r:
                body = await r.json()
                assert r.status == 200
                vec = body["vectors"][0]
                assert vec and all(w > 0 for w in vec.values())
                assert "[CLS]" not in vec and "[SEP]" not in vec
            for mode in ("sparse", "bm25", "hybrid"):
                async with http.post(
                    f"{base}/search",
                    json={"query": "feline pet", "mode": mode, "size": 3},
                    headers=auth,
                ) as r:
                    body = await r.json()
                    assert r.status == 200, body
                    if mode != "bm25":
                        assert body["hits"][0]["id"] == "cat", (mode, body)
                    for hit in body["hits"]:
                        assert "tokens" not in hit["source"] and "passages" not in hit["source"]
            errors = [
                ({"query": ""}, 400),
                ({"query": "x", "mode": "magic"}, 400),
                ({"query": "x", "size": 0}, 400),
                ({"query": "x" * 3000}, 413),
            ]
            for payload, status in errors:
                async with http.post(f"{base}/search", json=payload, headers=auth) as r:
                    assert r.status == status, payload
                    assert (await r.json())["error"]
            async with http.post(f"{base}/search", data=b"{", headers=auth) as r:
                assert r.status == 400
            async with http.post(f"{base}/encode", data=b"x" * 10_000, headers=auth) as r:
                assert r.status == 413
    # Nothing written through HTTP: the index holds just the three documents.
    assert (await es.count(index=index_name))["count"] == 3


async def test_offsets_are_committed_only_after_elasticsearch_confirmed(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_encoder: Any,
) -> None:
    """With Elasticsearch refusing writes (index blocked), nothing is committed; once it
    accepts again, everything is written and committed."""
    await create_topic(kafka_bootstrap, topic, partitions=1)
    settings = service_settings(
        kafka_bootstrap,
        es_url,
        topic,
        index_name,
        es_unavailable_backoff_s=0.2,
        es_bulk_max_retries=0,
    )
    async with running_service(settings, default_encoder) as svc:
        await es.indices.put_settings(index=index_name, settings={"index.blocks.write": True})
        await produce(kafka_bootstrap, topic, [doc(f"w{i}", body_text(i)) for i in range(30)])
        for _ in range(50):
            if metric(svc, "sparse_ingest_bulk_requests_total", {"outcome": "retry"}) >= 2:
                break
            await asyncio.sleep(0.2)
        assert metric(svc, "sparse_ingest_bulk_requests_total", {"outcome": "retry"}) >= 2
        ends = await end_offsets(kafka_bootstrap, topic)
        got = await committed(kafka_bootstrap, settings.kafka_group_id, list(ends))
        assert all(v <= 0 for v in got.values()), got
        await es.indices.put_settings(index=index_name, settings={"index.blocks.write": False})
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
    assert len(await get_all(es, index_name)) == 30
