"""Every Grafana panel returns data from a real Prometheus scraping a running service.

The service runs in-process against the session's Kafka and Elasticsearch with the default
model; a real Prometheus (Debian's ``prometheus``, started by the ``prometheus`` fixture)
scrapes it every second and loads deploy/prometheus/recording.yml and alerts.yml. The document
stream makes every event that some panel counts: upserts, a mapping conflict (bulk item error,
dead letter), a malformed record (dead letter), a delete, a stale version (from Elasticsearch
and within a batch), an unchanged re-send. A trickle of new documents keeps the rates above 0
while each panel's expression is sent to ``/api/v1/query`` with the dashboard's variables
filled in; each must return at least one finite sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.service_support import (
    Record,
    create_topic,
    doc,
    metric,
    produce,
    running_service,
    service_settings,
    tombstone,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sparse-ingest.json"
JOB = "sparse-ingest"
RATE_INTERVAL = "1m"  # stands in for Grafana's $__rate_interval


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL) of every target, with the dashboard variables filled in."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = (
                target["expr"]
                .replace("$__rate_interval", RATE_INTERVAL)
                .replace("$job", JOB)
                .replace("$instance", ".*")
            )
            assert "$" not in expr, f"{panel['title']}: unfilled variable in {expr}"
            out.append((panel["title"], target["refId"], expr))
    return out


def scrape_config(port: int) -> str:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROM / "recording.yml"), str(PROM / "alerts.yml")],
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
            }
        ],
    }
    return json.dumps(config)  # JSON is YAML


async def query(http: aiohttp.ClientSession, url: str, expr: str) -> list[dict[str, Any]]:
    async with http.get(f"{url}/api/v1/query", params={"query": expr}) as resp:
        body = await resp.json()
    assert body.get("status") == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def has_finite_sample(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


@pytest.fixture(scope="module")
def dashboard_encoder() -> Any:
    from encoder import SparseEncoder, fetch_default_model

    return SparseEncoder.load(fetch_default_model())


def body(i: int, rev: int = 0) -> str:
    words = ["kafka", "search", "vector", "sparse", "index", "encoder", "shard", "token"]
    return f"document {i} revision {rev}: " + " ".join(
        words[(i + k) % len(words)] for k in range(12)
    )


async def test_every_dashboard_panel_returns_data(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: Any,
    prometheus: Any,
    dashboard_encoder: Any,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=2)
    settings = service_settings(kafka_bootstrap, es_url, topic, index_name)
    dashboard = json.loads(DASHBOARD.read_text())
    queries = panel_queries(dashboard)

    async with running_service(settings, dashboard_encoder) as svc:
        assert svc.http_port
        prom_url = prometheus(scrape_config(svc.http_port))

        def m(name: str, labels: dict[str, str] | None = None) -> float:
            return metric(svc, name, labels)

        # 1. Documents with an explicit version and a numeric field (mapped as long).
        first: list[Record] = [doc(f"d{i}", body(i), version=10, n=i) for i in range(40)]
        await produce(kafka_bootstrap, topic, first)

        async def indexed(count: int) -> bool:
            return m("sparse_ingest_documents_indexed_total") >= count

        await wait_until(lambda: indexed(40), 120, "the first 40 documents indexed")

        # 2. One of each event the panels count.
        events: list[Record] = [
            (b"bad-json", b"{not json", []),  # dead letter: invalid_json
            doc("conflict", "the field n is not a number here", version=1, n="not a number"),
            tombstone("d0", version=20),  # delete
            doc("d1", body(1, rev=1), version=5),  # older than stored 10: stale in Elasticsearch
            doc("d2", body(2, rev=1), version=11),  # superseded by the next in its batch
            doc("d2", body(2, rev=2), version=12),
            doc("d3", body(3), version=11, tag="metadata only"),  # same text: unchanged
        ]
        await produce(kafka_bootstrap, topic, events)

        async def events_seen() -> bool:
            return (
                m("sparse_ingest_documents_dead_lettered_total", {"reason": "invalid_json"}) >= 1
                and m(
                    "sparse_ingest_bulk_item_errors_total", {"reason": "document_parsing_exception"}
                )
                >= 1
                and m("sparse_ingest_documents_deleted_total", {"result": "deleted"}) >= 1
                and m(
                    "sparse_ingest_documents_stale_total",
                    {"source": "elasticsearch", "topic": topic},
                )
                >= 1
                and m("sparse_ingest_documents_skipped_unchanged_total") >= 1
            )

        await wait_until(events_seen, 120, "the dead letter, item error, delete, stale, unchanged")

        # 3. A trickle of new documents keeps every rate above 0 while the panels are queried.
        async def trickle() -> None:
            i = 1000
            while True:
                await produce(kafka_bootstrap, topic, [doc(f"t{i}", body(i), version=1)])
                i += 1
                await asyncio.sleep(0.25)

        feeder = asyncio.create_task(trickle())
        try:
            empty = await _wait_for_panels(prom_url, queries, timeout=90)
            rules = await _rule_health(prom_url)
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder

    assert not empty, "panels with no data:\n" + "\n".join(
        f"  {title} [{ref}]: {expr}" for title, ref, expr in empty
    )
    assert rules["bad"] == [], f"rules that Prometheus could not evaluate: {rules['bad']}"
    assert rules["count"] >= 15, rules
    assert rules["recording_empty"] == [], (
        f"recording rules without data: {rules['recording_empty']}"
    )


async def _wait_for_panels(
    url: str, queries: list[tuple[str, str, str]], timeout: float
) -> list[tuple[str, str, str]]:
    """Query until every expression returns a finite sample; the ones that never did.

    Prints one line per query (series count, first finite value): shown when the test fails,
    or with ``pytest -s``.
    """
    deadline = time.monotonic() + timeout
    pending = list(queries)
    seen: dict[tuple[str, str, str], str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while pending and time.monotonic() < deadline:
            still = []
            for item in pending:
                result = await query(http, url, item[2])
                if has_finite_sample(result):
                    first = next(
                        float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))
                    )
                    seen[item] = f"{len(result)} series, e.g. {first:.4g}"
                else:
                    still.append(item)
            pending = still
            if pending:
                await asyncio.sleep(1.0)
    for item in queries:
        print(f"[panel] {item[0]} [{item[1]}]: {seen.get(item, 'NO DATA')}")
    return pending


async def _rule_health(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(f"{url}/api/v1/rules") as resp:
            body = orjson.loads(await resp.read())
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        bad = [(r["name"], r.get("lastError")) for r in rules if r.get("health") != "ok"]
        recording_empty = []
        for r in rules:
            if r["type"] == "recording" and not await query(http, url, r["name"]):
                recording_empty.append(r["name"])
    return {"count": len(rules), "bad": bad, "recording_empty": recording_empty}
