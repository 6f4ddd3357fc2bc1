"""Search: sparse (SPLADE dot product), BM25, or hybrid by reciprocal rank fusion.

Sparse search uses the ``sparse_vector`` query when the cluster has it, else a ``bool`` of
boosted ``term`` queries on the ``sparse_vector`` field, which scores the same dot product and
needs no ML plugin or licence. Hybrid fuses the two rankings client-side (RRF, k=60), so it
needs no licence either.

With passages (``SPARSE_INGEST_LONG_TEXT=passages``) the sparse query runs inside a ``nested``
query on the passages with ``score_mode: max``: a document scores as its best passage, and that
passage comes back (``inner_hits``: its offsets; its text cut from the document's text fields).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from elasticsearch import AsyncElasticsearch, BadRequestError

from service.messages import META_FIELD, content_hash, indexed_text

log = logging.getLogger(__name__)

Mode = Literal["sparse", "bm25", "hybrid"]
MODES: tuple[Mode, ...] = ("sparse", "bm25", "hybrid")
RRF_K = 60
MAX_QUERY_TOKENS = 512
T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True, slots=True)
class PassageHit:
    """A document's best passage: characters ``[start, end)`` of its indexed text (its text
    fields joined by spaces), that text (None when the stored fields no longer give the text
    that was encoded), its position among the document's passages and its score."""

    start: int
    end: int
    text: str | None
    ordinal: int
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "text": self.text,
            "ordinal": self.ordinal,
            "score": self.score,
        }


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    source: dict[str, Any]
    passage: PassageHit | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "score": self.score, "source": self.source}
        if self.passage is not None:
            out["passage"] = self.passage.as_dict()
        return out


def sparse_query(field: str, vector: dict[str, float], native: bool) -> dict[str, Any]:
    """The query for ``vector`` (token -> weight) on a ``sparse_vector`` field."""
    top = sorted(vector.items(), key=lambda kv: kv[1], reverse=True)[:MAX_QUERY_TOKENS]
    if native:
        return {"sparse_vector": {"field": field, "query_vector": dict(top)}}
    return {
        "bool": {
            "should": [{"term": {field: {"value": tok, "boost": w}}} for tok, w in top],
        }
    }


def best_passage_query(
    passage_field: str, inner: dict[str, Any], *, inner_hits: bool = True
) -> dict[str, Any]:
    """``inner`` (a query on the passages' vector) scoring each document by its best passage,
    and returning that passage's offsets (doc values: no ``_source`` is read)."""
    nested: dict[str, Any] = {"path": passage_field, "query": inner, "score_mode": "max"}
    if inner_hits:
        nested["inner_hits"] = {
            "size": 1,
            "_source": False,
            "docvalue_fields": [f"{passage_field}.start", f"{passage_field}.end"],
        }
    return {"nested": nested}


def bm25_query(text: str, fields: Sequence[str]) -> dict[str, Any]:
    return {"multi_match": {"query": text, "fields": list(fields)}}


