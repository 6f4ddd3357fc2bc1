"""Feature names of byte-level BPE and SentencePiece vocabularies in a real Elasticsearch.

``es_feature_name`` is the identity (docs/encoder.md, Output vectors). This indexes every
vocabulary string of a RoBERTa-style byte-level BPE tokenizer (``Ġ``-prefixed pieces, every byte a
printable character) and of an XLM-R-style Unigram tokenizer (``▁``-prefixed pieces, several
scripts), plus all 256 byte-level characters, as ``sparse_vector`` feature names, then reads each
document back and matches each name with a ``term`` query: every string must come back as it went
in, with its weight, and find its document. BERT's vocabulary was probed the same way earlier
(docs/local-stack.md). Runs against each major (``es_any``: 9.5.3 and 8.19.21).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from support import es_request
from tokenizers import Tokenizer, pre_tokenizers
from trained_tokenizers import train_roberta_tokenizer, train_xlmr_tokenizer

from encoder.features import es_feature_name, es_feature_token

pytestmark = pytest.mark.integration

MAPPINGS = {"properties": {"tokens": {"type": "sparse_vector"}}}
PER_DOCUMENT = 400  # features per document (and term clauses per check query)
REL_TOL = 0.004  # sparse_vector keeps 9 significant bits of a weight


def _vocabulary_strings(tmp_path: Path) -> dict[str, set[str]]:
    roberta = Tokenizer.from_file(
        str(train_roberta_tokenizer(tmp_path / "roberta") / "tokenizer.json")
    )
    xlmr = Tokenizer.from_file(str(train_xlmr_tokenizer(tmp_path / "xlmr") / "tokenizer.json"))
    return {
        "byte-level BPE": set(roberta.get_vocab(with_added_tokens=True)),
        "Unigram": set(xlmr.get_vocab(with_added_tokens=True)),
        "byte-level alphabet": set(pre_tokenizers.ByteLevel.alphabet()),
    }


def _ok(status: int, body: Any) -> Any:
    assert 200 <= status < 300, (status, body)
    return body


def test_every_vocabulary_string_is_a_feature_name(
    es_any: tuple[str, str], index_name: str, tmp_path: Path
) -> None:
    version, url = es_any
    vocabularies = _vocabulary_strings(tmp_path)
    assert len(vocabularies["byte-level alphabet"]) == 256
    assert any(t.startswith("Ġ") for t in vocabularies["byte-level BPE"])
    assert any(t.startswith("▁") for t in vocabularies["Unigram"])
    tokens = sorted(set().union(*vocabularies.values()))
    names = [es_feature_name(t) for t in tokens]
    assert len(set(names)) == len(names)  # injective
    assert [es_feature_token(n) for n in names] == tokens  # and reversed by its inverse

    index = f"{url}/{index_name}"
    _ok(*es_request(index, "PUT", {"mappings": MAPPINGS}))
    try:
        docs: dict[str, dict[str, float]] = {}
        for start in range(0, len(names), PER_DOCUMENT):
            chunk = names[start : start + PER_DOCUMENT]
            docs[f"d{start}"] = {name: 1.0 + k / 256 for k, name in enumerate(chunk)}
        for doc_id, features in docs.items():
            _ok(*es_request(f"{index}/_doc/{doc_id}", "PUT", {"tokens": features}))
        _ok(*es_request(f"{index}/_refresh", "POST"))
        # ES 9 leaves vectors out of _source unless asked; 8.x keeps them there
        params = "?_source_exclude_vectors=false" if not version.startswith("8.") else ""
        for doc_id, features in docs.items():
            # stored: the names come back as they went in (weights with 9 significant bits)
            got = _ok(*es_request(f"{index}/_doc/{quote(doc_id)}{params}"))
            stored = got["_source"]["tokens"]
            assert stored.keys() == features.keys(), sorted(stored.keys() ^ features.keys())[:10]
            for name, weight in features.items():
                assert stored[name] == pytest.approx(weight, rel=REL_TOL), name
            # indexed: a term query for each name finds this document (named clauses say which)
            clauses = [
                {"term": {"tokens": {"value": name, "_name": f"f{k}"}}}
                for k, name in enumerate(features)
            ]
            body = {"query": {"bool": {"should": clauses}}, "size": len(docs)}
            response = _ok(*es_request(f"{index}/_search", "POST", body))
            hits = response["hits"]["hits"]
            assert [h["_id"] for h in hits] == [doc_id], version
            matched = set(hits[0]["matched_queries"])
            missing = [name for k, name in enumerate(features) if f"f{k}" not in matched]
            assert not missing, (version, missing[:10])
    finally:
        es_request(index, "DELETE")
