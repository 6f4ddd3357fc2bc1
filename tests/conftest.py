"""Session fixtures: one real Kafka + Elasticsearch for the whole test session.

- ``stack``: a :class:`deploy.local.StackInfo` (``kafka_bootstrap``, ``es_url``). Started once
  per session in a temp run dir with :class:`deploy.local.LocalStack` and stopped at the end.
  ``SPARSE_INGEST_TEST_KAFKA=host:port`` / ``SPARSE_INGEST_TEST_ES=http://...`` point the tests
  at services that are already running instead (only the missing ones are started).
- ``local_stack``: the :class:`LocalStack` behind ``stack`` (None if all came from the env).
- ``kafka_bootstrap``, ``es_url``: strings.
- ``topic``, ``index_name``: unique per test (test name + uuid; lowercase for ES).
- ``es``: an ``AsyncElasticsearch`` client, closed (and ``index_name`` deleted) after the test.
- ``prometheus``: a factory, ``url = prometheus(scrape_config)`` starts a Prometheus with that
  scrape config (a path, or the YAML text) and returns its URL; all are stopped at the end.

The fixtures never skip: if the stack cannot start, the tests fail with the reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import support
from elasticsearch import AsyncElasticsearch

from deploy.local import LocalStack, StackError, StackInfo


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack | None]:
    kafka_env, es_env = support.external_stack()
    if kafka_env and es_env:
        yield None
        return
    stack = LocalStack(name="pytest", run_dir=tmp_path_factory.mktemp("stack"), log=support.log)
    try:
        stack.up(kafka=not kafka_env, elasticsearch=not es_env)
    except StackError as exc:
        stack.down(remove_data=False)
        pytest.fail(f"could not start the local stack: {exc}", pytrace=False)
    try:
        yield stack
    finally:
        stack.down(remove_data=True)


@pytest.fixture(scope="session")
def stack(local_stack: LocalStack | None, tmp_path_factory: pytest.TempPathFactory) -> StackInfo:
    info = local_stack.info if local_stack is not None else None
    return support.merge_external(info, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def kafka_bootstrap(stack: StackInfo) -> str:
    assert stack.kafka_bootstrap, "no Kafka in the test stack"
    return stack.kafka_bootstrap


@pytest.fixture(scope="session")
def es_url(stack: StackInfo) -> str:
    assert stack.es_url, "no Elasticsearch in the test stack"
    return stack.es_url


@pytest.fixture
def topic(request: pytest.FixtureRequest) -> str:
    return support.unique_name(request.node.name, max_len=200)


@pytest.fixture
def index_name(request: pytest.FixtureRequest) -> str:
    return "test-" + support.unique_name(request.node.name, max_len=120)


@pytest.fixture
async def es(
    stack: StackInfo, es_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[AsyncElasticsearch]:
    index = request.getfixturevalue("index_name") if "index_name" in request.fixturenames else None
    client = AsyncElasticsearch(es_url, basic_auth=stack.es_auth, request_timeout=30)
    try:
        yield client
    finally:
        if index is not None:
            await client.options(ignore_status=404).indices.delete(index=index)
        await client.close()


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str | Path], str]]:
    started: list[LocalStack] = []

    def start(scrape_config: str | Path) -> str:
        run_dir = tmp_path_factory.mktemp("prometheus")
        if isinstance(scrape_config, str):
            path = run_dir / "scrape.yml"
            path.write_text(scrape_config)
            scrape_config = path
        stack = LocalStack(name=f"prometheus-{len(started)}", run_dir=run_dir, log=support.log)
        started.append(stack)
        try:
            info = stack.up(
                kafka=False, elasticsearch=False, prometheus=True, prometheus_config=scrape_config
            )
        except StackError as exc:
            pytest.fail(f"could not start Prometheus: {exc}", pytrace=False)
        assert info.prometheus_url
        return info.prometheus_url

    try:
        yield start
    finally:
        for stack in started:
            stack.down(remove_data=True)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model (SPLADE-tiny-msmarco), fetched and exported once into the cache."""
    from encoder import fetch_default_model

    return fetch_default_model()


@pytest.fixture(scope="session")
def default_encoder(default_model_dir: Path) -> Any:
    """One warmed INT8 encoder shared by the tests that run the service."""
    from encoder import SparseEncoder

    return SparseEncoder.load(default_model_dir)
