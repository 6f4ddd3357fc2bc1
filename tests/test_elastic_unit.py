"""The REST API version negotiation (service.elastic) against a small HTTP server that answers
as Elasticsearch 7, 8 or 9 does to the ``compatible-with`` media type; the real 8.19 and 9.5
servers are in test_es_versions.py."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from service.config import load_settings
from service.elastic import (
    ClusterInfo,
    accepted_versions,
    check_elasticsearch,
    elasticsearch_client,
)
from service.errors import StartupError

Server = Callable[..., Any]


def _refusal(accepted: tuple[int, int], asked: str) -> dict[str, Any]:
    reason = f"Accept version must be either version {accepted[0]} or {accepted[1]}, but found {asked}. Accept=..."
    return {
        "error": {
            "root_cause": [{"type": "media_type_header_exception", "reason": "Invalid media-type"}],
            "type": "media_type_header_exception",
            "reason": "Invalid media-type value on headers [Content-Type, Accept]",
            "caused_by": {"type": "status_exception", "reason": reason},
        },
        "status": 400,
    }


def fake_es(version: str, accepted: tuple[int, int], seen: list[dict[str, str]]) -> web.Application:
    """Answers node info and ``HEAD /x`` like Elasticsearch ``version`` with its media-type
    check; records each request's headers."""

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append({k.lower(): v for k, v in request.headers.items()} | {"path": request.path})
        asked = re.search(r"compatible-with=(\d+)", request.headers.get("Accept", ""))
        headers = {"X-elastic-product": "Elasticsearch"}
        if asked and int(asked.group(1)) not in accepted:
            if request.method == "HEAD":
                return web.Response(status=400, headers=headers)
            return web.json_response(
                _refusal(accepted, asked.group(1)), status=400, headers=headers
            )
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers)
        node = {"version": version}
        return web.json_response({"nodes": {"n1": node}}, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[web.Application], Any]]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("version", "accepted", "api"),
    [("9.5.3", (9, 8), 9), ("8.19.21", (8, 7), 8), ("8.11.0", (8, 7), 8)],
)
async def test_the_client_speaks_the_api_version_the_server_accepts(
    serve: Any, version: str, accepted: tuple[int, int], api: int
) -> None:
    seen: list[dict[str, str]] = []
    url = await serve(fake_es(version, accepted, seen))
    settings = load_settings(es_url=url)
    es = elasticsearch_client(settings)
    try:
        info = await check_elasticsearch(es, settings)
        assert (info.version, info.api_version) == (version, api)
        assert f"REST API version {api}" in info.describe()
        assert await es.indices.exists(index="x")  # HEAD: no body to negotiate with
        assert f"compatible-with={api}" in seen[-1]["accept"]
    finally:
        await es.close()


async def test_a_head_request_first_negotiates_with_a_get(serve: Any) -> None:
    seen: list[dict[str, str]] = []
    url = await serve(fake_es("8.19.21", (8, 7), seen))
    es = elasticsearch_client(load_settings(es_url=url))
    try:
        assert await es.indices.exists(index="x")
        assert [s["path"] for s in seen] == ["/_nodes/_local/none", "/x"]
    finally:
        await es.close()


async def test_a_server_older_than_8_11_stops_the_start_with_what_to_do(serve: Any) -> None:
    for version, accepted in (("7.17.0", (7, 6)), ("8.10.4", (8, 7))):
        url = await serve(fake_es(version, accepted, []))
        settings = load_settings(es_url=url)
        es = elasticsearch_client(settings)
        try:
            with pytest.raises(StartupError, match=r"8\.11 or later"):
                await check_elasticsearch(es, settings)
        finally:
            await es.close()


async def test_the_api_key_goes_in_the_authorization_header(serve: Any) -> None:
    seen: list[dict[str, str]] = []
    url = await serve(fake_es("9.5.3", (9, 8), seen))
    settings = load_settings(es_url=url, es_api_key=SecretStr("a2V5OnNlY3JldA=="))
    es = elasticsearch_client(settings)
    try:
        await check_elasticsearch(es, settings)
    finally:
        await es.close()
    assert seen and all(s["authorization"] == "ApiKey a2V5OnNlY3JldA==" for s in seen)


def test_refusals_are_parsed_and_others_are_not() -> None:
    assert accepted_versions(400, _refusal((8, 7), "9")) == (8, 7)
    assert accepted_versions(400, _refusal((9, 8), "10")) == (9, 8)
    assert accepted_versions(400, {"error": {"type": "parsing_exception"}}) == ()
    assert accepted_versions(200, _refusal((8, 7), "9")) == ()
    assert accepted_versions(400, "not json") == ()


def test_cluster_info() -> None:
    assert ClusterInfo("8.19.21", 8, "nodes info").major_minor == (8, 19)
    assert not ClusterInfo("8.11.0", 8, "").too_old()
    assert ClusterInfo("8.10.4", 8, "").too_old()
    assert not ClusterInfo(None, 9, "no monitor").too_old()
    assert ClusterInfo(None, 7, "").too_old()
    assert "9.x (version hidden" in ClusterInfo(None, 9, "no monitor privilege").describe()


async def test_concurrent_first_requests_are_all_retried_in_the_agreed_version(serve: Any) -> None:
    seen: list[dict[str, str]] = []
    url = await serve(fake_es("8.19.21", (8, 7), seen))
    es = elasticsearch_client(load_settings(es_url=url))
    try:
        results = await asyncio.gather(*(es.nodes.info(node_id="_local") for _ in range(10)))
        assert all(r.meta.status == 200 for r in results)
    finally:
        await es.close()


async def test_the_pool_has_room_for_every_search_and_the_writes() -> None:
    """Hybrid holds two connections at once; writes must not queue behind searches."""
    for concurrent, expected in ((1, 10), (8, 20), (20, 44)):
        es = elasticsearch_client(
            load_settings(es_url="http://127.0.0.1:9", http_max_concurrent=concurrent)
        )
        try:
            (node,) = es.transport.node_pool.all()
            assert node.config.connections_per_node == expected
        finally:
            await es.close()
