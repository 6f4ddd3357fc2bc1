"""Session fixtures: one real Kafka + Elasticsearch for the whole test session.

- ``stack``: a :class:`deploy.local.StackInfo` (``kafka_bootstrap``, ``es_url``). Started once
  per session in a temp run dir with :class:`deploy.local.LocalStack` and stopped at the end.
  Elasticsearch 9.5.3, or the version ``SPARSE_INGEST_STACK_ES_VERSION`` names.
  ``SPARSE_INGEST_TEST_KAFKA=host:port`` / ``SPARSE_INGEST_TEST_ES=http://...`` point the tests
  at services that are already running instead (only the missing ones are started).
- ``local_stack``: the :class:`LocalStack` behind ``stack`` (None if all came from the env).
- ``kafka_bootstrap``, ``es_url``: strings.
- ``es8_url``: an Elasticsearch 8.19.21 (security off, no Kafka), started on first use and
  stopped at the end of the session; ``SPARSE_INGEST_TEST_ES8=http://...`` uses a running one.
  The elasticsearch-py 9 client sends ``compatible-with=9``, which 8.x refuses: talk to it
  with plain ``application/json`` (``deploy.local.probes.http_json``, ``support.es_request``).
- ``es_version_stack``: a factory, ``stack = es_version_stack("8.19.21")`` is a running
  Elasticsearch-only :class:`LocalStack` of that version (security off), one per version,
  started on first use and stopped at the end of the session.
- ``es_any``: ``(version, url)``, parametrized over ``ELASTICSEARCH_VERSIONS`` (9.5.3, 8.19.21):
  a test that takes it runs once against each major. The session stack's version is served by
  ``es_url``, 8.19.21 by ``es8_url``, any other by ``es_version_stack``.
- ``secure_es``: the :class:`LocalStack` of an Elasticsearch-only 9.5.3 with ``security=True``
  (http, no TLS), started on first use: ``.info.es_url``, ``.info.es_auth`` (the ``elastic``
  superuser), and ``.es_file_roles({...})`` / ``.es_file_user(name, password, roles)`` for
  least-privilege users. Roles and users stay for the session: give them names of the test's
  own. No environment override.
- ``cdc_stack``: the :class:`LocalStack` of Kafka + Postgres + Kafka Connect with Debezium's
  Postgres connector (no Elasticsearch), started on first use: ``.info.kafka_bootstrap``,
  ``.info.postgres_dsn``, ``.info.connect_url``, ``.postgres_exec(sql)``,
  ``.debezium_postgres_config(prefix, tables)``, ``.connect_add_connector(name, config)``.
  Tables, connectors, slots and topics stay for the session: give them names of the test's own.
- ``registry_url``: an Apicurio Registry (in-memory), started on first use: its
  Confluent-compatible API, ``http://127.0.0.1:PORT/apis/ccompat/v7``.
- ``topic``, ``index_name``: unique per test (test name + uuid; lowercase for ES).
- ``es``: an ``AsyncElasticsearch`` client, closed (and ``index_name`` deleted) after the test.
- ``prometheus``: a factory, ``url = prometheus(scrape_config)`` starts a Prometheus with that
  scrape config (a path, or the YAML text) and returns its URL; all are stopped at the end.

The fixtures never skip: if the stack cannot start, the tests fail with the reason.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import support
from elasticsearch import AsyncElasticsearch

from deploy.local import LocalStack, StackError, StackInfo
from deploy.local.versions import (
    ELASTICSEARCH_8_VERSION,
    ELASTICSEARCH_VERSION,
    ELASTICSEARCH_VERSIONS,
    default_elasticsearch_version,
)
from service.elastic import delete_index


def _up_or_fail(stack: LocalStack, what: str, **services: bool) -> LocalStack:
    """``stack.up(**services)``, or the test fails (never skips) with the reason."""
    try:
        stack.up(**services)
    except StackError as exc:
        stack.down(remove_data=False)
        pytest.fail(f"could not start {what}: {exc}", pytrace=False)
    return stack


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack | None]:
    kafka_env, es_env = support.external_stack()
    if kafka_env and es_env:
        yield None
        return
    stack = LocalStack(name="pytest", run_dir=tmp_path_factory.mktemp("stack"), log=support.log)
    _up_or_fail(stack, "the local stack", kafka=not kafka_env, elasticsearch=not es_env)
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


@pytest.fixture(scope="session")
def es_version_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[str], LocalStack]]:
    stacks: dict[str, LocalStack] = {}
    failed: dict[str, str] = {}

    def get(version: str) -> LocalStack:
        if version in failed:
            pytest.fail(failed[version], pytrace=False)
        if version not in stacks:
            failed[version] = f"Elasticsearch {version} could not start earlier in this session"
            run_dir = tmp_path_factory.mktemp(f"es-{version}")
            stack = LocalStack(
                name=f"pytest-es-{version}", run_dir=run_dir, es_version=version, log=support.log
            )
            stacks[version] = _up_or_fail(stack, f"Elasticsearch {version}", kafka=False)
            del failed[version]
        return stacks[version]

    try:
        yield get
    finally:
        for stack in stacks.values():
            stack.down(remove_data=True)


@pytest.fixture(scope="session")
def es8_url(es_version_stack: Callable[[str], LocalStack]) -> str:
    external = os.environ.get(support.ES8_ENV)
    if external:
        return external
    url = es_version_stack(ELASTICSEARCH_8_VERSION).info.es_url
    assert url
    return url


@pytest.fixture(params=ELASTICSEARCH_VERSIONS)
def es_any(request: pytest.FixtureRequest) -> tuple[str, str]:
    version: str = request.param
    try:
        session_version = default_elasticsearch_version()
    except StackError as exc:  # a bad $SPARSE_INGEST_STACK_ES_VERSION
        pytest.fail(str(exc), pytrace=False)
    if version == session_version:
        url = request.getfixturevalue("es_url")
    elif version == ELASTICSEARCH_8_VERSION:
        url = request.getfixturevalue("es8_url")
    else:
        url = request.getfixturevalue("es_version_stack")(version).info.es_url
    return version, url


@pytest.fixture(scope="session")
def secure_es(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(
        name="pytest-secure",
        run_dir=tmp_path_factory.mktemp("secure-es"),
        es_version=ELASTICSEARCH_VERSION,
        security=True,
        log=support.log,
    )
    _up_or_fail(stack, f"Elasticsearch {ELASTICSEARCH_VERSION} with security", kafka=False)
    try:
        yield stack
    finally:
        stack.down(remove_data=True)


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
            await delete_index(client, index)  # the index, or those behind the alias
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
    """One warmed INT8 encoder shared by the tests that run the service, as the service's
    default settings load it (long texts as passages of 256 tokens)."""
    from encoder import SparseEncoder
    from service.builder import long_text_options
    from service.config import load_settings

    options = long_text_options(load_settings(model_dir=default_model_dir))
    return SparseEncoder.load(default_model_dir, **options)


@pytest.fixture(scope="session")
def chunk_encoder(default_model_dir: Path) -> Any:
    """The default model with long texts max-merged into one vector (``LONG_TEXT=chunk``,
    the default of earlier releases)."""
    from encoder import SparseEncoder

    return SparseEncoder.load(default_model_dir, long_text="chunk")


@pytest.fixture(scope="session")
def cdc_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Kafka + Postgres + Kafka Connect with Debezium (no Elasticsearch: use ``es_url``)."""
    stack = LocalStack(name="pytest-cdc", run_dir=tmp_path_factory.mktemp("cdc"), log=support.log)
    _up_or_fail(
        stack,
        "the CDC stack (Kafka, Postgres, Kafka Connect + Debezium)",
        kafka=True,
        elasticsearch=False,
        postgres=True,
        connect=True,
    )
    try:
        yield stack
    finally:
        stack.down(remove_data=True)


@pytest.fixture(scope="session")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An Apicurio Registry's Confluent-compatible API (``http://127.0.0.1:PORT/apis/ccompat/v7``),
    in-memory, started on first use."""
    stack = LocalStack(
        name="pytest-registry", run_dir=tmp_path_factory.mktemp("registry"), log=support.log
    )
    _up_or_fail(stack, "Apicurio Registry", kafka=False, elasticsearch=False, registry=True)
    try:
        assert stack.info.registry_url
        yield stack.info.registry_url
    finally:
        stack.down(remove_data=True)
