"""GTE checkpoints (OpenSearch doc-v3-gte): both layouts, the numpy reference, export, runtime.

Tiny random checkpoints (hidden 32, 4 heads of 8, 2 layers, 64 positions) with the BERT WordPiece
tokenizer of the default model (30522 tokens) and GTE's padded vocabulary (30528 rows): the
``new-impl`` layout (``NewForMaskedLM``: packed q|k|v, ``up_gate_proj``, static NTK RoPE) and
transformers' native one (``GteForMaskedLM``: split projections, ``rope_parameters``), built from
the same arrays. No stack; a few seconds. The cross-check against transformers' own
``GteForMaskedLM`` runs only where torch and transformers >= 5.18 are installed (``make
test-torch``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from encoder import ModelError, SparseEncoder
from encoder.checkpoint import (
    drop_vocabulary_rows,
    load_masked_lm,
    ntk_rope,
    read_config,
    read_safetensors,
)
from encoder.export import export_model
from encoder.fetch import fetch_source
from encoder.graph import GraphOptions, build_graph
from encoder.metadata import read_metadata
from encoder.reference import splade_vectors
from encoder.registry import DEFAULT_MODEL_NAME

TOKENS = 30522  # the WordPiece tokenizer's vocabulary
VOCAB = 30528  # GTE's, padded to a multiple of 64
H, INTER, LAYERS, HEADS, POSITIONS = 32, 64, 2, 4, 64
HEAD = H // HEADS
THETA, NTK = 500_000.0, 2.0  # gte-base-en-v1.5's rope_theta and rope_scaling factor
DOUBLE_LOG = "splade_max_log1p_log1p"
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "what is the capital of france",
    "Vitamin D deficiency is associated with respiratory infections in children.",
    "a",
]
LONG_TEXT = (
    "Sparse retrieval with learned term weights runs on an inverted index, and rotary position "
    "embeddings let the encoder see where each word sits in the passage. "
) * 3


@pytest.fixture(scope="module")
def wordpiece_dir() -> Path:
    """The default model's source folder: a BERT uncased WordPiece tokenizer.json."""
    return fetch_source(DEFAULT_MODEL_NAME)


