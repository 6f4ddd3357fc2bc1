"""Changing the model without downtime: ``sparse-ingest reindex`` and ``sparse-ingest index``.

The service writes and searches an alias (``SPARSE_INGEST_ES_INDEX``, default ``documents``)
that points at one versioned index, ``<alias>-<vector fingerprint>``. Vectors of two models
never share an index. To change the model (README: Changing the model):

1. ``sparse-ingest reindex --model NEW_DIR`` builds a new index ``<alias>-<new fingerprint>``
   from the topics' earliest offsets, as a consumer group of its own
   (``<group>-<new fingerprint>``), with the new model. The running service (old model, old
   group, old index) goes on writing and serving meanwhile: nothing of its work changes.
2. It reports progress and lag; once the new group has caught up (its committed offsets have
   reached the topics' end offsets of the previous report) it swaps the alias to the new
   index in one atomic ``_aliases`` request.
3. It goes on consuming into the new index (so no change published during or after the swap
   is missed) until it is stopped, or stops right after the swap (``--exit-after-swap``):
   its group's offsets are committed, and the new deployment
   (``SPARSE_INGEST_MODEL_DIR=NEW_DIR``, ``SPARSE_INGEST_KAFKA_GROUP_ID=<its group>``) takes
   over from them.
4. ``sparse-ingest index retire OLD_INDEX --group OLD_GROUP`` deletes the old index and the old
   group's offsets once the old deployment is gone.

A running old replica keeps writing and searching the index it resolved at its start (never
the new one); one restarted after the swap with the old model refuses to start (the index's
``_meta`` names the model), rather than mixing two models in one index.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import DeleteGroupsRequest
from elasticsearch import ApiError, AsyncElasticsearch

from service.config import ConfigError, Settings, load_settings
from service.messages import META_FIELD

log = logging.getLogger(__name__)


class ReindexError(RuntimeError):
    """The reindex cannot go on; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class AliasState:
    """What ``name`` is in Elasticsearch now."""

    name: str
    indices: tuple[str, ...]  # behind the alias; (name,) for a plain index; () when missing
    is_alias: bool
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)  # index -> _meta.sparse_ingest


async def alias_state(es: AsyncElasticsearch, name: str, closed: bool = False) -> AliasState:
    """What ``name`` is; ``closed``: a pattern also matches closed indices."""
    resp = await es.options(ignore_status=404).indices.get(
        index=name, expand_wildcards="all" if closed else "open"
    )
    if resp.meta.status == 404:
        return AliasState(name, (), is_alias=False)
    body = dict(resp.body)
    meta = {
        index: dict(desc.get("mappings", {}).get("_meta", {}).get(META_FIELD, {}) or {})
        for index, desc in body.items()
    }
    return AliasState(name, tuple(sorted(body)), is_alias=name not in body, meta=meta)


@dataclass(slots=True)
class Progress:
    """One report of the new group's progress over all partitions of the topics."""

    done: int  # records the new group has committed
    total: int  # records in the topics (end - start offsets)
    lag: int
    rate: float  # records/s since the previous report
    caught_up: bool

    def describe(self, index: str) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"reindex into {index}: {self.done:,}/{self.total:,} records ({pct:.1f}%), "
            f"lag {self.lag:,}, {self.rate:,.0f} records/s"
            + (", caught up" if self.caught_up else "")
        )


