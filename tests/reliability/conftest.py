"""Fixtures of the reliability suite (docs/reliability.md).

- ``rel_env``: a :class:`scenarios.Env` on the session stack (Kafka + Elasticsearch of
  ``tests/conftest.py``) with the shared encoder.
- ``fault_stack`` / ``fault_env``: a stack of its own (Kafka + Elasticsearch) that the
  scenarios may stop and start; its Elasticsearch has a one-thread, one-slot write queue
  (``thread_pool.write.size/queue_size: 1``) so that concurrent writers really get 429s.
  ``SPARSE_INGEST_TEST_FAULT_STACK=<run dir>`` reuses one that is already up (development).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import support
from scenarios import Env

from deploy.local import LocalStack, StackError, StackInfo

FAULT_ES_SETTINGS = {"thread_pool.write.size": 1, "thread_pool.write.queue_size": 1}


@pytest.fixture
def rel_env(
    stack: StackInfo,
    kafka_bootstrap: str,
    es_url: str,
    default_model_dir: Path,
    default_encoder: Any,
    tmp_path: Path,
) -> Env:
    return Env(
        kafka=kafka_bootstrap,
        es_url=es_url,
        work=tmp_path,
        model_dir=default_model_dir,
        encoder=default_encoder,
        es_auth=stack.es_auth,
        log=support.log,
    )


@pytest.fixture(scope="session")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    reuse = os.environ.get("SPARSE_INGEST_TEST_FAULT_STACK")
    if reuse:
        yield LocalStack(name="reliability-faults", run_dir=reuse, log=support.log)
        return
    stack = LocalStack(
        name="reliability-faults",
        run_dir=tmp_path_factory.mktemp("fault-stack"),
        es_settings=FAULT_ES_SETTINGS,
        es_heap="512m",
        kafka_heap="384m",
        log=support.log,
    )
    try:
        stack.up()
    except StackError as exc:
        stack.down(remove_data=True)
        pytest.fail(f"could not start the fault stack: {exc}", pytrace=False)
    try:
        yield stack
    finally:
        stack.down(remove_data=True)


@pytest.fixture
def fault_env(
    fault_stack: LocalStack, default_model_dir: Path, default_encoder: Any, tmp_path: Path
) -> Env:
    info = fault_stack.info
    assert info.kafka_bootstrap and info.es_url
    return Env(
        kafka=info.kafka_bootstrap,
        es_url=info.es_url,
        work=tmp_path,
        model_dir=default_model_dir,
        encoder=default_encoder,
        stack=fault_stack,
        log=support.log,
    )


@pytest.fixture(scope="session")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Elasticsearch with security and https (CA made for the stack); Kafka with SSL,
    SASL_PLAINTEXT and SASL_SSL listeners (PLAIN, SCRAM-SHA-256/512) besides PLAINTEXT.
    ``SPARSE_INGEST_TEST_SECURE_STACK=<run dir>`` reuses one that is already up."""
    reuse = os.environ.get("SPARSE_INGEST_TEST_SECURE_STACK")
    if reuse:
        yield LocalStack(name="reliability-secure", run_dir=reuse, log=support.log)
        return
    stack = LocalStack(
        name="reliability-secure",
        run_dir=tmp_path_factory.mktemp("secure-stack"),
        es_tls=True,
        kafka_security=True,
        es_heap="512m",
        kafka_heap="384m",
        log=support.log,
    )
    try:
        stack.up()
    except StackError as exc:
        stack.down(remove_data=True)
        pytest.fail(f"could not start the secure stack: {exc}", pytrace=False)
    try:
        yield stack
    finally:
        stack.down(remove_data=True)


@pytest.fixture
def secure_env(
    secure_stack: LocalStack, default_model_dir: Path, default_encoder: Any, tmp_path: Path
) -> Env:
    """Our own clients use the PLAINTEXT listener and the elastic user; the service under
    test gets the secure settings from each test."""
    info = secure_stack.info
    assert info.es_url and info.es_auth and info.es_ca_certs and info.kafka_sasl
    return Env(
        kafka=info.kafka_listeners["PLAINTEXT"],
        es_url=info.es_url,
        work=tmp_path,
        model_dir=default_model_dir,
        encoder=default_encoder,
        stack=secure_stack,
        es_auth=info.es_auth,
        es_ca=info.es_ca_certs,
        log=support.log,
    )