def _batch(tok_dir: Path, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids and mask, special tokens included, cut to ``max_length`` ([SEP] kept)."""
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    encs = [e.ids for e in tok.encode_batch(texts)]
    encs = [e if len(e) <= max_length else e[: max_length - 1] + e[-1:] for e in encs]
    width = max(len(e) for e in encs)
    ids = np.zeros((len(texts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encs):
        ids[i, : len(e)] = e
        mask[i, : len(e)] = 1
    return ids, mask


def _full_batch(tok_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """A padded batch whose longest row uses every one of the 64 positions."""
    ids, mask = _batch(tok_dir, [LONG_TEXT, *TEXTS], POSITIONS)
    assert ids.shape[1] == POSITIONS and (mask == 0).any()
    return ids, mask


def _random_arrays(seed: int, type_vocab_size: int) -> dict[str, np.ndarray]:
    """One tiny GTE's weights by role (PyTorch layout), shared by both layouts."""
    rng = np.random.default_rng(seed)

    def mat(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    arrays: dict[str, np.ndarray] = {
        "word": mat(VOCAB, H),
        "emb_ln.w": 1 + mat(H),
        "emb_ln.b": mat(H),
        "head.w": mat(H, H),
        "head.b": mat(H),
        "head_ln.w": 1 + mat(H),
        "head_ln.b": mat(H),
        "decoder.b": mat(VOCAB) * 5,
    }
    for i in range(LAYERS):
        for n in ("q", "k", "v", "o"):
            arrays[f"{i}.{n}.w"], arrays[f"{i}.{n}.b"] = mat(H, H), mat(H)
        arrays[f"{i}.up"], arrays[f"{i}.gate"] = mat(INTER, H), mat(INTER, H)
        arrays[f"{i}.down.w"], arrays[f"{i}.down.b"] = mat(H, INTER), mat(H)
        for ln in ("attn_ln", "mlp_ln"):
            arrays[f"{i}.{ln}.w"], arrays[f"{i}.{ln}.b"] = 1 + mat(H), mat(H)
    if type_vocab_size:  # drawn last: the rest is the same with or without
        arrays["types"] = mat(type_vocab_size, H)
    return arrays


def _random_gte_checkpoint(
    folder: Path,
    tokenizer_src: Path,
    layout: str,
    *,
    seed: int = 0,
    type_vocab_size: int = 0,
    max_positions: int = POSITIONS,
    config_changes: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """A tiny random GTE masked-LM checkpoint named as each layout saves it (decoder weight tied
    to the word embeddings, so not in the file): ``new`` (NewForMaskedLM, gte-base's RoPE: theta
    500000, NTK factor 2); ``gte`` (GteForMaskedLM, the same RoPE as transformers' "linear"
    type, saved as its save_pretrained does: new-impl's names under ``gte.``); ``gte-split``
    (the same with transformers' module names: split q/k/v and up/gate). The same ``seed`` gives
    the same network in every layout."""
    a = _random_arrays(seed, type_vocab_size)
    shape = {
        "vocab_size": VOCAB,
        "hidden_size": H,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": INTER,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": max_positions,
        "type_vocab_size": type_vocab_size,
        "pad_token_id": 0,
    }
    p = "new." if layout == "new" else "gte."
    state: dict[str, np.ndarray] = {
        p + "embeddings.word_embeddings.weight": a["word"],
        p + "embeddings.LayerNorm.weight": a["emb_ln.w"],
        p + "embeddings.LayerNorm.bias": a["emb_ln.b"],
    }
    if type_vocab_size:
        state[p + "embeddings.token_type_embeddings.weight"] = a["types"]
    if layout in ("new", "gte"):
        for i in range(LAYERS):
            lp = f"{p}encoder.layer.{i}."
            qkv = [a[f"{i}.{n}.w"] for n in "qkv"]
            state[lp + "attention.qkv_proj.weight"] = np.concatenate(qkv)
            state[lp + "attention.qkv_proj.bias"] = np.concatenate([a[f"{i}.{n}.b"] for n in "qkv"])
            state[lp + "attention.o_proj.weight"] = a[f"{i}.o.w"]
            state[lp + "attention.o_proj.bias"] = a[f"{i}.o.b"]
            state[lp + "mlp.up_gate_proj.weight"] = np.concatenate([a[f"{i}.up"], a[f"{i}.gate"]])
            state[lp + "mlp.down_proj.weight"] = a[f"{i}.down.w"]
            state[lp + "mlp.down_proj.bias"] = a[f"{i}.down.b"]
            for ln in ("attn_ln", "mlp_ln"):
                state[f"{lp}{ln}.weight"] = a[f"{i}.{ln}.w"]
                state[f"{lp}{ln}.bias"] = a[f"{i}.{ln}.b"]
        state["lm_head.norm.weight"] = a["head_ln.w"]
        state["lm_head.norm.bias"] = a["head_ln.b"]
    else:
        for i in range(LAYERS):
            lp = f"{p}layers.{i}."
            for n in "qkvo":
                state[f"{lp}self_attn.{n}_proj.weight"] = a[f"{i}.{n}.w"]
                state[f"{lp}self_attn.{n}_proj.bias"] = a[f"{i}.{n}.b"]
            state[lp + "mlp.up_proj.weight"] = a[f"{i}.up"]
            state[lp + "mlp.gate_proj.weight"] = a[f"{i}.gate"]
            state[lp + "mlp.down_proj.weight"] = a[f"{i}.down.w"]
            state[lp + "mlp.down_proj.bias"] = a[f"{i}.down.b"]
            state[lp + "post_attention_layernorm.weight"] = a[f"{i}.attn_ln.w"]
            state[lp + "post_attention_layernorm.bias"] = a[f"{i}.attn_ln.b"]
            state[lp + "post_mlp_layernorm.weight"] = a[f"{i}.mlp_ln.w"]
            state[lp + "post_mlp_layernorm.bias"] = a[f"{i}.mlp_ln.b"]
        state["lm_head.layer_norm.weight"] = a["head_ln.w"]
        state["lm_head.layer_norm.bias"] = a["head_ln.b"]
    if layout == "new":
        config: dict[str, Any] = {
            "architectures": ["NewForMaskedLM"],
            "model_type": "new",
            **shape,
            "layer_norm_type": "layer_norm",
            "position_embedding_type": "rope",
            "rope_theta": THETA,
            "rope_scaling": {"factor": NTK, "type": "ntk"},
            "pack_qkv": True,
            "unpad_inputs": False,
            "use_memory_efficient_attention": False,
        }
    else:
        theta, scale = ntk_rope(THETA, NTK, HEAD)
        config = {
            "architectures": ["GteForMaskedLM"],
            "model_type": "gte",
            **shape,
            "rope_parameters": {"rope_type": "linear", "factor": scale, "rope_theta": theta},
            "tie_word_embeddings": True,
        }
    state["lm_head.dense.weight"] = a["head.w"]
    state["lm_head.dense.bias"] = a["head.b"]
    state["lm_head.decoder.bias"] = a["decoder.b"]
    for name in drop:
        del state[name]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config | (config_changes or {})))
    save_file(state, str(folder / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_src / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def new_layout(tmp_path_factory: pytest.TempPathFactory, wordpiece_dir: Path) -> Path:
    return _random_gte_checkpoint(tmp_path_factory.mktemp("gte-new"), wordpiece_dir, "new")


@pytest.fixture(scope="module")
def gte_layout(tmp_path_factory: pytest.TempPathFactory, wordpiece_dir: Path) -> Path:
    return _random_gte_checkpoint(
        tmp_path_factory.mktemp("gte-native"), wordpiece_dir, "gte", type_vocab_size=1
    )


@pytest.fixture(scope="module")
def gte_split_layout(tmp_path_factory: pytest.TempPathFactory, wordpiece_dir: Path) -> Path:
    return _random_gte_checkpoint(
        tmp_path_factory.mktemp("gte-split"), wordpiece_dir, "gte-split", type_vocab_size=1
    )


def _run(model: onnx.ModelProto, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]  # type: ignore[no-any-return]


# ------------------------------------------------------------------------ reading, both layouts


def test_ntk_scaling_is_new_impl_s() -> None:
    """gte-base-en-v1.5: theta 500000, NTK factor 2, head 64. new-impl's inverse frequencies
    (1 / (theta * f) ** (2i / 64) / f ** (2 / 64), as its NTKScalingRotaryEmbedding builds them:
    computed by hand from its code, first four and last) are ours: the angle of position p is
    p / scale * theta' ** (-2i / 64)."""
    theta, scale = ntk_rope(THETA, NTK, 64)
    assert theta == 1_000_000.0 and scale == pytest.approx(1.0218971486541166, abs=1e-15)
    inv_freq = theta ** (-np.arange(0, 64, 2) / 64) / scale
    np.testing.assert_allclose(
        inv_freq[[0, 1, 2, 3, 31]],
        [0.97857206, 0.63546672, 0.41266042, 0.26797409, 1.50692908e-06],
        rtol=1e-7,
    )
    # factor <= 1: new-impl never rebuilds its cache, so plain RoPE
    assert ntk_rope(THETA, 1.0, 64) == (THETA, 1.0)


def test_all_layouts_read_as_one_network(
    new_layout: Path, gte_layout: Path, gte_split_layout: Path
) -> None:
    new, gte, split = (load_masked_lm(p) for p in (new_layout, gte_layout, gte_split_layout))
    assert (new.config.architecture, gte.config.architecture) == (
        "NewForMaskedLM",
        "GteForMaskedLM",
    )
    assert split.config == gte.config
    for c in (new.config, gte.config):
        assert c.rotary and c.gated_mlp and c.vocab_size == VOCAB
        assert c.rope_theta == pytest.approx(THETA * NTK)
        assert c.rope_position_scale == pytest.approx(NTK ** (2 / HEAD))
        assert (c.max_length, c.default_length, c.pad_token_id) == (POSITIONS, POSITIONS, 0)
    assert new.position_embeddings is None and gte.position_embeddings is None
    assert new.token_type_embedding is None  # type_vocab_size 0, like gte-base-en-v1.5
    assert gte.token_type_embedding is not None and split.token_type_embedding is not None
    np.testing.assert_array_equal(gte.token_type_embedding, split.token_type_embedding)
    assert new.decoder_weight is new.word_embeddings  # tied: not in the file
    for other in (gte, split):
        np.testing.assert_array_equal(new.head_norm.gamma, other.head_norm.gamma)
        for a, b in zip(new.layers, other.layers, strict=True):
            for role in ("query", "key", "value", "attention_output", "ffn_in", "ffn_out"):
                np.testing.assert_array_equal(getattr(a, role).weight, getattr(b, role).weight)
                np.testing.assert_array_equal(getattr(a, role).bias, getattr(b, role).bias)
            assert a.ffn_gate is not None and b.ffn_gate is not None
            np.testing.assert_array_equal(a.ffn_gate.weight, b.ffn_gate.weight)
            np.testing.assert_array_equal(a.attention_norm.beta, b.attention_norm.beta)
            np.testing.assert_array_equal(a.output_norm.gamma, b.output_norm.gamma)
    # q | k | v really are the thirds of qkv_proj, up | gate the halves of up_gate_proj
    state = read_safetensors(new_layout / "model.safetensors")
    qkv = state["new.encoder.layer.1.attention.qkv_proj.weight"]
    np.testing.assert_array_equal(new.layers[1].key.weight, qkv[H : 2 * H])
    up_gate = state["new.encoder.layer.1.mlp.up_gate_proj.weight"]
    assert new.layers[1].ffn_gate is not None
    np.testing.assert_array_equal(new.layers[1].ffn_gate.weight, up_gate[INTER:])


# ------------------------------------------------------------------- graph vs numpy reference


@pytest.mark.parametrize(
    "options",
    [
        GraphOptions(),
        GraphOptions(attention="mha", bias_gelu=True, skip_layernorm=True),
        GraphOptions(attention="mha", mask_as_lengths=True, vocab_chunks=1),
        GraphOptions.standard(),
    ],
    ids=["default", "contrib-ops", "mha-lengths", "standard-ops"],
)
@pytest.mark.parametrize("layout", ["new", "gte"])
def test_gte_graph_matches_numpy_reference(
    layout: str,
    options: GraphOptions,
    new_layout: Path,
    gte_layout: Path,
    wordpiece_dir: Path,
) -> None:
    weights = load_masked_lm({"new": new_layout, "gte": gte_layout}[layout])
    ids, mask = _full_batch(wordpiece_dir)
    ref = splade_vectors(weights, ids, mask, DOUBLE_LOG)
    got = _run(build_graph(weights, options, pooling=DOUBLE_LOG), ids, mask)
    assert got.shape == (len(ids), VOCAB)
    assert (ref > 0).sum(axis=1).min() > 5
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)


def test_rotary_positions_and_ntk_scaling_change_the_output(
    new_layout: Path, wordpiece_dir: Path
) -> None:
    """The reference test above would not see a RoPE bug if positions did not matter: without
    rotation, or without the NTK scale, the vectors differ."""
    weights = load_masked_lm(new_layout)
    ids, mask = _full_batch(wordpiece_dir)
    ref = splade_vectors(weights, ids, mask, DOUBLE_LOG)
    for change in ({"rotary": False}, {"rope_position_scale": 1.0}, {"rope_theta": THETA}):
        other = replace(weights, config=replace(weights.config, **change))
        assert np.abs(splade_vectors(other, ids, mask, DOUBLE_LOG) - ref).max() > 1e-2, change


def test_synthetic_gte_shapes_export_and_match_the_reference(
    tmp_path: Path, wordpiece_dir: Path
) -> None:
    """encoder.synthetic: GTE_BASE is doc-v3-gte's shape (not built here: 137M parameters);
    GTE_TINY's random weights export (padded vocabulary dropped) and match the reference."""
    from encoder.synthetic import GTE_BASE, GTE_TINY, random_masked_lm

    c = GTE_BASE
    assert (c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size) == (768, 12, 12, 3072)
    assert (c.vocab_size, c.max_length, c.default_length, c.type_vocab_size) == (
        VOCAB,
        8192,
        512,
        0,
    )
    assert (
        c.rotary
        and c.gated_mlp
        and (c.rope_theta, c.rope_position_scale) == ntk_rope(THETA, NTK, 64)
    )
    weights = random_masked_lm(GTE_TINY, seed=2, active_fraction=0.05)
    assert weights.position_embeddings is None and weights.layers[0].ffn_gate is not None
    meta = export_model(
        wordpiece_dir, tmp_path / "out", weights=weights, quantize="none", pooling=DOUBLE_LOG
    )
    assert (meta.vocab_size, meta.max_length) == (TOKENS, 64)
    ids, mask = _full_batch(wordpiece_dir)
    session = ort.InferenceSession(
        str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    ref = splade_vectors(drop_vocabulary_rows(weights, TOKENS), ids, mask, DOUBLE_LOG)
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)


def test_double_log_pooling_is_log1p_of_splade(wordpiece_dir: Path) -> None:
    """The pooling option on a BERT graph: log1p of the usual SPLADE weights."""
    weights = load_masked_lm(wordpiece_dir)
    ids, mask = _batch(wordpiece_dir, TEXTS, 512)
    single = _run(build_graph(weights), ids, mask)
    double = _run(build_graph(weights, pooling=DOUBLE_LOG), ids, mask)
    np.testing.assert_allclose(double, np.log1p(single), atol=1e-6)
    with pytest.raises(ValueError, match="pooling must be one of"):
        build_graph(weights, pooling="mean")  # type: ignore[arg-type]


def test_com_microsoft_attention_is_refused_for_rotary(new_layout: Path) -> None:
    with pytest.raises(ValueError, match="rotary embeddings need the queries and keys"):
        build_graph(load_masked_lm(new_layout), GraphOptions(attention="attention"))


# ------------------------------------------------------------------------ export and runtime


def _with_special_biases(folder: Path, out: Path, boost: float) -> Path:
    """A copy of ``folder`` where the special tokens (and the 6 padded rows) have the largest
    biases of the vocabulary: the model gives them weight, the outputs must not."""
    shutil.copytree(folder, out)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    state = read_safetensors(folder / "model.safetensors")
    bias = state["lm_head.decoder.bias"].copy()
    bias[[tok.token_to_id(t) for t in SPECIALS]] += boost
    bias[TOKENS:] += boost
    state["lm_head.decoder.bias"] = bias
    save_file(state, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def exported_gte(
    tmp_path_factory: pytest.TempPathFactory, new_layout: Path
) -> tuple[Path, Path, Any]:
    """(model folder, source folder, weights cut to the tokenizer): the new-impl layout with an
    idf.json, exported INT8 + FP32 with the double log and IDF queries."""
    root = tmp_path_factory.mktemp("gte-export")
    src = _with_special_biases(new_layout, root / "src", 20.0)
    idf = {"quick": 2.5, "fox": 4.0, "capital": 3.0, "france": 5.5, "[CLS]": 9.0}
    (src / "idf.json").write_text(json.dumps(idf))
    out = root / "model"
    export_model(
        src,
        out,
        name="tiny-gte",
        pooling=DOUBLE_LOG,
        query_mode="idf",
        license="Apache-2.0",
        window_overlap=8,
    )
    return out, src, drop_vocabulary_rows(load_masked_lm(src), TOKENS)


def test_gte_export_metadata(exported_gte: tuple[Path, Path, Any]) -> None:
    out, _, _ = exported_gte
    meta = read_metadata(out)
    assert meta.architecture == "NewForMaskedLM"
    assert (meta.vocab_size, meta.max_length, meta.pad_token_id) == (TOKENS, POSITIONS, 0)
    assert (meta.pooling, meta.query_mode, meta.files["idf"]) == (DOUBLE_LOG, "idf", "idf.json")
    assert "vocabulary 30528 -> 30522" in meta.graph
    assert meta.fidelity is not None and meta.fidelity.mean_cosine > 0.98
    for name in ("model.onnx", "model.fp32.onnx"):  # the padded columns are gone from the graph
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        assert session.get_outputs()[0].shape == ["batch", TOKENS]
    fp32 = onnx.load(str(out / "model.fp32.onnx"))
    tables = {i.name.rsplit("_", 1)[0]: list(i.dims) for i in fp32.graph.initializer}
    assert tables["rope.cos"] == tables["rope.sin"] == [POSITIONS, HEAD // 2]
    ops = {n.op_type for n in fp32.graph.node}
    assert {"RotaryEmbedding", "Attention", "Split", "Mul"} <= ops


def test_gte_runtime_matches_reference_without_special_tokens(
    exported_gte: tuple[Path, Path, Any],
) -> None:
    out, _, weights = exported_gte
    enc = SparseEncoder.load(out, model_file="model.fp32.onnx", long_text="truncate")
    assert enc._pad_id == 0 and enc.window_tokens == POSITIONS - 2
    texts = [LONG_TEXT, *TEXTS[:3]]
    vecs = enc.encode_documents(texts)
    ids, mask = _batch(out, texts, POSITIONS)
    ref = splade_vectors(weights, ids, mask, DOUBLE_LOG)
    special_ids = [enc._tok.token_to_id(t) for t in SPECIALS]
    assert (ref[:, special_ids] > 1.0).all()  # the model gives them weight: the runtime drops it
    for row, vec in enumerate(vecs):
        assert vec and not (vec.keys() & set(SPECIALS))
        expected = {
            enc._tok.id_to_token(i): float(v)
            for i, v in enumerate(ref[row])
            if v > 0
            and enc._tok.id_to_token(i) not in SPECIALS
            and not enc._tok.id_to_token(i).startswith("[unused")
        }
        assert vec.keys() == expected.keys()
        for token, value in vec.items():
            assert value == pytest.approx(expected[token], abs=2e-4)
    # right padding, positions from 0 on every row: each text alone gives the same vector (to
    # float rounding: ONNX Runtime's GEMMs round differently for 4 x 64 rows than for 1 x 12,
    # for a BERT-style MLP without rotation as well)
    for text, vec in zip(texts, vecs, strict=True):
        [alone] = enc.encode_documents([text])
        assert alone.keys() == vec.keys()
        assert max(abs(alone[k] - vec[k]) for k in vec) < 1e-6
    # INT8 close to FP32
    int8 = SparseEncoder.load(out, long_text="truncate")
    for a, b in zip(int8.encode_documents(texts), vecs, strict=True):
        keys = sorted(a.keys() | b.keys())
        va = np.array([a.get(k, 0.0) for k in keys])
        vb = np.array([b.get(k, 0.0) for k in keys])
        assert va @ vb / np.linalg.norm(va) / np.linalg.norm(vb) > 0.98


def test_gte_queries_are_inference_free_idf(exported_gte: tuple[Path, Path, Any]) -> None:
    out, _, _ = exported_gte
    enc = SparseEncoder.load(out)
    [q1, q2] = enc.encode_queries(["quick quick fox jumps", "capital of France"])
    assert q1 == {"quick": 2.5, "fox": 4.0}  # tokens without an idf weight are dropped
    assert q2 == {"capital": 3.0, "france": 5.5}


def test_runtime_refuses_a_pooling_it_does_not_know(
    exported_gte: tuple[Path, Path, Any], tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(exported_gte[0], folder)
    meta = json.loads((folder / "sparse_model.json").read_text())
    (folder / "sparse_model.json").write_text(json.dumps({**meta, "pooling": "splade_mean"}))
    with pytest.raises(ModelError, match=r"pooling 'splade_mean' is not supported"):
        SparseEncoder.load(folder)


def test_gte_default_and_explicit_max_length(tmp_path: Path, wordpiece_dir: Path) -> None:
    """GTE takes 8192 positions; the export defaults to 512 (RoPE tables of 512 rows), a longer
    one is asked for, and more than the config's positions is refused."""
    src = _random_gte_checkpoint(tmp_path / "src", wordpiece_dir, "gte", max_positions=8192)
    (src / "tokenizer_config.json").unlink()  # its model_max_length (512) would decide
    assert read_config(src).max_length == 8192
    meta = export_model(src, tmp_path / "default", quantize="none")
    assert meta.max_length == 512
    meta = export_model(src, tmp_path / "long", quantize="none", max_length=1024)
    assert meta.max_length == 1024
    model = onnx.load(str(tmp_path / "long" / "model.onnx"))
    rows = {i.name.rsplit("_", 1)[0]: i.dims[0] for i in model.graph.initializer}
    assert rows["rope.cos"] == 1024
    enc = SparseEncoder.load(tmp_path / "long")
    assert enc.window_tokens == 1022
    with pytest.raises(ModelError, match=r"max_length 9000: the model takes 16 to 8192"):
        export_model(src, tmp_path / "x", quantize="none", max_length=9000)


def test_gte_cli_export_options(
    tmp_path: Path, new_layout: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``model export --pooling --max-length`` for a folder of one's own (no registry entry)."""
    out = tmp_path / "out"
    argv = ["model", "export", str(new_layout), str(out), "--quantize", "none"]
    assert _cli([*argv, "--pooling", DOUBLE_LOG, "--max-length", "32"]) == 0
    assert "exported gte-new" in capsys.readouterr().out
    meta = read_metadata(out)
    assert (meta.pooling, meta.max_length, meta.window_overlap) == (DOUBLE_LOG, 32, 8)
    assert _cli([*argv, "--max-length", "65"]) == 1
    assert "max_length 65: the model takes 16 to 64 tokens" in capsys.readouterr().err
    assert _cli([*argv]) == 0
    assert read_metadata(out).pooling == "splade_max"


def test_doc_v3_folder_pooling_from_sentence_transformers_or_a_warning(
    tmp_path: Path,
    new_layout: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A folder like doc-v3-gte's (GTE with an idf.json) exported without --model or --pooling:
    its Sentence Transformers SpladePooling config says the pooling (``log1p_relu``: log1p is
    taken twice); without one, a warning says which flags to pass."""
    src = tmp_path / "src"
    shutil.copytree(new_layout, src)
    (src / "idf.json").write_text(json.dumps({"quick": 2.5}))
    argv = ["model", "export", str(src), str(tmp_path / "a"), "--quantize", "none"]
    with caplog.at_level("WARNING", logger="encoder.export"):
        assert _cli(argv) == 0
    assert read_metadata(tmp_path / "a").pooling == "splade_max"
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "looks like an OpenSearch v3 doc model" in warning
    assert "--model opensearch-neural-sparse-encoding-doc-v3-gte" in warning
    assert "--pooling splade_max_log1p_log1p" in warning

    pooling = src / "document_1_SpladePooling"  # the Router layout of doc-v3-gte
    pooling.mkdir()
    st = {"pooling_strategy": "max", "activation_function": "log1p_relu"}
    (pooling / "config.json").write_text(json.dumps(st | {"word_embedding_dimension": 30522}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="encoder.export"):
        assert _cli([*argv[:3], str(tmp_path / "b"), *argv[4:]]) == 0
    assert read_metadata(tmp_path / "b").pooling == DOUBLE_LOG
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    capsys.readouterr()
    # the flag still decides
    assert _cli([*argv[:3], str(tmp_path / "c"), *argv[4:], "--pooling", "splade_max"]) == 0
    assert read_metadata(tmp_path / "c").pooling == "splade_max"

    from encoder.export import sentence_transformers_pooling

    (pooling / "config.json").write_text(json.dumps({"activation_function": "relu"}))
    assert sentence_transformers_pooling(src) == "splade_max"  # max is the default strategy
    (pooling / "config.json").write_text(json.dumps({"pooling_strategy": "sum"}))
    with pytest.raises(ModelError, match=r"pooling_strategy 'sum' is not supported"):
        sentence_transformers_pooling(src)
    (pooling / "config.json").write_text(json.dumps(st))
    (src / "1_SpladePooling").mkdir()
    (src / "1_SpladePooling" / "config.json").write_text(json.dumps({"pooling_strategy": "max"}))
    with pytest.raises(ModelError, match=r"SpladePooling modules disagree"):
        sentence_transformers_pooling(src)


# --------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"logn_attention_scale": True}, r"logn_attention_scale True is not supported"),
        ({"layer_norm_type": "rms_norm"}, r"layer_norm_type 'rms_norm' is not supported"),
        ({"position_embedding_type": "absolute"}, r"position_embedding_type 'absolute'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_scaling type 'dynamic'"),
        (
            {"rope_scaling": {"type": "ntk", "factor": 2.0, "mixed_b": 0.5}},
            r"rope_scaling\.mixed_b",
        ),
        ({"hidden_act": "swish"}, r"activation 'swish' is not supported"),
    ],
)
def test_new_impl_config_errors(
    changes: dict[str, Any], message: str, tmp_path: Path, wordpiece_dir: Path
) -> None:
    src = _random_gte_checkpoint(tmp_path, wordpiece_dir, "new", config_changes=changes)
    with pytest.raises(ModelError, match=message):
        read_config(src)


def test_native_gte_config_errors(tmp_path: Path, wordpiece_dir: Path) -> None:
    yarn = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}
    src = _random_gte_checkpoint(tmp_path / "yarn", wordpiece_dir, "gte", config_changes=yarn)
    with pytest.raises(ModelError, match=r"rope_parameters rope_type 'yarn' is not supported"):
        read_config(src)
    # no rope_parameters: transformers' older top-level keys, then GteConfig's defaults
    legacy = {"rope_parameters": None, "rope_theta": 20000.0}
    src = _random_gte_checkpoint(tmp_path / "legacy", wordpiece_dir, "gte", config_changes=legacy)
    cfg = read_config(src)
    assert (cfg.rope_theta, cfg.rope_position_scale) == (20000.0, 1.0)


def test_gte_weight_errors(tmp_path: Path, wordpiece_dir: Path) -> None:
    src = _random_gte_checkpoint(
        tmp_path / "a", wordpiece_dir, "new", drop=("new.encoder.layer.1.mlp.up_gate_proj.weight",)
    )
    with pytest.raises(ModelError, match=r"encoder\.layer\.1\.mlp\.up_gate_proj\.weight"):
        load_masked_lm(src)
    src = _random_gte_checkpoint(
        tmp_path / "b", wordpiece_dir, "new", config_changes={"intermediate_size": 48}
    )
    with pytest.raises(ModelError, match=r"up_gate_proj\.weight has 128 rows, .* 2 x 48"):
        load_masked_lm(src)
    # token types declared but absent
    src = _random_gte_checkpoint(
        tmp_path / "c", wordpiece_dir, "gte", config_changes={"type_vocab_size": 2}
    )
    with pytest.raises(ModelError, match=r"token_type_embeddings\.weight"):
        load_masked_lm(src)
    # the decoder said untied, and not in the file
    src = _random_gte_checkpoint(
        tmp_path / "d", wordpiece_dir, "new", config_changes={"tie_word_embeddings": False}
    )
    with pytest.raises(ModelError, match=r"tie_word_embeddings false.*'lm_head\.decoder\.weight'"):
        load_masked_lm(src)


def test_only_a_small_padding_of_the_vocabulary_is_dropped(
    tmp_path: Path, wordpiece_dir: Path, new_layout: Path
) -> None:
    """30528 rows for 30522 tokens is GTE's padding; a tokenizer 64 or more tokens short is
    another model's, and BERT's vocabulary is never padded."""
    weights = load_masked_lm(new_layout)
    big = replace(
        weights,
        config=replace(weights.config, vocab_size=TOKENS + 64),
        word_embeddings=np.zeros((TOKENS + 64, H), np.float32),
        decoder_weight=np.zeros((TOKENS + 64, H), np.float32),
        decoder_bias=np.zeros(TOKENS + 64, np.float32),
    )
    with pytest.raises(ModelError, match=r"30522 tokens but the model's vocabulary is 30586"):
        export_model(new_layout, tmp_path / "a", weights=big, quantize="none")
    bert = load_masked_lm(wordpiece_dir)
    padded_bert = replace(
        bert,
        config=replace(bert.config, vocab_size=VOCAB),
        word_embeddings=np.zeros((VOCAB, bert.config.hidden_size), np.float32),
        decoder_weight=np.zeros((VOCAB, bert.config.hidden_size), np.float32),
        decoder_bias=np.zeros(VOCAB, np.float32),
    )
    with pytest.raises(ModelError, match=r"30522 tokens but the model's vocabulary is 30528"):
        export_model(wordpiece_dir, tmp_path / "b", weights=padded_bert, quantize="none")


# ------------------------------------------------------------------------------- registry


def _cli(argv: list[str]) -> int:
    import argparse

    from encoder.cli import add_subcommands

    parser = argparse.ArgumentParser(prog="sparse-ingest")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_doc_v3_gte_registry_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from encoder.registry import LocalFolderSource, get_model_description

    desc = get_model_description("opensearch-neural-sparse-encoding-doc-v3-gte")
    assert isinstance(desc.source, LocalFolderSource)
    hf_id = "opensearch-project/opensearch-neural-sparse-encoding-doc-v3-gte"
    assert desc.source.hf_id == hf_id and desc.homepage == f"https://huggingface.co/{hf_id}"
    assert (desc.architecture, desc.vocab_size, desc.hidden_size, desc.num_layers) == (
        "NewForMaskedLM",
        TOKENS,
        768,
        12,
    )
    assert (desc.license, desc.query_mode, desc.pooling, desc.max_length) == (
        "Apache-2.0",
        "idf",
        DOUBLE_LOG,
        512,
    )
    assert "idf.json" in desc.files
    monkeypatch.setenv("SPARSE_INGEST_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "sources" / desc.name
    assert _cli(["model", "export", desc.name, str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{folder} does not exist" in err
    assert (
        f"hf download {hf_id} config.json model.safetensors tokenizer.json "
        f"tokenizer_config.json idf.json --local-dir {folder}"
    ) in err


def test_gte_registry_model_fetches_with_its_pooling_and_queries(
    tmp_path: Path, wordpiece_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry entry like doc-v3-gte's, of a tiny checkpoint's shape: the folder check takes
    the padded 30528-row vocabulary for the registry's 30522, and the export gets the entry's
    double log and IDF queries."""
    from encoder import registry
    from encoder.fetch import fetch_model

    src = _random_gte_checkpoint(tmp_path / "download", wordpiece_dir, "new")
    (src / "idf.json").write_text(json.dumps({"fox": 3.0}))
    desc = replace(
        registry.OPENSEARCH_DOC_V3_GTE,
        name="tiny-doc-v3-gte",
        source=registry.LocalFolderSource(hf_id="example/tiny-doc-v3-gte"),
        hidden_size=H,
        num_layers=LAYERS,
        max_length=POSITIONS,
    )
    monkeypatch.setitem(registry.MODELS, desc.name, desc)
    monkeypatch.setenv("SPARSE_INGEST_CACHE", str(tmp_path / "cache"))
    dest = fetch_model(desc.name, tmp_path / "model", src)
    meta = read_metadata(dest)
    assert (meta.pooling, meta.query_mode, meta.vocab_size) == (DOUBLE_LOG, "idf", TOKENS)
    assert SparseEncoder.load(dest).encode_queries(["the fox"]) == [{"fox": 3.0}]


# ------------------------------------------------------------ optional: transformers/PyTorch


def _have_native_gte() -> bool:
    if (
        importlib.util.find_spec("torch") is None
        or importlib.util.find_spec("transformers") is None
    ):
        return False
    return importlib.util.find_spec("transformers.models.gte") is not None


@pytest.mark.skipif(not _have_native_gte(), reason="optional; needs torch + transformers >= 5.18")
@pytest.mark.parametrize("rope", ["default", "ntk"])
def test_gte_matches_transformers(
    rope: str, tmp_path: Path, wordpiece_dir: Path
) -> None:  # pragma: no cover
    """transformers' own GteForMaskedLM, built from a small GteConfig with random weights and
    saved with save_pretrained, exported by us (FP32, double log), against its logits pooled the
    doc-v3-gte way (max over the masked positions, log1p(log1p(relu)), the 6 padded columns
    dropped) on a padded batch that fills every position. ``ntk``: gte-base's RoPE (theta 500000,
    NTK factor 2) as the native port expresses it (linear, factor 2 ** (2 / head), theta 1e6)."""
    import torch
    from transformers import GteConfig, GteForMaskedLM

    theta, scale = ntk_rope(THETA, NTK, HEAD) if rope == "ntk" else (160_000.0, 1.0)
    rope_parameters = (
        {"rope_type": "linear", "factor": scale, "rope_theta": theta}
        if rope == "ntk"
        else {"rope_type": "default", "rope_theta": theta}
    )
    config = GteConfig(
        vocab_size=VOCAB,
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTER,
        max_position_embeddings=POSITIONS,
        type_vocab_size=1 if rope == "ntk" else 0,
        pad_token_id=0,
        layer_norm_eps=1e-12,
        rope_parameters=rope_parameters,
    )
    torch.manual_seed(0)
    model = GteForMaskedLM(config).eval()
    with torch.no_grad():  # weights as wide as a trained model's (the init's 0.02 gives ~0 logits)
        for name, param in model.named_parameters():
            value = torch.randn_like(param) * 0.2
            if name.endswith(("LayerNorm.weight", "layernorm.weight", "layer_norm.weight")):
                value += 1
            elif param.dim() == 1 and param.shape[0] == VOCAB:  # the decoder bias: sparse output
                value *= 25
            param.copy_(value)
    src = tmp_path / "src"
    model.save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(wordpiece_dir / name, src / name)
    cfg = read_config(src)
    assert cfg.rope_theta == pytest.approx(theta)
    assert cfg.rope_position_scale == pytest.approx(scale)
    meta = export_model(src, tmp_path / "out", quantize="none", pooling=DOUBLE_LOG)
    assert (meta.architecture, meta.max_length, meta.vocab_size) == (
        "GteForMaskedLM",
        POSITIONS,
        TOKENS,
    )
    ids, mask = _full_batch(wordpiece_dir)
    with torch.no_grad():
        logits = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).logits[..., :TOKENS]
    pooled = (logits * torch.from_numpy(mask)[..., None]).amax(1)
    expected = torch.log1p(torch.log1p(torch.relu(pooled))).numpy()
    session = ort.InferenceSession(
        str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    print(
        f"GteForMaskedLM ({rope} RoPE): max abs diff {np.abs(got - expected).max():.2e} "
        f"({(expected > 0).sum()} non-zero weights of {expected.size})"
    )
    assert (expected > 0).sum(axis=1).min() > 5
    assert math.isfinite(float(got.max()))
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)
