"""The exporter against the plain numpy reference, checkpoint reading, and exporter errors."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import pickle
import shutil
import sys
import types
import zipfile
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import trained_tokenizers
from safetensors.numpy import save_file
from trained_tokenizers import train_roberta_tokenizer, train_xlmr_tokenizer

from encoder import EncodeStats, ModelError, SparseEncoder
from encoder.batching import window_starts
from encoder.checkpoint import load_masked_lm, read_safetensors, read_torch_zip
from encoder.export import export_model
from encoder.features import es_feature_token
from encoder.fetch import fetch_default_model, fetch_source
from encoder.graph import GraphOptions, build_graph
from encoder.metadata import read_metadata
from encoder.reference import mlm_logits, splade_vectors
from encoder.registry import DEFAULT_MODEL_NAME

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "what is the capital of france",
    "Vitamin D deficiency is associated with respiratory infections in children.",
    "a",
]
VOCAB = 30522


@pytest.fixture(scope="session")
def source_dir() -> Path:
    return fetch_source(DEFAULT_MODEL_NAME)


def _batch(
    src: Path, texts: list[str], pad_id: int = 0, max_length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``input_ids`` and ``attention_mask``, special tokens included (texts cut to
    ``max_length`` tokens, the last one kept: ``</s>`` or ``[SEP]``)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    encs = [e.ids for e in tok.encode_batch(texts)]
    if max_length is not None:
        encs = [e if len(e) <= max_length else e[: max_length - 1] + e[-1:] for e in encs]
    width = max(len(e) for e in encs)
    ids = np.full((len(texts), width), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encs):
        ids[i, : len(e)] = e
        mask[i, : len(e)] = 1
    return ids, mask


def _run(model: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]  # type: ignore[no-any-return]


def _random_checkpoint(
    folder: Path, tokenizer_src: Path, arch: str, *, old_norm_names: bool = False, seed: int = 0
) -> Path:
    """A tiny random BERT or DistilBERT masked-LM checkpoint (safetensors) with a real tokenizer."""
    rng = np.random.default_rng(seed)
    h, inter, layers, heads, pos = 32, 64, 2, 4, 512

    def mat(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    def norm(prefix: str) -> dict[str, np.ndarray]:
        g, b = ("gamma", "beta") if old_norm_names else ("weight", "bias")
        return {f"{prefix}.{g}": 1 + mat(h) * 0.5, f"{prefix}.{b}": mat(h)}

    def lin(prefix: str, out: int, inp: int) -> dict[str, np.ndarray]:
        return {f"{prefix}.weight": mat(out, inp), f"{prefix}.bias": mat(out)}

    state: dict[str, np.ndarray] = {}
    if arch == "bert":
        config = {
            "architectures": ["BertForMaskedLM"],
            "model_type": "bert",
            "vocab_size": VOCAB,
            "hidden_size": h,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": inter,
            "max_position_embeddings": pos,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-12,
            "type_vocab_size": 2,
        }
        state["bert.embeddings.word_embeddings.weight"] = mat(VOCAB, h)
        state["bert.embeddings.position_embeddings.weight"] = mat(pos, h)
        state["bert.embeddings.token_type_embeddings.weight"] = mat(2, h)
        state |= norm("bert.embeddings.LayerNorm")
        for i in range(layers):
            p = f"bert.encoder.layer.{i}."
            for name in ("query", "key", "value"):
                state |= lin(p + f"attention.self.{name}", h, h)
            state |= lin(p + "attention.output.dense", h, h)
            state |= norm(p + "attention.output.LayerNorm")
            state |= lin(p + "intermediate.dense", inter, h)
            state |= lin(p + "output.dense", h, inter)
            state |= norm(p + "output.LayerNorm")
        state |= lin("cls.predictions.transform.dense", h, h)
        state |= norm("cls.predictions.transform.LayerNorm")
        state["cls.predictions.decoder.weight"] = mat(VOCAB, h)  # untied
        state["cls.predictions.bias"] = mat(VOCAB) * 5
    else:
        config = {
            "architectures": ["DistilBertForMaskedLM"],
            "model_type": "distilbert",
            "vocab_size": VOCAB,
            "dim": h,
            "n_layers": layers,
            "n_heads": heads,
            "hidden_dim": inter,
            "max_position_embeddings": pos,
            "activation": "gelu",
        }
        state["distilbert.embeddings.word_embeddings.weight"] = mat(VOCAB, h)
        state["distilbert.embeddings.position_embeddings.weight"] = mat(pos, h)
        state |= norm("distilbert.embeddings.LayerNorm")
        for i in range(layers):
            p = f"distilbert.transformer.layer.{i}."
            for name in ("q_lin", "k_lin", "v_lin", "out_lin"):
                state |= lin(p + f"attention.{name}", h, h)
            state |= norm(p + "sa_layer_norm")
            state |= lin(p + "ffn.lin1", inter, h)
            state |= lin(p + "ffn.lin2", h, inter)
            state |= norm(p + "output_layer_norm")
        state |= lin("vocab_transform", h, h)
        state |= norm("vocab_layer_norm")
        state["vocab_projector.bias"] = mat(VOCAB) * 5  # weight tied to the word embeddings
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"))
    shutil.copy(tokenizer_src / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def random_bert(tmp_path_factory: pytest.TempPathFactory, source_dir: Path) -> Path:
    return _random_checkpoint(tmp_path_factory.mktemp("bert"), source_dir, "bert")


@pytest.fixture(scope="module")
def random_distilbert(tmp_path_factory: pytest.TempPathFactory, source_dir: Path) -> Path:
    return _random_checkpoint(tmp_path_factory.mktemp("distil"), source_dir, "distilbert")


# ------------------------------------------------------------------- graph vs numpy reference


@pytest.mark.parametrize(
    "options",
    [
        GraphOptions(),
        GraphOptions(attention="mha", bias_gelu=True, skip_layernorm=True),
        GraphOptions(attention="attention", mask_as_lengths=True),
        GraphOptions(attention="mha", mask_as_lengths=True, vocab_chunks=1),
        GraphOptions.standard(),
    ],
    ids=["default", "contrib-ops", "attention-op", "mha-lengths", "standard-ops"],
)
@pytest.mark.parametrize("which", ["default", "bert", "distilbert"])
def test_graph_matches_numpy_reference(
    which: str, options: GraphOptions, source_dir: Path, random_bert: Path, random_distilbert: Path
) -> None:
    src = {"default": source_dir, "bert": random_bert, "distilbert": random_distilbert}[which]
    weights = load_masked_lm(src)
    ids, mask = _batch(src, TEXTS)  # padded batch: masking is exercised
    ref = splade_vectors(weights, ids, mask)
    got = _run(build_graph(weights, options), ids, mask)
    assert got.shape == (len(TEXTS), VOCAB)
    assert (ref > 0).sum(axis=1).min() > 5
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)


def test_logits_head_matches_reference(random_bert: Path) -> None:
    weights = load_masked_lm(random_bert)
    ids, mask = _batch(random_bert, TEXTS[:2])
    got = _run(build_graph(weights, GraphOptions(head="logits")), ids, mask)
    np.testing.assert_allclose(got, mlm_logits(weights, ids, mask), atol=2e-4, rtol=1e-4)


def test_vocab_chunks_do_not_change_output(random_bert: Path) -> None:
    weights = load_masked_lm(random_bert)
    ids, mask = _batch(random_bert, TEXTS)
    one = _run(build_graph(weights, GraphOptions(vocab_chunks=1)), ids, mask)
    many = _run(build_graph(weights, GraphOptions(vocab_chunks=7)), ids, mask)
    np.testing.assert_array_equal(one, many)


def test_old_and_new_layernorm_names_load_the_same(tmp_path: Path, source_dir: Path) -> None:
    new = load_masked_lm(_random_checkpoint(tmp_path / "new", source_dir, "bert", seed=3))
    old = load_masked_lm(
        _random_checkpoint(tmp_path / "old", source_dir, "bert", seed=3, old_norm_names=True)
    )
    np.testing.assert_array_equal(new.layers[1].output_norm.gamma, old.layers[1].output_norm.gamma)
    np.testing.assert_array_equal(new.head_norm.beta, old.head_norm.beta)


def test_default_checkpoint_ties_decoder_to_embeddings(source_dir: Path) -> None:
    w = load_masked_lm(source_dir)
    assert w.decoder_weight is w.word_embeddings
    assert w.config.architecture == "BertForMaskedLM" and w.config.num_layers == 2


# ------------------------------------------------------------------------ export, end to end


def test_export_distilbert_and_encode(tmp_path: Path, random_distilbert: Path) -> None:
    meta = export_model(random_distilbert, tmp_path / "out", name="tiny-distil")
    assert meta.architecture == "DistilBertForMaskedLM"
    assert meta.quantization.method == "dynamic"
    assert meta.fidelity is not None and meta.fidelity.mean_cosine > 0.98
    assert {"model.onnx", "model.fp32.onnx", "tokenizer.json", "sparse_model.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()
    }
    fp32 = SparseEncoder.load(tmp_path / "out", model_file="model.fp32.onnx")
    weights = load_masked_lm(random_distilbert)
    ids, mask = _batch(random_distilbert, TEXTS[:1])
    ref = splade_vectors(weights, ids, mask)[0]
    [vec] = fp32.encode_documents(TEXTS[:1])
    for token, value in vec.items():
        assert value == pytest.approx(ref[fp32._tok.token_to_id(token)], abs=2e-4)


def test_export_without_quantization(tmp_path: Path, random_bert: Path) -> None:
    meta = export_model(random_bert, tmp_path / "out", quantize="none")
    assert meta.quantization.method == "none" and meta.fidelity is None
    assert not (tmp_path / "out" / "model.fp32.onnx").exists()
    enc = SparseEncoder.load(tmp_path / "out")
    assert enc.metadata.quantization.label == "fp32"


def test_fp32_groups_keep_vocab_matmuls_in_fp32(tmp_path: Path, random_bert: Path) -> None:
    import onnx

    from encoder.export import QuantizeOptions

    meta = export_model(
        random_bert, tmp_path / "out", quantize_options=QuantizeOptions(fp32_groups=("vocab",))
    )
    assert meta.quantization.fp32_nodes == ("vocab",)
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    float_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    assert float_matmuls and all("vocab_logits" in n for n in float_matmuls)


def _ops_as_ort_runs(model_path: Path, tmp_path: Path) -> list[tuple[str, str]]:
    """(domain, op type) of each node of the graph ONNX Runtime runs after its optimizers, with
    the runtime's disabled ones (ORT_DISABLED_OPTIMIZERS)."""
    import onnx

    from encoder.graph import ORT_DISABLED_OPTIMIZERS

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / f"optimized.{model_path.name}")
    ort.InferenceSession(
        str(model_path),
        opts,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=ORT_DISABLED_OPTIMIZERS,
    )
    nodes = onnx.load(opts.optimized_model_filepath).graph.node
    return [(n.domain or "ai.onnx", n.op_type) for n in nodes]


