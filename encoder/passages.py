"""Passages (``long_text="passages"``): where a long text is cut, and what each piece is.

Pure: no model, no tokenizer. :class:`encoder.SparseEncoder` finds the word and sentence starts
of a text's tokens and runs the model on each span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SparseVector = dict[str, float]


@dataclass(frozen=True, slots=True)
class Passage:
    """One window of a document: its characters ``text[start:end]`` and its vector."""

    start: int
    end: int
    vector: SparseVector


def passage_spans(
    n_tokens: int,
    window: int,
    overlap: int,
    word_start: Sequence[bool],
    sentence_start: Sequence[bool],
) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of a document's passages: at most ``window`` tokens each,
    neighbours sharing at most ``overlap`` tokens, aligned where that is cheap.

    ``word_start[i]``: token ``i`` begins a word (a cut before it splits no word);
    ``sentence_start[i]``: it begins a sentence or a paragraph. A passage ends before the last
    sentence start in its last quarter, else before the last word start there, else at
    ``window`` tokens; the next one starts at the first sentence start of the ``overlap``
    tokens before that end (a cut at a sentence start with none there: at the cut, repeating
    nothing), else at their first word start, so it repeats at most ``overlap`` tokens.
    (Indices searched are >= 1, so ``or`` never mistakes a found 0 for none.) A text
    that fits is one passage; every token is in some passage.
    """
    if window <= 0:
        raise ValueError("window must be positive")
    if not 0 <= overlap <= window // 2:
        raise ValueError("overlap must be in [0, window // 2]")
    if n_tokens <= window:
        return [(0, n_tokens)]
    spans: list[tuple[int, int]] = []
    start = 0
    while n_tokens - start > window:
        hard = start + window
        lowest = start + max(1, window - window // 4)
        end = _last(sentence_start, lowest, hard) or _last(word_start, lowest, hard) or hard
        spans.append((start, end))
        low = max(end - overlap, start + 1)
        start = (
            _first(sentence_start, low, end)  # a whole sentence again, or a clean cut
            or _first(word_start, low, end)
            or low
        )
    spans.append((start, n_tokens))
    return spans


def _last(flags: Sequence[bool], low: int, high: int) -> int | None:
    """The highest ``i`` in ``[low, high]`` with ``flags[i]``, or None."""
    return next((i for i in range(high, low - 1, -1) if flags[i]), None)


def _first(flags: Sequence[bool], low: int, high: int) -> int | None:
    """The lowest ``i`` in ``[low, high]`` with ``flags[i]``, or None."""
    return next((i for i in range(low, high + 1) if flags[i]), None)
