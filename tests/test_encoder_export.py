"""The exporter against the plain numpy reference, checkpoint reading, and exporter errors."""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
import shutil
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from safetensors.numpy import save_file

from encoder import ModelError, SparseEncoder
from encoder.checkpoint import load_masked_lm, read_safetensors, read_torch_zip
from encoder.export import export_model
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


def _batch(src: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    encs = tok.encode_batch(texts)
    width = max(len(e.ids) for e in encs)
    ids = np.zeros((len(texts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
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
        np.testing.assert_allclose(got, expected.numpy(), atol=2e-4, rtol=1e-4)