def test_residual_layernorm_stays_unfused(tmp_path: Path) -> None:
    """Add + LayerNormalization in the export, and the sessions keep them so: ORT's
    SkipLayerNormalization CPU kernel is ~4x slower (docs/encoder.md, Exporter)."""
    import onnx

    from encoder.graph import ORT_DISABLED_OPTIMIZERS

    model_dir = fetch_default_model()
    for name in ("model.onnx", "model.fp32.onnx"):
        ops = {n.op_type for n in onnx.load(str(model_dir / name)).graph.node}
        assert "LayerNormalization" in ops and "SkipLayerNormalization" not in ops, name
        optimized = {op for _, op in _ops_as_ort_runs(model_dir / name, tmp_path)}
        assert "SkipLayerNormalization" not in optimized, name
    # what the runtime does, checked the same way: its session options carry the list
    assert "SkipLayerNormFusion" in ORT_DISABLED_OPTIMIZERS


def test_int8_session_runs_standard_attention_and_folds_biases(tmp_path: Path) -> None:
    """The INT8 graph as ONNX Runtime runs it: the standard Attention op, and every Q/K/V and FFN
    bias folded into its INT8 MatMul, so Gelu runs alone (BiasGelu is 1.3x slower) and no bias
    Add is left but the residual ones (docs/encoder.md, Quantization)."""
    model_dir = fetch_default_model()
    ops = _ops_as_ort_runs(model_dir / "model.onnx", tmp_path)
    layers = read_metadata(model_dir).num_layers
    assert ops.count(("ai.onnx", "Attention")) == layers
    assert ops.count(("ai.onnx", "Gelu")) == layers + 1  # + the masked-LM head transform
    assert not {"BiasGelu", "MultiHeadAttention"} & {op for _, op in ops}
    # per layer: the two residual Adds; then the embeddings' position Add and the pooled bias/+1
    assert ops.count(("ai.onnx", "Add")) == 2 * layers + 3


# ----------------------------------------------------------------------- checkpoint formats


