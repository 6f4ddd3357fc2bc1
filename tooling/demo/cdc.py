"""``sparse-ingest demo --cdc``: a database table kept searchable while it changes.

1. Starts Kafka, Elasticsearch, Postgres and Kafka Connect with Debezium's Postgres connector
   (``deploy.local``), fills a table ``articles`` with standard-library doc paragraphs.
2. Adds the connector; the ingest service reads its change events (``debezium`` format) and
   indexes the snapshot.
3. Searches; then UPDATEs a row so that it answers the query, and shows the result change
   (with the time from the commit in Postgres to the new first hit); DELETEs it and shows it
   gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from service.app import Service
from service.config import load_settings
from service.elastic import delete_index, elasticsearch_client
from tooling.demo.corpus import stdlib_documents

QUERY = "leap february"
ANSWER = (
    "Leap years: every fourth year February gets a 29th day, except in century years that "
    "are not divisible by 400."
)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _sql(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def _until(check: Callable[[], Awaitable[bool]], limit_s: float, what: str) -> float:
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > limit_s:
            raise TimeoutError(f"{what}: not within {limit_s:.0f}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def run_cdc_demo(documents: int, http_port: int, stack_name: str, keep: bool) -> int:
    from deploy.local import LocalStack, StackError
    from encoder import fetch_default_model

    started = time.monotonic()
    _say("== 1. local stack: Kafka, Elasticsearch, Postgres, Kafka Connect + Debezium")
    stack = LocalStack(name=stack_name, log=lambda m: _say(f"   {m}"))
    try:
        info = stack.up(kafka=True, elasticsearch=True, postgres=True, connect=True)
    except StackError as exc:
        _say(f"sparse-ingest demo: {exc}")
        return 1
    try:
        model_dir = fetch_default_model()
        return asyncio.run(_run(stack, info, model_dir, documents, http_port, started))
    finally:
        if not keep:
            _say("\n== stopping the local stack")
            stack.down()
            _say(f"   done in {time.monotonic() - started:.0f}s total")


async def _run(
    stack: Any, info: Any, model_dir: Path, documents: int, http_port: int, started: float
) -> int:
    docs = list(stdlib_documents(documents))
    stamp = time.strftime("%H%M%S")
    table, prefix = f"articles_{stamp}", f"demo{stamp}"
    _say(f"\n== 2. table {table}: {len(docs)} rows (standard-library doc paragraphs)")
    values = ",".join(
        f"({i}, {_sql(d['title'])}, {_sql(d['body'])})" for i, d in enumerate(docs, 1)
    )
    await asyncio.to_thread(
        stack.postgres_exec,
        f"CREATE TABLE {table} (id int PRIMARY KEY, title text, body text);"
        f"ALTER TABLE {table} REPLICA IDENTITY FULL;"
        f"INSERT INTO {table} (id, title, body) VALUES {values};",
    )
    config = stack.debezium_postgres_config(prefix, [f"public.{table}"])
    await asyncio.to_thread(stack.connect_add_connector, prefix, config)
    topic = f"{prefix}.public.{table}"
    _say(f"   Debezium connector {prefix!r} running: changes go to topic {topic!r}")

    settings = load_settings(
        kafka_bootstrap_servers=info.kafka_bootstrap,
        kafka_topics=[topic],
        kafka_group_id=f"demo-cdc-{stamp}",
        es_url=info.es_url,
        es_index="demo-cdc",
        model_dir=model_dir,
        http_port=http_port,
        message_format="debezium",
        text_fields=["title", "body"],
        es_refresh_interval="200ms",
    )
    svc = Service(settings)
    es = elasticsearch_client(settings)
    await delete_index(es, "demo-cdc")
    await svc.start()
    try:
        assert svc.searcher is not None and svc.encoder is not None
        _say("\n== 3. the service indexes the snapshot (format: debezium)")

        async def count() -> int:
            await es.indices.refresh(index="demo-cdc")
            return int((await es.count(index="demo-cdc"))["count"])

        async def all_in() -> bool:
            return await count() == len(docs)

        seconds = await _until(all_in, 300, "the snapshot")
        _say(f"   {len(docs)} rows indexed in {seconds:.1f}s")

        encoder: Any = svc.encoder

        async def top(n: int = 3) -> list[Any]:
            vector = encoder.encode_queries([QUERY])[0]
            return await svc.searcher.search("sparse", QUERY, vector, n)  # type: ignore[union-attr]

        def show(hits: list[Any]) -> None:
            for rank, hit in enumerate(hits, 1):
                _say(
                    f"     {rank}. {hit.score:6.2f}  row {hit.id:>4}  {hit.source.get('title', '')[:70]}"
                )

        _say(f"\n   search {QUERY!r}:")
        before = await top()
        show(before)
        row = len(docs)  # the last row, far from the query
        _say(f"\n== 4. UPDATE row {row}: its text now answers the query")
        t0 = time.monotonic()
        await asyncio.to_thread(
            stack.postgres_exec,
            f"UPDATE {table} SET title = 'calendar: leap years', body = {_sql(ANSWER)} WHERE id = {row};",
        )

        async def first() -> bool:
            hits = await top(1)
            return bool(hits) and hits[0].id == str(row)

        await _until(first, 60, "the update to be searchable")
        lag = time.monotonic() - t0
        _say(f"   committed in Postgres -> first hit in {lag:.2f}s:")
        show(await top())

        _say(f"\n== 5. DELETE row {row}")
        t0 = time.monotonic()
        await asyncio.to_thread(stack.postgres_exec, f"DELETE FROM {table} WHERE id = {row};")

        async def gone() -> bool:
            return all(hit.id != str(row) for hit in await top(10))

        await _until(gone, 60, "the delete to be searchable")
        _say(f"   gone from the results {time.monotonic() - t0:.2f}s after the commit:")
        show(await top())
        _say(f"\n   index holds {await count()} documents; the table {len(docs) - 1} rows")
        _say(f"   whole demo so far {time.monotonic() - started:.0f}s")
        return 0
    finally:
        await svc.stop()
        await es.close()
        await asyncio.to_thread(stack.connect_delete_connector, prefix)
