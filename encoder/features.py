"""From [n, vocab] weights to ``{token: weight}`` dicts that Elasticsearch accepts."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

_UNUSED = re.compile(r"^\[unused\d+\]$")


def es_feature_name(token: str) -> str:
    """The ``sparse_vector`` feature name for a vocabulary token: the token string itself.

    Feature names are the tokenizer's own vocabulary strings, whatever the tokenizer:

    - WordPiece (BERT): ``search``, ``##ing``, ``.``, ``##.``.
    - Byte-level BPE (RoBERTa, Granite): each byte is a printable character (GPT-2's byte-to-unicode
      table: a space is ``Ġ``, a newline ``Ċ``), so ``Ġsearch`` is " search" at the start of a
      word and ``search`` the same letters inside one. They stay as they are: two vocabulary
      entries with weights of their own, and decoding the bytes back would not even give a
      string for the pieces that hold part of a multi-byte character.
    - SentencePiece / Unigram (XLM-R): ``▁search`` (a word start) and ``search`` likewise.

    The identity is injective and its inverse is the identity (:func:`es_feature_token`), so a
    feature name is a vocabulary entry (``tokenizer.token_to_id(name)``). Elasticsearch takes
    such strings as they are: 9.5 BERT's awkward ones (``"."``, ``"##."``, ``"[CLS]"``,
    non-ASCII), 9.5 and 8.19 every string of a byte-level BPE and a Unigram vocabulary plus all
    256 byte-level characters (probed: docs/local-stack.md, tests/test_encoder_feature_names.py,
    tests/test_foundation_e2e.py). Any escaping ever needed
    goes here, and only here, with its inverse in :func:`es_feature_token`. The mapping must stay
    injective or the weights of colliding tokens are max-merged.
    """
    return token


def es_feature_token(name: str) -> str:
    """The vocabulary token of a feature name: the inverse of :func:`es_feature_name`."""
    return name


@dataclass(frozen=True)
class FeatureTable:
    """Per vocabulary id: its feature name, and whether it may appear in an output vector."""

    tokens: np.ndarray  # object array [vocab] of str, the tokenizer's own strings
    names: np.ndarray  # object array [vocab] of str, es_feature_name(token)
    keep: np.ndarray  # bool [vocab]; False for special and [unusedN] tokens
    injective: bool  # True when no two kept ids share a feature name

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer, vocab_size: int) -> FeatureTable:
        vocab = tok.get_vocab(with_added_tokens=True)
        tokens = [""] * vocab_size
        for token, idx in vocab.items():
            if 0 <= idx < vocab_size:
                tokens[idx] = token
        special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        keep = np.array(
            [bool(t) and t not in special and not _UNUSED.match(t) for t in tokens], dtype=bool
        )
        names = np.array([es_feature_name(t) for t in tokens], dtype=object)
        kept = names[keep]
        return cls(
            tokens=np.array(tokens, dtype=object),
            names=names,
            keep=keep,
            injective=len(set(kept.tolist())) == len(kept),
        )

    def to_dicts(self, weights: np.ndarray) -> list[dict[str, float]]:
        """Rows of [n, vocab] weights as ``{feature: weight}`` with strictly positive weights."""
        weights = np.where(self.keep, weights, 0.0)
        rows, cols = np.nonzero(weights > 0)
        values = weights[rows, cols].tolist()
        names = self.names[cols].tolist()
        bounds = np.searchsorted(rows, np.arange(weights.shape[0] + 1)).tolist()
        out = []
        for i in range(weights.shape[0]):
            lo, hi = bounds[i], bounds[i + 1]
            if self.injective:
                out.append(dict(zip(names[lo:hi], values[lo:hi], strict=True)))
            else:
                out.append(_max_merge(zip(names[lo:hi], values[lo:hi], strict=True)))
        return out


def _max_merge(items: Iterable[tuple[str, float]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for name, value in items:
        if value > merged.get(name, 0.0):
            merged[name] = value
    return merged
