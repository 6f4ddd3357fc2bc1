"""Build the ONNX graph of a SPLADE encoder straight from numpy weights (no PyTorch).

Inputs: ``input_ids`` and ``attention_mask`` (int64, [batch, seq], right-padded). There is no
``token_type_ids`` input: SPLADE inputs are one segment, so the type-0 embedding is folded into the
position table. BERT's position ids are 0, 1, ...: the graph slices the table's first rows. RoBERTa
and XLM-R (``config.position_offset`` > 0) compute them from the ids as transformers does
(``cumsum(ids != pad) * (ids != pad) + pad``: token i of a right-padded row at ``pad_token_id + 1 +
i``, a padding token at the padding index even inside a text) and Gather them from the whole table.
Padded positions get positions too, but they are masked out of attention and pooling, so their rows
never matter. Output: ``sparse_weights`` [batch, vocab] float32.

GTE has no position table: rotary embeddings (the ``RotaryEmbedding`` op, opset 23, rotate-half)
turn the queries and keys of every layer, from cos/sin tables of ``max_length`` rows computed here
and stored as constants (the position ids 0..seq-1 are a slice of a constant range, like the
position table's rows); its MLP is gated (one MatMul for up and gate, ``Split``, ``Gelu(gate) *
up``). The token-type row 0 is folded into the word embeddings' table instead.

The SPLADE head is fused with the exact pooling rewrite: padded positions take the [CLS] hidden
state (so they never win the max), the vocabulary MatMul runs without its bias, a ReduceMax goes
over the sequence, and the bias, relu and log1p run on [batch, vocab] only (log1p twice for the
``splade_max_log1p_log1p`` pooling of OpenSearch's v3 models). The vocabulary MatMul is
split into ``vocab_chunks`` column blocks so that the [batch, seq, vocab] product never exists whole
(1 GB for 32 x 256 tokens on a 30522 vocabulary).

The default graph is standard ONNX (opset 23): the ``Attention`` op, ``Gelu``, ``LayerNormalization``.
``GraphOptions`` can choose, op by op, ONNX Runtime contrib ops instead (com.microsoft
``MultiHeadAttention``/``Attention``, ``SkipLayerNormalization``, ``BiasGelu``/``FastGelu``: what
ORT's transformer optimizer would produce), or attention from MatMul/Softmax
(``GraphOptions.standard()``); each was measured (docs/encoder.md, Quantization). ``head="logits"``
outputs the plain masked-LM logits [batch, seq, vocab] instead (the usual export; pooling left to the
caller).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from encoder.checkpoint import LayerNormWeights, LayerWeights, MaskedLMWeights, TransformerConfig
from encoder.registry import POOLINGS, Pooling

OPSET = 23  # the Attention op (23); Gelu (20); onnxruntime >= 1.23 runs it on the CPU
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"
OUTPUT_NAME = "sparse_weights"
# ONNX Runtime graph optimizers every session of our graphs runs without (see GraphOptions).
ORT_DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]
LOGITS_NAME = "logits"
# The RoBERTa/XLM-R position table's Gather (node names start with it): left in FP32 by the
# quantizer, as the table was when the graph sliced it (encoder.export.quantize_int8).
POSITION_GATHER = "position_embeddings.gather"
# ONNX files are protobuf messages, which cannot exceed 2 GiB; weights stored outside the file
# (ONNX external data) are not supported yet.
PROTOBUF_LIMIT = 2**31
GRAPH_STRUCTURE_BYTES = 2**20  # what estimate_graph_bytes allows for all but the weights


def estimate_graph_bytes(w: MaskedLMWeights, max_length: int | None = None) -> int:
    """About how many bytes the FP32 graph of ``w`` takes, from above: every weight as float32,
    the decoder again even when tied to the word embeddings (the graph stores it transposed,
    apart), the rotary tables, and 1 MiB for the graph's own structure (nodes, names, small
    constants: about 16 kB for 2 layers)."""
    c = w.config
    arrays: list[np.ndarray | None] = [
        w.word_embeddings,
        w.position_embeddings,
        w.token_type_embedding,
        w.embedding_norm.gamma,
        w.embedding_norm.beta,
        w.head_transform.weight,
        w.head_transform.bias,
        w.head_norm.gamma,
        w.head_norm.beta,
        w.decoder_weight,
        w.decoder_bias,
    ]
    for layer in w.layers:
        for lin in (
            layer.query,
            layer.key,
            layer.value,
            layer.attention_output,
            layer.ffn_in,
            layer.ffn_out,
            layer.ffn_gate,
        ):
            if lin is not None:
                arrays += [lin.weight, lin.bias]
        for ln in (layer.attention_norm, layer.output_norm):
            arrays += [ln.gamma, ln.beta]
    total = GRAPH_STRUCTURE_BYTES + sum(4 * a.size for a in arrays if a is not None)
    if c.rotary:  # cos and sin, [rows, head / 2] each
        total += 4 * (max_length or c.default_length or c.max_length) * c.head_size
    return total


@dataclass(frozen=True)
class GraphOptions:
    # "onnx": the standard Attention op (opset 23) with the Q/K/V MatMuls and their biases outside,
    # so ORT folds each bias into its INT8 MatMul; its CPU kernel runs BERT-base attention 1.07x
    # (4 x 512) to 1.5x (16 x 128) faster than com.microsoft MultiHeadAttention ("mha", the
    # exporter's default before version 4).
    # "attention": com.microsoft Attention (QKV weights inside; quantize_dynamic turns it into
    # QAttention). "plain": MatMul + Softmax.
    attention: Literal["onnx", "mha", "attention", "plain"] = "onnx"
    # com.microsoft SkipLayerNormalization for bias+residual+norm. Off: ONNX Runtime 1.32's CPU
    # kernel takes 3.5 ms on [2048, 768] where Add + LayerNormalization take 0.8 ms (17% of
    # BERT-base INT8 time); sessions also disable the optimizer that would fuse them back
    # (ORT_DISABLED_OPTIMIZERS).
    skip_layernorm: bool = False
    # com.microsoft BiasGelu/FastGelu for bias + activation. Off: Add + the standard Gelu op, and
    # ORT folds the Add into the INT8 MatMul before it: Gelu alone takes 3.4 ms on [2048, 3072]
    # where BiasGelu takes 4.3 (BERT-base INT8 on SciFact: 4,585 vs 4,403 tok/s).
    bias_gelu: bool = False

    @classmethod
    def standard(cls, **kw: Any) -> GraphOptions:
        """No com.microsoft contrib ops, and attention from MatMul + Softmax (a benchmark control)."""
        return cls(attention="plain", skip_layernorm=False, bias_gelu=False, **kw)

    @property
    def uses_contrib_ops(self) -> bool:
        return self.attention in ("mha", "attention") or self.skip_layernorm or self.bias_gelu

    def describe(self) -> str:
        ops = [
            name
            for name, on in (
                ("MultiHeadAttention", self.attention == "mha"),
                ("Attention", self.attention == "attention"),
                ("SkipLayerNormalization", self.skip_layernorm),
                ("BiasGelu", self.bias_gelu),
            )
            if on
        ]
        return f"contrib ops: {', '.join(ops) or 'none'}; head: {self.head}" + (
            f", pooling rewrite, vocabulary MatMul in {self.vocab_chunks} chunks"
            if self.head == "splade"
            else ""
        )

    head: Literal["splade", "logits"] = "splade"
    vocab_chunks: int = 32
    # Give MultiHeadAttention/Attention the key lengths [batch] instead of the [batch, seq] mask
    # (valid for right padding, which is what the runtime builds).
    mask_as_lengths: bool = False


@dataclass
class _Builder:
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    counter: int = 0

    def name(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}_{self.counter}"

    def const(self, hint: str, value: np.ndarray | np.generic) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(
        self,
        op_type: str,
        inputs: list[str],
        hint: str | None = None,
        domain: str = "",
        **attrs: Any,
    ) -> str:
        out = self.name(hint or op_type.lower())
        # The node is named after its output, so names say where a node sits ("layer3.ffn_in.mm_")
        # and quantization exclusions can match on them.
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=f"{out}.node", domain=domain, **attrs)
        )
        return out


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _layer_norm(g: _Builder, x: str, ln: LayerNormWeights, eps: float, hint: str) -> str:
    return g.op(
        "LayerNormalization",
        [x, g.const(f"{hint}.gamma", _f32(ln.gamma)), g.const(f"{hint}.beta", _f32(ln.beta))],
        hint=f"{hint}.out",
        axis=-1,
        epsilon=eps,
    )


def _dense(g: _Builder, x: str, weight: np.ndarray, hint: str) -> str:
    """MatMul with a PyTorch-layout [out, in] weight, no bias."""
    return g.op("MatMul", [x, g.const(f"{hint}.weight", _f32(weight.T))], hint=f"{hint}.mm")


def _bias_act(g: _Builder, x: str, bias: np.ndarray, act: str, fused: bool, hint: str) -> str:
    b = g.const(f"{hint}.bias", _f32(bias))
    if fused and act == "gelu":
        return g.op("BiasGelu", [x, b], hint=f"{hint}.gelu", domain=MS_DOMAIN)
    if fused and act == "gelu_tanh":
        return g.op("FastGelu", [x, b], hint=f"{hint}.gelu", domain=MS_DOMAIN)
    y = g.op("Add", [x, b])
    if act == "relu":
        return g.op("Relu", [y])
    approximate = "none" if act == "gelu" else "tanh"
    return g.op("Gelu", [y], hint=f"{hint}.gelu", approximate=approximate)


def _residual_norm(
    g: _Builder,
    x: str,
    residual: str,
    bias: np.ndarray,
    ln: LayerNormWeights,
    eps: float,
    fused: bool,
    hint: str,
) -> str:
    if fused:
        return g.op(
            "SkipLayerNormalization",
            [
                x,
                residual,
                g.const(f"{hint}.gamma", _f32(ln.gamma)),
                g.const(f"{hint}.beta", _f32(ln.beta)),
                g.const(f"{hint}.bias", _f32(bias)),
            ],
            hint=f"{hint}.out",
            domain=MS_DOMAIN,
            epsilon=eps,
        )
    y = g.op("Add", [g.op("Add", [x, g.const(f"{hint}.bias", _f32(bias))]), residual])
    return _layer_norm(g, y, ln, eps, hint)


def _plain_attention(
    g: _Builder,
    x: str,
    layer: LayerWeights,
    nh: int,
    mask_bias: str,
    p: str,
    rope: _Rope | None = None,
) -> str:
    """Self-attention from standard ops (the 1/sqrt(head) scale is folded into the query)."""
    hidden = layer.query.weight.shape[0]
    hd = hidden // nh
    scale = 1.0 / math.sqrt(hd)

    def heads(
        lin_w: np.ndarray, lin_b: np.ndarray, hint: str, perm: list[int], rotate: bool = False
    ) -> str:
        y = g.op("Add", [_dense(g, x, lin_w, hint), g.const(f"{hint}.bias", _f32(lin_b))])
        if rotate and rope is not None:  # a rotation commutes with the query's scale
            y = rope.apply(g, y, hint)
        y = g.op("Reshape", [y, g.const("shape_heads", np.array([0, 0, nh, hd], np.int64))])
        return g.op("Transpose", [y], perm=perm)

    q = heads(layer.query.weight * scale, layer.query.bias * scale, f"{p}.q", [0, 2, 1, 3], True)
    k = heads(layer.key.weight, layer.key.bias, f"{p}.k", [0, 2, 3, 1], True)
    v = heads(layer.value.weight, layer.value.bias, f"{p}.v", [0, 2, 1, 3])
    probs = g.op("Softmax", [g.op("Add", [g.op("MatMul", [q, k]), mask_bias])], axis=-1)
    ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    return g.op("Reshape", [ctx, g.const("shape_hidden", np.array([0, 0, hidden], np.int64))])


def rope_tables(c: TransformerConfig, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [rows, head / 2] float32 of positions 0..rows-1 (computed in float64): the
    angle of position p and pair i is p / rope_position_scale * rope_theta ** (-2i / head). The
    rotate-half layout repeats them over both halves of the head, which the op does itself."""
    hd = c.head_size
    inv_freq = c.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.outer(np.arange(rows, dtype=np.float64) / c.rope_position_scale, inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@dataclass(frozen=True)
class _Rope:
    cos: str
    sin: str
    position_ids: str
    num_heads: int

    def apply(self, g: _Builder, x: str, hint: str) -> str:
        """Rotate [batch, seq, hidden] queries or keys, head by head (rotate-half layout)."""
        return g.op(
            "RotaryEmbedding",
            [x, self.cos, self.sin, self.position_ids],
            hint=f"{hint}.rope",
            num_heads=self.num_heads,
            interleaved=0,
        )


def _gated_mlp(g: _Builder, x: str, layer: LayerWeights, act: str, p: str) -> str:
    """act(x @ gate) * (x @ up): one MatMul over [up | gate], Split, activation, Mul."""
    assert layer.ffn_gate is not None
    up, gate = layer.ffn_in, layer.ffn_gate
    inter = up.weight.shape[0]
    y = _dense(g, x, np.concatenate([up.weight, gate.weight]), f"{p}.ffn_in")
    bias = np.concatenate([up.bias, gate.bias])
    if np.any(bias):  # GTE has none
        y = g.op("Add", [y, g.const(f"{p}.ffn_in.bias", _f32(bias))])
    halves = g.const(f"{p}.ffn_split", np.array([inter, inter], np.int64))
    up_out, gate_out = g.name(f"{p}.ffn_up"), g.name(f"{p}.ffn_gate")
    g.nodes.append(
        helper.make_node("Split", [y, halves], [up_out, gate_out], name=f"{up_out}.node", axis=-1)
    )
    if act == "relu":
        gated = g.op("Relu", [gate_out])
    else:
        approximate = "none" if act == "gelu" else "tanh"
        gated = g.op("Gelu", [gate_out], hint=f"{p}.ffn_gate.gelu", approximate=approximate)
    return g.op("Mul", [gated, up_out], hint=f"{p}.ffn_gated")


def build_graph(
    w: MaskedLMWeights,
    options: GraphOptions | None = None,
    *,
    max_length: int | None = None,
    pooling: Pooling = "splade_max",
) -> onnx.ModelProto:
    """The ONNX graph of ``w``. ``max_length``: rows of the rotary tables (GTE; default the
    config's ``default_length``, else ``max_length``); a position table is always whole.
    ``pooling``: the SPLADE activation after the max (``encoder.registry.POOLINGS``)."""
    opts = options or GraphOptions()
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    c = w.config
    g = _Builder()
    nh = c.num_heads
    eps = c.layer_norm_eps
    if c.rotary and opts.attention == "attention":
        raise ValueError(
            "rotary embeddings need the queries and keys outside the attention op: use "
            "attention='onnx', 'mha' or 'plain', not com.microsoft Attention"
        )

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
    ]

    rope: _Rope | None = None
    if w.position_embeddings is None:
        # Rotary (GTE): word (+ token type 0, folded into the table) -> LayerNorm; the positions
        # turn the queries and keys of every layer.
        table = _f32(w.word_embeddings)
        if w.token_type_embedding is not None:
            table = table + _f32(w.token_type_embedding)
        emb = g.op(
            "Gather",
            [g.const("word_embeddings", table), "input_ids"],
            hint="word_embeddings.gather",
        )
        seq_len = g.op("Shape", ["input_ids"], hint="seq_len", start=1, end=2)
        rows = max_length or c.default_length or c.max_length
        cos, sin = rope_tables(c, rows)
        positions = g.op(
            "Slice",
            [
                g.const("position_range", np.arange(rows, dtype=np.int64)),
                g.const("zero", np.array([0], np.int64)),
                seq_len,
                g.const("axis0", np.array([0], np.int64)),
            ],
            hint="positions",
        )
        position_ids = g.op(
            "Expand", [positions, g.op("Shape", ["input_ids"])], hint="position_ids"
        )
        rope = _Rope(g.const("rope.cos", cos), g.const("rope.sin", sin), position_ids, nh)
    elif c.position_offset:
        # RoBERTa/XLM-R: word + position (+ token type) -> LayerNorm, the position ids computed
        # from the ids as transformers does (create_position_ids_from_input_ids): the count of
        # non-padding tokens so far, times "not padding", plus the padding index. A literal
        # padding token inside a text takes the padding index and the tokens after it count on
        # from where they were, as in transformers.
        word = g.op(
            "Gather",
            [g.const("word_embeddings", _f32(w.word_embeddings)), "input_ids"],
            hint="word_embeddings.gather",
        )
        pos_table = _f32(w.position_embeddings)
        if w.token_type_embedding is not None:  # single segment: type 0 everywhere
            pos_table = pos_table + _f32(w.token_type_embedding)
        seq_len = g.op("Shape", ["input_ids"], hint="seq_len", start=1, end=2)
        is_pad = g.op(
            "Equal", ["input_ids", g.const("pad_token_id", np.array(c.pad_token_id, np.int64))]
        )
        not_pad = g.op("Cast", [g.op("Not", [is_pad])], hint="not_pad", to=TensorProto.INT64)
        counted = g.op("CumSum", [not_pad, g.const("axis1_scalar", np.array(1, np.int64))])
        position_ids = g.op(
            "Add",
            [
                g.op("Mul", [counted, not_pad]),
                g.const("padding_idx", np.array(c.position_offset - 1, np.int64)),
            ],
            hint="position_ids",
        )
        positions = g.op(
            "Gather",
            [g.const("pos_table", pos_table), position_ids],
            hint=POSITION_GATHER,
        )
        emb = g.op("Add", [word, positions])
    else:
        # Embeddings: word + position (+ token type) -> LayerNorm.
        word = g.op(
            "Gather",
            [g.const("word_embeddings", _f32(w.word_embeddings)), "input_ids"],
            hint="word_embeddings.gather",
        )
        pos_table = _f32(w.position_embeddings[c.position_offset :])  # row 0: the first token
        if w.token_type_embedding is not None:  # single segment: type 0 everywhere
            pos_table = pos_table + _f32(w.token_type_embedding)
        seq_len = g.op("Shape", ["input_ids"], hint="seq_len", start=1, end=2)
        positions = g.op(
            "Slice",
            [
                g.const("pos_table", pos_table),
                g.const("zero", np.array([0], np.int64)),
                seq_len,
                g.const("axis0", np.array([0], np.int64)),
            ],
            hint="positions",
        )
        emb = g.op("Add", [word, positions])
    x = _layer_norm(g, emb, w.embedding_norm, eps, "embeddings.norm")

    if opts.attention == "onnx":
        # Boolean [batch, 1, seq, seq] (True: attend). The op wants the query axis spelled out.
        keep = g.op("Cast", ["attention_mask"], hint="mask_bool", to=TensorProto.BOOL)
        keep = g.op("Unsqueeze", [keep, g.const("ax12", np.array([1, 2], np.int64))])
        shape = g.op(
            "Concat",
            [
                g.const("ones2", np.array([1, 1], np.int64)),
                seq_len,
                g.const("one1", np.array([1], np.int64)),
            ],
            axis=0,
        )
        attn_mask = g.op("Expand", [keep, shape], hint="attn_mask")
    elif opts.attention != "plain":
        if opts.mask_as_lengths:  # right padding: the key lengths say it all ("mask_index" 1D)
            lengths = g.op(
                "ReduceSum",
                ["attention_mask", g.const("axis1", np.array([1], np.int64))],
                keepdims=0,
            )
            mask_i32 = g.op("Cast", [lengths], hint="key_lengths", to=TensorProto.INT32)
        else:
            mask_i32 = g.op("Cast", ["attention_mask"], hint="mask_i32", to=TensorProto.INT32)
    else:
        mask_f = g.op("Cast", ["attention_mask"], hint="mask_f", to=TensorProto.FLOAT)
        mask_bias = g.op(
            "Mul",
            [
                g.op("Sub", [g.const("one", np.float32(1.0)), mask_f]),
                g.const("neg", np.float32(-1e9)),
            ],
        )
        mask_bias = g.op("Unsqueeze", [mask_bias, g.const("ax12", np.array([1, 2], np.int64))])
    for i, layer in enumerate(w.layers):
        p = f"layer{i}"
        if opts.attention == "attention":
            qkv_w = np.concatenate([layer.query.weight, layer.key.weight, layer.value.weight]).T
            qkv_bias = np.concatenate([layer.query.bias, layer.key.bias, layer.value.bias])
            ctx = g.op(
                "Attention",
                [
                    x,
                    g.const(f"{p}.qkv.weight", _f32(qkv_w)),
                    g.const(f"{p}.qkv_bias", _f32(qkv_bias)),
                    mask_i32,
                ],
                hint=f"{p}.ctx",
                domain=MS_DOMAIN,
                num_heads=nh,
            )
        elif opts.attention == "mha" and rope is not None:
            # the biases go in before the rotation, so not into the op
            q, k, v = (
                g.op(
                    "Add",
                    [
                        _dense(g, x, lin.weight, f"{p}.{n}"),
                        g.const(f"{p}.{n}.bias", _f32(lin.bias)),
                    ],
                )
                for n, lin in (("q", layer.query), ("k", layer.key), ("v", layer.value))
            )
            q, k = rope.apply(g, q, f"{p}.q"), rope.apply(g, k, f"{p}.k")
            ctx = g.op(
                "MultiHeadAttention",
                [q, k, v, "", mask_i32],
                hint=f"{p}.ctx",
                domain=MS_DOMAIN,
                num_heads=nh,
            )
        elif opts.attention == "mha":
            q = _dense(g, x, layer.query.weight, f"{p}.q")
            k = _dense(g, x, layer.key.weight, f"{p}.k")
            v = _dense(g, x, layer.value.weight, f"{p}.v")
            qkv_bias = np.concatenate([layer.query.bias, layer.key.bias, layer.value.bias])
            ctx = g.op(
                "MultiHeadAttention",
                [q, k, v, g.const(f"{p}.qkv_bias", _f32(qkv_bias)), mask_i32],
                hint=f"{p}.ctx",
                domain=MS_DOMAIN,
                num_heads=nh,
            )
        elif opts.attention == "onnx":
            q, k, v = (
                g.op(
                    "Add",
                    [
                        _dense(g, x, lin.weight, f"{p}.{n}"),
                        g.const(f"{p}.{n}.bias", _f32(lin.bias)),
                    ],
                )
                for n, lin in (("q", layer.query), ("k", layer.key), ("v", layer.value))
            )
            if rope is not None:
                q, k = rope.apply(g, q, f"{p}.q"), rope.apply(g, k, f"{p}.k")
            ctx = g.op(
                "Attention", [q, k, v, attn_mask], hint=f"{p}.ctx", q_num_heads=nh, kv_num_heads=nh
            )
        else:
            ctx = _plain_attention(g, x, layer, nh, mask_bias, p, rope)
        attn = _dense(g, ctx, layer.attention_output.weight, f"{p}.attn_out")
        x = _residual_norm(
            g,
            attn,
            x,
            layer.attention_output.bias,
            layer.attention_norm,
            eps,
            opts.skip_layernorm,
            f"{p}.attn_norm",
        )
        if layer.ffn_gate is not None:
            ff = _gated_mlp(g, x, layer, c.hidden_act, p)
        else:
            ff = _bias_act(
                g,
                _dense(g, x, layer.ffn_in.weight, f"{p}.ffn_in"),
                layer.ffn_in.bias,
                c.hidden_act,
                opts.bias_gelu,
                f"{p}.ffn_in",
            )
        ff = _dense(g, ff, layer.ffn_out.weight, f"{p}.ffn_out")
        x = _residual_norm(
            g,
            ff,
            x,
            layer.ffn_out.bias,
            layer.output_norm,
            eps,
            opts.skip_layernorm,
            f"{p}.out_norm",
        )

    # Masked-LM head transform: dense -> activation -> LayerNorm.
    h = _bias_act(
        g,
        _dense(g, x, w.head_transform.weight, "head.transform"),
        w.head_transform.bias,
        c.head_act,
        opts.bias_gelu,
        "head.transform",
    )
    h = _layer_norm(g, h, w.head_norm, eps, "head.norm")

    decoder_t = _f32(w.decoder_weight).T  # [hidden, vocab]
    if opts.head == "logits":
        logits = g.op("MatMul", [h, g.const("decoder.weight", decoder_t)])
        g.nodes.append(
            helper.make_node(
                "Add",
                [logits, g.const("decoder.bias", _f32(w.decoder_bias))],
                [LOGITS_NAME],
                name="n_logits",
            )
        )
        outputs = [
            helper.make_tensor_value_info(
                LOGITS_NAME, TensorProto.FLOAT, ["batch", "seq", c.vocab_size]
            )
        ]
    else:
        # Pooling rewrite: padded positions take the [CLS] state, so they never win the max.
        cls = g.op(
            "Slice",
            [
                h,
                g.const("zero", np.array([0], np.int64)),
                g.const("one_i", np.array([1], np.int64)),
                g.const("axis1", np.array([1], np.int64)),
            ],
            hint="cls_state",
        )
        keep = g.op(
            "Cast",
            [g.op("Unsqueeze", ["attention_mask", g.const("ax2", np.array([2], np.int64))])],
            to=TensorProto.BOOL,
        )
        h = g.op("Where", [keep, h, cls], hint="pool_states")
        n_chunks = max(1, min(opts.vocab_chunks, c.vocab_size))
        bounds = np.linspace(0, c.vocab_size, n_chunks + 1).astype(int)
        maxima = []
        for j in range(n_chunks):
            lo, hi = int(bounds[j]), int(bounds[j + 1])
            logits = g.op(
                "MatMul",
                [h, g.const(f"decoder.weight.{j}", np.ascontiguousarray(decoder_t[:, lo:hi]))],
                hint=f"vocab_logits_{j}",
            )
            maxima.append(
                g.op(
                    "ReduceMax",
                    [logits, g.const("axis1", np.array([1], np.int64))],
                    hint=f"vocab_max_{j}",
                    keepdims=0,
                )
            )
        pooled = maxima[0] if n_chunks == 1 else g.op("Concat", maxima, axis=1)
        pooled = g.op("Add", [pooled, g.const("decoder.bias", _f32(w.decoder_bias))])
        pooled = g.op("Add", [g.op("Relu", [pooled]), g.const("one", np.float32(1.0))])
        if pooling == "splade_max_log1p_log1p":  # log1p(log1p(relu(x)))
            pooled = g.op("Add", [g.op("Log", [pooled]), g.const("one", np.float32(1.0))])
        g.nodes.append(helper.make_node("Log", [pooled], [OUTPUT_NAME], name="n_log1p"))
        outputs = [
            helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", c.vocab_size])
        ]

    graph = helper.make_graph(g.nodes, "splade_encoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if opts.uses_contrib_ops:
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="sparse-ingest")
    model.ir_version = IR_VERSION
    return model
