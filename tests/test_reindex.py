"""Changing the model without downtime (``sparse-ingest reindex``), on the real stack.

Model A (the default INT8 export) serves an alias; updates and deletes keep coming while
model B (a re-export of the same checkpoint without quantization: other vectors, another
fingerprint) builds a new index from the topic's start as its own group; the alias swaps when
B has caught up; B's deployment takes over the group's offsets. Every document ends with
model B's vector for its last text, no update or delete is lost, and every search during the
procedure answers from one index (one model's vectors).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from elasticsearch import AsyncElasticsearch
from service_support import (
    VECTOR_SOURCE,
    cosine,
    create_topic,
    doc,
    produce,
    running_service,
    service_settings,
    stored_vector,
    tombstone,
    wait_all_committed,
    wait_until,
)

from service.builder import long_text_options
from service.config import load_settings
from service.errors import StartupError
from service.messages import META_FIELD, vector_fingerprint
from service.reindex import Progress, ReindexError, alias_state, reindex, retire
from service.search import best_passage_query
from service.sink import IndexConfig, versioned_index

pytestmark = pytest.mark.integration  # needs the local stack


@pytest.fixture(scope="module")
def model_b_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    from encoder.export import export_model
    from encoder.fetch import fetch_source
    from encoder.registry import DEFAULT_MODEL_NAME

    out = tmp_path_factory.mktemp("model-b") / "splade-tiny-fp32"
    export_model(fetch_source(DEFAULT_MODEL_NAME), out, quantize="none", name="splade-tiny-fp32")
    return out


@pytest.fixture(scope="module")
def encoder_b(model_b_dir: Path) -> Any:
    """Model B as the service's settings load it (what `reindex` loads)."""
    from encoder import SparseEncoder

    return SparseEncoder.load(
        model_b_dir, **long_text_options(load_settings(model_dir=model_b_dir))
    )


def fingerprint(encoder: Any) -> str:
    return vector_fingerprint(encoder.metadata.name, encoder.fingerprint, 0.0)


async def all_docs(es: AsyncElasticsearch, index: str) -> dict[str, dict[str, Any]]:
    await es.indices.refresh(index=index)
    resp = await es.search(
        index=index,
        size=10_000,
        source_includes=["body", f"{META_FIELD}.model_fingerprint", *VECTOR_SOURCE],
    )
    return {h["_id"]: h["_source"] for h in resp["hits"]["hits"]}


