"""Fixtures of the reliability suite (see tests/reliability/README in docs/reliability.md).

``rel_env``: a :class:`scenarios.Env` on the session stack (Kafka + Elasticsearch of
``tests/conftest.py``) with the shared encoder; scenarios that stop services get their own
stack from the fixtures of their module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import support
from scenarios import Env

from deploy.local import StackInfo


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
