"""Retrieval metrics, as BEIR and trec_eval define them.

- ``ndcg_at_k``: gain = the graded relevance (trec_eval's linear gain, what BEIR reports),
  discount ``log2(rank + 1)``; the ideal ranking is every judged document with relevance > 0
  sorted by relevance, cut at k.
- ``recall_at_k``: relevant documents (relevance > 0) in the top k / all relevant documents.
- ``mrr_at_k``: 1 / rank of the first relevant document in the top k, else 0.

A query with no relevant document is left out of the means (as trec_eval and BEIR do).
Rankings are lists of document ids, best first; a document id appearing twice counts once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Qrels = Mapping[str, Mapping[str, int]]  # query id -> document id -> relevance
Run = Mapping[str, Sequence[str]]  # query id -> ranked document ids


def _dedup(ranking: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for doc in ranking:
        if doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out


def dcg(gains: Sequence[float]) -> float:
    return sum(g / math.log2(rank + 1) for rank, g in enumerate(gains, start=1))


def ndcg_at_k(ranking: Sequence[str], relevance: Mapping[str, int], k: int = 10) -> float:
    ideal = sorted((r for r in relevance.values() if r > 0), reverse=True)[:k]
    if not ideal:
        return 0.0
    got = [max(relevance.get(doc, 0), 0) for doc in _dedup(ranking)[:k]]
    return dcg(got) / dcg(ideal)


def recall_at_k(ranking: Sequence[str], relevance: Mapping[str, int], k: int = 100) -> float:
    relevant = {doc for doc, r in relevance.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(_dedup(ranking)[:k])) / len(relevant)


def mrr_at_k(ranking: Sequence[str], relevance: Mapping[str, int], k: int = 10) -> float:
    for rank, doc in enumerate(_dedup(ranking)[:k], start=1):
        if relevance.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def evaluate(run: Run, qrels: Qrels) -> dict[str, float]:
    """Mean nDCG@10, recall@100 and MRR@10 over the judged queries (those with a relevant doc).

    A judged query missing from ``run`` counts as an empty ranking (scores 0).
    """
    judged = [q for q, rel in qrels.items() if any(r > 0 for r in rel.values())]
    if not judged:
        return {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0, "queries": 0}
    totals = {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    for q in judged:
        ranking = run.get(q, ())
        totals["ndcg@10"] += ndcg_at_k(ranking, qrels[q], 10)
        totals["recall@100"] += recall_at_k(ranking, qrels[q], 100)
        totals["mrr@10"] += mrr_at_k(ranking, qrels[q], 10)
    out = {name: value / len(judged) for name, value in totals.items()}
    out["queries"] = len(judged)
    return out
