"""Search: sparse (SPLADE dot product), BM25, or hybrid by reciprocal rank fusion.

Sparse search uses the ``sparse_vector`` query when the cluster has it, else a ``bool`` of
boosted ``term`` queries on the ``sparse_vector`` field, which scores the same dot product and
needs no ML plugin or licence. Hybrid fuses the two rankings client-side (RRF, k=60), so it
needs no licence either.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from elasticsearch import AsyncElasticsearch, BadRequestError

from service.messages import META_FIELD

log = logging.getLogger(__name__)

Mode = Literal["sparse", "bm25", "hybrid"]
MODES: tuple[Mode, ...] = ("sparse", "bm25", "hybrid")
RRF_K = 60
MAX_QUERY_TOKENS = 512


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    source: dict[str, Any]


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


def bm25_query(text: str, fields: Sequence[str]) -> dict[str, Any]:
    return {"multi_match": {"query": text, "fields": list(fields)}}


def rrf(rankings: Sequence[Sequence[str]], k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: score(d) = sum over rankings of 1 / (k + rank), rank from 1."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, doc_id in enumerate(ranking, start=1):
            scores[doc_id] = scores.get(doc_id, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


async def has_sparse_vector_query(client: AsyncElasticsearch, index: str, field: str) -> bool:
    """Probe whether this cluster knows the ``sparse_vector`` query."""
    try:
        await client.search(
            index=index, size=0, query=sparse_query(field, {"probe": 1.0}, native=True)
        )
        return True
    except BadRequestError as exc:
        text = str(exc)
        if "sparse_vector" in text and ("unknown query" in text or "parsing_exception" in text):
            return False
        raise


class Searcher:
    def __init__(
        self,
        client: AsyncElasticsearch,
        index: str,
        vector_field: str,
        text_fields: Sequence[str],
    ) -> None:
        self.client = client
        self.index = index
        self.vector_field = vector_field
        self.text_fields = list(text_fields)
        self._native: bool | None = None

    async def native_sparse(self) -> bool:
        if self._native is None:
            self._native = await has_sparse_vector_query(self.client, self.index, self.vector_field)
            log.info("sparse_vector query available: %s", self._native)
        return self._native

    async def _run(self, query: dict[str, Any], size: int) -> list[Hit]:
        resp = await self.client.search(
            index=self.index,
            query=query,
            size=size,
            source_excludes=[self.vector_field, META_FIELD],
        )
        return [
            Hit(h["_id"], float(h["_score"]), h.get("_source", {})) for h in resp["hits"]["hits"]
        ]

    async def search(
        self, mode: Mode, text: str, vector: dict[str, float] | None, size: int = 10
    ) -> list[Hit]:
        if mode == "bm25":
            return await self._run(bm25_query(text, self.text_fields), size)
        if vector is None:
            raise ValueError(f"mode {mode!r} needs the query vector")
        sparse_q = sparse_query(self.vector_field, vector, await self.native_sparse())
        if mode == "sparse":
            return await self._run(sparse_q, size) if vector else []
        depth = max(size, 100)
        sparse_hits = await self._run(sparse_q, depth) if vector else []
        bm25_hits = await self._run(bm25_query(text, self.text_fields), depth)
        sources = {h.id: h.source for h in (*bm25_hits, *sparse_hits)}
        fused = rrf([[h.id for h in sparse_hits], [h.id for h in bm25_hits]])
        return [Hit(doc_id, score, sources[doc_id]) for doc_id, score in fused[:size]]