class LagMeter:
    """Committed offsets of ``group`` against the topics' end offsets (no group: the topics'
    offsets and configs only)."""

    def __init__(self, settings: Settings, group: str | None = None) -> None:
        from service.kafka.clients import kafka_security

        self.settings = settings
        self.group = group
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            client_id=f"{settings.kafka_client_id}-reindex-lag",
            enable_auto_commit=False,
            isolation_level="read_committed",  # end offsets = last stable offsets
            **kafka_security(settings),
        )
        self.admin = _kafka_admin(settings, "reindex-admin")
        self._previous_ends: dict[TopicPartition, int] | None = None
        self._previous: tuple[float, int] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        await self.admin.start()

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.consumer.stop()
        with contextlib.suppress(Exception):
            await self.admin.close()

    async def partitions(self, topic: str) -> list[TopicPartition]:
        ids = self.consumer.partitions_for_topic(topic)
        if not ids:  # a consumer that subscribes to nothing has no metadata until asked
            await self.consumer._client.force_metadata_update()
            ids = self.consumer.partitions_for_topic(topic) or set()
        return [TopicPartition(topic, p) for p in sorted(ids)]

    async def measure(self) -> Progress:
        assert self.group is not None
        partitions: list[TopicPartition] = []
        for topic in self.settings.kafka_topics:
            partitions.extend(await self.partitions(topic))
        ends = await self.consumer.end_offsets(partitions) if partitions else {}
        starts = await self.consumer.beginning_offsets(partitions) if partitions else {}
        offsets = await self.admin.list_consumer_group_offsets(self.group)
        committed = {
            tp: max(starts[tp], offsets[tp].offset if tp in offsets else starts[tp])
            for tp in partitions
        }
        done = sum(committed[tp] - starts[tp] for tp in partitions)
        total = sum(ends[tp] - starts[tp] for tp in partitions)
        lag = sum(max(0, ends[tp] - committed[tp]) for tp in partitions)
        previous = self._previous_ends
        caught_up = previous is not None and all(
            committed.get(tp, 0) >= end for tp, end in previous.items()
        )
        now = time.monotonic()
        rate = 0.0
        if self._previous is not None and now > self._previous[0]:
            rate = (done - self._previous[1]) / (now - self._previous[0])
        self._previous_ends = ends
        self._previous = (now, done)
        return Progress(done, total, lag, max(0.0, rate), caught_up)


async def check_history(settings: Settings) -> list[str]:
    """Why the topics may not hold every document's latest change: partitions whose oldest
    records were deleted (retention) on topics that are not compacted. A reindex from them
    would miss the documents whose last change is older."""
    meter = LagMeter(settings)
    problems: list[str] = []
    try:
        await meter.start()
        for topic in settings.kafka_topics:
            tps = await meter.partitions(topic)
            starts = await meter.consumer.beginning_offsets(tps) if tps else {}
            lost = {tp.partition: off for tp, off in starts.items() if off > 0}
            if not lost:
                continue
            try:
                configs = await meter.admin.describe_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, topic)]
                )
            except KafkaError:  # no DescribeConfigs ACL: the policy cannot be known
                configs = []
            policy = next(
                (
                    str(entry[1])
                    for resp in configs
                    for res in resp.resources
                    for entry in res[4]
                    if entry[0] == "cleanup.policy"
                ),
                "unknown" if not configs else "delete",
            )
            if "compact" not in policy:
                problems.append(
                    f"topic {topic} (cleanup.policy={policy}) starts past offset 0 in partition(s) "
                    + ", ".join(f"{p} (at {o})" for p, o in sorted(lost.items()))
                )
    finally:
        await meter.stop()
    return problems


@dataclass(slots=True)
class ReindexResult:
    index: str
    group: str
    previous: tuple[str, ...]
    swapped: bool
    seconds_to_catch_up: float | None
    progress: list[Progress] = field(default_factory=list)


def reindex_settings(settings: Settings, model_dir: Path, group: str, index: str) -> Settings:
    """The settings of the reindexing consumer: the new model, its own group from the topics'
    start, writing the new index (made beforehand, so never created by it)."""
    return settings.model_copy(
        update={
            "model_dir": model_dir,
            "kafka_group_id": group,
            "kafka_auto_offset_reset": "earliest",
            "es_index": index,
            "es_create_index": False,
        }
    )


async def swap_alias(
    es: AsyncElasticsearch, state: AliasState, target: str, *, replace_index: bool
) -> None:
    """Point ``state.name`` at ``target`` only, in one atomic request."""
    actions: list[dict[str, Any]] = []
    if state.indices and not state.is_alias:
        if not replace_index:
            raise ReindexError(
                f"{state.name!r} is an index, not an alias: the swap would have to delete it "
                "(an alias cannot share an index's name). Run again with --replace-index to "
                "delete it in the same atomic step, or point clients at a new alias name"
            )
        actions.append({"remove_index": {"index": state.name}})
    else:
        actions.extend(
            {"remove": {"index": index, "alias": state.name}}
            for index in state.indices
            if index != target
        )
    actions.append({"add": {"index": target, "alias": state.name, "is_write_index": True}})
    await es.indices.update_aliases(actions=actions)


