"""The Faust runner against the fault stack's secure listeners: Kafka SASL_SSL (SCRAM-SHA-512,
the stack's CA) for Faust's consumer and producer and the dead-letter producer alike,
Elasticsearch over https with basic auth. Our own clients use the PLAINTEXT listener."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import pytest
import scenarios
from faust_worker import FaustWorker, faust_env
from reliability_harness import create_topic, topic_partitions, wait_committed
from service_support import doc, produce, read_topic, tombstone, wait_until

from deploy.local import LocalStack
from service.elastic import delete_index

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


async def test_faust_worker_over_sasl_ssl_indexes_dead_letters_and_commits(
    fault_env: scenarios.Env, fault_stack: LocalStack
) -> None:
    info = fault_stack.info
    assert info.kafka_sasl and info.es_auth and info.es_url
    user, password = info.kafka_sasl
    es_user, es_password = info.es_auth
    name = f"faust-sasl-{uuid.uuid4().hex[:8]}"
    topic, index, group = name, name, f"{name}-group"
    # 3 partitions: a dead-letter topic made by the broker's auto-creation would have 4.
    await create_topic(fault_env.kafka, topic, partitions=3)
    records = [doc(f"s{i}", f"secure document {i} about glaciers and fjords") for i in range(40)]
    records += [doc("s1", "secure document one, rewritten about deserts"), tombstone("s2")]
    records += [(b"bad", b"{not json", [("trace", b"t-1")])]
    await produce(fault_env.kafka, topic, records)
    worker = FaustWorker(
        faust_env(
            kafka_bootstrap_servers=info.kafka_listeners["SASL_SSL"],
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="SCRAM-SHA-512",
            kafka_sasl_username=user,
            kafka_sasl_password=password,
            kafka_ssl_cafile=info.kafka_ca_file,
            kafka_topics=topic,
            kafka_group_id=group,
            es_url=info.es_url,
            es_username=es_user,
            es_password=es_password,
            es_ca_certs=info.es_ca_certs,
            es_index=index,
            model_dir=fault_env.model_dir,
        ),
        fault_env.work / "faust",
    )
    es = fault_env.es()
    worker.start()
    try:

        async def indexed() -> bool:
            worker.assert_running()
            if not await es.indices.exists(index=index):
                return False
            await es.indices.refresh(index=index)
            return (await es.count(index=index))["count"] == 39

        await wait_until(indexed, 150, "the Faust worker to index the stream over SASL_SSL")
        await wait_committed(fault_env.kafka, group, topic, 60)
        # Made at start by `sparse-ingest faust`, with the source topic's partition count.
        assert len(await topic_partitions(fault_env.kafka, f"{topic}.dlq")) == 3
        letters = await read_topic(fault_env.kafka, f"{topic}.dlq", 1)
        assert [r.value for r in letters] == [b"{not json"]
        headers = dict(letters[0].headers)
        assert headers["error.reason"] == b"invalid_json"
        assert headers["trace"] == b"t-1"
        got = await es.get(index=index, id="s1")
        assert got["_source"]["body"] == "secure document one, rewritten about deserts"
        assert not await es.exists(index=index, id="s2")
        code = await worker.stop()
        assert code == 0, f"exit status {code}:\n{worker.log_text()[-3000:]}"
        logs = worker.all_logs()
        for secret in (password, es_password):
            assert secret not in logs, "a password is in the worker's output"
    finally:
        await worker.stop()
        await delete_index(es, index)
        await es.close()


@pytest.mark.parametrize("case", ["kafka-wrong-password", "dead-letter-topic-missing"])
async def test_faust_worker_refuses_to_start_with_a_clear_error(
    case: str, fault_env: scenarios.Env, fault_stack: LocalStack
) -> None:
    """The start-up checks of `run`, before Faust starts: exit status 1 and one line that
    names the setting to fix, no traceback, no password."""
    info = fault_stack.info
    assert info.kafka_sasl and info.es_auth and info.es_url
    user, password = info.kafka_sasl
    wrong = "Wr0ng-" + password[::-1]
    name = f"faust-start-{uuid.uuid4().hex[:8]}"
    await create_topic(fault_env.kafka, name, partitions=1)
    settings: dict[str, object] = {
        "kafka_bootstrap_servers": info.kafka_listeners["SASL_SSL"],
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-256",
        "kafka_sasl_username": user,
        "kafka_sasl_password": password,
        "kafka_ssl_cafile": info.kafka_ca_file,
        "kafka_topics": name,
        "es_url": info.es_url,
        "es_username": info.es_auth[0],
        "es_password": info.es_auth[1],
        "es_ca_certs": info.es_ca_certs,
        "es_index": name,
        "model_dir": fault_env.model_dir,
    }
    if case == "kafka-wrong-password":
        settings["kafka_sasl_password"] = wrong
        expected = "SPARSE_INGEST_KAFKA_SASL_PASSWORD"
    else:
        settings["kafka_create_dead_letter_topic"] = "false"
        expected = f"dead-letter topic '{name}.dlq' does not exist"
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service.cli", "faust"],
        env=faust_env(**settings),
        cwd=fault_env.work,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if line.startswith("sparse-ingest: ")]
    assert proc.returncode == 1, output
    assert len(lines) == 1 and expected in lines[0], output
    assert "Traceback" not in output, output
    for secret in (password, wrong, info.es_auth[1]):
        assert secret not in output, "a password is in the output"
    async with fault_env.es() as es:
        await delete_index(es, name)
