"""Pooling a long text's windows into one vector: element-wise max, streamed over batches.

Pure: no model, no tokenizer, no timers. :class:`encoder.SparseEncoder` feeds each inference
batch's output rows here and turns the finished rows into ``{token: weight}`` dicts with
:meth:`encoder.features.FeatureTable.to_dicts`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class WindowMerger:
    """Max-merges the windows of each text as batches of window rows arrive, in any order.

    ``windows_per_text[t]``: how many windows text ``t`` has (at least 1). A text's merged row
    is handed back by the :meth:`add` call that brings its last window. Memory stays bounded:
    one dense buffer per text that has some but not all of its windows done, released with
    that last window; a text of one window is never buffered (its row is passed through).
    """

    def __init__(self, windows_per_text: Iterable[int]) -> None:
        counts = [int(n) for n in windows_per_text]
        if any(n < 1 for n in counts):
            raise ValueError("every text has at least one window")
        self._remaining = counts
        self._pending: dict[int, np.ndarray] = {}

    @property
    def pending(self) -> int:
        """Texts with a buffer held: some of their windows merged, not all."""
        return len(self._pending)

    @property
    def done(self) -> bool:
        """Every window of every text has been added."""
        return not any(self._remaining)

    def add(self, texts: Sequence[int], rows: np.ndarray) -> tuple[list[int], np.ndarray]:
        """Add a batch of windows: ``rows[r]`` ([len(texts), vocab]) is a window of text
        ``texts[r]``. Returns the texts whose last window was in this batch, in the order of
        those windows, and their merged rows ([k, vocab], the element-wise max of all the text's
        windows; ``k`` may be 0)."""
        if rows.ndim != 2 or rows.shape[0] != len(texts):
            raise ValueError(f"rows of shape {rows.shape} for {len(texts)} windows")
        finished: list[int] = []
        merged: list[np.ndarray] = []
        for row, text in zip(rows, texts, strict=True):
            left = self._remaining[text]
            if left == 0:
                raise ValueError(f"text {text}: more windows than announced")
            self._remaining[text] = left - 1
            acc = self._pending.get(text)
            if acc is not None:
                np.maximum(acc, row, out=acc)
            if left > 1:
                if acc is None:
                    self._pending[text] = row.copy()
                continue
            finished.append(text)
            merged.append(row if acc is None else self._pending.pop(text))
        if not merged:
            return finished, np.empty((0, rows.shape[1]), dtype=rows.dtype)
        return finished, np.stack(merged)
