"""Routine operations that must not lose updates silently (issue 12, findings 1, 4, 5, 7):

- a topic deleted and recreated: without a new version epoch its records are refused as stale,
  loudly (metric per topic, a sampled log line with both versions); with the epoch raised the
  new content wins;
- a replay from the start writes every record again (no stale), and a changed model fingerprint
  (here: index-time pruning) encodes every unchanged text again;
- partitions added while the service runs are consumed within seconds;
- a proxy in front of Elasticsearch that refuses bodies over its limit (413): the batch is
  written in smaller chunks, only a document too large on its own is dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from aiokafka.errors import KafkaError
from elasticsearch import AsyncElasticsearch
from service_support import (
    create_topic,
    doc,
    metric,
    produce,
    read_topic,
    running_service,
    service_settings,
    wait_all_committed,
    wait_until,
)

from service.elastic import delete_index
from service.errors import StartupError
from service.messages import OFFSET_VERSION_BITS
from service.sink import IndexConfig

pytestmark = pytest.mark.integration


def dead_letters(svc: Any) -> float:
    """Dead letters of every reason so far."""
    return sum(
        sample.value
        for family in svc.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "sparse_ingest_documents_dead_lettered_total"
    )


async def stored(es: AsyncElasticsearch, index: str) -> dict[str, dict[str, Any]]:
    await es.indices.refresh(index=index)
    resp = await es.search(
        index=index, size=1000, query={"match_all": {}}, version=True, source_exclude_vectors=False
    )
    return {h["_id"]: {**h["_source"], "_version": h["_version"]} for h in resp["hits"]["hits"]}


async def recreate_topic(kafka: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()

    async def created() -> bool:
        try:
            await create_topic(kafka, topic, partitions=1)
        except KafkaError:  # still marked for deletion
            return False
        return True

    await wait_until(created, 60, f"topic {topic} created again")


async def test_recreated_topic_is_loudly_stale_then_wins_with_a_new_epoch(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_encoder: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=1)
    await produce(kafka_bootstrap, topic, [doc("a", f"old text {i}") for i in range(10)])
    base = service_settings(kafka_bootstrap, es_url, topic, index_name)
    async with running_service(base, default_encoder):
        await wait_all_committed(kafka_bootstrap, base.kafka_group_id, topic)
    assert (await stored(es, index_name))["a"]["_version"] == 9  # the offset

    await recreate_topic(kafka_bootstrap, topic)
    await produce(kafka_bootstrap, topic, [doc("a", "new text"), doc("b", "new doc")])

    # Same epoch: offset 0 is older than the stored 9. Dropped, but loudly.
    same = service_settings(
        kafka_bootstrap, es_url, topic, index_name, kafka_group_id=f"{topic}-same-epoch"
    )
    with caplog.at_level(logging.WARNING, logger="service.batches"):
        async with running_service(same, default_encoder) as svc:
            await wait_all_committed(kafka_bootstrap, same.kafka_group_id, topic)
            labels = {"source": "elasticsearch", "topic": topic}
            assert metric(svc, "sparse_ingest_documents_stale_total", labels) == 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stale:")]
    assert len(lines) == 1, lines
    assert "'a'" in lines[0] and "version 0" in lines[0] and "[9]" in lines[0], lines[0]
    assert "new text" not in lines[0]  # ids and versions, never the content
    docs = await stored(es, index_name)
    assert docs["a"]["body"] == "old text 9" and docs["b"]["body"] == "new doc"

    # Epoch raised: every record of the new topic wins over every version of the old one.
    epoch = service_settings(
        kafka_bootstrap,
        es_url,
        topic,
        index_name,
        kafka_group_id=f"{topic}-epoch-1",
        version_epoch=1,
    )
    async with running_service(epoch, default_encoder):
        await wait_all_committed(kafka_bootstrap, epoch.kafka_group_id, topic)
    docs = await stored(es, index_name)
    assert docs["a"]["body"] == "new text"
    assert docs["a"]["_version"] == 1 << OFFSET_VERSION_BITS  # epoch 1, offset 0


async def test_replay_rewrites_and_a_new_fingerprint_is_refused(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_encoder: Any,
) -> None:
    n = 20
    await create_topic(kafka_bootstrap, topic, partitions=2)
    await produce(kafka_bootstrap, topic, [doc(f"d{i}", f"glaciers and ice {i}") for i in range(n)])
    # a plain index (an earlier release's, or made by hand): no model recorded in its mapping
    await es.indices.create(index=index_name, **IndexConfig(index_name).body())

    async def run(
        group: str, index: str = index_name, **overrides: Any
    ) -> tuple[float, float, float]:
        settings = service_settings(
            kafka_bootstrap, es_url, topic, index, kafka_group_id=group, **overrides
        )
        async with running_service(settings, default_encoder) as svc:
            await wait_all_committed(kafka_bootstrap, group, topic)
            return (
                metric(svc, "sparse_ingest_documents_indexed_total"),
                metric(svc, "sparse_ingest_documents_skipped_unchanged_total"),
                metric(
                    svc,
                    "sparse_ingest_documents_stale_total",
                    {"source": "elasticsearch", "topic": topic},
                ),
            )

    assert await run(f"{topic}-first") == (n, 0, 0)
    first = await stored(es, index_name)
    # A replay (a new group from the start, same model): written again, nothing encoded, no stale.
    assert await run(f"{topic}-replay") == (n, n, 0)
    replayed = await stored(es, index_name)
    assert replayed.keys() == first.keys()
    # Index-time pruning changes the vectors: this plain index (no model in its mapping) tells
    # by its documents, and the start is refused (one index never mixes two models' vectors).
    with pytest.raises(StartupError, match="sparse-ingest reindex"):
        await run(f"{topic}-pruned", es_prune_below=0.5)
    assert await stored(es, index_name) == replayed  # nothing written

    # An index the service made records its model: another fingerprint is refused at start
    # (one index never mixes two models; README: Changing the model).
    alias = f"{index_name}-alias"
    try:
        assert await run(f"{topic}-alias", alias) == (n, 0, 0)
        with pytest.raises(StartupError, match="sparse-ingest reindex"):
            await run(f"{topic}-alias-pruned", alias, es_prune_below=0.5)
    finally:
        await delete_index(es, alias)


async def test_partitions_added_while_running_are_consumed_within_seconds(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_encoder: Any,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=1)
    settings = service_settings(kafka_bootstrap, es_url, topic, index_name)
    assert settings.kafka_metadata_max_age_ms == 5000  # the default under test
    async with running_service(settings, default_encoder) as svc:
        await produce(kafka_bootstrap, topic, [doc("p0", "first partition")], partition=0)
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_partitions({topic: NewPartitions(total_count=3)})
        finally:
            await admin.close()
        await produce(kafka_bootstrap, topic, [doc("p2", "third partition")], partition=2)

        async def assigned() -> bool:
            assert svc.consumer is not None
            return len(svc.consumer.assignment()) == 3

        # aiokafka's default metadata age is 5 minutes: this would time out without the setting
        await wait_until(assigned, 60, "the new partitions assigned")

        async def indexed() -> bool:
            return "p2" in await stored(es, index_name)

        await wait_until(indexed, 60, "the record of the new partition indexed")
    assert set(await stored(es, index_name)) == {"p0", "p2"}


@asynccontextmanager
async def body_limit_proxy(
    es_url: str, limit: int, how: str = "413"
) -> AsyncIterator[tuple[str, list[int]]]:
    """A reverse proxy to Elasticsearch that refuses a request body over ``limit`` bytes: with
    413 (as nginx does, in HTML), or ``how="drop"``: by dropping the connection (as some load
    balancers do). Yields its URL and the sizes of the bodies it refused. ``how="slow"``: every
    bulk request waits 5 s first; yields the list holding that delay (empty it: fast again)."""
    refused: list[int] = []
    slow = [5.0]  # how="slow": each bulk waits this long (cleared by the caller: fast again)
    session = aiohttp.ClientSession()

    async def forward(request: web.Request) -> web.Response:
        if how == "slow" and request.path.endswith("/_bulk") and slow:
            await asyncio.sleep(slow[0])  # longer than the client's request timeout
        if how == "drop" and (request.content_length or 0) > limit:
            refused.append(request.content_length or 0)
            assert request.transport is not None
            request.transport.abort()
            raise web.HTTPBadRequest()
        body = await request.read()
        if len(body) > limit:
            refused.append(len(body))
            return web.Response(
                status=413,
                text="<html><body><h1>413 Request Entity Too Large</h1></body></html>",
                content_type="text/html",
            )
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("content-type", "accept", "authorization")
        }
        async with session.request(
            request.method, es_url + request.path_qs, data=body, headers=headers
        ) as resp:
            return web.Response(
                status=resp.status,
                body=await resp.read(),
                headers={
                    k: v
                    for k, v in resp.headers.items()
                    if k.lower() in ("content-type", "x-elastic-product")
                },
            )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", refused if how != "slow" else slow
    finally:
        await runner.cleanup()
        await session.close()


@pytest.mark.parametrize("how", ["413", "drop"])
async def test_a_proxy_body_limit_splits_bulks_and_dead_letters_only_the_oversized_document(
    how: str,
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_encoder: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    limit = 48 * 1024
    await create_topic(kafka_bootstrap, topic, partitions=1)
    records = [doc(f"d{i}", f"text number {i} " + "moraine " * 300) for i in range(40)]
    records.insert(20, doc("huge", "word " * 20_000))  # ~100 KB: over the limit on its own
    await produce(kafka_bootstrap, topic, records)
    async with body_limit_proxy(es_url, limit, how) as (proxy_url, refused):
        settings = service_settings(
            kafka_bootstrap, proxy_url, topic, index_name, batch_max_docs=64
        )
        with caplog.at_level(logging.WARNING, logger="service.sink"):
            async with running_service(settings, default_encoder) as svc:
                await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
                assert metric(svc, "sparse_ingest_documents_indexed_total") == 40
                reason = "request_too_large" if how == "413" else "request_rejected"
                dead = metric(
                    svc, "sparse_ingest_documents_dead_lettered_total", {"reason": reason}
                )
                assert dead == 1, how
        assert refused, "the proxy refused nothing: the test did not test"
    assert set(await stored(es, index_name)) == {f"d{i}" for i in range(40)}
    [letter] = await read_topic(kafka_bootstrap, settings.dead_letter_topic, 1)
    headers = {k: v.decode() for k, v in letter.headers}
    assert letter.key == b"huge" and headers["error.reason"] == reason
    assert orjson.loads(letter.value)["id"] == "huge"
    assert any(
        "refused a bulk request as too large (413)" in r.getMessage() for r in caplog.records
    )


async def test_a_slow_elasticsearch_is_waited_out_not_dead_lettered(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_encoder: Any,
) -> None:
    """Bulk requests time out (the cluster is slow, its health answers): the batch is retried,
    nothing is dead-lettered or committed, and all lands once the cluster is fast again. (A
    first fix for dropped connections took timeouts for a proxy's body limit.)"""
    await create_topic(kafka_bootstrap, topic, partitions=1)
    await produce(kafka_bootstrap, topic, [doc(f"d{i}", f"text {i}") for i in range(4)])
    async with body_limit_proxy(es_url, 10**9, "slow") as (proxy_url, slow):
        settings = service_settings(
            kafka_bootstrap,
            proxy_url,
            topic,
            index_name,
            es_request_timeout_s=1.0,
            es_unavailable_backoff_s=0.2,
        )
        async with running_service(settings, default_encoder) as svc:

            async def retried() -> bool:
                labels = {"outcome": "unavailable"}
                return metric(svc, "sparse_ingest_bulk_requests_total", labels) >= 3

            await wait_until(retried, 120, "three bulk attempts to time out")
            assert dead_letters(svc) == 0
            slow.clear()
            await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
            assert metric(svc, "sparse_ingest_documents_indexed_total") == 4
            assert dead_letters(svc) == 0


async def test_a_closed_index_is_waited_out_not_dead_lettered(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_encoder: Any,
) -> None:
    """An index closed for a settings change answers each item with index_closed_exception
    (400): the cluster's state, not the documents' fault."""
    await create_topic(kafka_bootstrap, topic, partitions=1)
    settings = service_settings(
        kafka_bootstrap, es_url, topic, index_name, es_unavailable_backoff_s=0.2
    )
    async with running_service(settings, default_encoder) as svc:
        await es.indices.close(index=index_name)
        await produce(kafka_bootstrap, topic, [doc(f"d{i}", f"text {i}") for i in range(5)])

        async def refused() -> bool:
            labels = {"reason": "index_closed_exception"}
            return metric(svc, "sparse_ingest_bulk_item_errors_total", labels) >= 5

        await wait_until(refused, 120, "the closed index to refuse the batch")
        await es.indices.open(index=index_name)
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        assert metric(svc, "sparse_ingest_documents_indexed_total") == 5
        assert dead_letters(svc) == 0
