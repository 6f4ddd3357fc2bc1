"""Elasticsearch side: the index and its mapping, content-hash look-ups, versioned bulk writes.

Writes use ``elasticsearch.helpers.async_streaming_bulk`` (it chunks by count and bytes and
retries 429s with exponential backoff). Every write carries an external version, so a change
that arrives late or twice never replaces a newer one: Elasticsearch answers 409 and we count
the item as stale. Failures that are the document's fault (a mapping error, say) are returned
to the caller for the dead-letter topic; failures that are Elasticsearch's (429 after the
retries, 5xx, unreachable) are returned as retriable, and the caller retries the batch.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from elastic_transport import ConnectionError as EsConnectionError
from elastic_transport import SerializationError, TlsError, TransportError
from elasticsearch import ApiError, AsyncElasticsearch, NotFoundError
from elasticsearch.helpers import async_streaming_bulk

from service.messages import META_FIELD, Action, Delete, Upsert

if TYPE_CHECKING:
    from encoder.passages import Passage

log = logging.getLogger(__name__)

# A failed item is the document's fault (dead-letter it) only when Elasticsearch says the
# request was bad (400, 413) for a reason about the document. Everything else (429, 5xx,
# blocks, missing privileges, a missing index) is the cluster's state: retry, never drop.
DOCUMENT_FAULT_STATUSES = frozenset({400, 413})
CLUSTER_ERROR_TYPES = frozenset(
    {
        "cluster_block_exception",
        "es_rejected_execution_exception",
        "circuit_breaking_exception",
        "unavailable_shards_exception",
        "no_shard_available_action_exception",
        "process_cluster_event_timeout_exception",
        "index_not_found_exception",
        "index_closed_exception",  # closed for a settings change: open it and writes go on
    }
)
# Reasons of otherwise document-looking errors that are about the cluster's state.
CLUSTER_ERROR_REASONS = ("no write index is defined for alias",)


# "... in document with id 'x'. Preview of field's value: 'abc'" (mapping errors)
_VALUE_PREVIEW = re.compile(r"\.? ?Preview of field's value: .*", re.DOTALL)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
# The status recorded for a bulk request whose connection dropped while the cluster answered.
_CONNECTION_DROPPED = 0
# After a 413 the bulk requests shrink, but never below this; they grow back after this many
# batches written without one.
_GROW_AFTER = 50
_MIN_CHUNK_BYTES = 16 * 1024


def versioned_index(alias: str, fingerprint: str) -> str:
    """The index made behind ``alias`` for the vectors of one model: ``<alias>-<fingerprint>``
    (the same name on every replica, so that two starting at once make one index)."""
    return f"{alias}-{fingerprint[:12] or 'index'}"


class ModelMismatchError(ValueError):
    """The index holds another model's vectors."""


class SinkUnavailable(Exception):
    """Elasticsearch could not take the batch now; retry later (nothing is lost)."""