async def reindex(
    settings: Settings,
    model_dir: Path,
    *,
    group: str | None = None,
    index: str | None = None,
    swap: bool = True,
    exit_after_swap: bool = False,
    replace_index: bool = False,
    progress_s: float = 5.0,
    http: bool = False,
    encoder: Any | None = None,
    stop: asyncio.Event | None = None,
    report: Callable[[Progress], None] | None = None,
    allow_incomplete: bool = False,
) -> ReindexResult:
    """Build the new index with ``model_dir``'s model and swap the alias (module docs).
    Returns after the swap with ``exit_after_swap``, else when ``stop`` is set."""
    from service.app import Service
    from service.builder import build_sink, load_encoder
    from service.elastic import check_elasticsearch, elasticsearch_client
    from service.sink import versioned_index

    stop = stop or asyncio.Event()
    lost = await check_history(settings)
    if lost and not allow_incomplete:
        raise ReindexError(
            "the topics no longer hold every document's latest change: "
            + "; ".join(lost)
            + ". A reindex would miss the documents whose last change was deleted by retention. "
            "Reindex needs compacted topics (cleanup.policy=compact) or unlimited retention; "
            "--allow-incomplete goes on anyway"
        )
    new_model: Any = encoder or await asyncio.to_thread(
        load_encoder, settings.model_copy(update={"model_dir": model_dir})
    )
    encoder = new_model
    alias = settings.es_index
    es = elasticsearch_client(settings)
    try:
        await check_elasticsearch(es, settings)
        sink = build_sink(settings, es, encoder)
        target = index or versioned_index(alias, sink.fingerprint)
        state = await alias_state(es, alias)
        if target in state.indices and state.is_alias and len(state.indices) == 1:
            raise ReindexError(
                f"alias {alias!r} already points at {target!r}, built with this model "
                f"({encoder.metadata.name}, fingerprint {sink.fingerprint}): nothing to do"
            )
        if state.indices and not state.is_alias and not replace_index and swap:
            raise ReindexError(
                f"{alias!r} is an index, not an alias: the swap at the end would have to delete "
                "it. Run with --replace-index to delete it in the atomic swap (it is the old "
                "model's index), or with --no-swap to build the new index only"
            )
        group = group or f"{settings.kafka_group_id}-{sink.fingerprint[:12]}"
        existing = await alias_state(es, target)
        if not existing.indices:
            body = sink.config.body(sink.index_meta(alias))
            await es.indices.create(
                index=target, settings=body["settings"], mappings=body["mappings"]
            )
            log.info("created index %s for model %s", target, encoder.metadata.name)
        else:
            log.info("index %s exists: resuming (group %s keeps its offsets)", target, group)
    finally:
        await es.close()

    log.info(
        "reindex: %s from the earliest offsets as group %r with model %s -> index %s; "
        "alias %s now points at %s",
        settings.kafka_topics,
        group,
        encoder.metadata.name,
        target,
        alias,
        ", ".join(state.indices) or "nothing",
    )
    new_settings = reindex_settings(settings, model_dir, group, target)
    service = Service(new_settings, encoder=encoder)
    meter = LagMeter(settings, group)
    result = ReindexResult(target, group, state.indices, False, None)
    started = time.monotonic()
    try:
        await service.start(http=http)
        await meter.start()
        while not stop.is_set():
            if not service.pipeline_running:
                await service.wait()  # raises the pipeline's error
                raise ReindexError("the reindexing consumer stopped")
            progress = await meter.measure()
            result.progress.append(progress)
            log.info("%s", progress.describe(target))
            if report is not None:
                report(progress)
            if progress.caught_up and not result.swapped:
                result.seconds_to_catch_up = time.monotonic() - started
                if not swap:
                    log.info("caught up; --no-swap: alias %s left as it is", alias)
                    break
                assert service.es is not None
                current = await alias_state(service.es, alias)
                if current.indices and not current.is_alias:
                    members = await group_members(settings, settings.kafka_group_id)
                    if members:
                        # it writes that index by its name: after the swap the name is the
                        # alias, and it would write the old model's vectors into the new index
                        raise ReindexError(
                            f"{alias!r} is an index that the old deployment (group "
                            f"{settings.kafka_group_id!r}, {members} member(s)) still writes by "
                            "name: stop it, then run the reindex again to swap (it resumes)"
                        )
                await service.es.indices.refresh(index=target)
                await swap_alias(service.es, current, target, replace_index=replace_index)
                result.swapped = True
                log.info(
                    "swapped alias %s: %s -> %s. Deploy the service with "
                    "SPARSE_INGEST_MODEL_DIR=%s SPARSE_INGEST_KAFKA_GROUP_ID=%s; then retire the "
                    "old index and group (`sparse-ingest index retire %s --group %s`)",
                    alias,
                    ", ".join(state.indices) or "nothing",
                    target,
                    model_dir,
                    group,
                    ", ".join(state.indices) or "-",
                    settings.kafka_group_id,
                )
                if exit_after_swap:
                    break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), progress_s)
    finally:
        await meter.stop()
        await service.stop()
    return result


