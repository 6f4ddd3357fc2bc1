"""Export a Hugging Face masked-LM checkpoint folder to a sparse-ingest model folder.

Output folder: ``model.onnx`` (INT8 by default), ``model.fp32.onnx`` (kept for fidelity checks),
``tokenizer.json`` (+ ``tokenizer_config.json``, ``idf.json`` when the source has them) and
``sparse_model.json``. No PyTorch: the graph is built from the weights (``encoder.graph``), checked
against the plain numpy forward pass (``encoder.reference``), then quantized with ONNX Runtime's
``quantize_dynamic``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

from encoder.checkpoint import (
    MaskedLMWeights,
    drop_vocabulary_rows,
    load_masked_lm,
    padded_vocabulary,
    sha256_file,
    weights_file,
)
from encoder.errors import ModelError
from encoder.graph import (
    ORT_DISABLED_OPTIMIZERS,
    POSITION_GATHER,
    PROTOBUF_LIMIT,
    GraphOptions,
    build_graph,
    estimate_graph_bytes,
)
from encoder.metadata import (
    FP32_MODEL_FILE,
    IDF_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    FidelityInfo,
    LongTextMode,
    ModelMetadata,
    QuantizationInfo,
    read_idf,
    write_metadata,
)
from encoder.reference import splade_vectors
from encoder.registry import POOLINGS, Pooling, QueryMode

log = logging.getLogger(__name__)

EXPORTER_VERSION = "sparse-ingest-exporter/5"
DEFAULT_WINDOW_OVERLAP = 64  # tokens neighbouring windows share (at most a quarter of the model's)

# Node groups that can be left in FP32 (matched against node names from encoder.graph).
FP32_GROUPS: dict[str, tuple[str, ...]] = {
    "embeddings": ("word_embeddings.gather",),
    "vocab": ("vocab_logits",),
    "head": ("vocab_logits", "head.transform"),
    "attention": (".q.mm", ".k.mm", ".v.mm", ".attn_out.mm"),
}

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "what is the capital of france",
    "Sparse retrieval with learned term weights runs on an inverted index.",
    "Elasticsearch stores the token weights in a sparse_vector field.",
    "Vitamin D deficiency is associated with an increased risk of respiratory infections "
    "in children and adults, according to several randomized controlled trials.",
    "how do i reset my router password",
    "The mitochondria is the powerhouse of the cell; it produces ATP through oxidative "
    "phosphorylation, which depends on the electron transport chain.",
    "Kafka consumers commit offsets after the sink has acknowledged the documents.",
    "symptoms of type 2 diabetes",
    "In 1969 Apollo 11 landed on the Moon and Neil Armstrong became the first person to walk "
    "on its surface.",
    "best pizza dough recipe with sourdough starter",
    "Quantum entanglement does not allow faster-than-light communication.",
    "A 42-year-old woman presented with fever, cough and shortness of breath for three days.",
    "The central bank raised interest rates by 25 basis points to curb inflation.",
    "python list comprehension vs generator expression memory",
    "CRISPR-Cas9 enables targeted genome editing in a wide range of organisms.",
)


@dataclass(frozen=True)
class QuantizeOptions:
    per_channel: bool = True
    # 7-bit weights. Without it, INT8 fidelity depends on the CPU that runs the model: on an AMD
    # EPYC (AVX-512 VNNI, no AMX) the default model gave mean cosine 0.989 (min 0.974) against
    # FP32 on the probe texts, 0.998 (min 0.995) with it; an exported model runs on whatever CPU
    # the service lands on, so the portable choice is the default (exporter 5).
    reduce_range: bool = True
    fp32_groups: tuple[str, ...] = ()
    # "Gather": the word embeddings are stored INT8 too (-70 MB on BERT-base, no measurable loss);
    # add "Attention" with GraphOptions(attention="attention") for QAttention.
    op_types: tuple[str, ...] = ("MatMul", "Gather")
    const_b_only: bool = True  # False also quantizes activation x activation MatMuls


def _encode_probe(
    tok: Tokenizer, texts: Sequence[str], max_length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    encs = tok.encode_batch(list(texts))
    ids_list = [e.ids[:max_length] for e in encs]
    width = max(len(i) for i in ids_list)
    ids = np.full((len(texts), width), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for row, i in enumerate(ids_list):
        ids[row, : len(i)] = i
        mask[row, : len(i)] = 1
    return ids, mask


def _session(path: Path, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(
        str(path),
        opts,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=ORT_DISABLED_OPTIMIZERS,
    )


def quantize_int8(src: Path, dst: Path, options: QuantizeOptions) -> QuantizationInfo:
    """Dynamic INT8 quantization of the op types asked for, except the FP32 groups."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src), load_external_data=False)
    patterns = tuple(p for g in options.fp32_groups for p in FP32_GROUPS[g])
    exclude = [
        n.name
        for n in model.graph.node
        if (n.op_type == "MatMul" and any(p in n.name for p in patterns))
        or n.name.startswith(POSITION_GATHER)  # RoBERTa's position table stays FP32
    ]
    del model
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic warns "consider pre-processing" on the root
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=list(options.op_types),
            per_channel=options.per_channel,
            reduce_range=options.reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            extra_options={
                "MatMulConstBOnly": options.const_b_only,
                "DefaultTensorType": onnx.TensorProto.FLOAT,
            },
        )
    finally:
        root.setLevel(level)
    return QuantizationInfo(
        method="dynamic",
        weight_type="int8",
        activation_type="uint8, per tensor, scale computed per batch",
        per_channel=options.per_channel,
        reduce_range=options.reduce_range,
        op_types=options.op_types,
        fp32_nodes=tuple(options.fp32_groups),
    )


