"""Where the cache and the run dirs live."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SPARSE_INGEST_CACHE"
RUN_DIR_ENV = "SPARSE_INGEST_RUN_DIR"
DEFAULT_STACK_NAME = "default"


def cache_dir() -> Path:
    """``$SPARSE_INGEST_CACHE`` or ``~/.cache/sparse-ingest``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "sparse-ingest"


def default_run_dir(name: str = DEFAULT_STACK_NAME) -> Path:
    """``$SPARSE_INGEST_RUN_DIR`` or ``<cache>/run/<name>``."""
    env = os.environ.get(RUN_DIR_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return cache_dir() / "run" / name