def _kafka_admin(settings: Settings, what: str) -> AIOKafkaAdminClient:
    from service.kafka.clients import kafka_security

    return AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"{settings.kafka_client_id}-{what}",
        **kafka_security(settings),
    )


async def group_members(settings: Settings, group: str) -> int:
    """How many consumers are in ``group`` now (0: none, or no such group)."""
    admin = _kafka_admin(settings, "describe")
    try:
        await admin.start()
        responses = await admin.describe_consumer_groups([group])
        return sum(len(g[5]) for r in responses for g in r.groups if g[1] == group)
    finally:
        await admin.close()


async def delete_group(settings: Settings, group: str) -> str:
    """Delete a consumer group without members (its committed offsets)."""
    admin = _kafka_admin(settings, "retire")
    try:
        await admin.start()
        node = await admin.find_coordinator(group)
        # aiokafka's admin client has no delete_consumer_groups: the protocol request
        response = await admin._send_request(DeleteGroupsRequest([group]), node)
        _, code = response.results[0]
    finally:
        await admin.close()
    if code == 68:  # NON_EMPTY_GROUP
        raise ReindexError(
            f"consumer group {group!r} still has members: stop the old deployment first "
            "(nothing was deleted)"
        )
    if code not in (0, 69):  # 69: GROUP_ID_NOT_FOUND
        raise ReindexError(f"deleting consumer group {group!r} failed (Kafka error {code})")
    return f"deleted consumer group {group}" if code == 0 else f"no consumer group {group}"


async def retire(settings: Settings, index: str, group: str | None) -> list[str]:
    """Delete an index no longer behind the alias, and the old deployment's consumer group.
    The group goes first: one that still has members (the old deployment runs, and would
    auto-create the deleted index again) stops the retire before anything is deleted."""
    from service.elastic import check_elasticsearch, elasticsearch_client

    if not index or any(c in index for c in ",*?") or index.startswith(("_", "-")):
        raise ReindexError(f"give one index name, not a pattern or a list: {index!r}")
    done: list[str] = []
    es = elasticsearch_client(settings)
    try:
        await check_elasticsearch(es, settings)
        serving = await alias_state(es, settings.es_index)
        target = await alias_state(es, index)
        if not target.indices:
            raise ReindexError(f"no index {index!r}")
        if target.is_alias or target.indices != (index,):
            raise ReindexError(f"{index!r} is an alias, not an index")
        if index in serving.indices:
            raise ReindexError(
                f"{index!r} is what {settings.es_index!r} serves now: it cannot be retired"
            )
        if group:
            done.append(await delete_group(settings, group))
        await es.indices.delete(index=index)
        done.insert(0, f"deleted index {index}")
    finally:
        await es.close()
    return done


