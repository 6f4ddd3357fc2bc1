"""Producers we did not write: kcat (librdkafka) and Kafka's own Java console producer.

- Every codec from both clients ends indexed (and the batches really were compressed: the
  broker's log segment says so, read with Kafka's DumpLogSegments).
- A hostile set (a header key that is not UTF-8, Unicode digits as versions, bytes that are not
  UTF-8, a BOM, deep nesting, lone surrogates, null values without a key, ...) sent with kcat:
  the service lives on, every good record is indexed and every bad one is dead-lettered with
  its reason.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
import scenarios
from reliability_harness import create_topic, read_all, wait_committed

from deploy.local import LocalStack, cache_dir, find_java
from deploy.local import artifacts as fetching
from deploy.local.versions import KAFKA_MIN_JAVA

pytestmark = pytest.mark.integration
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
PER_RUN = 40  # records per client and codec: enough that the clients really compress


def kcat(kafka: str, topic: str, lines: Sequence[bytes], *args: str, codec: str = "none") -> None:
    """One kcat run: each line is KEY<TAB>VALUE (``-Z``: an empty value is sent as null)."""
    cmd = ["kcat", "-P", "-b", kafka, "-t", topic, "-p", "0", "-K", "\t", "-z", codec]
    cmd += ["-X", "linger.ms=200", *args]
    proc = subprocess.run(
        cmd, input=b"".join(line + b"\n" for line in lines), capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")


def java_producer(kafka: str, topic: str, lines: Sequence[bytes], codec: str) -> None:
    libs = fetching.kafka_libs_dir(cache_dir())
    cmd = [
        str(find_java(KAFKA_MIN_JAVA).java),
        "-cp",
        f"{libs}/*",
        "org.apache.kafka.tools.ConsoleProducer",
    ]
    cmd += ["--bootstrap-server", kafka, "--topic", topic, "--compression-codec", codec]
    cmd += ["--property", "parse.key=true", "--property", "key.separator=\t"]
    cmd += ["--producer-property", "linger.ms=200"]
    proc = subprocess.run(
        cmd, input=b"".join(line + b"\n" for line in lines), capture_output=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]


def doc_line(doc_id: str, body: str, **extra: object) -> bytes:
    return doc_id.encode() + b"\t" + orjson.dumps({"id": doc_id, "body": body, **extra})


def segment_codecs(stack: LocalStack, topic: str) -> Counter[str]:
    """Record batches per codec in the broker's log of partition 0 (DumpLogSegments)."""
    log = Path(stack.run_dir) / "kafka" / "data" / f"{topic}-0" / "00000000000000000000.log"
    libs = fetching.kafka_libs_dir(cache_dir())
    cmd = [
        str(find_java(KAFKA_MIN_JAVA).java),
        "-cp",
        f"{libs}/*",
        "org.apache.kafka.tools.DumpLogSegments",
    ]
    out = subprocess.run(
        [*cmd, "--files", str(log)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    return Counter(
        line.split("compresscodec: ")[1].split()[0]
        for line in out.splitlines()
        if "compresscodec: " in line
    )


async def indexed_ids(env: scenarios.Env, index: str) -> set[str]:
    async with env.es() as es:
        await es.indices.refresh(index=index)
        resp = await es.search(index=index, size=10_000, query={"match_all": {}}, source=False)
        return {hit["_id"] for hit in resp["hits"]["hits"]}


@pytest.mark.timeout(600)
async def test_every_codec_from_kcat_and_the_java_producer_is_indexed(
    rel_env: scenarios.Env, local_stack: LocalStack | None
) -> None:
    topic, index, group = scenarios.names("codecs")
    await create_topic(rel_env.kafka, topic, 1)
    expected: set[str] = set()
    for codec in CODECS:
        ids = [f"kcat-{codec}-{i}" for i in range(PER_RUN)]
        kcat(rel_env.kafka, topic, [doc_line(i, f"text of {i} " * 8) for i in ids], codec=codec)
        expected.update(ids)
        ids = [f"java-{codec}-{i}" for i in range(PER_RUN)]
        java_producer(rel_env.kafka, topic, [doc_line(i, f"text of {i} " * 8) for i in ids], codec)
        expected.update(ids)

    settings = scenarios.settings_for(rel_env, topic, index, group)
    async with scenarios.in_process(rel_env, settings) as service:
        await wait_committed(rel_env.kafka, group, topic, 240)
        assert service.pipeline_running
    assert await indexed_ids(rel_env, index) == expected
    assert await read_all(rel_env.kafka, f"{topic}.dlq", wait_topic=5) == []
    if local_stack is not None:  # the session's own stack: its log files are ours to read
        codecs = segment_codecs(local_stack, topic)
        rel_env.log(f"record batches per codec in the broker's log: {dict(codecs)}")
        assert set(codecs) == set(CODECS), codecs


def hostile_records() -> tuple[list[tuple[list[bytes], list[str]]], dict[str, str], set[str]]:
    """(kcat runs: lines and extra args), bad record id -> expected reason, good ids."""
    runs: list[tuple[list[bytes], list[str]]] = []
    bad: dict[str, str] = {}
    good: set[str] = set()

    def add_good(prefix: str, n: int = 5) -> None:
        ids = [f"{prefix}-{i}" for i in range(n)]
        runs.append(([doc_line(i, f"good text {i}") for i in ids], []))
        good.update(ids)

    add_good("g0")
    # one kcat run per header set: -H applies to every line of the run
    runs.append(([doc_line(f"hdr-{i}", "body") for i in range(3)], ["-H", "\udcff\udcfe=v"]))
    bad.update({f"hdr-{i}": "invalid_header" for i in range(3)})
    runs.append(([doc_line("hver", "body")], ["-H", "version=²"]))
    bad["hver"] = "invalid_version"
    add_good("g1")
    lines = [
        (b"sup", orjson.dumps({"id": "sup", "body": "x", "version": "²"}), "invalid_version"),
        (b"arabic", orjson.dumps({"id": "arabic", "body": "x", "version": "٣"}), "invalid_version"),
        (b"notutf8", b'{"id": "notutf8", "body": "\xff\xfe"}', "invalid_utf8"),
        (b"notjson", b"this is not json", "invalid_json"),
        (b"surrogate", b'{"id": "surrogate", "body": "\\ud800"}', "invalid_json"),
        (b"nan", b'{"id": "nan", "body": "x", "n": NaN}', "invalid_json"),
        (b"deep", json.dumps({"id": "deep", "body": "x", "d": _deep(100)}).encode(), "too_deep"),
        (b"bigid", b'{"id": 123456789012345678901234567890, "body": "x"}', "invalid_id"),
        (b"array", b'[{"id": "array", "body": "x"}]', "not_an_object"),
        (b"reserved", orjson.dumps({"id": "reserved", "body": "x", "tokens": {}}), "reserved_field"),
        (b"notext", orjson.dumps({"id": "notext", "body": "   "}), "missing_text"),
        (b"badtype", orjson.dumps({"id": "badtype", "body": 7}), "wrong_type"),
        (b"emptyval", b"", "invalid_json"),
    ]  # fmt: skip
    runs.append(([k + b"\t" + v for k, v, _ in lines], []))
    bad.update({k.decode(): reason for k, _, reason in lines})
    # good ones that look odd: a BOM in front of the JSON, NUL and emoji in the text
    odd = [
        b"bom\t\xef\xbb\xbf" + orjson.dumps({"id": "bom", "body": "byte order mark"}),
        doc_line("nul", "a\u0000b text"),
        doc_line("emoji", "🧊 glaciers ❄"),
        doc_line("unicode-digits", "version text", version=12),
    ]
    runs.append((odd, []))
    good.update({"bom", "nul", "emoji", "unicode-digits"})
    # a null value without a key: a delete of nothing (kcat -Z sends an empty value as null)
    runs.append(([b"\t"], ["-Z"]))
    bad["<tombstone without key>"] = "tombstone_without_key"
    add_good("g2")
    return runs, bad, good


def _deep(levels: int) -> object:
    value: object = "leaf"
    for _ in range(levels):
        value = {"x": value}
    return value


@pytest.mark.timeout(600)
async def test_hostile_records_from_kcat_are_dead_lettered_and_the_stream_goes_on(
    rel_env: scenarios.Env,
) -> None:
    topic, index, group = scenarios.names("hostile")
    await create_topic(rel_env.kafka, topic, 1)
    runs, bad, good = hostile_records()
    for codec in ("none", "zstd"):  # each set twice: plain and in compressed batches
        for lines, args in runs:
            kcat(rel_env.kafka, topic, lines, *args, codec=codec)

    settings = scenarios.settings_for(rel_env, topic, index, group)
    async with scenarios.in_process(rel_env, settings) as service:
        await wait_committed(rel_env.kafka, group, topic, 240)
        assert service.pipeline_running, "the pipeline stopped"

    assert await indexed_ids(rel_env, index) == good
    letters = await read_all(rel_env.kafka, f"{topic}.dlq")
    reasons: Counter[tuple[str, str]] = Counter()
    for letter in letters:
        headers = {k: v.decode() for k, v in letter.headers if k.startswith(("error.", "source."))}
        assert headers["source.topic"] == topic and headers["source.partition"] == "0"
        assert int(headers["source.offset"]) >= 0
        key = letter.key.decode() if letter.key else "<tombstone without key>"
        reasons[(key, headers["error.reason"])] += 1
    assert reasons == Counter({item: 2 for item in bad.items()}), reasons
    invalid_header = [lt for lt in letters if (lt.key or b"").startswith(b"hdr-")]
    assert all(lt.value and orjson.loads(lt.value)["body"] == "body" for lt in invalid_header), (
        "the record's value must be kept in its dead letter"
    )
    rel_env.log(
        f"hostile set: {len(good)}/{len(good)} good documents indexed, "
        f"{len(letters)}/{2 * len(bad)} dead letters"
    )
