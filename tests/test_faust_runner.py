"""The faust-streaming runner, as a real worker process, against the real broker and node."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from elasticsearch import AsyncElasticsearch
from service_support import (
    create_topic,
    doc,
    produce,
    read_topic,
    tombstone,
    wait_all_committed,
    wait_until,
)

pytestmark = pytest.mark.integration


async def test_faust_worker_indexes_updates_deletes_and_dead_letters(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_model_dir: Path,
    tmp_path: Path,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=2)
    records = [doc(f"f{i}", f"Faust document number {i} about rivers and lakes") for i in range(30)]
    records += [doc("f1", "Faust document one, rewritten about deserts")]
    records += [tombstone("f2"), (b"bad", b"{not json", [])]
    await produce(kafka_bootstrap, topic, records)
    group = f"{topic}-faust"
    env = {
        **os.environ,
        "SPARSE_INGEST_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "SPARSE_INGEST_KAFKA_TOPICS": topic,
        "SPARSE_INGEST_KAFKA_GROUP_ID": group,
        "SPARSE_INGEST_ES_URL": es_url,
        "SPARSE_INGEST_ES_INDEX": index_name,
        "SPARSE_INGEST_MODEL_DIR": str(default_model_dir),
        "SPARSE_INGEST_HTTP_PORT": "0",
        "SPARSE_INGEST_BATCH_LINGER_MS": "100",
        "SPARSE_INGEST_COMMIT_INTERVAL_MS": "200",
    }
    log_path = tmp_path / "faust.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(  # noqa: ASYNC220 - a long-lived worker, not awaited
            [sys.executable, "-m", "service.cli", "faust"],
            env=env,
            cwd=tmp_path,  # Faust writes its data dir here
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        async def indexed() -> bool:
            assert worker.poll() is None, log_path.read_text()[-3000:]
            if not await es.indices.exists(index=index_name):
                return False
            await es.indices.refresh(index=index_name)
            return (await es.count(index=index_name))["count"] == 29

        await wait_until(indexed, 120, "the Faust worker to index the stream")
        await wait_all_committed(kafka_bootstrap, group, topic, timeout=60)
        got = await es.get(index=index_name, id="f1")
        assert got["_source"]["body"] == "Faust document one, rewritten about deserts"
        assert not await es.exists(index=index_name, id="f2")
        letters = await read_topic(kafka_bootstrap, f"{topic}.dlq", 1)
        assert [r.value for r in letters] == [b"{not json"]
        assert dict(letters[0].headers)["error.reason"] == b"invalid_json"
        # Same vectors as the in-process service would write: the sparse field is searchable.
        resp = await es.search(
            index=index_name,
            query={
                "sparse_vector": {
                    "field": "tokens",
                    "query_vector": {"desert": 1.0, "deserts": 1.0},
                }
            },
            size=1,
        )
        assert resp["hits"]["hits"][0]["_id"] == "f1"
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(worker.wait, 30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
