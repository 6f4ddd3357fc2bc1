"""Pure helpers: long-text windows and token-budget batches."""

from __future__ import annotations

import math
from collections.abc import Sequence


def window_starts(n_tokens: int, window: int, overlap: int) -> list[int]:
    """Start offsets of overlapping windows of ``window`` tokens covering ``n_tokens``.

    Every window is full length (the last one is aligned to the end, so it may overlap its
    neighbour by more than ``overlap``); a text that fits gives ``[0]``.
    """
    if window <= 0:
        raise ValueError("window must be positive")
    if not 0 <= overlap < window:
        raise ValueError("overlap must be in [0, window)")
    if n_tokens <= window:
        return [0]
    stride = window - overlap
    count = math.ceil((n_tokens - window) / stride) + 1
    return [min(i * stride, n_tokens - window) for i in range(count)]


def plan_batches(
    lengths: Sequence[int], max_batch_tokens: int, max_batch_docs: int
) -> list[list[int]]:
    """Group item indices into batches, longest first, within a padded-token budget.

    A batch holds at most ``max_batch_docs`` items and ``len(batch) * longest <= max_batch_tokens``
    (padding counts). An item longer than the budget gets a batch of its own.
    """
    if max_batch_tokens <= 0 or max_batch_docs <= 0:
        raise ValueError("max_batch_tokens and max_batch_docs must be positive")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        width = max(longest, lengths[i])
        if current and (
            len(current) + 1 > max_batch_docs or (len(current) + 1) * width > max_batch_tokens
        ):
            batches.append(current)
            current, width = [], lengths[i]
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches
