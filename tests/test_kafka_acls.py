"""Kafka least privilege (README: Least privilege): a broker with the ``StandardAuthorizer``, the
README's own ``kafka-acls.sh`` lines run through Kafka's ``AclCommand`` for the stack's SCRAM user,
and that user runs the service (consume, dead letter, commit), a reindex and a retire. Without
the group's ACL the start fails naming the group."""

from __future__ import annotations

import asyncio
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import support
from elasticsearch import AsyncElasticsearch
from service_support import (
    create_topic,
    doc,
    produce,
    read_topic,
    running_service,
    service_settings,
    wait_all_committed,
)

from deploy.local import LocalStack, StackError
from deploy.local import artifacts as fetching
from deploy.local.java import find_java
from deploy.local.paths import cache_dir
from deploy.local.versions import KAFKA_MIN_JAVA
from service.app import Service
from service.errors import StartupError
from service.reindex import alias_state, reindex, retire

README = Path(__file__).resolve().parent.parent / "README.md"
# the README's names: a broker of this test's own, so they collide with nothing
TOPIC, DLQ, GROUP = "documents", "documents.dlq", "sparse-ingest"


pytestmark = pytest.mark.integration  # needs the local stack


@pytest.fixture(scope="module")
def acl_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(
        name="pytest-acl",
        run_dir=tmp_path_factory.mktemp("acl-kafka"),
        kafka_security=True,
        kafka_settings={
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            # the PLAINTEXT listener (the broker itself, the controller, the test's tools)
            "super.users": "User:ANONYMOUS",
        },
        log=support.log,
    )
    try:
        stack.up(kafka=True, elasticsearch=False)
    except StackError as exc:
        stack.down(remove_data=False)
        pytest.fail(f"could not start Kafka with an authorizer: {exc}", pytrace=False)
    try:
        yield stack
    finally:
        stack.down(remove_data=True)


def readme_acl_lines(principal: str) -> list[list[str]]:
    """The ``kafka-acls.sh`` lines of the README's Kafka ACL block, ``$P`` = ``principal``."""
    text = README.read_text()
    block = text[text.index("Kafka ACLs (with an authorizer") :]
    block = block[block.index("```bash") : block.index("```", block.index("```bash") + 3)]
    lines = [ln for ln in block.splitlines() if ln.startswith("kafka-acls.sh")]
    assert len(lines) >= 4, block
    return [shlex.split(ln.replace("$P", principal))[1:] for ln in lines]


def acl_command(bootstrap: str, args: list[str]) -> None:
    libs = fetching.kafka_libs_dir(cache_dir())
    cmd = [str(find_java(KAFKA_MIN_JAVA).java), "-cp", f"{libs}/*"]
    cmd += ["org.apache.kafka.tools.AclCommand", "--bootstrap-server", bootstrap, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]


async def _run_until_it_fails(svc: Service) -> None:
    try:
        await svc.start(http=False)
        await asyncio.wait_for(svc.wait(), 120)
    finally:
        await svc.stop()


async def test_the_readme_acls_are_enough_and_the_group_acl_is_needed(
    acl_kafka: LocalStack,
    es_url: str,
    es: AsyncElasticsearch,
    index_name: str,
    default_encoder: Any,
    default_model_dir: Path,
) -> None:
    info = acl_kafka.info
    assert info.kafka_sasl and info.kafka_listeners
    user, password = info.kafka_sasl
    admin_bootstrap = info.kafka_bootstrap  # PLAINTEXT: super user
    sasl = info.kafka_listeners["SASL_PLAINTEXT"]
    await create_topic(admin_bootstrap, TOPIC, 2)
    await create_topic(admin_bootstrap, DLQ, 2)
    settings = service_settings(
        sasl, es_url, TOPIC, index_name,
        kafka_group_id=GROUP,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username=user,
        kafka_sasl_password=password,
        kafka_create_dead_letter_topic=False,
    )  # fmt: skip
    lines = readme_acl_lines(f"User:{user}")
    topic_lines = [args for args in lines if "--group" not in args]
    group_lines = [args for args in lines if "--group" in args]
    for args in topic_lines:
        await asyncio.to_thread(acl_command, admin_bootstrap, args)

    records = [doc(f"d{i}", f"mountains and valleys {i}") for i in range(10)]
    records.append((b"bad", b"{not json", []))
    await produce(admin_bootstrap, TOPIC, records)

    # without the group's ACL: the start fails and says which group
    with pytest.raises(
        StartupError,
        match=f"Read on the group.*{re.escape(GROUP)}|{re.escape(GROUP)}.*Read on the group",
    ):
        await _run_until_it_fails(Service(settings, encoder=default_encoder))

    for args in group_lines:
        await asyncio.to_thread(acl_command, admin_bootstrap, args)
    async with running_service(settings, default_encoder) as svc:
        await wait_all_committed(admin_bootstrap, GROUP, TOPIC)
        assert svc.pipeline_running
    await es.indices.refresh(index=index_name)
    assert (await es.count(index=index_name))["count"] == 10
    letters = await read_topic(admin_bootstrap, DLQ, 1)
    assert [dict(letter.headers)["error.reason"] for letter in letters] == [b"invalid_json"]

    # a reindex (a group under the prefix) and a retire (Delete on the old group), same user
    old = (await alias_state(es, index_name)).indices
    pruned = settings.model_copy(update={"es_prune_below": 0.3})
    result = await reindex(
        pruned, default_model_dir, encoder=default_encoder, exit_after_swap=True, progress_s=0.5
    )
    assert result.swapped and result.group.startswith(GROUP)
    done = await retire(settings, old[0], GROUP)
    assert done == [f"deleted index {old[0]}", f"deleted consumer group {GROUP}"]
