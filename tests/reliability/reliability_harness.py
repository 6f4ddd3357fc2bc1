"""Reliability harness: a known stream, faults, and an exact check of the end state.

Used by the CI tests in ``tests/reliability/`` (small streams) and by ``bench/reliability.py``
(the same scenarios, bigger and longer, printed as a table).

The check never trusts what was *meant* to be produced: after the run the source topic is read
back, and the expected final state is computed from what is really in it (so a producer retry
that duplicated a record is accounted for). Expected:

- every id whose newest change (highest version, then offset) is an upsert: present, with that
  version as ``_version``, that record's partition/offset in ``sparse_ingest``, ``_source``
  equal to the record's JSON (every pass-through field), and a non-empty vector;
- every id whose newest change is a tombstone: absent; nothing else in the index;
- every record carrying the header ``expect`` (the harness marks its poison records with the
  reason it expects) in the dead-letter topic, with that ``error.reason``, its original bytes
  and its ``source.partition``/``source.offset``; nothing else there (duplicates, which
  at-least-once allows, are counted, not failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from elasticsearch import AsyncElasticsearch
from elasticsearch.helpers import async_scan
from service_support import stored_vector

from service.messages import META_FIELD
from service.sink import IndexConfig

REPO = Path(__file__).resolve().parents[2]
Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]
Log = Callable[[str], None]

WORDS = [
    "ocean", "glacier", "volcano", "desert", "forest", "river", "mountain", "island", "canyon",
    "valley", "prairie", "swamp", "tundra", "reef", "lagoon", "delta", "plateau", "savanna",
    "meadow", "marsh", "harbor", "lighthouse", "orchard", "vineyard", "bridge", "tunnel",
    "castle", "library", "market", "bakery", "engine", "turbine", "satellite", "comet",
    "nebula", "quasar", "violin", "piano", "opera", "ballet",
]  # fmt: skip

# Ids that a careless service would mangle: kept verbatim as _id.
ODD_IDS = (
    "a/b/c",
    "with space",
    "ünïcödé-日本語",
    "emoji-🙂-id",
    "..",
    ".",
    "_underscore",
    "q?x=1&y=#2",
    'quote"d',
    "back\\slash",
    "tab\tid",
    "%2F%20",
    "<b>html</b>",
    "n" * 500,
)
INT_ID = 4242  # an integer id in the JSON value: stored as "4242"


def _quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------------------- the stream
@dataclass(frozen=True)
class StreamSpec:
    docs: int = 1500
    seed: int = 7
    update_share: float = 0.35  # ids updated at least once (1 to 3 times)
    meta_only_share: float = 0.3  # of updates: only a pass-through field changes
    delete_share: float = 0.12  # ids deleted (their last change is a tombstone) ...
    recreate_share: float = 0.03  # ... and ids deleted then created again
    explicit_versions: bool = False  # version field/header, else the record offset
    odd_ids: bool = True
    poison: bool = False  # interleave the bad records of :func:`poison_records`
    huge: bool = False  # with poison: a 10 MB record (topic/producer must allow it)
    text_words: tuple[int, int] = (8, 30)


@dataclass
class KnownStream:
    spec: StreamSpec
    records: list[Record]
    bad: int  # how many poison records are in ``records``

    @property
    def max_value_bytes(self) -> int:
        return max((len(v) for _, v, _ in self.records if v is not None), default=0)


def _text(rng: random.Random, n: int, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return f"Item {n}: " + " ".join(words) + "."


def poison_records(huge: bool = False) -> list[tuple[bytes | None, bytes | None, str]]:
    """(key, value, expected error.reason) of the bad inputs the contract must dead-letter."""
    deep_ok_json = {"id": "bad-depth", "body": "nested too deep for the index"}
    node: dict[str, Any] = deep_ok_json
    for _ in range(40):  # valid JSON, but deeper than index.mapping.depth.limit (20)
        node["d"] = {}
        node = node["d"]
    out: list[tuple[bytes | None, bytes | None, str]] = [
        (b"bad-json", b'{"id": "bad-json", "body": "unterminated', "invalid_json"),
        (b"bad-utf8", b'{"id": "bad-utf8", "body": "caf\xe9 \xff\xfe"}', "invalid_utf8"),
        (None, orjson.dumps({"body": "no id and no key"}), "missing_id"),
        (
            b"bad-empty",
            orjson.dumps({"id": "bad-empty", "title": "  ", "body": ""}),
            "missing_text",
        ),
        (b"bad-notext", orjson.dumps({"id": "bad-notext", "lang": "en"}), "missing_text"),
        (b"bad-type", orjson.dumps({"id": "bad-type", "body": 42}), "wrong_type"),
        (b"bad-type2", orjson.dumps({"id": "bad-type2", "title": ["a", "b"]}), "wrong_type"),
        (b"bad-idtype", orjson.dumps({"id": ["x"], "body": "id is a list"}), "invalid_id"),
        (b"bad-idlong", orjson.dumps({"id": "i" * 600, "body": "id over 512 bytes"}), "invalid_id"),
        (
            b"bad-ver",
            orjson.dumps({"id": "bad-ver", "body": "t", "version": "seven"}),
            "invalid_version",
        ),
        (b"bad-array", b"[1, 2, 3]", "not_an_object"),
        (b"bad-string", b'"just a string"', "not_an_object"),
        (
            b"bad-reserved",
            orjson.dumps({"id": "bad-reserved", "body": "t", "tokens": {"a": 1.0}}),
            "reserved_field",
        ),
        (b"", None, "tombstone_without_key"),
        (
            b"bad-deep",
            b'{"id": "bad-deep", "body": "x", "n": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            "invalid_json",
        ),
        (b"bad-depth", orjson.dumps(deep_ok_json), "document_parsing_exception"),
        (
            b"bad-mapping",  # "seq" is mapped as a long (see :func:`create_index`)
            orjson.dumps({"id": "bad-mapping", "body": "t", "seq": "not a number"}),
            "document_parsing_exception",
        ),
        (
            b"bad-long",
            orjson.dumps({"id": "bad-long", "body": "word " * 50_000}),
            "text_too_long",
        ),
    ]
    if huge:
        ten_mb = orjson.dumps({"id": "bad-huge", "body": "y" * (10 * 1024 * 1024)})
        out.append((b"bad-huge", ten_mb, "too_large"))
    return out


class _DocChanges:
    """The changes of one document: created, maybe updated, maybe deleted (and re-created)."""

    def __init__(self, spec: StreamSpec, rng: random.Random, n: int, raw_id: str | int) -> None:
        self.spec, self.rng, self.n, self.raw_id = spec, rng, n, raw_id
        self.key = str(raw_id).encode()
        self.version = 0

    def upsert(self, rev: int, title: str, body: str, views: int) -> Record:
        self.version += 10
        value: dict[str, Any] = {
            "id": self.raw_id,
            "title": title,
            "body": body,
            "seq": self.n,
            "rev": rev,
            "views": views,
            "lang": self.rng.choice(["en", "de", "fr"]),
            "tags": self.rng.sample(WORDS, 2),
            "extra": {"source": "reliability", "nested": {"k": self.n % 7}},
        }
        if self.spec.explicit_versions:
            value["version"] = self.version
        return (self.key, orjson.dumps(value), [])

    def tombstone(self) -> Record:
        self.version += 10
        explicit = self.spec.explicit_versions
        return (self.key, None, [("version", str(self.version).encode())] if explicit else [])

    def records(self) -> list[Record]:
        spec, rng, n = self.spec, self.rng, self.n
        title = f"Title {n} {rng.choice(WORDS)}"
        body = _text(rng, n, *spec.text_words)
        seq = [self.upsert(0, title, body, 0)]
        if rng.random() < spec.update_share:
            for rev in range(1, rng.randint(1, 3) + 1):
                if rng.random() >= spec.meta_only_share:
                    body = _text(rng, n, *spec.text_words)
                seq.append(self.upsert(rev, title, body, rev))
        roll = rng.random()
        if roll < spec.delete_share + spec.recreate_share:
            seq.append(self.tombstone())
            if roll < spec.recreate_share:
                seq.append(self.upsert(99, title, _text(rng, n, *spec.text_words), 99))
        return seq


def build_stream(spec: StreamSpec) -> KnownStream:
    """Creates, updates, deletes (and re-creates) of ``spec.docs`` ids, randomly interleaved
    with each id's changes in order; keyed by id; poison records mixed in when asked."""
    rng = random.Random(spec.seed)
    ids: list[str | int] = [f"doc-{i:05d}" for i in range(spec.docs)]
    if spec.odd_ids:
        for j, odd in enumerate((*ODD_IDS, INT_ID)):
            if j < len(ids):
                ids[j * 7 % len(ids)] = odd
    changes = {n: _DocChanges(spec, rng, n, raw_id).records() for n, raw_id in enumerate(ids)}
    # A uniform random interleaving that keeps each id's changes in order.
    slots = [n for n, seq in changes.items() for _ in seq]
    rng.shuffle(slots)
    cursor = dict.fromkeys(changes, 0)
    records: list[Record] = []
    for n in slots:
        records.append(changes[n][cursor[n]])
        cursor[n] += 1
    bad = 0
    if spec.poison:
        for key, value, reason in poison_records(spec.huge):
            pos = rng.randint(0, len(records))
            records.insert(pos, (key, value, [("expect", reason.encode())]))
            bad += 1
    return KnownStream(spec, records, bad)


