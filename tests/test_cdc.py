"""Change data capture for real: Postgres 15 -> Debezium 3.6.1 (Kafka Connect) -> Kafka -> the
service (``SPARSE_INGEST_MESSAGE_FORMAT=debezium``) -> Elasticsearch. INSERT, UPDATE (text
changed and unchanged), DELETE, a row updated twice in quick succession and twice in one
transaction, a Connect restart in the middle: the index ends exactly equal to the table, and each
committed change is searchable within seconds (the commit-to-searchable latency is printed)."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
import uuid
from typing import Any

import pytest
from elasticsearch import AsyncElasticsearch
from service_support import metric, running_service, service_settings, wait_until

from deploy.local import LocalStack

pytestmark = pytest.mark.integration  # needs the local stack


def sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def table_rows(stack: LocalStack, table: str) -> dict[str, tuple[str, str]]:
    out = await asyncio.to_thread(
        stack.postgres_exec, f"SELECT id, title, body FROM {table} ORDER BY id"
    )
    rows = {}
    for line in out.splitlines():
        if line.strip():
            row_id, title, body = line.split("|", 2)
            rows[row_id] = (title, body)
    return rows


async def index_docs(es: AsyncElasticsearch, index: str) -> dict[str, tuple[str, str]]:
    await es.indices.refresh(index=index)
    resp = await es.search(index=index, size=10_000, source_includes=["title", "body"])
    return {h["_id"]: (h["_source"]["title"], h["_source"]["body"]) for h in resp["hits"]["hits"]}


async def test_postgres_changes_end_in_the_index_exactly(
    cdc_stack: LocalStack,
    es_url: str,
    es: AsyncElasticsearch,
    index_name: str,
    default_encoder: Any,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    table, prefix = f"docs_{suffix}", f"cdc{suffix}"
    run = cdc_stack.postgres_exec
    await asyncio.to_thread(
        run,
        f"CREATE TABLE {table} (id int PRIMARY KEY, title text, body text, views int DEFAULT 0);"
        f"ALTER TABLE {table} REPLICA IDENTITY FULL;"
        + "".join(
            f"INSERT INTO {table} (id, title, body) VALUES ({i}, 'row {i}', "
            f"'glaciers and rivers number {i}');"
            for i in range(1, 41)
        ),
    )
    config = cdc_stack.debezium_postgres_config(prefix, [f"public.{table}"])
    await asyncio.to_thread(cdc_stack.connect_add_connector, prefix, config)
    topic = f"{prefix}.public.{table}"
    kafka = cdc_stack.info.kafka_bootstrap
    settings = service_settings(
        kafka, es_url, topic, index_name, message_format="debezium", text_fields=["title", "body"]
    )
    async with running_service(settings, default_encoder) as svc:

        async def snapshot_indexed() -> bool:
            return len(await index_docs(es, index_name)) == 40

        await wait_until(snapshot_indexed, 120, "the snapshot to be indexed")
        changes = [
            f"UPDATE {table} SET body = 'a new text about deserts' WHERE id = 1",
            f"UPDATE {table} SET views = views + 1 WHERE id BETWEEN 2 AND 6",  # text unchanged
            f"DELETE FROM {table} WHERE id IN (7, 8, 9)",
            f"INSERT INTO {table} (id, title, body) VALUES (41, 'late row', 'forty one')",
            f"UPDATE {table} SET body = 'first quick change' WHERE id = 10",
            f"UPDATE {table} SET body = 'second quick change' WHERE id = 10",
            f"BEGIN; UPDATE {table} SET title = 'one' WHERE id = 11; "
            f"UPDATE {table} SET title = 'two' WHERE id = 11; COMMIT",
        ]
        for statement in changes:
            await asyncio.to_thread(run, statement + ";")
        # Connect restarts in the middle: it resumes from its offsets, nothing lost or doubled
        await asyncio.to_thread(cdc_stack.restart_service, "connect")
        await asyncio.to_thread(
            run,
            f"UPDATE {table} SET body = 'after the restart' WHERE id = 12;"
            f"DELETE FROM {table} WHERE id = 13;"
            f"INSERT INTO {table} (id, title, body) VALUES (7, 'row 7 again', 'back after delete');",
        )

        async def equal() -> bool:
            return await index_docs(es, index_name) == await table_rows(cdc_stack, table)

        await wait_until(equal, 120, "the index to equal the table")
        assert metric(svc, "sparse_ingest_documents_skipped_unchanged_total") >= 5
        assert metric(svc, "sparse_ingest_documents_dead_lettered_total", {"reason": "invalid_version"}) == 0  # fmt: skip

        # commit in Postgres -> searchable (a BM25 match on a fresh word), one change at a time
        latencies = []
        for i in range(20):
            word = f"zq{uuid.uuid4().hex[:10]}"
            row = 14 + i
            started = time.monotonic()
            await asyncio.to_thread(
                run, f"UPDATE {table} SET body = 'marker {word}' WHERE id = {row};"
            )

            async def searchable(word: str = word) -> bool:
                resp = await es.search(index=index_name, query={"match": {"body": word}}, size=1)
                return bool(resp["hits"]["hits"])

            await wait_until(searchable, 60, f"change {i} to be searchable")
            latencies.append(time.monotonic() - started)
        assert await index_docs(es, index_name) == await table_rows(cdc_stack, table)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(
        f"\ncommit -> searchable over {len(latencies)} changes: p50 {statistics.median(latencies):.2f} s, "
        f"p99 {p99:.2f} s, max {latencies[-1]:.2f} s"
    )
    await asyncio.to_thread(cdc_stack.connect_delete_connector, prefix)


async def test_the_cdc_demo_shows_an_update_and_a_delete(
    cdc_stack: LocalStack, es_url: str, default_model_dir: Any, capsys: Any
) -> None:
    """`sparse-ingest demo --cdc`'s steps on the session's stacks (the command starts its own)."""
    import types

    from tooling.demo.cdc import _run

    info = types.SimpleNamespace(kafka_bootstrap=cdc_stack.info.kafka_bootstrap, es_url=es_url)
    assert await _run(cdc_stack, info, default_model_dir, 40, 0, time.monotonic()) == 0
    out = capsys.readouterr().out
    assert "40 rows indexed" in out
    after_update = out.split("UPDATE row 40")[1].split("DELETE")[0]
    assert re.search(r"1\.\s+\S+\s+row\s+40\s+calendar: leap years", after_update), out
    assert "index holds 39 documents; the table 39 rows" in out
