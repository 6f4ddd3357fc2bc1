"""Least privilege (README: Least privilege) on a security-enabled Elasticsearch 9.5.3 node with
file-realm users: no cluster privilege anywhere. ``run`` with the creating role makes the alias
and its index, ingests, is ready and searches; ``run`` with only read/write/view_index_metadata
goes on on the existing alias; ``search`` works with ``read`` alone; a user without privileges
on the index, or a refused API key, stop the start with a message, not a traceback."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from elasticsearch import AsyncElasticsearch
from pydantic import SecretStr
from service_support import (
    cli,
    create_topic,
    doc,
    produce,
    running_service,
    service_settings,
    tombstone,
    wait_all_committed,
)

from deploy.local import LocalStack
from service.app import Service
from service.errors import StartupError
from service.messages import META_FIELD

pytestmark = pytest.mark.integration  # needs the local stack


@pytest.fixture
async def admin(secure_es: LocalStack) -> AsyncIterator[AsyncElasticsearch]:
    client = AsyncElasticsearch(
        secure_es.info.es_url, basic_auth=secure_es.info.es_auth, request_timeout=30
    )
    try:
        yield client
    finally:
        await client.close()


def _roles(alias: str) -> dict[str, dict[str, Any]]:
    names = [alias, f"{alias}-*"]
    runtime = ["read", "write", "view_index_metadata"]
    return {
        f"{alias}-create": {"indices": [{"names": names, "privileges": [*runtime, "create_index", "manage"]}]},
        f"{alias}-run": {"indices": [{"names": names, "privileges": runtime}]},
        f"{alias}-search": {"indices": [{"names": names, "privileges": ["read"]}]},
        f"{alias}-other": {"indices": [{"names": ["someone-else-*"], "privileges": ["all"]}]},
        f"{alias}-nowrite": {"indices": [{"names": names, "privileges": ["read", "view_index_metadata"]}]},
        f"{alias}-noread": {"indices": [{"names": names, "privileges": ["write", "view_index_metadata"]}]},
    }  # fmt: skip


async def _start(settings: Any, encoder: Any) -> None:
    svc = Service(settings, encoder=encoder)
    try:
        await svc.start(http=False)
    finally:
        await svc.stop()


async def test_run_and_search_with_index_privileges_only(
    secure_es: LocalStack,
    admin: AsyncElasticsearch,
    kafka_bootstrap: str,
    topic: str,
    index_name: str,
    default_encoder: Any,
    default_model_dir: Any,
) -> None:
    alias = index_name
    secure_es.es_file_roles(_roles(alias))
    users = {
        kind: secure_es.es_file_user(f"u{n}{os.getpid()}", "secret-pass", [f"{alias}-{kind}"])
        for n, kind in enumerate(("create", "run", "search", "other", "nowrite", "noread"))
    }
    url = secure_es.info.es_url
    await create_topic(kafka_bootstrap, topic, 2)
    await produce(
        kafka_bootstrap, topic, [doc(f"d{i}", f"rivers and lakes {i}") for i in range(20)]
    )

    def settings(kind: str, **extra: Any) -> Any:
        user, password = users[kind]
        return service_settings(
            kafka_bootstrap, url, topic, alias, es_username=user, es_password=password, **extra
        )

    # the first start creates the alias and its index: create_index + manage, nothing cluster-wide
    async with running_service(settings("create"), default_encoder) as svc:
        assert svc.cluster is not None and svc.cluster.version is None  # no monitor privilege
        assert svc.cluster.api_version == 9
        await wait_all_committed(kafka_bootstrap, settings("create").kafka_group_id, topic)
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{svc.http_port}"
            async with http.get(f"{base}/readyz") as r:
                body = await r.json()
                assert r.status == 200, body
            async with http.post(f"{base}/search", json={"query": "lakes", "size": 3}) as r:
                assert r.status == 200 and len((await r.json())["hits"]) == 3

    # later starts need only read, write and view_index_metadata
    await produce(kafka_bootstrap, topic, [doc("d0", "a new text of d0"), tombstone("d1")])
    async with running_service(settings("run"), default_encoder) as svc:
        assert svc.index != alias and svc.index.startswith(alias)  # the index behind the alias
        await wait_all_committed(kafka_bootstrap, settings("run").kafka_group_id, topic)
        assert svc.readiness is not None
        ok, detail = await svc.readiness.elasticsearch()
        assert ok and "no monitor privilege" in detail
    await admin.indices.refresh(index=alias)
    assert (await admin.count(index=alias))["count"] == 19
    stored = await admin.get(index=alias, id="d0")
    assert stored["_source"]["body"] == "a new text of d0"
    assert stored["_source"][META_FIELD]["model"] == default_encoder.metadata.name

    # `sparse-ingest search` with read only
    user, password = users["search"]
    env = {
        "SPARSE_INGEST_ES_URL": url,
        "SPARSE_INGEST_ES_INDEX": alias,
        "SPARSE_INGEST_ES_USERNAME": user,
        "SPARSE_INGEST_ES_PASSWORD": password,
        "SPARSE_INGEST_MODEL_DIR": str(default_model_dir),
    }
    out = cli(["search", "rivers", "--json", "--mode", "hybrid", "--size", "5"], env)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 5

    # no privilege on the index: a start-up error that says what to grant, no traceback
    with pytest.raises(StartupError, match="Least privilege"):
        await _start(settings("other"), default_encoder)
    # one privilege short: the start says which, instead of retrying writes for ever
    for kind, lacking in (("nowrite", "write"), ("noread", "read")):
        with pytest.raises(StartupError, match=f"lacks the index privilege\\(s\\) {lacking} "):
            await _start(settings(kind), default_encoder)
    user, password = users["other"]
    out = cli(["run"], {**env, "SPARSE_INGEST_ES_USERNAME": user,
                         "SPARSE_INGEST_ES_PASSWORD": password,
                         "SPARSE_INGEST_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
                         "SPARSE_INGEST_KAFKA_TOPICS": topic, "SPARSE_INGEST_HTTP_PORT": "0"})  # fmt: skip
    assert out.returncode == 1
    assert "Least privilege" in out.stderr and "Traceback" not in out.stderr

    # an API key the cluster does not know: the credentials are named
    refused = service_settings(
        kafka_bootstrap, url, topic, alias, es_api_key=SecretStr("bm90OmEta2V5")
    )
    with pytest.raises(StartupError, match="SPARSE_INGEST_ES_API_KEY"):
        await _start(refused, default_encoder)