# ------------------------------------------------------------------------------- Kafka
async def create_topic(
    kafka: str, topic: str, partitions: int = 4, config: dict[str, str] | None = None, **kw: Any
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka, **kw)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1, topic_configs=config or {})])
    finally:
        await admin.close()


@dataclass
class Production:
    produced: int = 0
    resent_chunks: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


async def produce_stream(
    kafka: str,
    topic: str,
    records: Sequence[Record],
    *,
    rate: float | None = None,
    chunk: int = 50,
    state: Production | None = None,
    max_request_size: int = 1024 * 1024,
    log: Log = _quiet,
    **client: Any,
) -> Production:
    """Produce in order (idempotent producer, acks=all), ``rate`` records/s if given.

    A chunk that fails (the broker is down longer than the producer waits) is sent again with a
    new producer: the topic may then hold a record twice, which the expectation accounts for.
    """
    state = state or Production()

    async def new_producer() -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            max_request_size=max_request_size,
            request_timeout_ms=60_000,
            **client,
        )
        await producer.start()
        return producer

    producer = await new_producer()
    start = time.monotonic()
    try:
        for i in range(0, len(records), chunk):
            part = records[i : i + chunk]
            if rate:
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            while True:
                try:
                    futures = [
                        await producer.send(topic, value=v, key=k, headers=h) for k, v, h in part
                    ]
                    await asyncio.gather(*futures)
                    break
                except KafkaError as exc:
                    log(f"producer: {exc!r}; sending the chunk again")
                    state.resent_chunks += 1
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    await asyncio.sleep(1.0)
                    with contextlib.suppress(KafkaError):
                        producer = await new_producer()
            state.produced += len(part)
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
        state.done.set()
    return state


