"""Poison input: every kind of bad record ends in the dead-letter topic; the rest lands."""

from __future__ import annotations

import orjson
import pytest
import scenarios
from reliability_harness import create_topic, produce_stream, read_all, wait_committed

from service.elastic import delete_index

pytestmark = pytest.mark.integration


@pytest.mark.timeout(180)
async def test_poison_records_are_dead_lettered_and_the_stream_goes_on(
    rel_env: scenarios.Env,
) -> None:
    result = await scenarios.poison(rel_env, docs=1000, huge=True)
    assert result.ok, result.summary()
    assert result.check.dlq_expected >= 19
    assert result.check.dlq_found == result.check.dlq_expected
    assert result.check.dlq_reasons["too_large"] == 1


@pytest.mark.timeout(120)
async def test_dead_letter_too_large_for_its_topic_is_sent_without_its_value(
    rel_env: scenarios.Env,
) -> None:
    """The dead-letter topic allows less than the source topic: the letter still gets out
    (empty value, headers error.value.truncated/error.value.bytes) and the partition moves on."""
    topic, index, group = scenarios.names("dlq-small")
    await create_topic(rel_env.kafka, topic, 1, {"max.message.bytes": str(2 * scenarios.MB)})
    await create_topic(rel_env.kafka, f"{topic}.dlq", 1, {"max.message.bytes": "50000"})
    bad = b'{"id": "big-bad", "body": "' + b"z" * 400_000  # not JSON, 400 KB: fits the source
    good = [
        (f"g{i}".encode(), orjson.dumps({"id": f"g{i}", "body": f"text {i}"}), []) for i in range(5)
    ]
    await produce_stream(
        rel_env.kafka, topic, [good[0], (b"big-bad", bad, [("expect", b"invalid_json")]), *good[1:]],
        max_request_size=2 * scenarios.MB,
    )  # fmt: skip
    settings = scenarios.settings_for(rel_env, topic, index, group)
    async with scenarios.in_process(rel_env, settings):
        await wait_committed(rel_env.kafka, group, topic, 60)
    [letter] = await read_all(rel_env.kafka, f"{topic}.dlq")
    headers = {k: v.decode() for k, v in letter.headers}
    assert headers["error.reason"] == "invalid_json"
    assert headers["error.value.truncated"] == "true"
    assert headers["error.value.bytes"] == str(len(bad))
    assert letter.value == b""
    assert letter.key == b"big-bad"
    async with rel_env.es() as es:
        await es.indices.refresh(index=index)
        assert (await es.count(index=index))["count"] == 5
        await delete_index(es, index)


@pytest.mark.timeout(120)
async def test_dead_letter_too_large_even_without_its_value_is_sent_bare(
    rel_env: scenarios.Env,
) -> None:
    """A bad record whose key alone is over the dead-letter producer's limit: the letter goes
    out with only our headers (error.key.bytes), the stream goes on (it retried forever)."""
    topic, index, group = scenarios.names("dlq-bigkey")
    await create_topic(rel_env.kafka, topic, 1, {"max.message.bytes": str(5 * scenarios.MB)})
    big_key = b"K" * 1_200_000
    records = [
        (b"ok1", orjson.dumps({"id": "ok1", "body": "before"}), []),
        (big_key, b"not json", [("h", b"v")]),
        (b"ok2", orjson.dumps({"id": "ok2", "body": "after"}), []),
    ]
    await produce_stream(rel_env.kafka, topic, records, max_request_size=5 * scenarios.MB)
    settings = scenarios.settings_for(rel_env, topic, index, group)
    async with scenarios.in_process(rel_env, settings):
        await wait_committed(rel_env.kafka, group, topic, 60)
    [letter] = await read_all(rel_env.kafka, f"{topic}.dlq")
    headers = {k: v.decode() for k, v in letter.headers}
    assert letter.key is None and letter.value == b""
    assert headers["error.reason"] == "invalid_json"
    assert headers["error.key.bytes"] == str(len(big_key))
    assert headers["error.headers.dropped"] == "1"
    assert headers["source.offset"] == "1"
    async with rel_env.es() as es:
        await es.indices.refresh(index=index)
        assert (await es.count(index=index))["count"] == 2
        await delete_index(es, index)
