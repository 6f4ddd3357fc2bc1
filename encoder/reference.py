"""An independent, plain numpy forward pass of a masked-LM SPLADE encoder (float64).

It follows the textbook definition and none of the exporter's tricks: the full logits
[batch, seq, vocab] with bias, ``log1p(relu(logits)) * mask`` (``log1p`` twice for the
``splade_max_log1p_log1p`` pooling), then max over the sequence. GTE: rotary embeddings computed
from the angles of each position (no tables), the gated MLP as two products. Used to check the
exported ONNX graphs; slow, not for production.
"""

from __future__ import annotations

import math

import numpy as np

from encoder.checkpoint import LayerNormWeights, Linear, MaskedLMWeights, TransformerConfig
from encoder.registry import Pooling

_erf = np.frompyfunc(math.erf, 1, 1)


def _act(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "gelu":
        return 0.5 * x * (1.0 + np.asarray(_erf(x / math.sqrt(2.0)), dtype=np.float64))
    if kind == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if kind == "relu":
        return np.maximum(x, 0.0)
    raise ValueError(kind)


def _linear(x: np.ndarray, lin: Linear) -> np.ndarray:
    return x @ lin.weight.astype(np.float64).T + lin.bias.astype(np.float64)


def _norm(x: np.ndarray, ln: LayerNormWeights, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * ln.gamma + ln.beta


def position_ids(c: TransformerConfig, input_ids: np.ndarray) -> np.ndarray:
    """[batch, seq] position ids, computed as transformers does.

    BERT/DistilBERT: 0, 1, ... RoBERTa/XLM-R (``position_offset > 0``): ``padding_idx`` for
    padding tokens, else ``padding_idx`` + the count of non-padding tokens so far
    (``create_position_ids_from_input_ids``), padding_idx being ``position_offset - 1``.
    """
    b, s = input_ids.shape
    if c.position_offset == 0:
        return np.broadcast_to(np.arange(s), (b, s))
    not_pad = (input_ids != c.pad_token_id).astype(np.int64)
    return np.cumsum(not_pad, axis=1) * not_pad + (c.position_offset - 1)


def rotate(c: TransformerConfig, t: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """RoPE, rotate-half layout, on [batch, heads, seq, head] queries or keys: the pair (j,
    j + head/2) of position p turns by p / rope_position_scale * rope_theta ** (-2j / head)."""
    hd = c.head_size
    half = hd // 2
    inv_freq = 1.0 / c.rope_theta ** (np.arange(half, dtype=np.float64) * 2 / hd)
    angles = positions[:, None, :, None] / c.rope_position_scale * inv_freq  # [b, 1, s, half]
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = t[..., :half], t[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def hidden_states(
    w: MaskedLMWeights, input_ids: np.ndarray, attention_mask: np.ndarray
) -> np.ndarray:
    """Last encoder layer, [batch, seq, hidden] float64."""
    c = w.config
    b, s = input_ids.shape
    positions = position_ids(c, input_ids)
    x = w.word_embeddings[input_ids].astype(np.float64)
    if w.position_embeddings is not None:
        x = x + w.position_embeddings[positions]
    if w.token_type_embedding is not None:
        x = x + w.token_type_embedding
    x = _norm(x, w.embedding_norm, c.layer_norm_eps)
    nh = c.num_heads
    hd = c.hidden_size // nh
    mask_bias = np.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9)
    for layer in w.layers:

        def heads(t: np.ndarray) -> np.ndarray:
            return t.reshape(b, s, nh, hd).transpose(0, 2, 1, 3)

        q, k, v = (heads(_linear(x, lin)) for lin in (layer.query, layer.key, layer.value))
        if c.rotary:
            q, k = rotate(c, q, positions), rotate(c, k, positions)
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + mask_bias
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, c.hidden_size)
        x = _norm(x + _linear(ctx, layer.attention_output), layer.attention_norm, c.layer_norm_eps)
        if layer.ffn_gate is not None:  # GTE: act(gate) * up
            inner = _act(_linear(x, layer.ffn_gate), c.hidden_act) * _linear(x, layer.ffn_in)
        else:
            inner = _act(_linear(x, layer.ffn_in), c.hidden_act)
        ff = _linear(inner, layer.ffn_out)
        x = _norm(x + ff, layer.output_norm, c.layer_norm_eps)
    return x


def mlm_logits(w: MaskedLMWeights, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Masked-LM logits [batch, seq, vocab] float64, bias included."""
    h = hidden_states(w, input_ids, attention_mask)
    h = _norm(
        _act(_linear(h, w.head_transform), w.config.head_act), w.head_norm, w.config.layer_norm_eps
    )
    return h @ w.decoder_weight.astype(np.float64).T + w.decoder_bias


def splade_pool(
    logits: np.ndarray, attention_mask: np.ndarray, pooling: Pooling = "splade_max"
) -> np.ndarray:
    """Standard SPLADE max pooling: max over seq of log1p(relu(logits)) * mask; with
    ``splade_max_log1p_log1p``, of log1p(log1p(relu(logits))) * mask."""
    weights = np.log1p(np.maximum(logits, 0.0))
    if pooling == "splade_max_log1p_log1p":
        weights = np.log1p(weights)
    elif pooling != "splade_max":
        raise ValueError(pooling)
    return (weights * attention_mask[:, :, None]).max(axis=1)


def splade_vectors(
    w: MaskedLMWeights,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    pooling: Pooling = "splade_max",
) -> np.ndarray:
    """[batch, vocab] SPLADE weights, computed the plain way."""
    return splade_pool(mlm_logits(w, input_ids, attention_mask), attention_mask, pooling)
