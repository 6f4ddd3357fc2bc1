"""Elasticsearch's scores checked against a brute-force dot product of the query vector (as
sent) with the document vectors the pipeline wrote, raw and with Lucene's storage of the
weights emulated (FeatureField keeps 9 significant bits)."""

from __future__ import annotations

import math
import random
import struct
from typing import Any

import numpy as np

from service.search import sparse_query

SparseVector = dict[str, float]
Ranked = list[tuple[str, float]]  # (doc id, score), best first
# Lucene's FeatureField keeps the upper 16 bits of the float32: 9 significant bits.
FEATURE_REL_PRECISION = 2.0**-8


def lucene_feature(weight: float) -> float:
    """``weight`` as Lucene's FeatureField stores it (float32 bits >> 15 << 15: truncation)."""
    bits = struct.unpack("<I", struct.pack("<f", weight))[0]
    return float(struct.unpack("<f", struct.pack("<I", (bits >> 15) << 15))[0])


def lucene_vector(vec: SparseVector) -> SparseVector:
    """:func:`lucene_feature` of every weight (vectorised)."""
    weights = np.fromiter(vec.values(), dtype=np.float32, count=len(vec))
    stored = ((weights.view(np.uint32) >> 15) << 15).view(np.float32)
    return dict(zip(vec.keys(), stored.tolist(), strict=True))


def dot(query: SparseVector, doc: SparseVector) -> float:
    return sum(w * doc.get(t, 0.0) for t, w in query.items())


def query_as_sent(vec: SparseVector) -> SparseVector:
    """The query vector as :func:`service.search.sparse_query` sends it (top tokens only)."""
    q = sparse_query("f", vec, native=True)["sparse_vector"]["query_vector"]
    return {str(k): float(v) for k, v in q.items()}


def best_dot(query: SparseVector, doc: list[SparseVector]) -> float:
    """A document's score: its best passage's dot product (its one vector's, without)."""
    return max((dot(query, p) for p in doc), default=0.0)


Inverted = dict[str, list[tuple[tuple[str, int], float]]]


def brute_force_top(query: SparseVector, index: Inverted, k: int) -> Ranked:
    """The ``k`` best documents by :func:`best_dot`, over an :func:`inverted` index."""
    scores: dict[tuple[str, int], float] = {}
    for token, qw in query.items():
        for key, w in index.get(token, ()):
            scores[key] = scores.get(key, 0.0) + qw * w
    best: dict[str, float] = {}
    for (doc, _), score in scores.items():
        best[doc] = max(score, best.get(doc, score))
    return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def inverted(vectors: dict[str, list[SparseVector]]) -> Inverted:
    """token -> [((doc, passage), weight)]."""
    inv: Inverted = {}
    for doc, passages in vectors.items():
        for i, vec in enumerate(passages):
            for token, w in vec.items():
                inv.setdefault(token, []).append(((doc, i), w))
    return inv


def check_scores(
    runs: dict[str, dict[str, Ranked]],
    query_vectors: dict[str, SparseVector],
    doc_vectors: dict[str, list[SparseVector]],
    *,
    sample: int = 50,
    k: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Elasticsearch's ``_score`` of the top ``k`` hits of ``sample`` queries against the
    brute-force dot product of the query vector (as sent) and the documents' vectors (as
    written; a document with passages scores as its best): raw, and with the stored weights
    truncated to 9 significant bits as Lucene does. Also whether the brute-force top ``k`` over the whole corpus is what Elasticsearch returned.
    """
    qids = sorted(query_vectors)
    random.Random(seed).shuffle(qids)
    qids = [q for q in qids if query_vectors[q]][:sample]
    lucene_docs = {doc: [lucene_vector(p) for p in vec] for doc, vec in doc_vectors.items()}
    inv = inverted(doc_vectors)
    inv_lucene = inverted(lucene_docs)
    out: dict[str, Any] = {"queries": len(qids), "k": k}
    for mode in ("sparse_exact", "sparse"):
        rel, rel_lucene = [], []
        same_top, overlap, same_scores = 0, 0.0, 0
        for q in qids:
            qv = query_as_sent(query_vectors[q])
            hits = runs[mode][q][:k]
            for doc, score in hits:
                bf = best_dot(qv, doc_vectors[doc])
                bf_l = best_dot(qv, lucene_docs[doc])
                rel.append(abs(score - bf) / bf if bf else math.inf)
                rel_lucene.append(abs(score - bf_l) / bf_l if bf_l else math.inf)
            top = brute_force_top(qv, inv, k)
            es_ids = [d for d, _ in hits]
            bf_ids = [d for d, _ in top]
            same_top += es_ids == bf_ids
            overlap += len(set(es_ids) & set(bf_ids)) / max(1, len(bf_ids))
            # Ranking up to exact ties: the k best scores are the same numbers.
            top_l = brute_force_top(qv, inv_lucene, k)
            same_scores += len(top_l) == len(hits) and all(
                abs(s - b) <= 1e-5 * max(abs(b), 1e-9)
                for (_, s), (_, b) in zip(hits, top_l, strict=True)
            )
        n = max(1, len(rel))
        out[mode] = {
            "hits": len(rel),
            "max_rel_err": max(rel, default=0.0),
            "mean_rel_err": sum(rel) / n,
            "within_1pct": sum(r <= 0.01 for r in rel) / n,
            "within_field_precision": sum(r <= FEATURE_REL_PRECISION for r in rel) / n,
            "max_rel_err_lucene_emulated": max(rel_lucene, default=0.0),
            "same_top_k_as_brute_force": same_top / max(1, len(qids)),
            "top_k_overlap_with_brute_force": overlap / max(1, len(qids)),
            "same_top_k_scores_lucene_emulated": same_scores / max(1, len(qids)),
        }
    return out
