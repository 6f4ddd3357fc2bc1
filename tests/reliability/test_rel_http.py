"""The HTTP API under abuse (what tests/test_service_ingest.py::test_http_api does not cover):
chunked and oversized bodies, too many texts, wrong or missing bearer tokens (never echoed),
methods and paths that do not exist, and no write to Elasticsearch whatever is sent."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
import scenarios
from elasticsearch import AsyncElasticsearch
from reliability_harness import index_stats

from service.app import Service

pytestmark = pytest.mark.integration

TOKEN = "http-secret-7c1d2e"


async def _chunks(total: int, size: int = 16384) -> AsyncIterator[bytes]:
    for _ in range(0, total, size):
        yield b"x" * size


async def test_http_api_limits_auth_and_no_writes(
    rel_env: scenarios.Env, index_name: str, es: AsyncElasticsearch
) -> None:
    settings = scenarios.settings_for(
        rel_env, "unused", index_name, "unused", http_bearer_token=TOKEN, http_max_body_bytes=8192
    )
    service = Service(settings, encoder=rel_env.encoder)
    await service.start(consume=False)  # HTTP only: the index exists, nothing consumes
    try:
        before = await index_stats(es, index_name)
        base = f"http://127.0.0.1:{service.http_port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as http:
            # Open endpoints need no token (they reveal no data and no secret).
            for path in ("/healthz", "/readyz", "/metrics"):
                async with http.get(base + path) as r:
                    assert r.status == 200, path
                    assert TOKEN not in await r.text()
            # Wrong tokens: same length, other scheme, lower case, empty; never echoed.
            wrong = [
                "Bearer " + "x" * len(TOKEN),
                f"Basic {TOKEN}",
                f"bearer {TOKEN}",
                "Bearer ",
                f"Bearer {TOKEN}x",
            ]
            for header in wrong:
                async with http.post(
                    f"{base}/encode", json={"text": "a"}, headers={"Authorization": header}
                ) as r:
                    assert r.status == 401, header
                    assert TOKEN not in await r.text()
            # Bodies over the limit: with a length, and chunked without one.
            async with http.post(
                f"{base}/search", data=b"{" + b" " * 9000 + b"}", headers=auth
            ) as r:
                assert r.status == 413
            async with http.post(f"{base}/encode", data=_chunks(1024 * 1024), headers=auth) as r:
                assert r.status == 413
            # Unauthenticated oversized body: refused either way, never processed.
            async with http.post(f"{base}/encode", data=b"x" * 20000) as r:
                assert r.status in (401, 413)
            bad_bodies = [
                {"texts": ["a"] * 33},  # too many texts
                {"texts": []},
                {"texts": ["ok", 5]},
                {"text": "a", "top": 10**9},
                {"text": "a", "query": "yes"},
                {"query": "a", "size": 101},
                {"query": ["a"]},
            ]
            for body in bad_bodies:
                path = "/search" if "query" in body and "text" not in body else "/encode"
                async with http.post(base + path, json=body, headers=auth) as r:
                    assert r.status == 400, (path, body, await r.text())
                    assert "error" in await r.json()
            # No way to write: other methods and paths do not exist.
            for method, path in [
                ("PUT", "/search"), ("DELETE", "/search"), ("PUT", "/encode"),
                ("POST", "/_bulk"), ("POST", f"/{index_name}/_doc"), ("POST", "/index"),
                ("GET", "/search"), ("POST", "/metrics"),
            ]:  # fmt: skip
                async with http.request(method, base + path, json={"a": 1}, headers=auth) as r:
                    assert r.status in (404, 405), (method, path, r.status)
            # A search with write-looking fields is still only a search.
            async with http.post(
                f"{base}/search",
                json={"query": "x", "mode": "bm25", "index": "other", "script": "ctx._source"},
                headers=auth,
            ) as r:
                assert r.status == 200
        await es.indices.refresh(index=index_name)
        assert await index_stats(es, index_name) == before
        assert (await es.count(index=index_name))["count"] == 0
    finally:
        await service.stop()