async def topic_partitions(
    kafka: str, topic: str, wait: float = 30.0, **client: Any
) -> list[TopicPartition]:
    """The partitions of ``topic`` ([] if it does not exist after ``wait`` seconds)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka, **client)
    await admin.start()
    try:
        deadline = time.monotonic() + wait
        while True:
            with contextlib.suppress(KafkaError):
                described = await admin.describe_topics([topic])
                parts = [
                    p["partition"]
                    for t in described
                    if t["topic"] == topic and not t.get("error_code")
                    for p in t["partitions"]
                ]
                if parts:
                    return [TopicPartition(topic, p) for p in sorted(parts)]
            if time.monotonic() > deadline:
                return []
            await asyncio.sleep(0.3)
    finally:
        await admin.close()


async def read_all(
    kafka: str, topic: str, timeout: float = 120.0, wait_topic: float = 30.0, **client: Any
) -> list[Any]:
    """Every record of ``topic`` up to its current end offsets ([] if there is no topic)."""
    tps = await topic_partitions(kafka, topic, wait_topic, **client)
    if not tps:
        return []
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
        **client,
    )
    await consumer.start()
    out: list[Any] = []
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end in {timeout:.0f}s")
            batch = await consumer.getmany(timeout_ms=500)
            for recs in batch.values():
                out.extend(recs)
    finally:
        await consumer.stop()
    return out


class CommitWatch:
    """Samples a group's committed offsets (sum over the topic) every ``interval`` seconds."""

    def __init__(self, kafka: str, group: str, topic: str, interval: float = 0.25, **client: Any):
        self.kafka, self.group, self.topic, self.interval = kafka, group, topic, interval
        self.client = client
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CommitWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task

    async def _run(self) -> None:
        admin: AIOKafkaAdminClient | None = None
        while True:
            try:
                if admin is None:
                    admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka, **self.client)
                    await admin.start()
                offsets = await asyncio.wait_for(admin.list_consumer_group_offsets(self.group), 5)
                total = sum(m.offset for tp, m in offsets.items() if tp.topic == self.topic)
                self.samples.append((time.monotonic(), total))
            except asyncio.CancelledError:
                if admin is not None:
                    with contextlib.suppress(Exception):
                        await admin.close()
                raise
            except Exception:
                if admin is not None:
                    with contextlib.suppress(Exception):
                        await admin.close()
                admin = None
            await asyncio.sleep(self.interval)

    @property
    def latest(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def at(self, when: float) -> int:
        """Committed total at or before ``when`` (0 before the first sample)."""
        best = 0
        for t, total in self.samples:
            if t > when:
                break
            best = total
        return best

    def progress_after(self, when: float, settle: float = 0.0) -> float | None:
        """Seconds from ``when`` until the committed total first grew past its value then.
        ``settle``: commits seen within that many seconds after ``when`` count as before it
        (a commit sent just before a kill, or sampled late, is not the replacement's)."""
        base = self.at(when + settle)
        for t, total in self.samples:
            if t > when + settle and total > base:
                return t - when
        return None

    async def wait_progress(self, beyond: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.latest <= beyond:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no commit past {beyond} in {timeout:.0f}s (at {self.latest})"
                )
            await asyncio.sleep(self.interval)


async def wait_committed(
    kafka: str,
    group: str,
    topic: str,
    timeout: float,
    watch: CommitWatch | None = None,
    **client: Any,
) -> None:
    """Until ``group`` has committed every partition of ``topic`` to its end offset."""
    tps = await topic_partitions(kafka, topic, **client)
    assert tps, f"no topic {topic}"
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False, **client)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka, **client)
    await consumer.start()
    await admin.start()
    try:
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while True:
            got = {}
            with contextlib.suppress(KafkaError, asyncio.TimeoutError):
                offsets = await asyncio.wait_for(
                    admin.list_consumer_group_offsets(group, partitions=tps), 5
                )
                got = {tp: m.offset for tp, m in offsets.items()}
            if all(got.get(tp, -1) >= end for tp, end in ends.items()):
                return
            if time.monotonic() > deadline:
                lag = {f"{tp.partition}": end - got.get(tp, 0) for tp, end in ends.items()}
                raise AssertionError(
                    f"group {group} did not commit {topic} to the end in {timeout:.0f}s "
                    f"(lag per partition: {lag})"
                )
            await asyncio.sleep(0.3)
    finally:
        await consumer.stop()
        await admin.close()