def compare_vectors(a: np.ndarray, b: np.ndarray) -> FidelityInfo:
    """Cosine, top-10 overlap and max difference of two [n, vocab] weight matrices."""
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-12)
    k = min(10, a.shape[1])
    top_a = np.argsort(-a, axis=1)[:, :k]
    top_b = np.argsort(-b, axis=1)[:, :k]
    overlap = [
        len(set(x) & set(y)) / k for x, y in zip(top_a.tolist(), top_b.tolist(), strict=True)
    ]
    return FidelityInfo(
        texts=int(a.shape[0]),
        mean_cosine=round(float(cos.mean()), 6),
        min_cosine=round(float(cos.min()), 6),
        top10_overlap=round(float(np.mean(overlap)), 4),
        max_abs_diff=round(float(np.abs(a - b).max()), 6),
    )


def check_against_reference(
    weights: MaskedLMWeights,
    model_path: Path,
    tok: Tokenizer,
    max_length: int,
    tolerance: float = 1e-3,
    pooling: Pooling = "splade_max",
) -> float:
    """Run the FP32 graph and the numpy reference on two probe texts; return the max difference."""
    ids, mask = _encode_probe(tok, PROBE_TEXTS[4:6], max_length, weights.config.pad_token_id)
    ref = splade_vectors(weights, ids, mask, pooling)
    out = _session(model_path).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    diff = float(np.abs(out - ref).max())
    if not diff <= tolerance:
        raise ModelError(
            f"{model_path}: the exported graph differs from the numpy reference by {diff:.3g} "
            f"(tolerance {tolerance}); this is an exporter bug, please report it"
        )
    return diff


