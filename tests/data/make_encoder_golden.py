"""Regenerate tests/data/encoder_golden.json from the FP32 export of the default model.

    .venv/bin/python tests/data/make_encoder_golden.py

The vectors are cross-checked against the plain numpy reference before they are written.
Only regenerate when the model or the exporter changes on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from encoder import SparseEncoder, fetch_default_model
from encoder.checkpoint import load_masked_lm
from encoder.fetch import fetch_source
from encoder.reference import splade_vectors
from encoder.registry import DEFAULT_MODEL_NAME

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "what is the capital of france",
    "Vitamin D deficiency is associated with respiratory infections in children (n=1,204; p<0.05).",
    "Elasticsearch stores learned sparse vectors in a sparse_vector field.",
    "naïve café résumé — Zürich 2024",
]
OUT = Path(__file__).with_name("encoder_golden.json")


def main() -> None:
    model_dir = fetch_default_model()
    enc = SparseEncoder.load(model_dir, model_file="model.fp32.onnx")
    vectors = enc.encode_documents(TEXTS)

    weights = load_masked_lm(fetch_source(DEFAULT_MODEL_NAME))
    tok = enc._tok  # same tokenizer the encoder uses
    for text, vec in zip(TEXTS, vectors, strict=True):
        ids = np.array([tok.encode(text).ids], dtype=np.int64)
        ref = splade_vectors(weights, ids, np.ones_like(ids))[0]
        for token, value in vec.items():
            assert abs(ref[tok.token_to_id(token)] - value) < 1e-4, (text, token)
    OUT.write_text(
        json.dumps(
            {
                "model": DEFAULT_MODEL_NAME,
                "source": "FP32 export (model.fp32.onnx), checked against encoder.reference",
                "texts": TEXTS,
                "vectors": [{k: round(v, 6) for k, v in sorted(vec.items())} for vec in vectors],
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
