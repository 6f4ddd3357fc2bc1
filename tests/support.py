"""Helpers for the tests (the fixtures themselves live in conftest.py)."""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from deploy.local import StackInfo
from deploy.local.probes import http_json
from deploy.local.procs import group_members

KAFKA_ENV = "SPARSE_INGEST_TEST_KAFKA"
ES_ENV = "SPARSE_INGEST_TEST_ES"
ES8_ENV = "SPARSE_INGEST_TEST_ES8"


def log(message: str) -> None:
    print(f"[stack] {message}", file=sys.stderr, flush=True)


def unique_name(test_name: str, max_len: int = 80) -> str:
    """``<test name>-<8 hex>`` using only characters legal in Kafka topics and ES indices."""
    base = re.sub(r"[^a-zA-Z0-9_.-]+", "-", test_name).strip("-._").lower() or "test"
    suffix = uuid.uuid4().hex[:8]
    return f"{base[: max_len - len(suffix) - 1]}-{suffix}"


def external_stack() -> tuple[str | None, str | None]:
    """(kafka bootstrap, ES URL) given by the environment, for an already running stack."""
    return os.environ.get(KAFKA_ENV) or None, os.environ.get(ES_ENV) or None


def merge_external(info: StackInfo | None, run_dir: Path) -> StackInfo:
    kafka, es = external_stack()
    merged = info or StackInfo(name="external", run_dir=run_dir)
    if kafka:
        merged.kafka_bootstrap = kafka
    if es:
        merged.es_url = es
    return merged


def es_request(
    url: str,
    method: str = "GET",
    body: object = None,
    auth: tuple[str, str] | None = None,
) -> tuple[int, Any]:
    """(status, parsed JSON) of one Elasticsearch request with plain ``application/json``
    headers, which 8.x and 9.x both accept (elasticsearch-py 9 sends ``compatible-with=9``,
    which 8.x refuses). HTTP errors are returned, not raised."""
    if method == "GET" and body is None:
        return http_json(url, 30.0, auth)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Accept", "application/json")
    request.add_header("Content-Type", "application/json")
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30.0) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    return status, json.loads(raw) if raw else None


def es_node_version(url: str, auth: tuple[str, str] | None = None) -> str:
    """The version the (single) node at ``url`` reports (``GET /_nodes/_local``)."""
    status, body = es_request(f"{url}/_nodes/_local", auth=auth)
    assert status == 200, (status, body)
    (node,) = body["nodes"].values()
    return str(node["version"])


def processes_in_groups(pgids: list[int]) -> list[int]:
    """Live PIDs in any of the process groups ``pgids``."""
    return [pid for pgid in pgids for pid in group_members(pgid)]


def processes_mentioning(text: str) -> list[str]:
    """``pid cmdline`` of live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state not in ("Z", "X"):
            found.append(f"{entry.name} {cmdline[:200]}")
    return found