def export_model(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    quantize: Literal["int8", "none"] = "int8",
    keep_fp32: bool = True,
    quantize_options: QuantizeOptions | None = None,
    graph_options: GraphOptions | None = None,
    name: str | None = None,
    long_text: LongTextMode = "chunk",
    window_overlap: int | None = None,
    query_mode: QueryMode = "model",
    license: str = "",
    source: str = "",
    weights: MaskedLMWeights | None = None,
    pooling: Pooling | None = None,
    max_length: int | None = None,
) -> ModelMetadata:
    """Export ``src_dir`` (a Hugging Face masked-LM folder of an architecture in
    ``encoder.checkpoint.ARCHITECTURES``) into ``out_dir``.

    ``weights`` may be given to skip reading the checkpoint again (the benchmark uses it for
    random models); ``src_dir`` must still hold the tokenizer. ``pooling``: the activation after
    the max (``encoder.registry.POOLINGS``; OpenSearch v3 doc models take log1p twice); None:
    what a Sentence Transformers ``SpladePooling`` module of the folder declares
    (``sentence_transformers_pooling``), else ``splade_max``.
    ``max_length``: tokens per window, special tokens included (default: what the model takes,
    at most its ``default_length`` — 512 for GTE, which takes 8192 — and at most
    tokenizer_config.json's ``model_max_length``).
    """
    src, out = Path(src_dir), Path(out_dir)
    tok_path = src / TOKENIZER_FILE
    if not tok_path.is_file():
        raise ModelError(
            f"{tok_path}: missing; the exporter needs the fast tokenizer file (tokenizer.json). "
            "Save it with `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`"
        )
    if pooling is not None and pooling not in POOLINGS:
        raise ModelError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
    weights_given = weights is not None
    if weights is None:
        weights = load_masked_lm(src)
    cfg = weights.config
    if not 0 <= cfg.pad_token_id < cfg.vocab_size:  # read_config checks config.json's
        raise ModelError(
            f"pad_token_id {cfg.pad_token_id} is outside the vocabulary ({cfg.vocab_size} tokens)"
        )
    size = estimate_graph_bytes(weights, max_length)
    if size >= PROTOBUF_LIMIT:
        raise ModelError(
            f"{src}: the model is too large for a single-file ONNX export: its FP32 graph would "
            f"take about {size / 2**30:.2f} GiB, and an ONNX file (a protobuf message) holds at "
            "most 2 GiB; weights stored outside the file (ONNX external data) are not supported "
            "yet"
        )
    try:
        tok = Tokenizer.from_file(str(tok_path))
    except Exception as exc:  # tokenizers raises plain Exception
        raise ModelError(f"{tok_path}: not a tokenizer.json that tokenizers reads ({exc})") from exc
    _check_pad_token(src, tok, cfg.pad_token_id)
    if (src / IDF_FILE).is_file():
        read_idf(src / IDF_FILE)  # refused now rather than when the service loads the model
    if pooling is None:
        pooling = sentence_transformers_pooling(src)
        if pooling is not None:
            log.info("%s: pooling %s, from its Sentence Transformers SpladePooling", src, pooling)
        else:
            pooling = "splade_max"
            if cfg.architecture in OPENSEARCH_V3_ARCHITECTURES and (src / IDF_FILE).is_file():
                log.warning(
                    "%s looks like an OpenSearch v3 doc model (%s with an idf.json) but says "
                    "nothing of its pooling: exporting with splade_max = log1p(relu). If it is "
                    "opensearch-neural-sparse-encoding-doc-v3-gte, pass --model "
                    "opensearch-neural-sparse-encoding-doc-v3-gte (or --pooling "
                    "splade_max_log1p_log1p; Python: pooling='splade_max_log1p_log1p', "
                    "query_mode='idf')",
                    src,
                    cfg.architecture,
                )
    tok.no_padding()
    tok.no_truncation()
    tokens = tok.get_vocab_size(with_added_tokens=True)
    vocabulary_note = ""
    if padded_vocabulary(cfg, tokens):  # rows no token has: their columns are never output
        vocabulary_note = (
            f"; vocabulary {cfg.vocab_size} -> {tokens} (rows past the tokenizer's dropped)"
        )
        weights = drop_vocabulary_rows(weights, tokens)
        cfg = weights.config
    if tokens != cfg.vocab_size:
        raise ModelError(
            f"{src}: tokenizer.json has {tokens} tokens but the "
            f"model's vocabulary is {cfg.vocab_size}; use the tokenizer saved with this checkpoint"
        )
    if max_length is None:
        max_length = _max_length(src, cfg.default_length or cfg.max_length)
    elif not 16 <= max_length <= cfg.max_length:
        raise ModelError(
            f"max_length {max_length}: the model takes 16 to {cfg.max_length} tokens per window"
        )
    if window_overlap is None:  # 64, or a quarter of a short model's window
        window_overlap = min(DEFAULT_WINDOW_OVERLAP, max_length // 4)
    if not 0 <= window_overlap < max_length // 2:
        raise ModelError(f"window_overlap {window_overlap} must be in [0, {max_length // 2})")

    out.mkdir(parents=True, exist_ok=True)
    gopts = graph_options or GraphOptions()
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        fp32_path = Path(tmp) / FP32_MODEL_FILE
        onnx.save(
            build_graph(weights, gopts, max_length=max_length, pooling=pooling), str(fp32_path)
        )
        diff = check_against_reference(weights, fp32_path, tok, max_length, pooling=pooling)
        log.info("FP32 graph matches the numpy reference (max difference %.2g)", diff)
        fidelity = None
        if quantize == "int8":
            qopts = quantize_options or QuantizeOptions()
            int8_path = Path(tmp) / MODEL_FILE
            quant = quantize_int8(fp32_path, int8_path, qopts)
            fidelity = measure_fidelity(fp32_path, int8_path, tok, max_length, cfg.pad_token_id)
            log.info("INT8 vs FP32 on %d probe texts: %s", len(PROBE_TEXTS), fidelity)
            shutil.move(str(int8_path), out / MODEL_FILE)
            if keep_fp32:
                shutil.move(str(fp32_path), out / FP32_MODEL_FILE)
        elif quantize == "none":
            quant = QuantizationInfo()
            shutil.move(str(fp32_path), out / MODEL_FILE)
        else:
            raise ModelError(f"unknown quantization {quantize!r}; use 'int8' or 'none'")
    for extra in (TOKENIZER_FILE, "tokenizer_config.json", IDF_FILE):
        if (src / extra).is_file():
            shutil.copyfile(src / extra, out / extra)
    if quantize != "int8" or not keep_fp32:
        (out / FP32_MODEL_FILE).unlink(missing_ok=True)

    own_files = {TOKENIZER_FILE, "tokenizer_config.json", IDF_FILE}
    if weights_given:
        checksums = {}
    else:
        own_files.add("config.json")
        checksums = {weights_file(src).name: sha256_file(weights_file(src))}
    checksums |= {p.name: sha256_file(p) for p in sorted(src.iterdir()) if p.name in own_files}
    files = {"model": MODEL_FILE, "tokenizer": TOKENIZER_FILE}
    if (out / FP32_MODEL_FILE).is_file():
        files["model_fp32"] = FP32_MODEL_FILE
    if (out / IDF_FILE).is_file():
        files["idf"] = IDF_FILE
    meta = ModelMetadata(
        name=name or src.name,
        architecture=cfg.architecture,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_length=max_length,
        pad_token_id=cfg.pad_token_id,
        quantization=quant,
        pooling=pooling,
        long_text=long_text,
        window_overlap=window_overlap,
        query_mode=query_mode,
        license=license,
        source=source or str(src),
        source_checksums=checksums,
        exporter_version=EXPORTER_VERSION,
        graph=gopts.describe() + vocabulary_note,
        files=files,
        fidelity=fidelity,
    )
    write_metadata(out, meta)
    return meta


def measure_fidelity(
    fp32_path: Path, int8_path: Path, tok: Tokenizer, max_length: int, pad_id: int = 0
) -> FidelityInfo:
    ids, mask = _encode_probe(tok, PROBE_TEXTS, max_length, pad_id)
    feeds = {"input_ids": ids, "attention_mask": mask}
    ref = _session(fp32_path).run(None, feeds)[0]
    got = _session(int8_path).run(None, feeds)[0]
    return compare_vectors(got, ref)


# Architectures of OpenSearch's v3 doc models (doc-v3-gte): exported without a pooling, a folder of
# one with an idf.json gets a warning that says which flags to pass.
OPENSEARCH_V3_ARCHITECTURES = ("NewForMaskedLM", "GteForMaskedLM")

# Sentence Transformers' SpladePooling(activation_function=...): the activation before log1p.
_SPLADE_POOLING_ACTIVATIONS: dict[str, Pooling] = {
    "relu": "splade_max",  # log1p(relu(x))
    "log1p_relu": "splade_max_log1p_log1p",  # log1p(log1p(relu(x)))
}


def sentence_transformers_pooling(src: Path) -> Pooling | None:
    """The pooling that the folder's Sentence Transformers ``SpladePooling`` module declares
    (``1_SpladePooling/config.json``, ``document_1_SpladePooling/config.json`` of a Router: any
    ``*SpladePooling/config.json``), None without one. Its ``activation_function`` comes
    before ``log1p`` (sbert.net): ``relu`` is ``splade_max``, ``log1p_relu`` is
    ``splade_max_log1p_log1p``; only the ``max`` pooling strategy is supported."""
    found: dict[str, Pooling] = {}
    for path in sorted(src.glob("*SpladePooling/config.json")):
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: unreadable ({exc})") from exc
        if not isinstance(raw, dict):
            raise ModelError(f"{path}: not a JSON object")
        strategy = raw.get("pooling_strategy", "max")
        activation = raw.get("activation_function", "relu")
        if strategy != "max":
            raise ModelError(f"{path}: pooling_strategy {strategy!r} is not supported (only 'max')")
        if activation not in _SPLADE_POOLING_ACTIVATIONS:
            raise ModelError(
                f"{path}: activation_function {activation!r} is not supported "
                f"({', '.join(_SPLADE_POOLING_ACTIVATIONS)})"
            )
        found[str(path.relative_to(src))] = _SPLADE_POOLING_ACTIVATIONS[activation]
    if len(set(found.values())) > 1:
        raise ModelError(
            f"{src}: its SpladePooling modules disagree ({found}); pass --pooling "
            f"({', '.join(POOLINGS)})"
        )
    return next(iter(found.values()), None)


def _check_pad_token(src: Path, tok: Tokenizer, pad_id: int) -> None:
    """The padding token the tokenizer declares (its padding settings, else tokenizer_config.json's
    ``pad_token``), when it declares one, must be config.json's ``pad_token_id``: RoBERTa's
    positions count from it, and the runtime pads with it."""
    declared: dict[str, Any] = {}
    if tok.padding:
        declared[f"{TOKENIZER_FILE} padding"] = tok.padding.get("pad_id")
    path = src / "tokenizer_config.json"
    if path.is_file():
        try:
            token = json.loads(path.read_text()).get("pad_token")
        except (ValueError, AttributeError):
            token = None
        if isinstance(token, dict):  # {"content": "<pad>", ...} in older files
            token = token.get("content")
        if isinstance(token, str) and tok.token_to_id(token) is not None:
            declared[f"tokenizer_config.json pad_token {token!r}"] = tok.token_to_id(token)
    for where, got in declared.items():
        if got != pad_id:
            raise ModelError(
                f"{src}: config.json says pad_token_id {pad_id}, but {where} is id {got}; "
                "the tokenizer does not belong to this checkpoint, or config.json's pad_token_id "
                "is wrong"
            )


def _max_length(src: Path, positions: int) -> int:
    path = src / "tokenizer_config.json"
    if path.is_file():
        try:
            declared = int(json.loads(path.read_text()).get("model_max_length", positions))
        except (ValueError, TypeError):
            declared = positions
        if 0 < declared < positions:
            return declared
    return positions