@dataclass(frozen=True, slots=True)
class IndexConfig:
    index: str
    vector_field: str = "tokens"
    text_fields: Sequence[str] = ("title", "body")
    number_of_shards: int = 1
    number_of_replicas: int = 0
    refresh_interval: str = "1s"
    prune_below: float = 0.0
    # long_text=passages: the nested field of passages, each {start, end, <vector_field>}
    # (README: Long documents); None: one vector per document in vector_field
    passage_field: str | None = None

    @property
    def vector_path(self) -> str:
        """The ``sparse_vector`` field queries name: ``tokens`` or ``passages.tokens``."""
        if self.passage_field:
            return f"{self.passage_field}.{self.vector_field}"
        return self.vector_field

    def passage_mapping(self) -> dict[str, Any]:
        """The nested field of passages: a vector and the characters of the document's text
        it covers (offsets are returned, never searched: doc values only)."""
        offset = {"type": "integer", "index": False}
        return {
            "type": "nested",
            "properties": {
                self.vector_field: {"type": "sparse_vector"},
                "start": offset,
                "end": offset,
            },
        }

    def body(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Settings and mappings of a new index; ``meta``: the mapping's ``_meta.sparse_ingest``
        (which model wrote the index: the service checks it at start)."""
        vector: dict[str, Any] = (
            {self.passage_field: self.passage_mapping()}
            if self.passage_field
            else {self.vector_field: {"type": "sparse_vector"}}
        )
        properties: dict[str, Any] = {
            **vector,
            META_FIELD: {
                "properties": {
                    "content_hash": {"type": "keyword", "index": False},
                    "model": {"type": "keyword"},
                    "model_fingerprint": {"type": "keyword"},
                    "topic": {"type": "keyword"},
                    "partition": {"type": "integer"},
                    "offset": {"type": "long"},
                    "version": {"type": "long"},
                    "indexed_at": {"type": "date"},
                }
            },
        }
        for name in self.text_fields:
            properties[name] = {"type": "text"}
        return {
            "settings": {
                "number_of_shards": self.number_of_shards,
                "number_of_replicas": self.number_of_replicas,
                "refresh_interval": self.refresh_interval,
            },
            "mappings": {"properties": properties}
            | ({"_meta": {META_FIELD: meta}} if meta else {}),
        }


@dataclass(frozen=True, slots=True)
class Stored:
    """What :meth:`ElasticsearchSink.lookup` found of a stored document: the hash of the text
    its vectors come from, and the vector (one per document) or the passages."""

    content_hash: str
    vector: dict[str, float] | None
    passages: list[Passage] | None


def _stored_passages(raw: object, vector_field: str) -> list[Passage] | None:
    """The passages of a stored document's ``_source`` (None when not well-formed)."""
    from encoder.passages import Passage

    if not isinstance(raw, list) or not raw:
        return None
    out = []
    for item in raw:
        if not isinstance(item, dict):
            return None
        start, end, vector = item.get("start"), item.get("end"), item.get(vector_field)
        if not (isinstance(start, int) and isinstance(end, int) and isinstance(vector, dict)):
            return None
        out.append(Passage(start, end, vector))
    return out


@dataclass(slots=True)
class WriteOutcome:
    indexed: list[Upsert] = field(default_factory=list)
    deleted: list[Delete] = field(default_factory=list)
    not_found: list[Delete] = field(default_factory=list)
    stale: list[Action] = field(default_factory=list)
    stale_details: dict[str, str] = field(default_factory=dict)  # id -> Elasticsearch's reason
    rejected: list[tuple[Action, str, str]] = field(default_factory=list)  # action, reason, detail
    retry: list[tuple[Action, str]] = field(default_factory=list)  # action, reason


def es_features(vector: dict[str, float], prune_below: float = 0.0) -> dict[str, float]:
    """The token weights as written to the ``sparse_vector`` field (optionally pruned)."""
    if prune_below <= 0.0:
        return vector
    return {k: w for k, w in vector.items() if w >= prune_below}


def _without_values(reason: str) -> str:
    """Elasticsearch's reason without the values it may quote: the preview of a field's value,
    and quoted strings (``For input string: "abc"``); field names stay (in brackets). The
    reason goes to logs and metrics' neighbours: never a record's content."""
    return _QUOTED.sub("'…'", _VALUE_PREVIEW.sub("", reason))


def _error_reason(info: dict[str, Any]) -> tuple[str, str]:
    error = info.get("error")
    if isinstance(error, dict):
        kind = str(error.get("type", "unknown"))
        detail = _without_values(str(error.get("reason", "")))
        cause = error.get("caused_by")
        if isinstance(cause, dict) and cause.get("type"):
            # only the cause's type: its reason quotes the value ("Failed to parse value [x]")
            detail = f"{detail} (caused by {cause.get('type')})"
        return kind, detail
    if "exception" in info:
        exc = info["exception"]
        return type(exc).__name__, str(error or exc)
    return "unknown", str(error)


class ElasticsearchSink:
    def __init__(
        self,
        client: AsyncElasticsearch,
        config: IndexConfig,
        *,
        model_name: str,
        chunk_size: int = 500,
        max_chunk_bytes: int = 20 * 1024 * 1024,
        max_retries: int = 5,
        initial_backoff: float = 0.5,
        max_backoff: float = 10.0,
    ) -> None:
        self.client = client
        self.config = config
        self.model_name = model_name
        self.fingerprint = ""  # messages.vector_fingerprint, set by the BatchProcessor
        # how long texts become vectors ("passages of 510 tokens, overlap 64"): in the index's
        # _meta, and named when an index made another way is refused
        self.long_text = ""
        self._bulk_options = {
            "chunk_size": chunk_size,
            "max_chunk_bytes": max_chunk_bytes,
            "max_retries": max_retries,
            "initial_backoff": initial_backoff,
            "max_backoff": max_backoff,
        }
        self._configured_chunk_bytes = max_chunk_bytes
        self._clean_writes = 0
        self._largest_written = 0  # size estimate of the largest document written
        # the index written and read: config.index, or the write index behind that alias
        # (resolved by ensure_index)
        self.target = config.index

    async def ensure_index(self, create: bool = True) -> str:
        """Find (or create) the index this process writes and searches, and return its name.

        ``config.index`` is an alias (what ``sparse-ingest`` creates: a versioned index
        ``<alias>-<vector fingerprint>`` behind the alias, README: Changing the model) or an
        index (made by an earlier release, or by hand): both work. Behind an alias, the write
        index is resolved once, here: an alias swapped by ``sparse-ingest reindex`` while this
        process runs does not make it write another model's vectors into the new index. The
        index's mapping must hold a ``sparse_vector`` field, and an index made by this service
        must come from the same model (``_meta``): one index never mixes two models' vectors.
        """
        name = self.config.index
        found = await self._resolve(name)
        if found is None:
            if not create:
                raise ValueError(
                    f"index or alias {name!r} does not exist and SPARSE_INGEST_ES_CREATE_INDEX "
                    "is false: create it (README: Least privilege), or allow the service to"
                )
            await self._create(name)
            found = await self._resolve(name)
            if found is None:
                raise ValueError(
                    f"index {versioned_index(name, self.fingerprint)!r} exists but alias {name!r} "
                    "does not point at it: a reindex left unfinished? Finish it "
                    "(`sparse-ingest reindex`) or delete that index"
                )
        target, body = found
        self._check_model(target, body)
        if not self._meta_model(body):
            await self._check_documents_model(target)
        if self._vector_unmapped(target, body):  # an index made by hand: add the field
            field_name = self.config.passage_field or self.config.vector_field
            mapping = (
                self.config.passage_mapping()
                if self.config.passage_field
                else {"type": "sparse_vector"}
            )
            await self.client.indices.put_mapping(index=target, properties={field_name: mapping})
        self.target = target
        return target

    async def _resolve(self, name: str) -> tuple[str, dict[str, Any]] | None:
        """The index behind ``name`` (itself, or an alias's write index) and its description;
        None when neither exists."""
        try:
            resp = await self.client.indices.get(index=name)
        except NotFoundError:
            return None
        indices: dict[str, Any] = dict(resp.body)
        if name in indices:
            return name, indices[name]
        writers = [
            index
            for index, body in indices.items()
            if body.get("aliases", {}).get(name, {}).get("is_write_index")
        ]
        if not writers and len(indices) == 1:
            writers = list(indices)
        if len(writers) != 1:
            raise ValueError(
                f"alias {name!r} points at {sorted(indices)} and none is its write index: "
                f"give one `is_write_index: true`, or set SPARSE_INGEST_ES_INDEX to one index"
            )
        return writers[0], indices[writers[0]]

    async def _create(self, alias: str) -> None:
        index = versioned_index(alias, self.fingerprint)
        body = self.config.body(self.index_meta(alias))
        try:
            await self.client.indices.create(
                index=index,
                settings=body["settings"],
                mappings=body["mappings"],
                aliases={alias: {"is_write_index": True}},
            )
            log.info("created index %s behind alias %s", index, alias)
        except ApiError:
            # another replica may have made it first (the same name), or, starting with
            # another model at the same moment, its own index behind the alias: ensure_index
            # resolves the alias again and checks the model of what is there
            if await self._resolve(alias) is None:
                raise

    def index_meta(self, alias: str) -> dict[str, Any]:
        return {
            "alias": alias,
            "model": self.model_name,
            "model_fingerprint": self.fingerprint,
            "long_text": self.long_text,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }

    def _vector_unmapped(self, index: str, body: dict[str, Any]) -> bool:
        props = body.get("mappings", {}).get("properties", {})
        passages = self.config.passage_field
        if passages:
            mapped = props.get(passages, {})
            kind = mapped.get("type", "object" if "properties" in mapped else None)
            inner = mapped.get("properties", {}).get(self.config.vector_field, {}).get("type")
            if kind is not None and (kind != "nested" or inner != "sparse_vector"):
                raise ValueError(
                    f"index {index!r} maps field {passages!r} as {kind!r}"
                    f"{'' if kind != 'nested' else f' whose {self.config.vector_field!r} is {inner!r}'}"
                    f", not as passages (nested, with a sparse_vector {self.config.vector_field!r}): "
                    "this index was not made for SPARSE_INGEST_LONG_TEXT=passages; reindex "
                    "(`sparse-ingest reindex`), or choose another SPARSE_INGEST_ES_PASSAGE_FIELD"
                )
            return kind is None
        kind = props.get(self.config.vector_field, {}).get("type")
        if kind not in (None, "sparse_vector"):
            raise ValueError(
                f"index {index!r} maps field {self.config.vector_field!r} as {kind!r}, "
                "not 'sparse_vector': choose another SPARSE_INGEST_ES_VECTOR_FIELD or index"
            )
        return kind is None

    @staticmethod
    def _meta_model(body: dict[str, Any]) -> dict[str, Any]:
        meta = body.get("mappings", {}).get("_meta", {}).get(META_FIELD, {})
        return meta if isinstance(meta, dict) and meta.get("model_fingerprint") else {}

    async def _check_documents_model(self, index: str) -> None:
        """An index without the model in its mapping (an earlier release's, or made by hand):
        the model of a document written last tells (read privilege only)."""
        resp = await self.client.search(
            index=index,
            size=1,
            query={"exists": {"field": f"{META_FIELD}.model_fingerprint"}},
            sort=[{f"{META_FIELD}.indexed_at": {"order": "desc", "unmapped_type": "date"}}],
            source_includes=[f"{META_FIELD}.model", f"{META_FIELD}.model_fingerprint"],
        )
        hits = resp["hits"]["hits"]
        if hits:
            meta = hits[0].get("_source", {}).get(META_FIELD, {})
            self._check_model(index, {"mappings": {"_meta": {META_FIELD: meta}}})

    def _check_model(self, index: str, body: dict[str, Any]) -> None:
        meta = self._meta_model(body)
        stored = meta.get("model_fingerprint")
        if stored and self.fingerprint and stored != self.fingerprint:
            made = meta.get("long_text") or (
                "not recorded (an earlier release: `chunk` unless SPARSE_INGEST_LONG_TEXT said "
                "otherwise)"
            )
            raise ModelMismatchError(
                f"index {index!r} holds the vectors of model {meta.get('model')!r} (vector "
                f"fingerprint {stored}; long texts: {made}); this process makes other vectors: "
                f"model {self.model_name!r}, fingerprint {self.fingerprint} (long texts: "
                f"{self.long_text or 'unknown'}; the model's files, SPARSE_INGEST_LONG_TEXT, "
                "SPARSE_INGEST_WINDOW_TOKENS / _OVERLAP and SPARSE_INGEST_ES_PRUNE_BELOW count). "
                "One index never mixes two models' vectors: to change them run `sparse-ingest "
                "reindex --model DIR` (README: Changing the model); to keep the index, set the "
                "model and settings back"
            )

    async def reachable(self, within_s: float = 2.0) -> bool:
        """Does Elasticsearch answer (cluster health) within ``within_s`` seconds?"""
        try:
            await self.client.options(request_timeout=within_s, max_retries=0).cluster.health()
        except ApiError:
            return True  # it answered (a 403: no monitor privilege, README: Least privilege)
        except Exception:
            return False
        return True

    async def lookup(self, ids: Sequence[str]) -> dict[str, Stored]:
        """Content hash and vector(s) of the stored documents with these ids (those that
        exist and hold what this mode writes)."""
        if not ids:
            return {}
        passages = self.config.passage_field
        # Elasticsearch 9 leaves vectors out of _source unless named in _source_includes (its
        # _source_exclude_vectors is unknown to 8.x). mget is real-time (no refresh needed).
        resp = await self.client.mget(
            index=self.target,
            ids=list(ids),
            source_includes=[
                f"{META_FIELD}.content_hash",
                self.config.vector_path,
                *((f"{passages}.start", f"{passages}.end") if passages else ()),
            ],
        )
        found: dict[str, Stored] = {}
        for doc in resp.body.get("docs", []):
            if not doc.get("found"):
                continue
            src = doc.get("_source", {})
            digest = src.get(META_FIELD, {}).get("content_hash")
            if not digest:
                continue
            if passages:
                stored = _stored_passages(src.get(passages), self.config.vector_field)
                if stored is not None:
                    found[doc["_id"]] = Stored(digest, None, stored)
                continue
            vector = src.get(self.config.vector_field)
            if isinstance(vector, dict):
                found[doc["_id"]] = Stored(digest, vector, None)
        return found

    def _bulk_action(self, action: Action, now: str) -> dict[str, Any]:
        head: dict[str, Any] = {
            "_index": self.target,
            "_id": action.doc_id,
            "version": action.version,
            # a change written again (a replay, a redelivery) replaces itself, so that replaying
            # a topic re-encodes with a new model; only an older version is refused (409, stale)
            "version_type": "external_gte",
        }
        if isinstance(action, Delete):
            head["_op_type"] = "delete"
            return head
        source = dict(action.source)
        prune = self.config.prune_below
        if self.config.passage_field:
            assert action.passages is not None, "upsert written before it was encoded"
            source[self.config.passage_field] = [
                {
                    "start": p.start,
                    "end": p.end,
                    self.config.vector_field: es_features(p.vector, prune),
                }
                for p in action.passages
            ]
        else:
            assert action.vector is not None, "upsert written before it was encoded"
            source[self.config.vector_field] = es_features(action.vector, prune)
        source[META_FIELD] = {
            "content_hash": action.content_hash,
            "model": self.model_name,
            "model_fingerprint": self.fingerprint,
            "topic": action.ref.topic,
            "partition": action.ref.partition,
            "offset": action.ref.offset,
            "version": action.version,
            "indexed_at": now,
        }
        head["_op_type"] = "index"
        head["_source"] = source
        return head

    async def write(self, actions: Sequence[Action]) -> WriteOutcome:
        """Write one batch (at most one action per id). Classifies every item's result.

        A bulk request refused as a whole (413 from a proxy's body limit or a cluster's
        ``http.max_content_length``, a 400 for the request) says nothing about its documents:
        its actions are written again in smaller chunks, down to one action a request; only an
        action refused on its own is the document's fault (``request_too_large`` /
        ``request_rejected``). After a 413 the chunks stay smaller (and a warning says so).

        Raises :class:`SinkUnavailable` when the request itself could not be made.
        """
        outcome = WriteOutcome()
        options = dict(self._bulk_options)
        pending: Sequence[Action] = actions
        drops: dict[str, int] = {}  # connections dropped for a request holding only this id
        clean = True
        while pending:
            refused, untried = await self._write_chunks(pending, options, outcome)
            pending = untried
            if not refused:
                continue
            clean = False
            if options["chunk_size"] > 1 and len(refused) > 1:  # split, and shrink for good
                if any(status in (413, _CONNECTION_DROPPED) for _, status, _ in refused):
                    self._shrink_chunk_bytes()
                options["chunk_size"] = max(1, min(options["chunk_size"], len(refused)) // 2)
                options["max_chunk_bytes"] = max(
                    1, min(options["max_chunk_bytes"], self._bulk_options["max_chunk_bytes"]) // 2
                )
                pending = [*(action for action, _, _ in refused), *untried]
                continue
            for action, status, detail in refused:  # refused holding only this action
                if status == _CONNECTION_DROPPED and drops.get(action.doc_id, 0) < 2:
                    # a connection may drop by chance: try again, twice, then give up
                    drops[action.doc_id] = drops.get(action.doc_id, 0) + 1
                    await asyncio.sleep(0.5 * drops[action.doc_id])
                    pending = [action, *pending]
                    continue
                if status == _CONNECTION_DROPPED and not self._clearly_oversized(action):
                    # dropped alone, but no bigger than documents that went through: not its
                    # size, so not its fault; the caller retries it (Elasticsearch flapping)
                    raise SinkUnavailable(f"a bulk request of one document failed: {detail}")
                reason = "request_too_large" if status == 413 else "request_rejected"
                what = (
                    "dropped the connection of"
                    if status == _CONNECTION_DROPPED
                    else f"refused ({status})"
                )
                outcome.rejected.append(
                    (
                        action,
                        reason,
                        f"Elasticsearch (or a proxy before it) {what} a bulk request holding "
                        f"only this document, while it answered other requests: {detail}",
                    )
                )
        if clean:
            self._grow_chunk_bytes()
        return outcome

    def _clearly_oversized(self, action: Action) -> bool:
        """Is ``action`` much bigger than any document written since the start? Only then is a
        dropped connection for it alone taken as a body-size limit (a proxy's) and the document
        dead-lettered; otherwise the failure is the cluster's and it is retried."""
        return self._largest_written > 0 and _size_estimate(action) > 2 * self._largest_written

    def _grow_chunk_bytes(self) -> None:
        """After ``_GROW_AFTER`` batches written without a refusal, double the bulk size again
        (up to the setting): one oversized document must not shrink the bulks for good."""
        self._clean_writes += 1
        current = self._bulk_options["max_chunk_bytes"]
        if self._clean_writes >= _GROW_AFTER and current < self._configured_chunk_bytes:
            self._bulk_options["max_chunk_bytes"] = min(self._configured_chunk_bytes, current * 2)
            self._clean_writes = 0

    def _shrink_chunk_bytes(self) -> None:
        self._clean_writes = 0
        before = self._bulk_options["max_chunk_bytes"]
        after = max(_MIN_CHUNK_BYTES, before // 2)
        if after < before:
            self._bulk_options["max_chunk_bytes"] = after
            log.warning(
                "Elasticsearch (or a proxy before it) refused a bulk request as too large (413) "
                "or dropped its connection: "
                "bulk requests are now at most %d bytes (were %d); set "
                "SPARSE_INGEST_ES_BULK_MAX_BYTES below the cluster's http.max_content_length "
                "and any proxy's body limit",
                after,
                before,
            )

    async def _write_chunks(
        self, actions: Sequence[Action], options: dict[str, Any], outcome: WriteOutcome
    ) -> tuple[list[tuple[Action, int, str]], list[Action]]:
        """One pass of the bulk helper over ``actions``: item results go into ``outcome``.
        Returns the actions of requests refused as a whole (400, 413, or a dropped connection
        while the cluster answers), and those not tried because an earlier request of the pass
        failed so."""
        refused: list[tuple[Action, int, str]] = []
        if not actions:
            return refused, []
        by_id = {a.doc_id: a for a in actions}
        now = dt.datetime.now(dt.UTC).isoformat()
        bulk: Iterable[dict[str, Any]] = (self._bulk_action(a, now) for a in actions)
        seen: set[str] = set()
        try:
            async for ok, item in async_streaming_bulk(
                self.client,
                bulk,
                raise_on_error=False,
                raise_on_exception=False,
                yield_ok=True,
                **options,
            ):
                op, info = next(iter(item.items()))
                action = by_id[info["_id"]]
                seen.add(action.doc_id)
                kind, reason, detail = classify_item(ok, op, info, isinstance(action, Delete))
                if kind == "written":
                    if isinstance(action, Delete):
                        outcome.deleted.append(action)
                    else:
                        outcome.indexed.append(action)
                        self._largest_written = max(self._largest_written, _size_estimate(action))
                elif kind == "request_refused":
                    refused.append((action, int(info["status"]), detail))
                elif kind == "not_found" and isinstance(action, Delete):
                    outcome.not_found.append(action)
                elif kind == "stale":
                    outcome.stale.append(action)
                    outcome.stale_details[action.doc_id] = detail
                elif kind == "rejected":
                    outcome.rejected.append((action, reason, detail))
                else:
                    outcome.retry.append((action, reason))
        except SerializationError:
            raise  # a document that cannot be serialized: the caller isolates it
        except (TransportError, ApiError) as exc:  # connection refused or dropped, timeout
            unseen = [a for a in actions if a.doc_id not in seen]
            # A proxy or load balancer that drops the connection of a body over its limit looks
            # like an outage, except that the cluster still answers a small request: then the
            # bulk is split like a 413, instead of retrying the same body forever.
            dropped = isinstance(exc, EsConnectionError) and not isinstance(exc, TlsError)
            if unseen and dropped and await self.reachable():  # never on a timeout: slow != big
                detail = f"{type(exc).__name__}: {exc}"[:300]
                if options["chunk_size"] == 1:  # the failed request held the first unseen one
                    return [*refused, (unseen[0], _CONNECTION_DROPPED, detail)], unseen[1:]
                return [*refused, *((a, _CONNECTION_DROPPED, detail) for a in unseen)], []
            raise SinkUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if len(seen) != len(by_id):  # defensive: never let an item go unaccounted
            outcome.retry.extend((by_id[i], "no_result") for i in set(by_id) - seen)
        return refused, []


ItemKind = Literal["written", "request_refused", "not_found", "stale", "rejected", "retry"]


def classify_item(
    ok: bool, op: str, info: dict[str, Any], is_delete: bool
) -> tuple[ItemKind, str, str]:
    """What one result of a bulk request means, as ``(kind, reason, detail)``:

    - ``written``: indexed or deleted;
    - ``request_refused``: the whole request failed with a status that may be the document's
      (400, 413): the caller splits the request to find out;
    - ``not_found``: a delete of a document that is not there (done);
    - ``stale``: Elasticsearch holds a newer version (409; ``detail`` names both);
    - ``rejected``: the document's fault (a 400 or 413 for a reason about the document): a
      dead letter with ``reason``;
    - ``retry``: the cluster's state (429, 5xx, blocks, privileges, a missing index): never
      dropped, written again later.
    """
    status = info.get("status")
    if ok:
        return "written", "", ""
    if "exception" in info:  # the whole request failed, not this item
        if status in DOCUMENT_FAULT_STATUSES:
            return "request_refused", f"request_{status}", _request_error(info)
        return "retry", f"request_{status}", ""
    if status == 404 and is_delete:
        return "not_found", "", ""
    if status == 409:
        return "stale", "version_conflict", _error_reason(info)[1]
    reason, detail = _error_reason(info)
    if (
        status in DOCUMENT_FAULT_STATUSES
        and reason not in CLUSTER_ERROR_TYPES
        and not any(r in detail for r in CLUSTER_ERROR_REASONS)
    ):
        return "rejected", reason, f"{op} failed ({status}): {detail}"
    return "retry", reason, detail


def _size_estimate(action: Action) -> int:
    """About the bytes of an upsert in a bulk body (text + source + vector), cheaply."""
    if isinstance(action, Delete):
        return 64
    features = len(action.vector or ()) + sum(len(p.vector) + 2 for p in action.passages or ())
    return 2 * len(action.text) + 24 * features + 256


def _request_error(info: dict[str, Any]) -> str:
    exc = info.get("exception")
    if isinstance(exc, ApiError):
        reason, detail = _error_reason(
            {"error": exc.body.get("error")} if isinstance(exc.body, dict) else {}
        )
        if reason != "unknown" or detail not in ("", "None"):
            return f"{reason}: {detail}"
    return str(info.get("error", ""))[:500]