# ------------------------------------------------------------------------------- Elasticsearch
async def create_index(es: AsyncElasticsearch, index: str, refresh: str = "1s") -> None:
    """The service's own mapping plus ``seq: long`` and ``views: long`` (so that a record with
    ``"seq": "not a number"`` is a mapping error, whatever order the records come in)."""
    body = IndexConfig(index=index, refresh_interval=refresh).body()
    body["mappings"]["properties"].update(
        seq={"type": "long"}, views={"type": "long"}, rev={"type": "long"}
    )
    await es.indices.create(index=index, settings=body["settings"], mappings=body["mappings"])


async def index_stats(es: AsyncElasticsearch, index: str) -> dict[str, int]:
    resp = await es.indices.stats(index=index, metric="indexing")
    ix = resp["_all"]["primaries"]["indexing"]  # the index, or the one behind the alias
    return {
        "index_total": int(ix.get("index_total", 0)),
        "delete_total": int(ix.get("delete_total", 0)),
        "version_conflicts": int(ix.get("index_failed_due_to_version_conflict", 0)),
        "index_failed": int(ix.get("index_failed", 0)),
    }


def add_stats(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


async def read_index(es: AsyncElasticsearch, index: str) -> dict[str, dict[str, Any]]:
    await es.indices.refresh(index=index)
    out: dict[str, dict[str, Any]] = {}
    async for hit in async_scan(
        es,
        index=index,
        query={"query": {"match_all": {}}},
        size=1000,
        version=True,
        source_exclude_vectors=False,
    ):
        out[hit["_id"]] = {"_version": hit["_version"], **hit["_source"]}
    return out


# ------------------------------------------------------------------------------- the check
@dataclass
class Expected:
    docs: dict[str, tuple[int, int, int, dict[str, Any]]]  # id -> version, partition, offset, value
    deleted: set[str]
    bad: dict[tuple[int, int], tuple[str, bytes | None]]  # (partition, offset) -> reason, value
    records: int


def _version_of(
    value: dict[str, Any] | None, headers: Iterable[tuple[str, bytes]], offset: int
) -> int:
    if value is not None and isinstance(value.get("version"), int):
        return int(value["version"])
    for k, v in headers:
        if k == "version":
            return int(v)
    return offset


def expected_state(records: Sequence[Any]) -> Expected:
    newest: dict[str, tuple[int, int, int, dict[str, Any] | None]] = {}
    bad: dict[tuple[int, int], tuple[str, bytes | None]] = {}
    for r in records:
        headers = list(r.headers or ())
        mark = dict(headers).get("expect")
        if mark is not None:
            bad[(r.partition, r.offset)] = (mark.decode(), r.value)
            continue
        value = None if r.value is None else orjson.loads(r.value)
        doc_id = r.key.decode() if value is None else str(value["id"])
        change = (_version_of(value, headers, r.offset), r.partition, r.offset, value)
        current = newest.get(doc_id)
        if current is None or (change[0], change[2]) >= (current[0], current[2]):
            newest[doc_id] = change
    docs = {i: (v, p, o, val) for i, (v, p, o, val) in newest.items() if val is not None}
    deleted = {i for i, (_, _, _, val) in newest.items() if val is None}
    return Expected(docs, deleted, bad, len(records))


@dataclass
class Check:
    expected_docs: int = 0
    found_docs: int = 0  # present with the right version and content
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # present with an older version
    wrong: list[str] = field(default_factory=list)  # right version, wrong content
    resurrected: list[str] = field(default_factory=list)  # deleted, yet present
    deleted_expected: int = 0
    dlq_expected: int = 0
    dlq_found: int = 0  # distinct source records in the dead-letter topic
    dlq_duplicates: int = 0
    dlq_missing: list[str] = field(default_factory=list)
    dlq_unexpected: list[str] = field(default_factory=list)
    dlq_wrong: list[str] = field(default_factory=list)
    dlq_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            not (
                self.missing
                or self.extra
                or self.stale
                or self.wrong
                or self.resurrected
                or self.dlq_missing
                or self.dlq_unexpected
                or self.dlq_wrong
            )
            and self.found_docs == self.expected_docs
        )

    def problems(self) -> str:
        lines = []
        for name in (
            "missing", "extra", "stale", "wrong", "resurrected", "dlq_missing",
            "dlq_unexpected", "dlq_wrong",
        ):  # fmt: skip
            items = getattr(self, name)
            if items:
                lines.append(f"{name}: {len(items)}, e.g. {items[:5]}")
        return "; ".join(lines) or "none"