def _fake_torch_modules() -> dict[str, types.ModuleType]:
    """Just enough of `torch` for pickle to write what torch.save writes."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args: Any) -> None:
        raise AssertionError("never called when writing")

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    torch.FloatStorage = FloatStorage  # type: ignore[attr-defined]
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    torch._utils = utils  # type: ignore[attr-defined]
    return {"torch": torch, "torch._utils": utils}


def _write_torch_zip(path: Path, state: dict[str, np.ndarray], monkeypatch: Any) -> None:
    """Write `state` in the zip layout of torch.save (archive/data.pkl + archive/data/N)."""
    mods = _fake_torch_modules()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    storage_cls = mods["torch"].FloatStorage  # type: ignore[attr-defined]
    rebuild = mods["torch._utils"]._rebuild_tensor_v2  # type: ignore[attr-defined]

    class Tensor:
        def __init__(self, key: str, arr: np.ndarray) -> None:
            self.key, self.arr = key, arr

        def __reduce__(self) -> Any:
            storage = ("storage", storage_cls, self.key, "cpu", self.arr.size)
            stride = tuple(s // 4 for s in self.arr.strides)
            return rebuild, (_Persistent(storage), 0, self.arr.shape, stride, False, OrderedDict())

    class _Persistent:
        def __init__(self, pid: tuple[Any, ...]) -> None:
            self.pid = pid

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return obj.pid if isinstance(obj, _Persistent) else None

    buf = io.BytesIO()
    tensors = OrderedDict(
        (k, Tensor(str(i), np.ascontiguousarray(v, np.float32)))
        for i, (k, v) in enumerate(state.items())
    )
    Pickler(buf, protocol=2).dump(tensors)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        for t in tensors.values():
            zf.writestr(f"archive/data/{t.key}", t.arr.tobytes())


def test_pytorch_bin_is_read_without_torch(
    tmp_path: Path, random_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = read_safetensors(random_bert / "model.safetensors")
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(random_bert / "config.json", folder)
    _write_torch_zip(folder / "pytorch_model.bin", state, monkeypatch)
    monkeypatch.undo()
    assert "torch" not in sys.modules
    got = read_torch_zip(folder / "pytorch_model.bin")
    assert got.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(got[k], state[k])
    assert load_masked_lm(folder).decoder_weight.shape == (VOCAB, 32)


def test_pytorch_bin_with_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(ModelError, match=r"os\.system is not allowed"):
        read_torch_zip(path)


def test_legacy_pytorch_bin_gives_conversion_hint(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelError, match="safetensors"):
        read_torch_zip(path)


def test_bf16_safetensors(tmp_path: Path) -> None:
    values = np.array([1.0, -2.5, 0.15625], np.float32)
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, len(raw)]}})
    blob = len(header).to_bytes(8, "little") + header.encode() + raw
    (tmp_path / "m.safetensors").write_bytes(blob)
    np.testing.assert_array_equal(read_safetensors(tmp_path / "m.safetensors")["w"], values)


# --------------------------------------------------------------------------------- errors


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["T5ForConditionalGeneration"]})
    )
    with pytest.raises(ModelError, match=r"not supported.*BertForMaskedLM"):
        load_masked_lm(tmp_path)


def test_missing_weights_and_tokenizer(tmp_path: Path, random_bert: Path) -> None:
    shutil.copy(random_bert / "config.json", tmp_path)
    with pytest.raises(ModelError, match=r"no model\.safetensors or pytorch_model\.bin"):
        load_masked_lm(tmp_path)
    with pytest.raises(ModelError, match=r"tokenizer\.json: missing"):
        export_model(tmp_path, tmp_path / "out")
    with pytest.raises(ModelError, match="not a folder"):
        load_masked_lm(tmp_path / "nope")


def test_missing_tensor_is_named(tmp_path: Path, random_bert: Path) -> None:
    state = read_safetensors(random_bert / "model.safetensors")
    del state["bert.encoder.layer.1.output.dense.weight"]
    shutil.copy(random_bert / "config.json", tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError, match=r"encoder\.layer\.1\.output\.dense\.weight"):
        load_masked_lm(tmp_path)


# ----------------------------------------------------------------------- RoBERTa and XLM-R

ROBERTA_ARCHS = {"roberta": "RobertaForMaskedLM", "xlm-roberta": "XLMRobertaForMaskedLM"}
POSITIONS = 66  # padding index 1, so 64 tokens: long texts need windows in a few hundred words
LONG = (
    "Sparse retrieval with learned term weights runs on an inverted index. "
    "Vitamin D deficiency is associated with respiratory infections in children. "
    "Kafka consumers commit offsets after the sink has acknowledged the documents.\n"
) * 6


@pytest.fixture(scope="module")
def roberta_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_roberta_tokenizer(tmp_path_factory.mktemp("roberta-tok"))


@pytest.fixture(scope="module")
def xlmr_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_xlmr_tokenizer(tmp_path_factory.mktemp("xlmr-tok"))


def _tokenizer_for(kind: str, request: pytest.FixtureRequest) -> Path:
    fixture = {"roberta": "roberta_tokenizer", "xlm-roberta": "xlmr_tokenizer"}[kind]
    return Path(request.getfixturevalue(fixture))


def _vocab_size(tokenizer_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(True)


def _random_roberta_checkpoint(
    folder: Path,
    tokenizer_src: Path,
    kind: str,
    *,
    seed: int = 0,
    untied: bool = False,
    config_changes: dict[str, Any] | None = None,
) -> Path:
    """A tiny random RobertaForMaskedLM / XLMRobertaForMaskedLM checkpoint, named as
    transformers saves it: ``roberta.`` + BERT's encoder, ``lm_head.{dense,layer_norm,bias}``,
    the decoder tied to the word embeddings (or, ``untied``, ``lm_head.decoder.weight`` and
    ``.bias``)."""
    rng = np.random.default_rng(seed)
    vocab, h, inter, layers, heads = _vocab_size(tokenizer_src), 32, 64, 2, 4

    def mat(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.weight": 1 + mat(h) * 0.5, f"{prefix}.bias": mat(h)}

    def lin(prefix: str, out: int, inp: int) -> dict[str, np.ndarray]:
        return {f"{prefix}.weight": mat(out, inp), f"{prefix}.bias": mat(out)}

    config: dict[str, Any] = {
        "architectures": [ROBERTA_ARCHS[kind]],
        "model_type": kind,
        "vocab_size": vocab,
        "hidden_size": h,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": inter,
        "max_position_embeddings": POSITIONS,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "type_vocab_size": 1,
        "pad_token_id": trained_tokenizers.PAD_ID,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "position_embedding_type": "absolute",
    } | (config_changes or {})
    state: dict[str, np.ndarray] = {
        "roberta.embeddings.word_embeddings.weight": mat(vocab, h),
        "roberta.embeddings.position_embeddings.weight": mat(POSITIONS, h),
        "roberta.embeddings.token_type_embeddings.weight": mat(1, h),
    }
    state |= norm("roberta.embeddings.LayerNorm")
    for i in range(layers):
        p = f"roberta.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            state |= lin(p + f"attention.self.{name}", h, h)
        state |= lin(p + "attention.output.dense", h, h)
        state |= norm(p + "attention.output.LayerNorm")
        state |= lin(p + "intermediate.dense", inter, h)
        state |= lin(p + "output.dense", h, inter)
        state |= norm(p + "output.LayerNorm")
    state |= lin("lm_head.dense", h, h)
    state |= norm("lm_head.layer_norm")
    if untied:
        state["lm_head.decoder.weight"] = mat(vocab, h)
        state["lm_head.decoder.bias"] = mat(vocab) * 5
    else:
        state["lm_head.bias"] = mat(vocab) * 5
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_src / name, folder / name)
    return folder


@pytest.fixture(scope="module", params=sorted(ROBERTA_ARCHS))
def random_roberta(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A random RoBERTa checkpoint with the byte-level BPE tokenizer (decoder tied), and an
    XLM-R one with the Unigram tokenizer (decoder untied, ``lm_head.decoder.bias``)."""
    kind = request.param
    return _random_roberta_checkpoint(
        tmp_path_factory.mktemp(kind),
        _tokenizer_for(kind, request),
        kind,
        untied=kind == "xlm-roberta",
    )


# A literal "<pad>" inside a text is the padding token: transformers gives it the padding index's
# position and counts the tokens after it on from where they were (not from their index).
LITERAL_PAD = "The quick <pad> brown fox jumps over the lazy dog."


def _roberta_texts() -> list[str]:
    # the long one fills the 64 positions (cut), the others are padded
    return [*TEXTS, LONG, LITERAL_PAD]


