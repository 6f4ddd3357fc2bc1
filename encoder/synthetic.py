"""Randomly initialised masked-LM weights of a given shape (benchmarks and tests only)."""

from __future__ import annotations

import numpy as np

from encoder.checkpoint import (
    LayerNormWeights,
    LayerWeights,
    Linear,
    MaskedLMWeights,
    TransformerConfig,
)

BERT_BASE = TransformerConfig(
    architecture="BertForMaskedLM",
    vocab_size=30522,
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
    head_act="gelu",
    type_vocab_size=2,
)

# ibm-granite/granite-embedding-30m-sparse: RoBERTa, 6 layers, hidden 384, 12 heads, 50265 tokens,
# 514 positions from padding index 1 (512 tokens).
GRANITE_30M_SPARSE = TransformerConfig(
    architecture="RobertaForMaskedLM",
    vocab_size=50265,
    hidden_size=384,
    num_layers=6,
    num_heads=12,
    intermediate_size=1536,
    max_position_embeddings=514,
    layer_norm_eps=1e-5,
    hidden_act="gelu",
    head_act="gelu",
    position_offset=2,
    pad_token_id=1,
    type_vocab_size=1,
)


def random_masked_lm(
    config: TransformerConfig = BERT_BASE, seed: int = 0, active_fraction: float = 0.01
) -> MaskedLMWeights:
    """Random weights; the decoder bias is set so that about ``active_fraction`` of the
    vocabulary gets a positive weight per text, like a trained SPLADE model (a few hundred)."""
    rng = np.random.default_rng(seed)
    h, inter = config.hidden_size, config.intermediate_size

    def mat(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    def norm() -> LayerNormWeights:
        return LayerNormWeights(1 + mat(h, scale=0.1), mat(h, scale=0.1))

    def lin(out: int, inp: int) -> Linear:
        return Linear(mat(out, inp, scale=1 / np.sqrt(inp)), mat(out))

    layers = tuple(
        LayerWeights(
            query=lin(h, h),
            key=lin(h, h),
            value=lin(h, h),
            attention_output=lin(h, h),
            attention_norm=norm(),
            ffn_in=lin(inter, h),
            ffn_out=lin(h, inter),
            output_norm=norm(),
        )
        for _ in range(config.num_layers)
    )
    word = mat(config.vocab_size, h, scale=1 / np.sqrt(h))
    # Logits are about N(0, 1) per position; the max over a few hundred positions sits near 3,
    # so a bias around -3 leaves a small fraction of the vocabulary positive.
    from statistics import NormalDist

    shift = NormalDist().inv_cdf(1 - active_fraction) + 0.5
    return MaskedLMWeights(
        config=config,
        word_embeddings=word,
        position_embeddings=mat(config.max_position_embeddings, h),
        token_type_embedding=mat(h) if config.type_vocab_size else None,
        embedding_norm=norm(),
        layers=layers,
        head_transform=lin(h, h),
        head_norm=norm(),
        decoder_weight=word,
        decoder_bias=(mat(config.vocab_size, scale=0.1) - shift).astype(np.float32),
    )
