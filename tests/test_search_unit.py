"""Query building and rank fusion (pure logic)."""

from __future__ import annotations

from service.search import rrf, sparse_query


def test_rrf_fuses_rankings() -> None:
    fused = rrf([["a", "b", "c"], ["b", "d"]], k=60)
    assert [d for d, _ in fused] == ["b", "a", "d", "c"]
    assert fused[0][1] == 1 / 62 + 1 / 61


def test_sparse_query_forms() -> None:
    vec = {"cat": 1.5, "dog": 0.5}
    native = sparse_query("tokens", vec, native=True)
    assert native == {
        "sparse_vector": {"field": "tokens", "query_vector": {"cat": 1.5, "dog": 0.5}}
    }
    terms = sparse_query("tokens", vec, native=False)
    assert terms["bool"]["should"][0] == {"term": {"tokens": {"value": "cat", "boost": 1.5}}}