async def test_reindex_with_a_new_model_while_updates_go_on(
    kafka_bootstrap: str,
    es_url: str,
    es: AsyncElasticsearch,
    topic: str,
    index_name: str,
    default_encoder: Any,
    model_b_dir: Path,
    encoder_b: Any,
) -> None:
    await create_topic(kafka_bootstrap, topic, 2)
    alias = index_name
    settings_a = service_settings(kafka_bootstrap, es_url, topic, alias)
    rng = random.Random(13)
    expected: dict[str, str | None] = {
        f"d{i}": f"first text {i} about topic {i % 7}" for i in range(300)
    }
    await produce(kafka_bootstrap, topic, [doc(k, v) for k, v in expected.items() if v])

    fp_a, fp_b = fingerprint(default_encoder), fingerprint(encoder_b)
    assert fp_a != fp_b
    index_a, index_b = versioned_index(alias, fp_a), versioned_index(alias, fp_b)

    async with running_service(settings_a, default_encoder) as service_a:
        assert service_a.index == index_a  # a new alias gets a versioned index behind it
        await wait_all_committed(kafka_bootstrap, settings_a.kafka_group_id, topic)

        producing = asyncio.Event()
        producing.set()
        changes = 0

        async def keep_changing() -> None:
            nonlocal changes
            while producing.is_set():
                batch = []
                for _ in range(10):
                    key = f"d{rng.randrange(320)}"  # some new ids too
                    if rng.random() < 0.2:
                        expected[key] = None
                        batch.append(tombstone(key))
                    else:
                        expected[key] = f"update {changes} of {key}: words {rng.random():.6f}"
                        batch.append(doc(key, expected[key]))
                    changes += 1
                await produce(kafka_bootstrap, topic, batch)
                await asyncio.sleep(0.05)

        searches: list[set[str]] = []

        async def keep_searching() -> None:
            vector = encoder_b.encode_queries(["topic 3"])[0]
            while producing.is_set():
                with contextlib.suppress(Exception):  # the alias may not exist for a moment
                    resp = await es.search(
                        index=alias,
                        size=50,
                        query=best_passage_query(
                            "passages",
                            {"sparse_vector": {"field": "passages.tokens", "query_vector": vector}},
                            inner_hits=False,
                        ),
                        source_includes=[f"{META_FIELD}.model_fingerprint"],
                    )
                    searches.append(
                        {
                            h["_source"][META_FIELD]["model_fingerprint"]
                            for h in resp["hits"]["hits"]
                        }
                    )
                # the running service A answers from its own index, whatever the alias does
                hits = await service_a.searcher.search("sparse", "topic 3", vector, 5)  # type: ignore[union-attr]
                assert hits is not None
                await asyncio.sleep(0.1)

        changer = asyncio.create_task(keep_changing())
        searcher = asyncio.create_task(keep_searching())
        stop = asyncio.Event()
        reports: list[Progress] = []
        started = time.monotonic()
        reindexing = asyncio.create_task(
            reindex(
                settings_a,
                model_b_dir,
                encoder=encoder_b,
                progress_s=0.5,
                stop=stop,
                report=reports.append,
            )
        )

        async def swapped() -> bool:
            if reindexing.done():
                reindexing.result()  # raises what went wrong
            state = await alias_state(es, alias)
            return state.indices == (index_b,)

        await wait_until(swapped, 300, "the alias to swap to the new index")
        swap_s = time.monotonic() - started
        # updates and deletes go on after the swap: the reindexing group writes them
        mark = changes

        async def more_changes() -> bool:
            return changes - mark >= 150

        await wait_until(more_changes, 60, "more changes after the swap")
        producing.clear()
        await asyncio.gather(changer, searcher)
        group_b = f"{settings_a.kafka_group_id}-{fp_b[:12]}"
        await wait_all_committed(kafka_bootstrap, group_b, topic, timeout=120)
        stop.set()
        result = await reindexing
        assert result.swapped and result.index == index_b and result.previous == (index_a,)

        # service A still writes its own index (never the new one) and is not disturbed
        assert service_a.index == index_a and service_a.pipeline_running
        # retiring its index and group while it runs deletes nothing
        with pytest.raises(ReindexError, match="still has members"):
            await retire(settings_a, index_a, settings_a.kafka_group_id)
        assert (await alias_state(es, index_a)).indices == (index_a,)

    # an old replica restarted after the swap refuses to mix its model into the new index
    with pytest.raises(StartupError, match="reindex"):
        async with running_service(settings_a, default_encoder):
            pass

    # the new deployment takes the group's offsets over: changes made meanwhile are not lost
    late = {f"d{i}": f"late change {i}" for i in range(5)} | {"d5": None}
    expected.update(late)
    await produce(
        kafka_bootstrap, topic, [doc(k, v) if v else tombstone(k) for k, v in late.items()]
    )
    settings_b = service_settings(
        kafka_bootstrap, es_url, topic, alias, model_dir=model_b_dir, kafka_group_id=group_b
    )
    async with running_service(settings_b, encoder_b) as service_b:
        assert service_b.index == index_b
        await wait_all_committed(kafka_bootstrap, group_b, topic)

    docs = await all_docs(es, alias)
    alive = {k: v for k, v in expected.items() if v is not None}
    assert set(docs) == set(alive), "an update or a delete was lost"
    assert all(d["body"] == alive[k] for k, d in docs.items()), "a stale text won"
    assert {d[META_FIELD]["model_fingerprint"] for d in docs.values()} == {fp_b}
    sample = sorted(docs)[:40]
    vectors_b = encoder_b.encode_documents([alive[k] for k in sample])
    vectors_a = default_encoder.encode_documents([alive[k] for k in sample])
    for key, vb, va in zip(sample, vectors_b, vectors_a, strict=True):
        stored = stored_vector(docs[key]) or {}
        assert cosine(stored, vb) > 0.9999, key
        assert cosine(stored, va) < cosine(stored, vb), key
    assert searches and all(len(fps) <= 1 for fps in searches), "a search mixed two indices"
    assert {fp for fps in searches for fp in fps} <= {fp_a, fp_b}

    done = await retire(settings_a, index_a, settings_a.kafka_group_id)
    assert done == [
        f"deleted index {index_a}",
        f"deleted consumer group {settings_a.kafka_group_id}",
    ]
    assert (await alias_state(es, alias)).indices == (index_b,)
    last = reports[-1]
    print(
        f"\nreindex: {len(expected)} ids, {changes} changes during it; caught up and swapped "
        f"{swap_s:.1f} s after the start ({result.seconds_to_catch_up:.1f} s to catch up); "
        f"last report: {last.describe(index_b)}"
    )


async def test_reindex_guards(
    kafka_bootstrap: str,
    es_url: str,
    es: AsyncElasticsearch,
    topic: str,
    index_name: str,
    default_encoder: Any,
    default_model_dir: Path,
) -> None:
    """A transactional topic catches up (the commit marker is past every committed offset); a
    topic that lost records to retention is refused; retire takes one index that does not
    serve, and deletes nothing while the old group has members; --replace-index does not swap
    while the old deployment writes the index by name."""
    await create_topic(kafka_bootstrap, topic, 1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"{topic}-tx")
    await producer.start()
    try:
        async with producer.transaction():
            for i in range(5):
                await producer.send(topic, orjson.dumps({"id": f"t{i}", "body": f"text {i}"}))
    finally:
        await producer.stop()
    # a plain index (an earlier release's) written by the old deployment, which keeps running
    await es.indices.create(index=index_name, **IndexConfig(index_name).body())
    settings = service_settings(kafka_bootstrap, es_url, topic, index_name)
    pruned = settings.model_copy(update={"es_prune_below": 0.3})
    async with running_service(settings, default_encoder):
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        with pytest.raises(ReindexError, match="still writes by name"):
            await reindex(
                pruned, default_model_dir, encoder=default_encoder, exit_after_swap=True,
                replace_index=True, progress_s=0.3,
            )  # fmt: skip
        assert (await alias_state(es, index_name)).indices == (index_name,)  # not swapped
        with pytest.raises(ReindexError, match="one index name"):
            await retire(settings, f"{index_name}-x,{index_name}", None)
        with pytest.raises(ReindexError, match="serves now"):
            await retire(settings, index_name, None)
    # the old deployment stopped: the swap goes through (the transaction's marker is no obstacle)
    result = await asyncio.wait_for(
        reindex(
            pruned, default_model_dir, encoder=default_encoder, exit_after_swap=True,
            replace_index=True, progress_s=0.3,
        ),
        120,
    )  # fmt: skip
    assert result.swapped and (await alias_state(es, index_name)).indices == (result.index,)
    assert (await es.count(index=index_name))["count"] == 5

    # retention took the oldest records of a topic that is not compacted: refused
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(2)})
    finally:
        await admin.close()
    with pytest.raises(ReindexError, match="retention"):
        await reindex(settings, default_model_dir, encoder=default_encoder, exit_after_swap=True)