@pytest.mark.parametrize(
    "options",
    [
        GraphOptions(),
        GraphOptions(attention="mha", bias_gelu=True, skip_layernorm=True),
        GraphOptions.standard(),
    ],
    ids=["default", "contrib-ops", "standard-ops"],
)
def test_roberta_graph_matches_numpy_reference(random_roberta: Path, options: GraphOptions) -> None:
    weights = load_masked_lm(random_roberta)
    c = weights.config
    assert (c.position_offset, c.pad_token_id, c.max_length) == (2, 1, POSITIONS - 2)
    ids, mask = _batch(random_roberta, _roberta_texts(), pad_id=1, max_length=c.max_length)
    assert ids.shape[1] == c.max_length and (ids == 1).any()  # every position, and padding
    assert ((ids == 1) & (mask == 1)).any()  # and a padding token inside a text
    ref = splade_vectors(weights, ids, mask)
    got = _run(build_graph(weights, options), ids, mask)
    assert (ref > 0).sum(axis=1).min() > 5
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
    # the check would catch positions counted from 0 (BERT's): the offset matters
    from_zero = splade_vectors(replace(weights, config=replace(c, position_offset=0)), ids, mask)
    assert np.abs(from_zero - ref).max() > 0.05


def test_reference_positions_are_transformers_positions() -> None:
    from encoder.reference import position_ids
    from encoder.synthetic import BERT_BASE, GRANITE_30M_SPARSE

    ids = np.array([[0, 7, 8, 2, 1, 1], [0, 7, 8, 9, 10, 2]])
    np.testing.assert_array_equal(
        position_ids(GRANITE_30M_SPARSE, ids), [[2, 3, 4, 5, 1, 1], [2, 3, 4, 5, 6, 7]]
    )
    np.testing.assert_array_equal(position_ids(BERT_BASE, ids), [list(range(6))] * 2)
    assert GRANITE_30M_SPARSE.max_length == 512


def test_roberta_checkpoint_names_and_tying(random_roberta: Path) -> None:
    w = load_masked_lm(random_roberta)
    state = read_safetensors(random_roberta / "model.safetensors")
    if "lm_head.decoder.weight" in state:  # XLM-R fixture: untied, bias under decoder.
        assert w.config.architecture == "XLMRobertaForMaskedLM"
        np.testing.assert_array_equal(w.decoder_weight, state["lm_head.decoder.weight"])
        np.testing.assert_array_equal(w.decoder_bias, state["lm_head.decoder.bias"])
    else:
        assert w.config.architecture == "RobertaForMaskedLM"
        assert w.decoder_weight is w.word_embeddings
        np.testing.assert_array_equal(w.decoder_bias, state["lm_head.bias"])
    np.testing.assert_array_equal(
        w.token_type_embedding, state["roberta.embeddings.token_type_embeddings.weight"][0]
    )
    np.testing.assert_array_equal(w.head_norm.gamma, state["lm_head.layer_norm.weight"])
    assert w.config.head_act == "gelu" and w.config.layer_norm_eps == 1e-5


def test_roberta_head_is_erf_gelu_whatever_hidden_act(
    tmp_path: Path, roberta_tokenizer: Path
) -> None:
    folder = _random_roberta_checkpoint(
        tmp_path / "m", roberta_tokenizer, "roberta", config_changes={"hidden_act": "gelu_new"}
    )
    cfg = load_masked_lm(folder).config
    assert (cfg.hidden_act, cfg.head_act) == ("gelu_tanh", "gelu")


def test_roberta_config_by_model_type_and_errors(tmp_path: Path, roberta_tokenizer: Path) -> None:
    from encoder.checkpoint import read_config

    folder = _random_roberta_checkpoint(tmp_path / "m", roberta_tokenizer, "xlm-roberta")
    config = json.loads((folder / "config.json").read_text())

    def with_config(**changes: Any) -> Path:
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        return folder

    del config["architectures"]  # model_type decides
    assert read_config(with_config()).architecture == "XLMRobertaForMaskedLM"
    with pytest.raises(ModelError, match=r"pad_token_id is None.*usually 1"):
        read_config(with_config(pad_token_id=None))
    with pytest.raises(ModelError, match=r"position_embedding_type 'relative_key'"):
        read_config(with_config(position_embedding_type="relative_key"))
    with pytest.raises(ModelError, match=r"max_position_embeddings 2 leaves no position"):
        read_config(with_config(max_position_embeddings=2))
    with pytest.raises(ModelError, match=r"position_embeddings has shape \(66, 32\)"):
        load_masked_lm(with_config(max_position_embeddings=130))


def test_export_refuses_a_tokenizer_with_another_pad_token(
    tmp_path: Path, roberta_tokenizer: Path
) -> None:
    folder = _random_roberta_checkpoint(tmp_path / "m", roberta_tokenizer, "roberta")
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tok_config, "pad_token": "<s>"}))
    with pytest.raises(ModelError, match=r"pad_token_id 1, but tokenizer_config\.json pad_token"):
        export_model(folder, tmp_path / "out")


def _synthetic_roberta(kind: str, vocab: int, special_bias: float = 0.0) -> Any:
    """Random weights from encoder.synthetic; ``special_bias`` lifts the special tokens' bias so
    that the model gives them weight (which the runtime must still drop)."""
    from encoder.checkpoint import TransformerConfig
    from encoder.synthetic import random_masked_lm

    config = TransformerConfig(
        architecture=ROBERTA_ARCHS[kind],
        vocab_size=vocab,
        hidden_size=48,
        num_layers=2,
        num_heads=4,
        intermediate_size=96,
        max_position_embeddings=POSITIONS,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        head_act="gelu",
        position_offset=2,
        pad_token_id=1,
        type_vocab_size=1,
    )
    w = random_masked_lm(config, seed=1, active_fraction=0.05)
    special = [0, 1, 2, 3, vocab - 1]  # <s> <pad> </s> <unk> <mask>
    bias = w.decoder_bias.copy()
    bias[special] += special_bias
    return replace(w, decoder_bias=bias)


@pytest.fixture(scope="module", params=sorted(ROBERTA_ARCHS))
def exported_roberta(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Any]:
    """(model folder, weights): random RoBERTa/XLM-R weights of encoder.synthetic exported with
    the trained tokenizer; the special tokens have the biggest biases of all."""
    kind = request.param
    tok_dir = _tokenizer_for(kind, request)
    weights = _synthetic_roberta(kind, _vocab_size(tok_dir), special_bias=20.0)
    out = tmp_path_factory.mktemp(f"{kind}-export") / "model"
    export_model(tok_dir, out, weights=weights, name=f"tiny-{kind}", window_overlap=8)
    return out, weights


def test_roberta_export_metadata_and_fidelity(exported_roberta: tuple[Path, Any]) -> None:
    out, weights = exported_roberta
    meta = read_metadata(out)
    assert meta.architecture == weights.config.architecture
    assert (meta.max_length, meta.pad_token_id, meta.window_overlap) == (64, 1, 8)
    assert meta.fidelity is not None and meta.fidelity.mean_cosine > 0.98


