"""The faust-streaming runner, as a real worker process, against the real broker and node."""

from __future__ import annotations

import subprocess
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from elasticsearch import AsyncElasticsearch
from faust_worker import FaustWorker, faust_env
from service_support import (
    committed,
    create_topic,
    doc,
    end_offsets,
    produce,
    read_topic,
    tombstone,
    wait_all_committed,
    wait_until,
)

from service.search import best_passage_query, sparse_query
from service.sink import IndexConfig

pytestmark = pytest.mark.integration


def _worker(
    kafka: str, es_url: str, topic: str, index: str, model_dir: Path, work: Path, **extra: object
) -> FaustWorker:
    """A Faust worker for ``topic`` -> ``index``, group ``<topic>-faust`` (not started)."""
    env = faust_env(
        kafka_bootstrap_servers=kafka,
        kafka_topics=topic,
        kafka_group_id=f"{topic}-faust",
        es_url=es_url,
        es_index=index,
        model_dir=model_dir,
        **extra,
    )
    return FaustWorker(env, work)


async def _count(es: AsyncElasticsearch, index: str) -> int:
    if not await es.indices.exists(index=index):
        return -1
    await es.indices.refresh(index=index)
    return int((await es.count(index=index))["count"])


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
    worker = _worker(kafka_bootstrap, es_url, topic, index_name, default_model_dir, tmp_path)
    worker.start()
    try:

        async def indexed() -> bool:
            worker.assert_running()
            return await _count(es, index_name) == 29

        await wait_until(indexed, 120, "the Faust worker to index the stream")
        await wait_all_committed(kafka_bootstrap, group, topic, timeout=60)
        got = await es.get(index=index_name, id="f1")
        assert got["_source"]["body"] == "Faust document one, rewritten about deserts"
        assert not await es.exists(index=index_name, id="f2")
        letters = await read_topic(kafka_bootstrap, f"{topic}.dlq", 1)
        assert [r.value for r in letters] == [b"{not json"]
        assert dict(letters[0].headers)["error.reason"] == b"invalid_json"
        # Same vectors as the in-process service would write: the sparse field is searchable.
        vector = {"desert": 1.0, "deserts": 1.0}
        resp = await es.search(
            index=index_name,
            query=best_passage_query("passages", sparse_query("passages.tokens", vector, True)),
            size=1,
        )
        assert resp["hits"]["hits"][0]["_id"] == "f1"
        code = await worker.stop()
        assert code == 0, f"exit status {code}:\n{worker.log_text()[-3000:]}"
    finally:
        await worker.stop()


async def test_faust_worker_commits_only_what_was_written_while_elasticsearch_refuses(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_model_dir: Path,
    tmp_path: Path,
) -> None:
    """The index refuses writes (a write block) while a batch is in progress; SIGTERM then.
    The worker exits promptly (it does not wait out the outage), and the group's offsets
    stay where the written records end: the refused batch was not acknowledged. Once the
    block is lifted, a new worker indexes everything and commits to the end."""
    await create_topic(kafka_bootstrap, topic, partitions=2)
    body = IndexConfig(index_name).body()
    await es.indices.create(index=index_name, **body)
    group = f"{topic}-faust"
    worker = _worker(
        kafka_bootstrap,
        es_url,
        topic,
        index_name,
        default_model_dir,
        tmp_path,
        es_unavailable_backoff_s=0.2,
    )
    first = [doc(f"a{i}", f"written before the block, number {i}") for i in range(10)]
    second = [doc(f"b{i}", f"refused by the block at first, number {i}") for i in range(12)]
    await produce(kafka_bootstrap, topic, first)
    worker.start()
    try:

        async def first_indexed() -> bool:
            worker.assert_running()
            return await _count(es, index_name) == len(first)

        await wait_until(first_indexed, 120, "the first records to be indexed")
        await wait_all_committed(kafka_bootstrap, group, topic, timeout=60)
        written = await end_offsets(kafka_bootstrap, topic)

        await es.indices.put_settings(index=index_name, settings={"index.blocks.write": True})
        await produce(kafka_bootstrap, topic, second)
        await worker.wait_log("cluster_block_exception")  # the batch is being retried
        code = await worker.stop(timeout=60)
        assert code == 0, f"exit status {code}:\n{worker.log_text()[-3000:]}"
        got = await committed(kafka_bootstrap, group, list(written))
        assert got == written, f"committed {got}, but only {written} was written"
        assert await _count(es, index_name) == len(first)

        await es.indices.put_settings(index=index_name, settings={"index.blocks.write": None})
        worker.start()

        async def all_indexed() -> bool:
            worker.assert_running()
            return await _count(es, index_name) == len(first) + len(second)

        await wait_until(all_indexed, 120, "every record to be indexed after the block")
        await wait_all_committed(kafka_bootstrap, group, topic, timeout=60)
    finally:
        await worker.stop()


def _kcat(kafka: str, topic: str, key: bytes, args: list[bytes]) -> None:
    value = orjson.dumps({"id": key.decode(), "body": "after the transactions"})
    cmd = [b"kcat", b"-P", b"-b", kafka.encode(), b"-t", topic.encode(), b"-k", key, *args]
    subprocess.run(cmd, input=value, check=True, timeout=60)


async def test_faust_worker_skips_aborted_transactions_and_reads_past_unreadable_records(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_model_dir: Path,
    tmp_path: Path,
) -> None:
    """A transactional producer commits c1, aborts (ab, an overwrite of c1), commits c2; kcat
    then sends a record whose header key is not UTF-8, and c3. Faust read uncommitted data
    (ab indexed, c1 overwritten), and its commit stopped for good before the skipped offsets."""
    await create_topic(kafka_bootstrap, topic, partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"{topic}-tx")
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(topic, key=b"c1", value=orjson.dumps({"id": "c1", "body": "one"}))
        await producer.begin_transaction()
        await producer.send(topic, key=b"ab", value=orjson.dumps({"id": "ab", "body": "aborted"}))
        await producer.send(topic, key=b"c1", value=orjson.dumps({"id": "c1", "body": "aborted"}))
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(topic, key=b"c2", value=orjson.dumps({"id": "c2", "body": "two"}))
    finally:
        await producer.stop()
    _kcat(kafka_bootstrap, topic, b"hb", [b"-H", b"\xff\xfe=v"])  # a header key not UTF-8
    _kcat(kafka_bootstrap, topic, b"c3", [])
    group = f"{topic}-faust"
    worker = _worker(kafka_bootstrap, es_url, topic, index_name, default_model_dir, tmp_path)
    worker.start()
    try:
        await wait_all_committed(kafka_bootstrap, group, topic, timeout=120)
        await es.indices.refresh(index=index_name)
        resp = await es.search(index=index_name, query={"match_all": {}}, size=10)
        bodies = {h["_id"]: h["_source"]["body"] for h in resp["hits"]["hits"]}
        assert bodies == {"c1": "one", "c2": "two", "c3": "after the transactions"}
        [letter] = await read_topic(kafka_bootstrap, f"{topic}.dlq", 1)
        assert dict(letter.headers)["error.reason"] == b"invalid_header"
        assert letter.key == b"hb"
        code = await worker.stop()
        assert code == 0, f"exit status {code}:\n{worker.log_text()[-3000:]}"
    finally:
        await worker.stop()
