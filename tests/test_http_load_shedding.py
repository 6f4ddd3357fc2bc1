"""HTTP load shedding against the real Kafka and Elasticsearch with the default model: past
``HTTP_MAX_CONCURRENT`` requests at work, /encode and /search get 429 with Retry-After at once,
and the ingest keeps indexing while a client hammers /encode (the encoder gate's burst rule)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any

import aiohttp
import pytest
from elasticsearch import AsyncElasticsearch
from service_support import (
    create_topic,
    doc,
    metric,
    produce,
    running_service,
    service_settings,
    wait_all_committed,
    wait_until,
)

from service.app import Service
from service.config import ConfigError, load_settings

pytestmark = pytest.mark.integration


class HeldEncoder:
    """The real encoder, with a door in front of its API calls (queries and priority document
    calls) that the test opens: the test knows how many requests are at work. Ingest calls pass
    straight through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.door = asyncio.Event()
        self.at_door = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def priority_burst(self) -> int:
        return int(self.inner.priority_burst)

    @priority_burst.setter
    def priority_burst(self, value: int) -> None:
        self.inner.priority_burst = value

    async def _wait_at_door(self) -> None:
        self.at_door += 1
        await self.door.wait()

    async def aencode_queries(self, texts: Sequence[str], stats: Any = None) -> Any:
        await self._wait_at_door()
        return await self.inner.aencode_queries(texts, stats)

    async def aencode_documents(
        self, texts: Sequence[str], stats: Any = None, *, priority: bool = False
    ) -> Any:
        if priority:
            await self._wait_at_door()
        return await self.inner.aencode_documents(texts, stats, priority=priority)


async def _post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, str], Any]:
    async with http.post(url, json=body) as r:
        return r.status, dict(r.headers), await r.json()


async def test_requests_past_the_bound_get_429_with_retry_after(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,  # deletes the index afterwards
    default_encoder: Any,
) -> None:
    held = HeldEncoder(default_encoder)
    settings = service_settings(kafka_bootstrap, es_url, topic, index_name, http_max_concurrent=3)
    svc = Service(settings, encoder=held)
    await svc.start(consume=False)  # HTTP only
    try:
        base = f"http://127.0.0.1:{svc.http_port}"
        async with aiohttp.ClientSession() as http:
            admitted = [
                asyncio.ensure_future(_post(http, f"{base}/encode", body))
                for body in ({"text": "glacier", "query": True}, {"texts": ["ice", "lava"]})
            ]
            admitted.append(
                asyncio.ensure_future(
                    _post(http, f"{base}/search", {"query": "glacier", "mode": "sparse"})
                )
            )

            async def three_at_work() -> bool:
                return held.at_door == 3

            await wait_until(three_at_work, 60, "3 requests at the encoder")
            assert metric(svc, "sparse_ingest_http_inflight_requests") == 3
            # Past the bound: refused at once, whatever the endpoint or mode.
            for path, body in [
                ("/encode", {"text": "volcano"}),
                ("/search", {"query": "volcano", "mode": "hybrid"}),
                ("/search", {"query": "volcano", "mode": "bm25"}),
            ]:
                status, headers, answer = await _post(http, base + path, body)
                assert status == 429, (path, answer)
                assert headers["Retry-After"] == "1"
                assert "SPARSE_INGEST_HTTP_MAX_CONCURRENT" in answer["error"]
                assert "retry after 1 s" in answer["error"]
                assert "volcano" not in answer["error"]
            # A bad request is still told what is wrong; probes are never shed.
            status, _, answer = await _post(http, f"{base}/encode", {"texts": []})
            assert status == 400, answer
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200
            assert held.at_door == 3  # nothing refused reached the encoder
            # The admitted ones are answered in full once the encoder frees up.
            held.door.set()
            results = await asyncio.gather(*admitted)
            assert [status for status, _, _ in results] == [200, 200, 200], results
            assert all(results[0][2]["vectors"][0]) and len(results[1][2]["vectors"]) == 2
            assert results[2][2]["mode"] == "sparse"
            # ... and their slots are free again.
            status, _, answer = await _post(http, f"{base}/encode", {"text": "volcano"})
            assert status == 200, answer
        rejected = "sparse_ingest_http_rejected_total"
        assert metric(svc, rejected, {"endpoint": "/encode", "reason": "max_concurrent"}) == 1
        assert metric(svc, rejected, {"endpoint": "/search", "reason": "max_concurrent"}) == 2
        requests = "sparse_ingest_http_requests_total"
        assert metric(svc, requests, {"endpoint": "/encode", "status": "429"}) == 1
        assert metric(svc, requests, {"endpoint": "/search", "status": "429"}) == 2
        assert metric(svc, "sparse_ingest_http_inflight_requests") == 0
    finally:
        await svc.stop()