def rrf(rankings: Sequence[Sequence[str]], k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: score(d) = sum over rankings of 1 / (k + rank), rank from 1."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, doc_id in enumerate(ranking, start=1):
            scores[doc_id] = scores.get(doc_id, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


async def has_sparse_vector_query(
    client: AsyncElasticsearch, index: str, field: str, passage_field: str | None = None
) -> bool:
    """Probe whether this cluster knows the ``sparse_vector`` query."""
    query = sparse_query(field, {"probe": 1.0}, native=True)
    if passage_field:
        query = best_passage_query(passage_field, query, inner_hits=False)
    try:
        await client.search(index=index, size=0, query=query)
        return True
    except BadRequestError as exc:
        text = str(exc)
        if "sparse_vector" in text and ("unknown query" in text or "parsing_exception" in text):
            return False
        raise


async def _both(first: Awaitable[T], second: Awaitable[U]) -> tuple[T, U]:
    """Run two awaitables at once; the first failure is raised as it is (not as a group) and
    stops the other."""
    a, b = asyncio.ensure_future(first), asyncio.ensure_future(second)
    try:
        await asyncio.wait((a, b), return_when=asyncio.FIRST_EXCEPTION)
        for task in (a, b):
            if task.done():
                task.result()  # the failure, if this one failed
        return a.result(), b.result()
    finally:
        for task in (a, b):
            task.cancel()  # (nothing when done)
        await asyncio.gather(a, b, return_exceptions=True)


class Searcher:
    # Hybrid runs its two rankings at once (True) or one after the other (False: only for the
    # scale bench's side-by-side figures).
    parallel_rankings = True

    def __init__(
        self,
        client: AsyncElasticsearch,
        index: str,
        vector_field: str,
        text_fields: Sequence[str],
        *,
        passage_field: str | None = None,
    ) -> None:
        """``passage_field``: the index holds passages (search scores the best one)."""
        self.client = client
        self.index = index
        self.vector_field = vector_field
        self.text_fields = list(text_fields)
        self.passage_field = passage_field
        self._native: bool | None = None

    async def follow_mapping(self, passage_field: str) -> None:
        """Search the way the index was made (passages under ``passage_field``, or one vector a
        document), whatever this process's settings say: for ``sparse-ingest search``, which
        may run with other settings than the service that wrote the index. (The query vector
        is the same either way: long-text handling is about documents.) Field capabilities
        need only the ``read`` privilege; a mapping that says neither leaves the settings'."""
        vector = f"{passage_field}.{self.vector_field}"
        resp = await self.client.field_caps(
            index=self.index, fields=[passage_field, vector, self.vector_field]
        )
        fields = resp.body.get("fields", {})
        if "nested" in fields.get(passage_field, {}) and "sparse_vector" in fields.get(vector, {}):
            self.passage_field = passage_field
        elif "sparse_vector" in fields.get(self.vector_field, {}):
            self.passage_field = None

    @property
    def vector_path(self) -> str:
        if self.passage_field:
            return f"{self.passage_field}.{self.vector_field}"
        return self.vector_field

    async def native_sparse(self) -> bool:
        if self._native is None:
            self._native = await has_sparse_vector_query(
                self.client, self.index, self.vector_path, self.passage_field
            )
            log.info("sparse_vector query available: %s", self._native)
        return self._native

    def sparse(self, vector: dict[str, float], native: bool) -> dict[str, Any]:
        """The sparse query for ``vector``: on the document's vector, or its best passage."""
        query = sparse_query(self.vector_path, vector, native)
        if self.passage_field:
            return best_passage_query(self.passage_field, query)
        return query

    async def _run(self, query: dict[str, Any], size: int) -> list[Hit]:
        excludes = [self.vector_field, META_FIELD]
        extra: dict[str, Any] = {}
        if self.passage_field:
            excludes.append(self.passage_field)
            extra["docvalue_fields"] = [
                f"{META_FIELD}.content_hash",
                f"{META_FIELD}.model_fingerprint",
            ]
        resp = await self.client.search(
            index=self.index, query=query, size=size, source_excludes=excludes, **extra
        )
        return [
            Hit(h["_id"], float(h["_score"]), h.get("_source", {}), self._passage(h))
            for h in resp["hits"]["hits"]
        ]

    def _passage(self, hit: dict[str, Any]) -> PassageHit | None:
        """The best passage ``inner_hits`` gave, with its text cut from the document's text
        fields if they still give the text that was encoded (the content hash stored with the
        document: a changed SPARSE_INGEST_TEXT_FIELDS gives offsets, never a wrong text)."""
        if not self.passage_field:
            return None
        inner = hit.get("inner_hits", {}).get(self.passage_field, {}).get("hits", {}).get("hits")
        if not inner:
            return None
        best = inner[0]
        fields = best.get("fields", {})
        try:
            start = int(fields[f"{self.passage_field}.start"][0])
            end = int(fields[f"{self.passage_field}.end"][0])
        except (KeyError, IndexError, TypeError, ValueError):
            return None
        text = indexed_text(hit.get("_source", {}), self.text_fields)
        meta = hit.get("fields", {})
        stored = meta.get(f"{META_FIELD}.content_hash", [None])[0]
        fingerprint = meta.get(f"{META_FIELD}.model_fingerprint", [""])[0]
        if text is None or stored != content_hash(fingerprint, text) or end > len(text):
            passage_text = None
        else:
            passage_text = text[start:end]
        ordinal = int(best.get("_nested", {}).get("offset", 0))
        return PassageHit(start, end, passage_text, ordinal, float(best.get("_score") or 0.0))

    async def search(
        self, mode: Mode, text: str, vector: dict[str, float] | None, size: int = 10
    ) -> list[Hit]:
        if mode == "bm25":
            return await self._run(bm25_query(text, self.text_fields), size)
        if vector is None:
            raise ValueError(f"mode {mode!r} needs the query vector")
        native = await self.native_sparse()
        if mode == "sparse":
            return await self._run(self.sparse(vector, native), size) if vector else []
        # Hybrid: the two rankings as ids only (no _source, no passages: fetching them for
        # 2 x 100 hits costs more than both searches), fused, then one request for the
        # documents (and best passages) of the fused top ``size``.
        depth = max(size, 100)
        sparse_q = sparse_query(self.vector_path, vector, native)
        if self.passage_field:
            sparse_q = best_passage_query(self.passage_field, sparse_q, inner_hits=False)
        bm25_q = bm25_query(text, self.text_fields)
        sparse_ids: list[str] = []
        if not vector:
            bm25_ids = await self._ids(bm25_q, depth)
        elif self.parallel_rankings:  # side by side: the slower one's time, not the sum
            sparse_ids, bm25_ids = await _both(self._ids(sparse_q, depth), self._ids(bm25_q, depth))
        else:
            sparse_ids, bm25_ids = await self._ids(sparse_q, depth), await self._ids(bm25_q, depth)
        fused = rrf([sparse_ids, bm25_ids])[:size]
        if not fused:
            return []
        ids = {"ids": {"values": [doc_id for doc_id, _ in fused]}}
        fetch: dict[str, Any] = {"bool": {"filter": [ids]}}
        if vector and self.passage_field:  # the best passage of those the sparse half found
            fetch["bool"]["should"] = [self.sparse(vector, native)]
        found = {h.id: h for h in await self._run(fetch, len(fused))}
        return [
            Hit(doc_id, score, found[doc_id].source, found[doc_id].passage)
            for doc_id, score in fused
            if doc_id in found  # (deleted in between)
        ]

    async def _ids(self, query: dict[str, Any], size: int) -> list[str]:
        resp = await self.client.search(
            index=self.index, query=query, size=size, source=False, track_total_hits=False
        )
        return [h["_id"] for h in resp["hits"]["hits"]]
