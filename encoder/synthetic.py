"""Randomly initialised masked-LM weights of a given shape (benchmarks and tests only)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from encoder.checkpoint import (
    GTE_DEFAULT_LENGTH,
    LayerNormWeights,
    LayerWeights,
    Linear,
    MaskedLMWeights,
    TransformerConfig,
    ntk_rope,
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

# opensearch-neural-sparse-encoding-doc-v3-gte: gte-base-en-v1.5's NewForMaskedLM, 12 layers,
# hidden 768, 12 heads, gated MLP 3072, vocabulary padded to 30528 (BERT's 30522 + 6), no
# token types, RoPE theta 500000 with static NTK factor 2, 8192 positions (exported at 512).
_GTE_THETA, _GTE_SCALE = ntk_rope(500_000.0, 2.0, 64)
GTE_BASE = TransformerConfig(
    architecture="NewForMaskedLM",
    vocab_size=30528,
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    intermediate_size=3072,
    max_position_embeddings=8192,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
    head_act="gelu",
    type_vocab_size=0,
    rotary=True,
    rope_theta=_GTE_THETA,
    rope_position_scale=_GTE_SCALE,
    gated_mlp=True,
    default_length=GTE_DEFAULT_LENGTH,
)

# The same architecture, tiny (tests): 2 layers, hidden 32, 4 heads of 8, 64 positions, still the
# padded 30528 vocabulary and the NTK-scaled RoPE (of head size 8).
_TINY_THETA, _TINY_SCALE = ntk_rope(500_000.0, 2.0, 8)
GTE_TINY = replace(
    GTE_BASE,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    rope_theta=_TINY_THETA,
    rope_position_scale=_TINY_SCALE,
    default_length=64,
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

    def no_bias(out: int, inp: int) -> Linear:  # GTE's up and gate projections
        return Linear(mat(out, inp, scale=1 / np.sqrt(inp)), np.zeros(out, np.float32))

    layers = tuple(
        LayerWeights(
            query=lin(h, h),
            key=lin(h, h),
            value=lin(h, h),
            attention_output=lin(h, h),
            attention_norm=norm(),
            ffn_in=no_bias(inter, h) if config.gated_mlp else lin(inter, h),
            ffn_out=lin(h, inter),
            output_norm=norm(),
            ffn_gate=no_bias(inter, h) if config.gated_mlp else None,
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
        position_embeddings=None if config.rotary else mat(config.max_position_embeddings, h),
        token_type_embedding=mat(h) if config.type_vocab_size else None,
        embedding_norm=norm(),
        layers=layers,
        head_transform=lin(h, h),
        head_norm=norm(),
        decoder_weight=word,
        decoder_bias=(mat(config.vocab_size, scale=0.1) - shift).astype(np.float32),
    )