# Bounds of the flood: clients, requests per client, seconds in all.
FLOOD_CLIENTS = 8
FLOOD_REQUESTS_PER_CLIENT = 20_000
FLOOD_SECONDS = 150.0
# A refused client retries after 10 ms instead of the second it is asked to wait.
FLOOD_RETRY_S = 0.01
# ~400 tokens: a document request of 24 of them is 5 inference calls back to back
LONG_TEXT = " ".join(["the glacier carved a valley into the mountain over many winters"] * 29)


async def test_ingest_makes_progress_while_a_client_floods_encode(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,  # deletes the index afterwards
    default_encoder: Any,
) -> None:
    """8 clients (loopback) send /encode as fast as they are answered and retry 429s after
    10 ms, queries and 24-text document requests mixed, against a bound of 4. Documents produced
    meanwhile are all indexed while the flood goes on: the ingest is not starved."""
    n_docs = 200
    await create_topic(kafka_bootstrap, topic, partitions=1)
    settings = service_settings(kafka_bootstrap, es_url, topic, index_name, http_max_concurrent=4)
    statuses: collections.Counter[int] = collections.Counter()
    missing_retry_after = 0
    stop = asyncio.Event()
    async with running_service(settings, default_encoder) as svc:
        url = f"http://127.0.0.1:{svc.http_port}/encode"

        async def client(n: int, http: aiohttp.ClientSession) -> None:
            nonlocal missing_retry_after
            body: dict[str, Any] = (
                {"text": "glacier valley", "query": True} if n % 2 else {"texts": [LONG_TEXT] * 24}
            )
            for _ in range(FLOOD_REQUESTS_PER_CLIENT):
                if stop.is_set():
                    return
                async with http.post(url, json=body) as r:
                    await r.read()
                    statuses[r.status] += 1
                if r.status == 429:
                    missing_retry_after += r.headers.get("Retry-After") != "1"
                    await asyncio.sleep(FLOOD_RETRY_S)

        connector = aiohttp.TCPConnector(limit=FLOOD_CLIENTS)
        async with aiohttp.ClientSession(connector=connector) as http:
            flood = [asyncio.ensure_future(client(n, http)) for n in range(FLOOD_CLIENTS)]
            try:

                async def flood_at_full_strength() -> bool:
                    return statuses[200] > FLOOD_CLIENTS and statuses[429] > 0

                await wait_until(flood_at_full_strength, 60, "the flood to be answered and shed")
                await produce(
                    kafka_bootstrap,
                    topic,
                    [doc(f"d{i}", f"Document {i}: {LONG_TEXT[:600]}") for i in range(n_docs)],
                )
                answered_before = statuses[200]

                async def all_indexed() -> bool:
                    return metric(svc, "sparse_ingest_documents_indexed_total") >= n_docs

                await wait_until(all_indexed, FLOOD_SECONDS, f"{n_docs} documents indexed")
                flood_still_on = not any(task.done() for task in flood)
                answered_during = statuses[200] - answered_before
            finally:
                stop.set()
                await asyncio.gather(*flood)
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        assert metric(svc, "sparse_ingest_documents_indexed_total") == n_docs
    assert flood_still_on, "the flood ended before the ingest was done: nothing was shown"
    assert answered_during > 0, statuses
    assert set(statuses) == {200, 429}, statuses
    assert missing_retry_after == 0


@pytest.mark.parametrize(
    ("name", "value"), [("http_max_concurrent", 0), ("encoder_priority_burst", 0)]
)
def test_load_shedding_settings_are_checked(name: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"SPARSE_INGEST_{name.upper()}"):
        load_settings(**{name: value})