def check_index(expected: Expected, stored: dict[str, dict[str, Any]], check: Check) -> None:
    check.expected_docs = len(expected.docs)
    check.deleted_expected = len(expected.deleted)
    for doc_id, (version, partition, offset, value) in expected.docs.items():
        got = stored.get(doc_id)
        if got is None:
            check.missing.append(doc_id)
            continue
        if got["_version"] < version:
            check.stale.append(f"{doc_id}: v{got['_version']} < v{version}")
            continue
        meta = got.get(META_FIELD, {})
        written = ("_version", "tokens", "passages", META_FIELD)
        source = {k: v for k, v in got.items() if k not in written}
        tokens = stored_vector(got)
        if got["_version"] != version:
            check.wrong.append(f"{doc_id}: v{got['_version']} != v{version}")
        elif source != value:
            diff = sorted(k for k in set(source) | set(value) if source.get(k) != value.get(k))
            check.wrong.append(f"{doc_id}: fields {diff} differ")
        elif (meta.get("partition"), meta.get("offset")) != (partition, offset):
            check.wrong.append(
                f"{doc_id}: from {meta.get('partition')}@{meta.get('offset')}, "
                f"expected {partition}@{offset}"
            )
        elif not isinstance(tokens, dict) or not tokens:
            check.wrong.append(f"{doc_id}: no vector")
        else:
            check.found_docs += 1
    for doc_id in stored:
        if doc_id in expected.docs:
            continue
        (check.resurrected if doc_id in expected.deleted else check.extra).append(doc_id)


