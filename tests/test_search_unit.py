"""Query building and rank fusion (pure logic)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.search import Searcher, _both, rrf, sparse_query


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


async def test_both_runs_side_by_side_and_returns_in_order() -> None:
    started: list[str] = []
    both_running = asyncio.Event()

    async def one(name: str) -> str:
        started.append(name)
        if len(started) == 2:
            both_running.set()
        await both_running.wait()  # returns only if the other one runs meanwhile
        return name

    assert await asyncio.wait_for(_both(one("sparse"), one("bm25")), 30) == ("sparse", "bm25")


@pytest.mark.parametrize("failing", [0, 1])
async def test_both_raises_the_first_failure_as_is_and_stops_the_other(failing: int) -> None:
    cancelled = asyncio.Event()

    async def fails() -> str:
        raise ValueError("refused")

    async def hangs() -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    pair = (fails(), hangs()) if failing == 0 else (hangs(), fails())
    with pytest.raises(ValueError, match="refused"):
        await asyncio.wait_for(_both(*pair), 30)
    assert cancelled.is_set()


async def test_both_cancelled_cancels_both() -> None:
    cancelled: list[str] = []
    started: list[str] = []
    both_started = asyncio.Event()

    async def hangs(name: str) -> str:
        started.append(name)
        if len(started) == 2:
            both_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise
        return name

    task = asyncio.ensure_future(_both(hangs("a"), hangs("b")))
    await asyncio.wait_for(both_started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(cancelled) == ["a", "b"]


class _BothAtOnce:
    """A fake client: an id-only ranking answers only once the other one has been sent too."""

    def __init__(self) -> None:
        self.rankings = 0
        self.both_sent = asyncio.Event()

    async def search(self, **kw: Any) -> dict[str, Any]:
        if kw.get("source") is False:  # a ranking
            self.rankings += 1
            if self.rankings == 2:
                self.both_sent.set()
            await self.both_sent.wait()
            ids = ["s1", "both"] if "bool" in kw["query"] else ["both", "b1"]
        else:  # the fetch of the fused ids
            ids = kw["query"]["bool"]["filter"][0]["ids"]["values"]
        hits = [{"_id": i, "_score": 1.0, "_source": {"title": i}} for i in ids]
        return {"hits": {"hits": hits}}


async def test_hybrid_sends_its_two_rankings_at_once() -> None:
    client = _BothAtOnce()
    searcher = Searcher(client, "docs", "tokens", ["title"])  # type: ignore[arg-type]
    searcher._native = False  # (no probe)
    hits = await asyncio.wait_for(searcher.search("hybrid", "cat", {"cat": 1.0}, 3), 30)
    assert [h.id for h in hits] == ["both", "s1", "b1"]
