"""The write stage's backoff while Elasticsearch is away (no stack needed): it ends at the
first probe that answers after one that did not, even when that probe straddles the return
(a frozen node that thaws mid-request), and not earlier when probes always answer."""

from __future__ import annotations

import time
from typing import Any

import pytest

from service.batches import BatchProcessor
from service.messages import MessageContract
from service.metrics import Metrics
from service.sink import IndexConfig


class _Sink:
    config = IndexConfig("i")

    def __init__(self, answers: list[bool]) -> None:
        self.answers = answers

    async def reachable(self, within_s: float = 2.0) -> bool:
        return self.answers.pop(0) if self.answers else True


def _processor(sink: Any) -> BatchProcessor:
    return BatchProcessor(None, sink, None, MessageContract(), Metrics(), model_name="m")  # type: ignore[arg-type]


async def _timed(processor: BatchProcessor, limit: float) -> float:
    start = time.monotonic()
    await processor._wait_until_back(limit)
    return time.monotonic() - start


async def test_backoff_ends_at_the_first_answer_after_an_outage() -> None:
    processor = _processor(_Sink([False, False, False]))  # probes at 1, 2 and 2.2 s
    assert await _timed(processor, 2.2) == pytest.approx(2.2, abs=0.3)  # still down: full wait
    # The next wait: the first probe answers (the node came back): out after ~1 s, not 16.
    assert await _timed(processor, 16.0) < 1.5


async def test_backoff_is_kept_when_probes_always_answer() -> None:
    processor = _processor(_Sink([]))  # health answers, yet the bulk failed: no early exit
    assert await _timed(processor, 2.2) == pytest.approx(2.2, abs=0.3)