def check_dead_letters(
    expected: Expected, letters: Sequence[Any], topic: str, check: Check
) -> None:
    check.dlq_expected = len(expected.bad)
    seen: dict[tuple[int, int], int] = {}
    for letter in letters:
        h = {k: v.decode(errors="replace") for k, v in letter.headers}
        if h.get("source.topic") != topic:
            check.dlq_unexpected.append(f"from topic {h.get('source.topic')}")
            continue
        pos = (int(h["source.partition"]), int(h["source.offset"]))
        seen[pos] = seen.get(pos, 0) + 1
        if seen[pos] > 1:
            continue
        reason = h.get("error.reason", "")
        check.dlq_reasons[reason] = check.dlq_reasons.get(reason, 0) + 1
        if pos not in expected.bad:
            check.dlq_unexpected.append(f"{pos[0]}@{pos[1]} {reason}: {h.get('error.message')}")
            continue
        want, original = expected.bad[pos]
        if reason != want:
            check.dlq_wrong.append(f"{pos}: reason {reason} != {want} ({h.get('error.message')})")
        elif not _same_value(original, letter.value, h):
            check.dlq_wrong.append(f"{pos}: value differs from the original ({reason})")
        elif h.get("expect") != want:
            check.dlq_wrong.append(f"{pos}: the record's own headers were not kept")
        elif not h.get("error.message"):
            check.dlq_wrong.append(f"{pos}: no error.message")
    check.dlq_found = len(seen)
    check.dlq_duplicates = sum(n - 1 for n in seen.values())
    check.dlq_missing = [
        f"{p}@{o} {expected.bad[(p, o)][0]}" for p, o in expected.bad if (p, o) not in seen
    ]


def _same_value(original: bytes | None, got: bytes | None, headers: dict[str, str]) -> bool:
    """The original bytes, or (a record too large for the dead-letter topic) a prefix of them
    with the headers saying so."""
    if headers.get("error.value.truncated") == "true":
        return (
            original is not None
            and original.startswith(got or b"")
            and int(headers.get("error.value.bytes", -1)) == len(original)
        )
    return original == got


async def verify(
    kafka: str,
    es: AsyncElasticsearch,
    topic: str,
    index: str,
    dlq_topic: str,
    *,
    kafka_client: dict[str, Any] | None = None,
) -> tuple[Check, Expected]:
    records = await read_all(kafka, topic, **(kafka_client or {}))
    expected = expected_state(records)
    check = Check()
    check_index(expected, await read_index(es, index), check)
    # No dead letters expected: the topic may well not exist (it is made on the first one).
    wait = 30.0 if expected.bad else 2.0
    letters = await read_all(kafka, dlq_topic, wait_topic=wait, **(kafka_client or {}))
    check_dead_letters(expected, letters, topic, check)
    return check, expected


