"""``sparse_model.json``: what a model folder holds and how it was made."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from encoder.errors import ModelError
from encoder.registry import Pooling, QueryMode

METADATA_FILE = "sparse_model.json"
MODEL_FILE = "model.onnx"
FP32_MODEL_FILE = "model.fp32.onnx"
TOKENIZER_FILE = "tokenizer.json"
IDF_FILE = "idf.json"
FORMAT_VERSION = 1

LongTextMode = Literal["chunk", "truncate", "passages"]
LONG_TEXT_MODES: tuple[LongTextMode, ...] = ("chunk", "truncate", "passages")


@dataclass(frozen=True)
class QuantizationInfo:
    """How ``model.onnx`` was quantized. ``method == "none"`` means FP32."""

    method: Literal["none", "dynamic"] = "none"
    weight_type: str = "float32"  # "int8" (signed, symmetric) when quantized
    activation_type: str = "float32"  # "uint8, per tensor, scale computed per batch" when dynamic
    per_channel: bool = False
    reduce_range: bool = False
    op_types: tuple[str, ...] = ()
    fp32_nodes: tuple[str, ...] = ()  # MatMuls deliberately left in FP32

    @property
    def label(self) -> str:
        if self.method == "none":
            return "fp32"
        return f"int8-{self.method}{'-per-channel' if self.per_channel else ''}"


@dataclass(frozen=True)
class FidelityInfo:
    """INT8 against FP32 on the exporter's probe texts, measured at export."""

    texts: int
    mean_cosine: float
    min_cosine: float
    top10_overlap: float
    max_abs_diff: float


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_length: int
    quantization: QuantizationInfo
    # the activation after the max over positions (encoder.registry.POOLINGS): log1p(relu), or
    # log1p twice (OpenSearch v3 doc models)
    pooling: Pooling = "splade_max"
    long_text: LongTextMode = "chunk"
    window_overlap: int = 64
    # tokens per window (truncate, chunk, passages), special tokens not counted; 0: as many as
    # the model takes (max_length minus [CLS] and [SEP])
    window_tokens: int = 0
    # the token id padded batches are filled with (config.json's pad_token_id); None in folders
    # exported before it was recorded (all BERT/DistilBERT: the runtime takes the tokenizer's
    # padding settings, else 0). Padding never changes a vector (it is masked out), but RoBERTa
    # counts positions from it.
    pad_token_id: int | None = None
    query_mode: QueryMode = "model"
    license: str = ""
    source: str = ""
    source_checksums: dict[str, str] = field(default_factory=dict)  # file -> sha256
    exporter_version: str = ""
    graph: str = ""  # how the graph was built (fused ops, vocabulary chunks)
    files: dict[str, str] = field(default_factory=dict)  # role -> file name
    fidelity: FidelityInfo | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelMetadata:
        raw = dict(raw)
        q = dict(raw.pop("quantization", {}) or {})
        for key in ("op_types", "fp32_nodes"):
            q[key] = tuple(q.get(key, ()))
        fidelity = raw.pop("fidelity", None)
        known = set(cls.__dataclass_fields__)
        return cls(
            quantization=QuantizationInfo(**q),
            fidelity=FidelityInfo(**fidelity) if fidelity else None,
            **{k: v for k, v in raw.items() if k in known},
        )

    def info_labels(self) -> dict[str, str]:
        """Flat string labels for an info metric (Prometheus ``Info``)."""
        return {
            "name": self.name,
            "architecture": self.architecture,
            "vocab_size": str(self.vocab_size),
            "max_length": str(self.max_length),
            "quantization": self.quantization.label,
            "long_text": self.long_text,
            "query_mode": self.query_mode,
            "exporter_version": self.exporter_version,
        }


# IDF weights below this are 0 (dropped): Elasticsearch refuses feature weights below the smallest
# normal float, and no real IDF is that small.
IDF_MIN_WEIGHT = 1e-30


def read_idf(path: Path) -> dict[str, float]:
    """``idf.json``: a JSON object of ``{token: weight}``, every weight a finite number >= 0
    (null, strings, lists, NaN, Infinity or a negative weight are refused, naming how many
    tokens have one); a weight under ``IDF_MIN_WEIGHT`` is 0, left out of the result."""
    try:
        raw = json.loads(path.read_text())  # NaN and Infinity parse, and are refused below
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: query mode 'idf' needs a readable idf.json ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelError(
            f"{path}: not a JSON object of token weights ({type(raw).__name__}); idf.json maps "
            "each token to its IDF"
        )
    weights: dict[str, float] = {}
    bad: list[str] = []
    for token, value in raw.items():
        weight = _idf_weight(value)
        if weight is None:
            bad.append(token)
        elif weight >= IDF_MIN_WEIGHT:
            weights[str(token)] = weight
    if bad:
        raise ModelError(
            f"{path}: {len(bad)} of {len(raw)} tokens have a weight that is not a finite number "
            f">= 0 (the first: {bad[0]!r}: {raw[bad[0]]!r}); fix or regenerate idf.json"
        )
    return weights


def _idf_weight(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        weight = float(value)
    except OverflowError:  # an int past float's range
        return None
    return weight if math.isfinite(weight) and weight >= 0 else None


def read_metadata(model_dir: Path) -> ModelMetadata:
    path = model_dir / METADATA_FILE
    if not path.is_file():
        raise ModelError(
            f"{path}: missing; {model_dir} is not an exported model folder. Export one with "
            "`sparse-ingest model export SRC_DIR OUT_DIR` or run `sparse-ingest model fetch-default`"
        )
    try:
        raw = json.loads(path.read_text())
        meta = ModelMetadata.from_dict(raw)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{path}: unreadable metadata ({exc}); export the model again") from exc
    if meta.format_version > FORMAT_VERSION:
        raise ModelError(
            f"{path}: format version {meta.format_version} is newer than this package "
            f"understands ({FORMAT_VERSION}); upgrade sparse-ingest"
        )
    return meta


def write_metadata(model_dir: Path, meta: ModelMetadata) -> None:
    (model_dir / METADATA_FILE).write_text(meta.to_json())


def document_fingerprint(model_path: Path, tokenizer_path: Path, meta: ModelMetadata) -> str:
    """A short digest of everything a document vector depends on: the ONNX file as it is on
    disk (weights, quantization, exporter), the tokenizer, and how long texts are handled.
    The service stores it with each document and folds it into the content hash, so that a
    new model, a re-export or another long-text mode re-encodes unchanged texts too."""
    digest = hashlib.sha256()
    for path in (model_path, tokenizer_path):
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    digest.update(
        f"|{meta.pooling}|{meta.long_text}|{meta.window_overlap}|{meta.max_length}".encode()
    )
    if meta.window_tokens:  # only when set: the fingerprints of earlier releases stay the same
        digest.update(f"|window {meta.window_tokens}".encode())
    return digest.hexdigest()[:16]