def test_roberta_runtime_matches_reference_without_special_tokens(
    exported_roberta: tuple[Path, Any],
) -> None:
    out, weights = exported_roberta
    enc = SparseEncoder.load(out, model_file="model.fp32.onnx", long_text="truncate")
    assert enc._pad_id == 1 and enc.window_tokens == 62  # 64 - <s> - </s>
    assert enc._tok.id_to_token(enc._prefix[0]) == "<s>" and len(enc._prefix) == 1
    assert [enc._tok.id_to_token(i) for i in enc._suffix] == ["</s>"]
    specials = {"<s>", "<pad>", "</s>", "<unk>", "<mask>"}
    texts = TEXTS[:3]
    vecs = enc.encode_documents(texts)
    ids, mask = _batch(out, texts, pad_id=1)
    ref = splade_vectors(weights, ids, mask)
    special_ids = [enc._tok.token_to_id(t) for t in specials]
    assert (ref[:, special_ids] > 1.0).all()  # the model gives them weight: the runtime drops it
    for row, vec in enumerate(vecs):
        assert vec and not (vec.keys() & specials)
        assert {es_feature_token(k) for k in vec} == set(vec)  # names are the tokens
        expected = {
            enc._tok.id_to_token(i): float(v)
            for i, v in enumerate(ref[row])
            if v > 0 and enc._tok.id_to_token(i) not in specials
        }
        assert vec.keys() == expected.keys()
        for token, value in vec.items():
            assert value == pytest.approx(expected[token], abs=2e-4)
    # padding is right and changes nothing: each text alone gives the same vector, bit for bit
    assert [enc.encode_documents([t])[0] for t in texts] == vecs


def test_roberta_long_texts_windows_and_passages(exported_roberta: tuple[Path, Any]) -> None:
    out, _ = exported_roberta
    enc = SparseEncoder.load(out, model_file="model.fp32.onnx")
    n = len(enc._tok.encode(LONG, add_special_tokens=False).ids)
    assert n > 3 * enc.window_tokens
    stats = EncodeStats()
    [merged] = enc.encode_documents([LONG], stats)
    [chunks] = enc.encode_documents_chunks([LONG])
    assert len(chunks) == stats.windows == len(window_starts(n, enc.window_tokens, 8))
    expected: dict[str, float] = {}
    for chunk in chunks:
        for token, value in chunk.items():
            expected[token] = max(value, expected.get(token, 0.0))
    assert merged == expected
    [passages] = enc.encode_passages([LONG])
    assert len(passages) >= 3
    assert passages[0].start == 0 and passages[-1].end == len(LONG)
    for p in passages:
        assert p.vector and not (p.vector.keys() & {"<s>", "</s>", "<pad>"})
    starts = [p.start for p in passages[1:]]
    # cut at sentence starts when there is one near the window's end: after ". " or a line break
    sentence_starts = {
        i + 2 for i in range(len(LONG) - 2) if LONG[i] == "." and LONG[i + 1] in " \n"
    }
    assert sum(s in sentence_starts for s in starts) >= len(starts) // 2, starts
    for p, nxt in itertools.pairwise(passages):
        assert p.start < nxt.start  # in order; overlapping, or cut at a sentence start:
        assert nxt.start <= p.end or not LONG[p.end : nxt.start].strip()  # nothing skipped
        assert LONG[nxt.start - 1].isspace() and not LONG[nxt.start].isspace()  # at a word
        assert LONG[p.end - 1] in ".!?" or LONG[p.end].isspace()  # and end at one