# ---------------------------------------------------------------------------------- CLI
def add_subcommands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "reindex",
        help="change the model without downtime: build a new index, swap the alias",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="the new model's folder")
    p.add_argument("--group", help="its consumer group (default: <group>-<new fingerprint>)")
    p.add_argument("--index", help="the new index (default: <alias>-<new fingerprint>)")
    p.add_argument("--no-swap", action="store_true", help="build and catch up only")
    p.add_argument(
        "--exit-after-swap",
        action="store_true",
        help="stop right after the swap (the new deployment takes over the group's offsets)",
    )
    p.add_argument(
        "--replace-index",
        action="store_true",
        help="SPARSE_INGEST_ES_INDEX is an index (an older release's), not an alias: delete "
        "it in the atomic swap",
    )
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="go on although retention deleted the oldest records of a topic that is not "
        "compacted (the documents whose last change was deleted are missed)",
    )
    p.add_argument("--progress-every", type=float, default=5.0, metavar="S")
    p.set_defaults(handler=_reindex_cli)

    idx = subparsers.add_parser("index", help="the alias and the indices behind it")
    sub = idx.add_subparsers(dest="index_command", required=True)
    status = sub.add_parser("status", help="what the alias points at, and each index's model")
    status.set_defaults(handler=_status_cli)
    ret = sub.add_parser("retire", help="delete an old index (and its consumer group)")
    ret.add_argument("old_index")
    ret.add_argument("--group", help="the old deployment's consumer group, to delete")
    ret.set_defaults(handler=_retire_cli)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"sparse-ingest: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _reindex_cli(args: argparse.Namespace) -> int:
    from service.errors import StartupError

    settings = _settings()

    async def main() -> ReindexResult:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await reindex(
            settings,
            args.model,
            group=args.group,
            index=args.index,
            swap=not args.no_swap,
            exit_after_swap=args.exit_after_swap,
            replace_index=args.replace_index,
            progress_s=args.progress_every,
            stop=stop,
            allow_incomplete=args.allow_incomplete,
        )

    try:
        result = asyncio.run(main())
    except (ReindexError, StartupError, ApiError) as exc:
        print(f"sparse-ingest: {exc}", file=sys.stderr)
        return 1
    print(
        f"index {result.index} (group {result.group}): "
        + ("alias swapped" if result.swapped else "alias not swapped")
        + (
            f", caught up in {result.seconds_to_catch_up:.0f} s"
            if result.seconds_to_catch_up is not None
            else ""
        )
    )
    return 0


def _status_cli(args: argparse.Namespace) -> int:
    settings = _settings()

    async def main() -> int:
        from service.elastic import check_elasticsearch, elasticsearch_client

        es = elasticsearch_client(settings)
        try:
            await check_elasticsearch(es, settings)
            state = await alias_state(es, settings.es_index)
            if not state.indices:
                print(f"{settings.es_index}: does not exist")
                return 1
            kind = "alias" if state.is_alias else "index"
            print(f"{settings.es_index} ({kind}) -> {', '.join(state.indices)}")
            others = await alias_state(es, f"{settings.es_index}-*", closed=True)
            for name in sorted(set(state.indices) | set(others.indices)):
                meta = {**others.meta.get(name, {}), **state.meta.get(name, {})}
                try:
                    count = f"{(await es.count(index=name))['count']:,} documents"
                except ApiError as exc:  # closed, say
                    count = f"no count ({exc.error})"
                serving = "serving" if name in state.indices else "not serving"
                print(
                    f"  {name}: {serving}, {count}, model {meta.get('model', '?')} "
                    f"(fingerprint {meta.get('model_fingerprint', '?')})"
                )
            return 0
        finally:
            await es.close()

    from service.errors import StartupError

    try:
        return asyncio.run(main())
    except (StartupError, ApiError) as exc:
        print(f"sparse-ingest: {exc}", file=sys.stderr)
        return 1


def _retire_cli(args: argparse.Namespace) -> int:
    from service.errors import StartupError

    settings = _settings()
    try:
        for line in asyncio.run(retire(settings, args.old_index, args.group)):
            print(line)
    except (ReindexError, StartupError, ApiError) as exc:
        print(f"sparse-ingest: {exc}", file=sys.stderr)
        return 1
    return 0
