"""Fixtures of the reliability suite (docs/reliability.md).

- ``rel_env``: a :class:`scenarios.Env` on the session stack (Kafka + Elasticsearch of
  ``tests/conftest.py``) with the shared encoder.
- ``fault_stack`` / ``fault_env``: a stack of its own that the scenarios may stop and start:
  Elasticsearch with security over https (CA made for the stack) and a one-thread, one-slot
  write queue (``thread_pool.write.size/queue_size: 1``) so that concurrent writers really get
  429s; Kafka with SSL, SASL_PLAINTEXT and SASL_SSL listeners (PLAIN, SCRAM-SHA-256/512)
  besides PLAINTEXT. Started in a thread when the session starts (if a collected test needs
  it). ``SPARSE_INGEST_TEST_FAULT_STACK=<run dir>`` reuses one that is already up
  (development).
"""

from __future__ import annotations

import os
import threading
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


def _new_fault_stack(run_dir: Path) -> LocalStack:
    return LocalStack(
        name="reliability",
        run_dir=run_dir,
        es_settings=FAULT_ES_SETTINGS,
        es_tls=True,
        kafka_security=True,
        es_heap="512m",
        kafka_heap="384m",
        log=support.log,
    )


class _Early:
    """The fault stack started in a thread at the start of the session (when a collected
    test needs it), so that its ~40 s start overlaps the tests that run before."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._up, name="fault-stack-up", daemon=True)
        self.thread.start()

    def _up(self) -> None:
        try:
            self.stack.up()
        except BaseException as exc:
            self.error = exc

    def wait(self) -> LocalStack:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.stack


@pytest.fixture(scope="session", autouse=True)
def _fault_stack_early(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[_Early | None]:
    wanted = any(
        {"fault_stack", "fault_env"} & set(getattr(item, "fixturenames", ()))
        for item in request.session.items
    )
    if not wanted or os.environ.get("SPARSE_INGEST_TEST_FAULT_STACK"):
        yield None
        return
    early = _Early(_new_fault_stack(tmp_path_factory.mktemp("fault-stack")))
    try:
        yield early
    finally:
        early.thread.join()
        early.stack.down(remove_data=True)


@pytest.fixture(scope="session")
def fault_stack(_fault_stack_early: _Early | None) -> LocalStack:
    reuse = os.environ.get("SPARSE_INGEST_TEST_FAULT_STACK")
    if reuse:
        return LocalStack(name="reliability", run_dir=reuse, log=support.log)
    assert _fault_stack_early is not None
    try:
        return _fault_stack_early.wait()
    except StackError as exc:
        pytest.fail(f"could not start the fault stack: {exc}", pytrace=False)


@pytest.fixture
def fault_env(
    fault_stack: LocalStack, default_model_dir: Path, default_encoder: Any, tmp_path: Path
) -> Env:
    """Our own clients use the PLAINTEXT listener and the elastic user over https; a service
    under test gets the same unless a test gives it the secure Kafka settings."""
    info = fault_stack.info
    assert info.es_url and info.es_auth and info.es_ca_certs and info.kafka_sasl
    return Env(
        kafka=info.kafka_listeners["PLAINTEXT"],
        es_url=info.es_url,
        work=tmp_path,
        model_dir=default_model_dir,
        encoder=default_encoder,
        stack=fault_stack,
        es_auth=info.es_auth,
        es_ca=info.es_ca_certs,
        log=support.log,
    )