def test_roberta_positions_come_from_the_ids(
    random_roberta: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The graph computes RoBERTa's positions from the ids, as transformers does: a literal
    ``<pad>`` takes the padding index (the tokens after it count on from where they were), and
    a config whose pad_token_id is 0, the id of ``<s>``, gives ``<s>`` that position too."""
    weights = load_masked_lm(random_roberta)
    c = weights.config
    texts = [LITERAL_PAD, "<pad> what is the capital of france", "a"]
    ids, mask = _batch(random_roberta, texts, pad_id=1)
    assert ((ids == 1) & (mask == 1)).sum() == 2
    got = _run(build_graph(weights), ids, mask)
    np.testing.assert_allclose(got, splade_vectors(weights, ids, mask), atol=2e-4, rtol=1e-4)
    # positions by index (what slicing the table gives) differ on the rows with a <pad>
    by_index = np.where(mask == 1, np.cumsum(mask, axis=1) + 1, 1)
    shifted = ((by_index != 1 + np.cumsum(ids != 1, axis=1) * (ids != 1)) & (mask == 1)).any(1)
    assert shifted.tolist() == [True, True, False]

    pad0 = replace(weights, config=replace(c, pad_token_id=0, position_offset=1))
    ids0, mask0 = _batch(random_roberta, TEXTS, pad_id=0)
    got = _run(build_graph(pad0), ids0, mask0)
    np.testing.assert_allclose(got, splade_vectors(pad0, ids0, mask0), atol=2e-4, rtol=1e-4)
    # and it exports (the reference check at export passes): 65 tokens from 66 positions
    kind = "xlm-roberta" if c.architecture == "XLMRobertaForMaskedLM" else "roberta"
    folder = _random_roberta_checkpoint(
        tmp_path / "pad0",
        _tokenizer_for(kind, request),
        kind,
        config_changes={"pad_token_id": 0},
    )
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    meta = export_model(folder, tmp_path / "out", quantize="none", window_overlap=8)
    assert (meta.pad_token_id, meta.max_length) == (0, POSITIONS - 1)


def test_empty_window_never_reaches_the_model(
    exported_roberta: tuple[Path, Any], tmp_path: Path
) -> None:
    """A tokenizer that adds no special tokens makes an empty text a window of no tokens: its
    vector is ``{}`` (queries too), its passage one with ``{}``, and the model never sees it, alone
    (ONNX Runtime refuses a zero-length sequence) or beside others (an all-zero mask row)."""
    folder = tmp_path / "model"
    shutil.copytree(exported_roberta[0], folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    enc = SparseEncoder.load(folder, model_file="model.fp32.onnx")
    assert enc._prefix == enc._suffix == []
    hello = enc.encode_documents(["hello world"])[0]
    assert hello
    assert enc.encode_documents([""]) == [{}]
    assert enc.encode_documents(["", "hello world", ""]) == [{}, hello, {}]
    assert enc.encode_queries(["", "hello world"]) == [{}, hello]
    long = enc.encode_documents([LONG])[0]  # several windows, merged, after an empty text
    stats = EncodeStats()
    assert enc.encode_documents(["", LONG, "hello world"], stats) == [{}, long, hello]
    without = EncodeStats()
    enc.encode_documents([LONG, "hello world"], without)
    assert (stats.windows, stats.tokens, stats.batches) == (
        without.windows + 1,  # the empty one: counted, never run
        without.tokens,
        without.batches,
    )
    [[empty], passages] = enc.encode_passages(["", "hello world"])
    assert (empty.start, empty.end, empty.vector) == (0, 0, {})
    assert [(p.start, p.end, p.vector) for p in passages] == [(0, 11, hello)]
    assert enc.encode_documents_chunks(["", "hello world"]) == [[{}], [hello]]
    # with special tokens (the fixture's tokenizer) an empty text is <s></s>: one passage too
    with_specials = SparseEncoder.load(exported_roberta[0], model_file="model.fp32.onnx")
    [[passage]] = with_specials.encode_passages([""])
    assert (passage.start, passage.end) == (0, 0)


# ------------------------------------------------------------ config and checkpoint errors

_MINIMAL_CONFIGS: dict[str, dict[str, Any]] = {
    "BertForMaskedLM": {
        "vocab_size": 100,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    },
    "DistilBertForMaskedLM": {
        "vocab_size": 100,
        "dim": 32,
        "n_layers": 1,
        "n_heads": 4,
        "hidden_dim": 64,
    },
    "RobertaForMaskedLM": {"vocab_size": 100, "hidden_size": 32, "num_attention_heads": 4},
    "XLMRobertaForMaskedLM": {"vocab_size": 100, "hidden_size": 32, "num_attention_heads": 4},
    "NewForMaskedLM": {"vocab_size": 100, "hidden_size": 32, "num_attention_heads": 4},
    "GteForMaskedLM": {"vocab_size": 100, "hidden_size": 32, "num_attention_heads": 4},
}


def _config_folder(folder: Path, arch: str, **changes: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": [arch], **_MINIMAL_CONFIGS[arch], **changes}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("arch", sorted(_MINIMAL_CONFIGS))
def test_pad_token_id_must_be_a_token_id(tmp_path: Path, arch: str) -> None:
    from encoder.checkpoint import read_config

    assert read_config(_config_folder(tmp_path, arch, pad_token_id=99)).pad_token_id == 99
    for pad in (-1, 100, 1000, True, 1.0, "1"):
        with pytest.raises(ModelError, match=r"config\.json: pad_token_id"):
            read_config(_config_folder(tmp_path, arch, pad_token_id=pad))


def test_export_refuses_a_negative_pad_token_id(
    tmp_path: Path, random_bert: Path, source_dir: Path
) -> None:
    folder = tmp_path / "m"
    shutil.copytree(random_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pad_token_id": -1}))
    with pytest.raises(ModelError, match=r"config\.json: pad_token_id is -1"):
        export_model(folder, tmp_path / "out", quantize="none")
    weights = load_masked_lm(random_bert)  # weights given: the same check
    bad = replace(weights, config=replace(weights.config, pad_token_id=VOCAB))
    with pytest.raises(ModelError, match=r"pad_token_id 30522 is outside the vocabulary"):
        export_model(source_dir, tmp_path / "out", weights=bad, quantize="none")
    assert not (tmp_path / "out" / "sparse_model.json").exists()


def test_roberta_and_gte_configs_default_as_transformers(tmp_path: Path) -> None:
    """A key missing from config.json means what it means to transformers' config class
    (RobertaConfig, XLMRobertaConfig, GteConfig; new-impl's NewConfig)."""
    from encoder.checkpoint import read_config

    def read(arch: str) -> Any:
        folder = tmp_path / arch
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
        return read_config(folder)

    def sizes(c: Any) -> tuple[int, ...]:
        return (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size)

    for arch, vocab in (("RobertaForMaskedLM", 50265), ("XLMRobertaForMaskedLM", 30522)):
        c = read(arch)
        assert sizes(c) == (vocab, 768, 12, 12, 3072)
        assert (c.layer_norm_eps, c.max_position_embeddings, c.type_vocab_size) == (1e-12, 512, 2)
        assert (c.pad_token_id, c.position_offset, c.max_length) == (1, 2, 510)
        assert (c.hidden_act, c.tie_word_embeddings) == ("gelu", True)
    for arch, vocab, positions, theta, pad in (
        ("NewForMaskedLM", 30528, 2048, 10000.0, 0),
        ("GteForMaskedLM", 250048, 8192, 160000.0, 1),
    ):
        c = read(arch)
        assert sizes(c) == (vocab, 768, 12, 12, 3072)
        assert (c.max_position_embeddings, c.type_vocab_size, c.layer_norm_eps) == (
            positions,
            1,
            1e-12,
        )
        assert (c.rope_theta, c.rope_position_scale, c.pad_token_id) == (theta, 1.0, pad)


def test_malformed_checkpoint_files_are_model_errors(
    tmp_path: Path, roberta_tokenizer: Path
) -> None:
    from encoder.checkpoint import _rebuild_tensor, _Storage, read_config

    folder = _random_roberta_checkpoint(tmp_path / "m", roberta_tokenizer, "roberta")
    good = (folder / "model.safetensors").read_bytes()
    header_len = int.from_bytes(good[:8], "little")

    def weights_file(data: bytes) -> Path:
        (folder / "model.safetensors").write_bytes(data)
        return folder / "model.safetensors"

    def header(value: Any) -> bytes:
        text = json.dumps(value).encode()
        return len(text).to_bytes(8, "little") + text

    for data, message in (
        (good[: len(good) // 2], r"word_embeddings\.weight.*truncated or corrupt"),
        (good[: header_len + 8], r"truncated or corrupt"),
        (good[:4], r"not a safetensors file"),
        (b"\xff" * 16, r"not a safetensors file \(a header of"),
        (header({"a": 5}), r"tensor 'a' has a malformed header entry"),
        (header({"a": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}), r"malformed"),
        (header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}), r"corrupt"),
        (header([1, 2]), r"not a JSON object"),
    ):
        with pytest.raises(ModelError, match=message):
            read_safetensors(weights_file(data))
    weights_file(good)
    with pytest.raises(ValueError, match="does not fit its storage"):  # -> ModelError in the zip
        _rebuild_tensor(_Storage(np.zeros(4, np.float32), False), 2, (3,), (1,))

    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"tokenizer\.json: not a tokenizer\.json"):
        export_model(folder, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    for changes, message in (
        ({"num_attention_heads": 0}, r"num_attention_heads is 0"),
        ({"num_attention_heads": 5}, r"num_attention_heads 5 does not divide hidden_size 32"),
        ({"hidden_size": 0}, r"hidden_size is 0"),
        ({"architectures": {"a": 1}}, r"architectures must be a list"),
        ({"tie_word_embeddings": "no"}, r"tie_word_embeddings must be true or false"),
    ):
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(ModelError, match=message):
            read_config(folder)
    # one name instead of a list: what transformers does with it
    (folder / "config.json").write_text(
        json.dumps({**config, "architectures": "XLMRobertaForMaskedLM", "model_type": "bert"})
    )
    assert read_config(folder).architecture == "XLMRobertaForMaskedLM"


def test_untied_config_needs_the_decoder_weight(
    tmp_path: Path, roberta_tokenizer: Path, random_bert: Path
) -> None:
    folder = _random_roberta_checkpoint(
        tmp_path / "m", roberta_tokenizer, "roberta", config_changes={"tie_word_embeddings": False}
    )
    with pytest.raises(ModelError, match=r"tie_word_embeddings false.*'lm_head\.decoder\.weight'"):
        load_masked_lm(folder)
    untied = _random_roberta_checkpoint(
        tmp_path / "u",
        roberta_tokenizer,
        "roberta",
        untied=True,
        config_changes={"tie_word_embeddings": False},
    )
    w = load_masked_lm(untied)
    assert w.decoder_weight is not w.word_embeddings
    bert = tmp_path / "bert"
    shutil.copytree(random_bert, bert)
    state = read_safetensors(bert / "model.safetensors")
    del state["cls.predictions.decoder.weight"]
    save_file(state, str(bert / "model.safetensors"))
    tied = load_masked_lm(bert)  # no tie_word_embeddings: true, transformers' default
    assert tied.decoder_weight is tied.word_embeddings
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(ModelError, match=r"'cls\.predictions\.decoder\.weight'"):
        load_masked_lm(bert)


# ------------------------------------------------------------------------------- idf.json

IDF_CASES = {
    "null": ('{"a": 1.5, "b": null}', r"1 of 2 tokens have a weight that is not a finite number"),
    "string": ('{"a": "1.5"}', r"1 of 1 tokens"),
    "list": ('{"a": [1], "b": [2], "c": 1}', r"2 of 3 tokens"),
    "bool": ('{"a": true}', r"1 of 1 tokens"),
    "nan": ('{"a": NaN}', r"1 of 1 tokens"),
    "infinity": ('{"a": Infinity, "b": -Infinity}', r"2 of 2 tokens"),
    "negative": ('{"a": -0.5}', r"1 of 1 tokens"),
    "huge int": ('{"a": 1' + "0" * 400 + "}", r"1 of 1 tokens"),
    "not an object": ("[1, 2]", r"not a JSON object of token weights"),
    "not json": ("{", r"needs a readable idf\.json"),
}


@pytest.mark.parametrize("case", sorted(IDF_CASES))
def test_idf_json_is_checked_at_load_and_export(
    exported_roberta: tuple[Path, Any], tmp_path: Path, case: str
) -> None:
    text, message = IDF_CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(exported_roberta[0], folder)
    meta = json.loads((folder / "sparse_model.json").read_text())
    meta["query_mode"] = "idf"
    meta["files"]["idf"] = "idf.json"
    (folder / "sparse_model.json").write_text(json.dumps(meta))
    (folder / "idf.json").write_text(text)
    with pytest.raises(ModelError, match=r"idf\.json: .*" + message):
        SparseEncoder.load(folder)
    # at export, from the source folder, before anything is written
    src = tmp_path / "src"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "idf.json"):
        shutil.copy(folder / name, src / name)
    with pytest.raises(ModelError, match=r"src/idf\.json: .*" + message):
        export_model(src, tmp_path / "out", weights=exported_roberta[1])
    assert not (tmp_path / "out" / "sparse_model.json").exists()


def test_idf_weights_too_small_for_elasticsearch_are_zero(tmp_path: Path) -> None:
    from encoder.metadata import read_idf

    (tmp_path / "idf.json").write_text('{"a": 1e-40, "b": 1e-31, "c": 1e-29, "d": 0, "e": 3}')
    assert read_idf(tmp_path / "idf.json") == {"c": 1e-29, "e": 3.0}


# ------------------------------------------------------------------------ the 2 GiB limit


def _zero_weights(
    vocab: int, hidden: int, layers: int, inter: int, positions: int
) -> Any:  # MaskedLMWeights of zero-stride arrays: the shapes of a big model, no memory
    from encoder.checkpoint import (
        LayerNormWeights,
        LayerWeights,
        Linear,
        MaskedLMWeights,
        TransformerConfig,
    )

    def zeros(*shape: int) -> np.ndarray:
        return np.broadcast_to(np.float32(0), shape)

    def lin(out: int, inp: int) -> Linear:
        return Linear(zeros(out, inp), zeros(out))

    norm = LayerNormWeights(zeros(hidden), zeros(hidden))
    word = zeros(vocab, hidden)
    layer = LayerWeights(
        lin(hidden, hidden),
        lin(hidden, hidden),
        lin(hidden, hidden),
        lin(hidden, hidden),
        norm,
        lin(inter, hidden),
        lin(hidden, inter),
        norm,
    )
    config = TransformerConfig(
        architecture="XLMRobertaForMaskedLM",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=hidden // 64,
        intermediate_size=inter,
        max_position_embeddings=positions,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        head_act="gelu",
        position_offset=2,
        pad_token_id=1,
        type_vocab_size=1,
    )
    return MaskedLMWeights(
        config,
        word,
        zeros(positions, hidden),
        zeros(hidden),
        norm,
        (layer,) * layers,
        lin(hidden, hidden),
        norm,
        word,
        zeros(vocab),
    )


def test_a_graph_past_2_gib_is_refused_before_it_is_built(
    tmp_path: Path, roberta_tokenizer: Path, random_roberta: Path
) -> None:
    from encoder.graph import PROTOBUF_LIMIT, estimate_graph_bytes

    # the estimate is the graph's size from above: the weights (the decoder counted apart when
    # tied), and 1 MiB for the rest (16 kB here)
    weights = load_masked_lm(random_roberta)
    size = build_graph(weights).ByteSize()
    assert 2**20 - 32768 < estimate_graph_bytes(weights) - size < 2**20
    # XLM-R base fits (1.75 GiB), XLM-R large (3.3 GB) does not
    base = _zero_weights(250002, 768, 12, 3072, 514)
    assert 1.7 * 2**30 < estimate_graph_bytes(base) < PROTOBUF_LIMIT
    large = _zero_weights(250002, 1024, 24, 4096, 514)
    with pytest.raises(ModelError, match=r"too large for a single-file ONNX export.* 3\.\d\d GiB"):
        export_model(roberta_tokenizer, tmp_path / "out", weights=large)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------- registry: a folder the user downloads


def _cli(argv: list[str]) -> int:
    import argparse

    from encoder.cli import add_subcommands

    parser = argparse.ArgumentParser(prog="sparse-ingest")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_granite_is_a_local_folder_and_its_error_says_what_to_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from encoder.registry import LocalFolderSource, get_model_description

    desc = get_model_description("granite-embedding-30m-sparse")
    assert isinstance(desc.source, LocalFolderSource)
    assert desc.source.hf_id == "ibm-granite/granite-embedding-30m-sparse"
    assert (desc.architecture, desc.vocab_size, desc.hidden_size, desc.num_layers) == (
        "RobertaForMaskedLM",
        50265,
        384,
        6,
    )
    assert desc.license == "Apache-2.0" and desc.max_length == 512
    monkeypatch.setenv("SPARSE_INGEST_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "sources" / desc.name
    # SRC may name the registry model: its folder is <cache>/sources/<name>
    assert _cli(["model", "export", desc.name, str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{folder} does not exist" in err
    assert "https://huggingface.co/ibm-granite/granite-embedding-30m-sparse" in err
    assert (
        f"hf download ibm-granite/granite-embedding-30m-sparse config.json model.safetensors "
        f"tokenizer.json tokenizer_config.json --local-dir {folder}"
    ) in err
    # a folder of the wrong model: named, with what the registry expected
    other = _random_roberta_checkpoint(
        tmp_path / "other", train_roberta_tokenizer(tmp_path / "t"), "roberta"
    )
    assert _cli(["model", "export", str(other), str(tmp_path / "out"), "--model", desc.name]) == 1
    err = capsys.readouterr().err
    assert (
        "the registry's granite-embedding-30m-sparse is ('RobertaForMaskedLM', 50265, 384, 6)"
        in err
    )
    (other / "tokenizer_config.json").unlink()
    assert _cli(["model", "fetch", desc.name, "--src", str(other)]) == 1
    assert "lacks tokenizer_config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert _cli(["model", "list"]) == 0
    assert "download config.json, model.safetensors" in capsys.readouterr().out


def test_local_folder_registry_model_exports_and_fetches_once(
    tmp_path: Path,
    roberta_tokenizer: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A registry entry of the same kind as granite's, the shape of a tiny random checkpoint:
    export through the CLI, and ``fetch_model`` exports once, again when the folder changes."""
    from encoder import registry
    from encoder.fetch import fetch_model

    src = _random_roberta_checkpoint(tmp_path / "download", roberta_tokenizer, "roberta")
    desc = registry.ModelDescription(
        name="tiny-roberta",
        description="a test entry",
        source=registry.LocalFolderSource(hf_id="example/tiny-roberta"),
        files=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
        architecture="RobertaForMaskedLM",
        vocab_size=_vocab_size(roberta_tokenizer),
        hidden_size=32,
        num_layers=2,
        max_length=64,
        license="Apache-2.0",
    )
    monkeypatch.setitem(registry.MODELS, desc.name, desc)
    monkeypatch.setenv("SPARSE_INGEST_CACHE", str(tmp_path / "cache"))
    argv = ["model", "export", str(src), str(tmp_path / "out"), "--model", desc.name]
    assert _cli([*argv, "--window-overlap", "8", "--quantize", "none"]) == 0
    assert "exported tiny-roberta (RobertaForMaskedLM, fp32)" in capsys.readouterr().out
    meta = read_metadata(tmp_path / "out")
    assert (meta.name, meta.license, meta.max_length) == ("tiny-roberta", "Apache-2.0", 64)
    assert "https://huggingface.co/example/tiny-roberta" in meta.source
    assert meta.source_checksums.keys() >= set(desc.files)

    dest = fetch_model(desc.name, tmp_path / "model", src)
    stamp = (dest / "model.onnx").stat().st_mtime_ns
    assert fetch_model(desc.name, tmp_path / "model", src) == dest
    assert (dest / "model.onnx").stat().st_mtime_ns == stamp  # nothing to do
    _random_roberta_checkpoint(src, roberta_tokenizer, "roberta", seed=5)  # downloaded again
    fetch_model(desc.name, tmp_path / "model", src)
    assert (dest / "model.onnx").stat().st_mtime_ns != stamp


# ------------------------------------------------------------ optional: transformers/PyTorch

HAVE_TRANSFORMERS = (
    importlib.util.find_spec("torch") is not None
    and importlib.util.find_spec("transformers") is not None
)


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="optional cross-check; needs torch+transformers")
def test_matches_transformers(
    source_dir: Path, random_distilbert: Path
) -> None:  # pragma: no cover
    import torch
    from transformers import AutoModelForMaskedLM

    for src in (source_dir, random_distilbert):
        model = AutoModelForMaskedLM.from_pretrained(str(src)).eval()
        ids, mask = _batch(src, TEXTS)
        with torch.no_grad():
            logits = model(
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
            ).logits
        expected = (torch.log1p(torch.relu(logits)) * torch.from_numpy(mask)[..., None]).amax(1)
        got = _run(build_graph(load_masked_lm(src)), ids, mask)
        print(f"{src.name}: max abs diff {np.abs(got - expected.numpy()).max():.2e}")
        np.testing.assert_allclose(got, expected.numpy(), atol=2e-4, rtol=1e-4)


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="optional cross-check; needs torch+transformers")
@pytest.mark.parametrize("kind", sorted(ROBERTA_ARCHS))
def test_roberta_matches_transformers(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:  # pragma: no cover
    """RobertaForMaskedLM / XLMRobertaForMaskedLM built by transformers from a small config with
    random weights, saved with save_pretrained, exported by us (FP32), against transformers' own
    MLM logits pooled the SPLADE way, on a padded batch that fills every position."""
    import torch
    import transformers

    tok_dir = _tokenizer_for(kind, request)
    vocab = _vocab_size(tok_dir)
    config_class = {"roberta": "RobertaConfig", "xlm-roberta": "XLMRobertaConfig"}[kind]
    config = getattr(transformers, config_class)(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=POSITIONS,
        type_vocab_size=1,
        pad_token_id=trained_tokenizers.PAD_ID,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = getattr(transformers, ROBERTA_ARCHS[kind])(config).eval()
    with torch.no_grad():  # weights as wide as a trained model's (the init's 0.02 gives ~0 logits)
        for name, param in model.named_parameters():
            value = torch.randn_like(param) * 0.2
            if name.endswith(("LayerNorm.weight", "layer_norm.weight")):
                value += 1
            elif param.dim() == 1 and param.shape[0] == vocab:  # the decoder bias: sparse output
                value *= 25
            param.copy_(value)
    src = tmp_path / "src"
    model.save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, src / name)
    meta = export_model(src, tmp_path / "out", quantize="none", window_overlap=8)
    assert (meta.architecture, meta.max_length, meta.pad_token_id) == (
        ROBERTA_ARCHS[kind],
        POSITIONS - 2,
        1,
    )
    ids, mask = _batch(src, _roberta_texts(), pad_id=1, max_length=meta.max_length)
    assert ids.shape[1] == meta.max_length and (ids == 1).any()
    assert ((ids == 1) & (mask == 1)).any()  # a literal <pad> inside a text (LITERAL_PAD)
    with torch.no_grad():
        logits = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).logits
    pooled = (torch.log1p(torch.relu(logits)) * torch.from_numpy(mask)[..., None]).amax(1)
    expected = pooled.numpy()
    session = ort.InferenceSession(
        str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    print(
        f"{ROBERTA_ARCHS[kind]}: max abs diff {np.abs(got - expected).max():.2e} "
        f"({(expected > 0).sum()} non-zero weights of {expected.size})"
    )
    assert (expected > 0).sum(axis=1).min() > 5
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="optional cross-check; needs torch+transformers")
@pytest.mark.parametrize(
    ("arch", "config_class"),
    [
        ("RobertaForMaskedLM", "RobertaConfig"),
        ("XLMRobertaForMaskedLM", "XLMRobertaConfig"),
        ("GteForMaskedLM", "GteConfig"),
    ],
)
def test_config_defaults_are_transformers(
    arch: str, config_class: str, tmp_path: Path
) -> None:  # pragma: no cover
    """A config.json with nothing but the architecture reads as transformers' config class."""
    import transformers

    from encoder.checkpoint import read_config

    (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch]}))
    ours = read_config(tmp_path)
    theirs = getattr(transformers, config_class)()
    assert (
        ours.vocab_size,
        ours.hidden_size,
        ours.num_layers,
        ours.num_heads,
        ours.intermediate_size,
        ours.max_position_embeddings,
        ours.layer_norm_eps,
        ours.type_vocab_size,
        ours.pad_token_id,
        ours.tie_word_embeddings,
    ) == (
        theirs.vocab_size,
        theirs.hidden_size,
        theirs.num_hidden_layers,
        theirs.num_attention_heads,
        theirs.intermediate_size,
        theirs.max_position_embeddings,
        theirs.layer_norm_eps,
        theirs.type_vocab_size,
        theirs.pad_token_id,
        theirs.tie_word_embeddings,
    )
    if ours.rotary:
        assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