# ------------------------------------------------------------------------------- results
@dataclass
class FaultResult:
    fault: str
    check: Check = field(default_factory=Check)
    records: int = 0
    es_stats: dict[str, int] = field(default_factory=dict)
    recovery_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.check.ok

    @property
    def duplicates(self) -> int:
        """Writes Elasticsearch refused as not newer: replays of changes already written."""
        return self.es_stats.get("version_conflicts", 0)

    def recovery(self) -> str:
        if not self.recovery_s:
            return "-"
        if len(self.recovery_s) == 1:
            return f"{self.recovery_s[0]:.1f}"
        mean = sum(self.recovery_s) / len(self.recovery_s)
        return f"{mean:.1f} (max {max(self.recovery_s):.1f})"

    def row(self) -> dict[str, Any]:
        c = self.check
        return {
            "fault": self.fault,
            "records": self.records,
            "docs expected": c.expected_docs,
            "docs found": c.found_docs,
            "missing": len(c.missing),
            "extra": len(c.extra) + len(c.resurrected),
            "stale": len(c.stale),
            "wrong": len(c.wrong),
            "dup writes": self.duplicates,
            "dlq exp": c.dlq_expected,
            "dlq found": c.dlq_found,
            "dlq dup": c.dlq_duplicates,
            "recovery s": self.recovery(),
            "wall s": f"{self.wall_s:.0f}",
            "ok": "yes" if self.ok else "NO",
        }

    def summary(self) -> str:
        return (
            f"{self.fault}: "
            + ", ".join(f"{k}={v}" for k, v in self.row().items())
            + ("" if self.ok else f"\n  problems: {self.check.problems()}")
            + "".join(f"\n  note: {n}" for n in self.notes)
        )


def table(results: Sequence[FaultResult]) -> str:
    rows = [r.row() for r in results]
    if not rows:
        return "(no results)"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = " | ".join(c.ljust(width[c]) for c in cols)
    sep = "-|-".join("-" * width[c] for c in cols)
    body = [" | ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join([line, sep, *body])


# ------------------------------------------------------------------------------- the service
def service_env(
    kafka: str, es_url: str, topic: str, index: str, group: str, **overrides: Any
) -> dict[str, str]:
    """Environment for ``python -m service.cli run`` (no SPARSE_INGEST_* leaks in from ours)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SPARSE_INGEST_") or k in ("SPARSE_INGEST_CACHE",)
    }
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": kafka,
        "kafka_topics": topic,
        "kafka_group_id": group,
        "es_url": es_url,
        "es_index": index,
        "http_port": 0,
        "batch_linger_ms": 50,
        "commit_interval_ms": 200,
        "kafka_session_timeout_ms": 6000,  # the broker's minimum: a dead member leaves soon
        "es_refresh_interval": "1s",
        "encoder_threads": 1,
    }
    values.update(overrides)
    for name, value in values.items():
        if value is not None:
            env[f"SPARSE_INGEST_{name.upper()}"] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServiceProcess:
    """``python -m service.cli run`` as a real subprocess, in its own process group."""

    def __init__(self, env: dict[str, str], log_dir: Path, name: str = "service") -> None:
        self.env = env
        self.log_dir = log_dir
        self.name = name
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    def start(self) -> None:
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{self.name}-{self.starts}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "run"],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def all_logs(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob(f"{self.name}-*.log"))
        )

    async def wait_log(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            match = rx.search(self.log_text())
            if match:
                return match
            if not self.running():
                raise AssertionError(
                    f"{self.name} exited ({self.proc and self.proc.returncode}) before "
                    f"{pattern!r}:\n{self.log_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {pattern!r} in {timeout:.0f}s:\n{self.log_text()[-3000:]}"
                )
            await asyncio.sleep(0.1)

    async def http_port(self, timeout: float = 60.0) -> int:
        match = await self.wait_log(r"HTTP on http://[^:]+:(\d+)", timeout)
        return int(match.group(1))

    def kill(self) -> None:
        """SIGKILL: no drain, no commit, no goodbye to the group."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    async def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM, wait for the drain; SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            for _ in range(int(timeout * 10)):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            if self.proc.poll() is None:
                self.kill()
        return self.proc.returncode

    def rss_bytes(self) -> int:
        """Resident memory of the service process (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)
