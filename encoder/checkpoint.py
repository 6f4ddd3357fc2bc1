"""Read a Hugging Face masked-LM checkpoint folder into numpy, without PyTorch.

Supported architectures (``ARCHITECTURES``, one entry each: how to read its config.json and how its
weights are named): ``BertForMaskedLM`` and ``DistilBertForMaskedLM`` (the SPLADE and OpenSearch
neural-sparse models), ``RobertaForMaskedLM`` and ``XLMRobertaForMaskedLM`` (IBM Granite sparse,
multilingual sparse models; the same network as BERT, but position ids start after the padding
index, ``TransformerConfig.position_offset``), and GTE: ``NewForMaskedLM`` (Alibaba's
``new-impl`` remote code, ``model_type: new``: OpenSearch's doc-v3-gte) and transformers' native
``GteForMaskedLM`` (``model_type: gte``), rotary position embeddings instead of a position table,
a gated MLP, post-LayerNorm blocks like BERT's. Weights come from ``model.safetensors`` (F32, F16
or BF16, read by a small reader of the safetensors layout) or from ``pytorch_model.bin`` (the zip
format that ``torch.save`` writes since PyTorch 1.6, read by a restricted unpickler that only
accepts the few globals a plain state dict needs, so no code from the file ever runs).

Both LayerNorm naming schemes are accepted (``weight``/``bias`` and the old ``gamma``/``beta``),
and a missing decoder weight is tied to the word embeddings, as ``tie_word_embeddings`` says.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from encoder.errors import ModelError

log = logging.getLogger(__name__)

Array = np.ndarray

_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


@dataclass(frozen=True)
class TransformerConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    layer_norm_eps: float
    hidden_act: str  # "gelu" (erf), "gelu_tanh" or "relu"
    head_act: str
    # Position id of the first token. 0 for BERT/DistilBERT; RoBERTa and XLM-R count positions
    # from the padding index + 1 (transformers' create_position_ids_from_input_ids: token i of a
    # right-padded row sits at pad_token_id + 1 + i), so a 514-row table takes 512 tokens.
    position_offset: int = 0
    pad_token_id: int = 0  # config.json's; what the runtime pads with
    # config.json's tie_word_embeddings: False needs the decoder weight in the file
    tie_word_embeddings: bool = True
    type_vocab_size: int = 0  # rows of the token-type table (0: none, DistilBERT)
    # Rotary position embeddings (GTE) instead of a position table: rotate-half over the whole
    # head, angle of position p and pair i = p / rope_position_scale * rope_theta ** (-2i / head).
    # new-impl's static NTK scaling with factor f is rope_theta = theta * f and
    # rope_position_scale = f ** (2 / head) (``ntk_rope``); transformers' "linear" is the scale.
    rotary: bool = False
    rope_theta: float = 10000.0
    rope_position_scale: float = 1.0
    # Gated MLP (GTE): act(x @ gate.T) * (x @ up.T), LayerWeights.ffn_gate and ffn_in (= up).
    gated_mlp: bool = False
    # Tokens per sequence exported by default when fewer than max_length (0: max_length). GTE
    # takes 8192 positions; 512 is what its models were trained and evaluated at.
    default_length: int = 0

    @property
    def max_length(self) -> int:
        """Tokens per sequence the position table allows (special tokens included)."""
        return self.max_position_embeddings - self.position_offset

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class LayerNormWeights:
    gamma: Array
    beta: Array


@dataclass(frozen=True)
class Linear:
    """A linear layer in PyTorch layout: ``weight`` is [out, in]."""

    weight: Array
    bias: Array


@dataclass(frozen=True)
class LayerWeights:
    query: Linear
    key: Linear
    value: Linear
    attention_output: Linear
    attention_norm: LayerNormWeights
    ffn_in: Linear  # the up projection of a gated MLP
    ffn_out: Linear
    output_norm: LayerNormWeights
    # Gated MLP (GTE): act(x @ ffn_gate.weight.T + ffn_gate.bias) * ffn_in(x); None: act(ffn_in(x)).
    ffn_gate: Linear | None = None


@dataclass(frozen=True)
class MaskedLMWeights:
    config: TransformerConfig
    word_embeddings: Array  # [vocab, hidden]
    position_embeddings: Array | None  # [max_positions, hidden]; None: rotary (config.rotary)
    token_type_embedding: Array | None  # [hidden], the type-0 row (None: no token types)
    embedding_norm: LayerNormWeights
    layers: tuple[LayerWeights, ...]
    head_transform: Linear
    head_norm: LayerNormWeights
    decoder_weight: Array  # [vocab, hidden]
    decoder_bias: Array  # [vocab]


# ----------------------------------------------------------------------------------- files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise ModelError(
        f"{folder}: no model.safetensors or pytorch_model.bin; point at a Hugging Face "
        "checkpoint folder (config.json, model.safetensors, tokenizer.json)"
    )


def read_config(folder: Path) -> TransformerConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{path}: missing; a Hugging Face checkpoint folder needs config.json")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: not a JSON object; is this a Hugging Face config.json?")
    archs = raw.get("architectures") or []
    if isinstance(archs, str):  # one name, not a list: transformers would take it as one
        archs = [archs]
    if not isinstance(archs, list):
        raise ModelError(f"{path}: architectures must be a list of names, not {archs!r}")
    model_type = raw.get("model_type", "")
    arch = next((a for a in archs if isinstance(a, str) and a in ARCHITECTURES), None)
    if arch is None and not archs:
        arch = next(
            (a for a, spec in ARCHITECTURES.items() if model_type in spec.model_types), None
        )
    if arch is None:
        raise ModelError(
            f"{path}: architecture {archs or model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (a masked-LM head is needed for SPLADE)"
        )
    try:
        cfg = ARCHITECTURES[arch].read_config(arch, path, raw)
    except KeyError as exc:
        raise ModelError(f"{path}: missing key {exc} for {arch}") from exc
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{path}: a setting of {arch} has the wrong type ({exc})") from exc
    _check_config(path, cfg)
    return cfg


def _check_config(path: Path, cfg: TransformerConfig) -> None:
    """Sizes that make a network at all, and a padding id inside the vocabulary."""
    for key, value, least in (
        ("vocab_size", cfg.vocab_size, 1),
        ("hidden_size", cfg.hidden_size, 1),
        ("num_attention_heads", cfg.num_heads, 1),
        ("intermediate_size", cfg.intermediate_size, 1),
        ("num_hidden_layers", cfg.num_layers, 0),
    ):
        if value < least:
            raise ModelError(f"{path}: {key} is {value}; {cfg.architecture} needs at least {least}")
    _check_heads(path, cfg.hidden_size, cfg.num_heads)
    if not 0 <= cfg.pad_token_id < cfg.vocab_size:
        raise ModelError(
            f"{path}: pad_token_id {cfg.pad_token_id} is outside the vocabulary (0 to "
            f"{cfg.vocab_size - 1}); set config.json's pad_token_id to the id of the tokenizer's "
            "padding token"
        )
    if cfg.max_length < 1:
        raise ModelError(
            f"{path}: max_position_embeddings {cfg.max_position_embeddings} leaves no position "
            f"after the first one ({cfg.position_offset})"
        )


def _check_heads(path: Path, hidden: int, heads: int) -> None:
    if heads < 1 or hidden % heads:
        raise ModelError(
            f"{path}: num_attention_heads {heads} does not divide hidden_size {hidden}; "
            "config.json does not describe these weights"
        )


def _pad_token_id(
    path: Path, arch: str, raw: dict[str, Any], default: int, null: int | None
) -> int:
    """config.json's ``pad_token_id``: an int >= 0 (the vocabulary bound is checked with the
    whole config, ``_check_config``); ``default`` when absent, ``null`` when null (None: null
    is an error, RoBERTa's positions count from it)."""
    pad = raw.get("pad_token_id", default)
    if pad is None and null is not None:
        pad = null
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        why = (
            f"; {arch} counts positions from it (position of token i = pad_token_id + 1 + i)"
            if null is None
            else ""
        )
        usually = ", usually 1 (<pad>)" if null is None else ""
        raise ModelError(
            f"{path}: pad_token_id is {pad!r}, not a token id{why}: set config.json's "
            f"pad_token_id to the id of the tokenizer's padding token{usually}"
        )
    return pad


def _tied(path: Path, raw: dict[str, Any]) -> bool:
    tie = raw.get("tie_word_embeddings", True)
    if not isinstance(tie, bool):
        raise ModelError(f"{path}: tie_word_embeddings must be true or false, not {tie!r}")
    return tie


def _bert_config(arch: str, path: Path, raw: dict[str, Any]) -> TransformerConfig:
    act = _activation(path, raw.get("hidden_act", "gelu"))
    return TransformerConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=int(raw["num_attention_heads"]),
        intermediate_size=int(raw["intermediate_size"]),
        max_position_embeddings=int(raw.get("max_position_embeddings", 512)),
        layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
        hidden_act=act,
        head_act=act,  # BertPredictionHeadTransform uses config.hidden_act
        pad_token_id=_pad_token_id(path, arch, raw, 0, 0),
        type_vocab_size=int(raw.get("type_vocab_size", 2)),
        tie_word_embeddings=_tied(path, raw),
    )


def _distilbert_config(arch: str, path: Path, raw: dict[str, Any]) -> TransformerConfig:
    act = _activation(path, raw.get("activation", "gelu"))
    return TransformerConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["dim"]),
        num_layers=int(raw["n_layers"]),
        num_heads=int(raw["n_heads"]),
        intermediate_size=int(raw["hidden_dim"]),
        max_position_embeddings=int(raw.get("max_position_embeddings", 512)),
        layer_norm_eps=1e-12,
        hidden_act=act,
        head_act=act,
        pad_token_id=_pad_token_id(path, arch, raw, 0, 0),
        type_vocab_size=0,
        tie_word_embeddings=_tied(path, raw),
    )


def _shape(raw: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The sizes of a BERT-shaped config, absent keys taking the defaults of transformers' config
    classes (BERT-base's, but for the vocabulary: ``vocab_size``); the weights' shapes are
    checked against them."""
    return {
        "vocab_size": int(raw.get("vocab_size", vocab_size)),
        "hidden_size": int(raw.get("hidden_size", 768)),
        "num_layers": int(raw.get("num_hidden_layers", 12)),
        "num_heads": int(raw.get("num_attention_heads", 12)),
        "intermediate_size": int(raw.get("intermediate_size", 3072)),
    }


# transformers' default vocabulary sizes of the config classes (RobertaConfig, XLMRobertaConfig,
# new-impl's NewConfig, GteConfig): what a config.json without vocab_size means.
_DEFAULT_VOCABULARY = {
    "RobertaForMaskedLM": 50265,
    "XLMRobertaForMaskedLM": 30522,
    "NewForMaskedLM": 30528,
    "GteForMaskedLM": 250048,
}


def _roberta_config(arch: str, path: Path, raw: dict[str, Any]) -> TransformerConfig:
    """RobertaForMaskedLM and XLMRobertaForMaskedLM (one config class layout). An absent key
    takes transformers' default (RobertaConfig and XLMRobertaConfig have the same but for the
    vocabulary): 512 positions, LayerNorm epsilon 1e-12, two token types, padding id 1. Real
    checkpoints set 514 and 1e-5."""
    kind = raw.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ModelError(
            f"{path}: position_embedding_type {kind!r} is not supported for {arch} "
            "(only 'absolute', the default of RoBERTa and XLM-R checkpoints)"
        )
    pad = _pad_token_id(path, arch, raw, 1, None)
    return TransformerConfig(
        architecture=arch,
        max_position_embeddings=int(raw.get("max_position_embeddings", 512)),
        layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
        hidden_act=_activation(path, raw.get("hidden_act", "gelu")),
        head_act="gelu",  # RobertaLMHead applies the erf gelu whatever hidden_act says
        position_offset=pad + 1,
        pad_token_id=pad,
        type_vocab_size=int(raw.get("type_vocab_size", 2)),
        tie_word_embeddings=_tied(path, raw),
        **_shape(raw, _DEFAULT_VOCABULARY[arch]),
    )


# GTE's models were trained at 512 tokens (gte-base-en-v1.5 and OpenSearch's doc-v3-gte take up to
# 8192): the export's default length, which --max-length raises.
GTE_DEFAULT_LENGTH = 512


def ntk_rope(theta: float, factor: float, head_size: int) -> tuple[float, float]:
    """new-impl's static NTK RoPE scaling as (rope_theta, rope_position_scale).

    ``NTKScalingRotaryEmbedding`` builds its cache for ``max_position_embeddings * factor``
    positions, which exceeds ``max_position_embeddings`` whenever ``factor > 1``, and then uses
    ``inv_freq = 1 / (theta * factor) ** (2i / head) / factor ** (2 / head)`` for every position,
    short inputs included. Dividing inv_freq by a constant is dividing the positions by it.
    With ``factor <= 1`` the cache is never rebuilt: plain RoPE."""
    if factor > 1:
        return theta * factor, factor ** (2 / head_size)
    return theta, 1.0


def _gte_shape(path: Path, arch: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The sizes and common settings of both GTE configs; absent keys take the defaults of
    NewConfig and GteConfig (the same but for the vocabulary)."""
    shape = _shape(raw, _DEFAULT_VOCABULARY[arch])
    _check_heads(path, shape["hidden_size"], shape["num_heads"])
    return shape | {
        "layer_norm_eps": float(raw.get("layer_norm_eps", 1e-12)),
        "tie_word_embeddings": _tied(path, raw),
        "rotary": True,
        "gated_mlp": True,
    }


def _gte_new_config(arch: str, path: Path, raw: dict[str, Any]) -> TransformerConfig:
    """NewForMaskedLM: new-impl's ``NewConfig``. ``unpad_inputs`` and
    ``use_memory_efficient_attention`` (xformers) change how it runs, not what it computes."""
    for key, value, supported in (
        ("position_embedding_type", raw.get("position_embedding_type", "rope"), "rope"),
        ("layer_norm_type", raw.get("layer_norm_type", "layer_norm"), "layer_norm"),
        ("logn_attention_scale", bool(raw.get("logn_attention_scale", False)), False),
    ):
        if value != supported:
            raise ModelError(
                f"{path}: {key} {value!r} is not supported for {arch} (only {supported!r}, "
                "what GTE v1.5 checkpoints use)"
            )
    shape = _gte_shape(path, arch, raw)
    theta = float(raw.get("rope_theta", 10000.0))
    scale = 1.0
    scaling = raw.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict) or scaling.get("type") != "ntk":
            kind = scaling.get("type") if isinstance(scaling, dict) else scaling
            raise ModelError(
                f"{path}: rope_scaling type {kind!r} is not supported for {arch} (only 'ntk', "
                "the one new-impl implements)"
            )
        if scaling.get("mixed_b") is not None:
            raise ModelError(
                f"{path}: rope_scaling.mixed_b (mixed NTK scaling) is not supported for {arch}; "
                "only the fixed NTK scaling of GTE v1.5 checkpoints"
            )
        theta, scale = ntk_rope(
            theta, float(scaling["factor"]), shape["hidden_size"] // shape["num_heads"]
        )
    positions = int(raw.get("max_position_embeddings", 2048))
    act = _activation(path, raw.get("hidden_act", "gelu"))
    return TransformerConfig(
        architecture=arch,
        max_position_embeddings=positions,
        hidden_act=act,
        head_act=act,  # NewLMPredictionHead: ACT2FN[config.hidden_act]
        # NewConfig leaves it to PretrainedConfig (None): 0, what its BERT tokenizer pads with
        pad_token_id=_pad_token_id(path, arch, raw, 0, 0),
        type_vocab_size=int(raw.get("type_vocab_size", 1)),
        rope_theta=theta,
        rope_position_scale=scale,
        default_length=min(GTE_DEFAULT_LENGTH, positions),
        **shape,
    )


def _gte_config(arch: str, path: Path, raw: dict[str, Any]) -> TransformerConfig:
    """GteForMaskedLM: transformers' native ``GteConfig`` (>= 5.18). RoPE settings are in
    ``rope_parameters`` (``rope_theta``, ``rope_type`` "default" or "linear" with ``factor``), or
    in the older top-level ``rope_theta`` / ``rope_scaling`` that transformers still reads."""
    params = raw.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        params, key = raw.get("rope_scaling") or {}, "rope_scaling"
    if not isinstance(params, dict):
        raise ModelError(f"{path}: {key} must be an object, not {params!r}")
    theta = float(params.get("rope_theta", raw.get("rope_theta", 160_000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        scale = 1.0
    elif kind == "linear":
        scale = float(params["factor"])
    else:
        raise ModelError(
            f"{path}: {key} rope_type {kind!r} is not supported for {arch} (only 'default' and "
            "'linear'; new-impl's NTK scaling converts to 'linear')"
        )
    if scale <= 0:
        raise ModelError(f"{path}: {key} factor {scale} must be positive")
    positions = int(raw.get("max_position_embeddings", 8192))
    return TransformerConfig(
        architecture=arch,
        max_position_embeddings=positions,
        hidden_act=_activation(path, raw.get("hidden_act", "gelu")),
        head_act="gelu",  # GteLMHead applies the erf gelu whatever hidden_act says
        pad_token_id=_pad_token_id(path, arch, raw, 1, 0),  # GteConfig's default: 1
        type_vocab_size=int(raw.get("type_vocab_size", 1)),
        rope_theta=theta,
        rope_position_scale=scale,
        default_length=min(GTE_DEFAULT_LENGTH, positions),
        **_gte_shape(path, arch, raw),
    )


def _activation(path: Path, name: str) -> str:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ModelError(
            f"{path}: activation {name!r} is not supported ({', '.join(_ACTIVATIONS)})"
        ) from None


# ------------------------------------------------------------------------------ safetensors

_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4"}


def read_safetensors(path: Path) -> dict[str, Array]:
    """Read a safetensors file as float32/int numpy arrays (BF16 and F16 become float32).
    A header that is not the safetensors layout, or a tensor whose bytes are not all in the
    file (a truncated download), is a ModelError naming the file."""
    data = path.read_bytes()
    try:
        if len(data) < 8:
            raise ValueError(f"{len(data)} bytes, shorter than the header's length field")
        (header_len,) = struct.unpack("<Q", data[:8])
        if 8 + header_len > len(data):
            raise ValueError(f"a header of {header_len} bytes in a file of {len(data)}")
        header = json.loads(data[8 : 8 + header_len])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError) as exc:
        raise ModelError(f"{path}: not a safetensors file ({exc})") from exc
    base = 8 + header_len
    size = len(data) - base
    out: dict[str, Array] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError) as exc:
            raise ModelError(
                f"{path}: tensor {name!r} has a malformed header entry ({exc}); the file is "
                "corrupt: download it again"
            ) from exc
        if dtype == "BF16":
            itemsize = 2
        elif dtype in _SAFETENSORS_DTYPES:
            itemsize = np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
        else:
            raise ModelError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        if (
            any(d < 0 for d in shape)
            or not 0 <= start <= end <= size
            or end - start != int(np.prod(shape)) * itemsize
        ):
            raise ModelError(
                f"{path}: tensor {name!r} ({dtype} {list(shape)}) should be bytes {start} to {end} "
                f"of the {size} after the header; the file is truncated or corrupt: download it "
                "again"
            )
        buf = data[base + start : base + end]
        if dtype == "BF16":
            arr = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(buf, _SAFETENSORS_DTYPES[dtype])
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        out[name] = arr.reshape(shape)
    return out


# ------------------------------------------------------------------- pytorch_model.bin (zip)

_TORCH_STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "DoubleStorage": np.dtype("<f8"),
    "BFloat16Storage": np.dtype("<u2"),  # widened to float32 below
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    array: Array
    bfloat16: bool


def _rebuild_tensor(
    storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> Array:
    base = storage.array
    itemsize = base.dtype.itemsize
    # the last element a view of ``size`` and ``stride`` reaches must be in the storage (a corrupt
    # or hostile file must not make as_strided read past it)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True) if n > 0)
    if (
        offset < 0
        or any(n < 0 or st < 0 for n, st in zip(size, stride, strict=True))
        or (0 not in size and last >= len(base))
    ):
        raise ValueError(
            f"a tensor of size {tuple(size)} at offset {offset} does not fit its storage of "
            f"{len(base)} elements"
        )
    if not size:
        arr = base[offset : offset + 1].reshape(())
    else:
        arr = np.lib.stride_tricks.as_strided(
            base[offset:], shape=size, strides=[s * itemsize for s in stride]
        )
    arr = np.array(arr)  # own the memory, contiguous
    if storage.bfloat16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    elif arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    return arr


def _rebuild_parameter(data: Array, *_: Any) -> Array:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a state dict from ``torch.save`` without torch and without running code."""

    def __init__(self, fh: Any, load_record: Callable[[str, np.dtype[Any]], Array]) -> None:
        super().__init__(fh)
        self._load_record = load_record
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not allowed in a plain state dict (refusing to load it)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if key not in self._storages:
            dtype = _TORCH_STORAGE_DTYPES[storage_type.name]
            self._storages[key] = _Storage(
                self._load_record(key, dtype), storage_type.name == "BFloat16Storage"
            )
        return self._storages[key]


def read_torch_zip(path: Path) -> dict[str, Array]:
    if not zipfile.is_zipfile(path):
        raise ModelError(
            f"{path}: not the zip format of torch.save (PyTorch >= 1.6); convert it to "
            'safetensors once, e.g. `python -c "import torch, safetensors.torch as s; '
            "s.save_file(torch.load('pytorch_model.bin'), 'model.safetensors')\"`"
        )
    with zipfile.ZipFile(path) as zf:
        pkl_names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl_names) != 1:
            raise ModelError(f"{path}: expected one data.pkl in the archive, found {pkl_names}")
        prefix = pkl_names[0][: -len("data.pkl")]

        def load_record(key: str, dtype: np.dtype[Any]) -> Array:
            return np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype=dtype)

        with zf.open(pkl_names[0]) as fh:
            try:
                state = _RestrictedUnpickler(fh, load_record).load()
            except (
                pickle.UnpicklingError,
                KeyError,
                TypeError,
                ValueError,
                EOFError,
                zipfile.BadZipFile,
                zlib.error,
            ) as exc:
                raise ModelError(f"{path}: cannot read the state dict ({exc})") from exc
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ModelError(f"{path}: the pickle does not hold a state dict")
    return {str(k): v for k, v in state.items() if isinstance(v, np.ndarray)}


def read_state_dict(path: Path) -> dict[str, Array]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_zip(path)


# ------------------------------------------------------------------------ name mapping


class _Lookup:
    def __init__(self, path: Path, state: Mapping[str, Array], prefixes: tuple[str, ...]) -> None:
        self.path = path
        self.state = state
        self.prefixes = prefixes

    def get(self, *names: str) -> Array:
        for name in names:
            for prefix in self.prefixes:
                if prefix + name in self.state:
                    return np.ascontiguousarray(self.state[prefix + name], dtype=np.float32)
        raise ModelError(
            f"{self.path}: weight {names[0]!r} not found (tried {', '.join(names)} with "
            f"prefixes {self.prefixes}); is this a masked-LM checkpoint?"
        )

    def has(self, name: str) -> bool:
        return any(p + name in self.state for p in self.prefixes)

    def linear(self, name: str) -> Linear:
        return Linear(self.get(f"{name}.weight"), self.get(f"{name}.bias"))

    def norm(self, name: str) -> LayerNormWeights:
        return LayerNormWeights(
            self.get(f"{name}.weight", f"{name}.gamma"), self.get(f"{name}.bias", f"{name}.beta")
        )


def _decoder(cfg: TransformerConfig, w: _Lookup, name: str, word: Array) -> Array:
    """The decoder weight ``name``, else (absent from the file) the word embeddings, tied as
    ``tie_word_embeddings`` (default true) says; false with no decoder weight is an error."""
    if w.has(name):
        return w.get(name)
    if not cfg.tie_word_embeddings:
        raise ModelError(
            f"{w.path}: config.json says tie_word_embeddings false, but the decoder weight "
            f"{name!r} (prefixes {w.prefixes}) is not in the file; is the checkpoint complete?"
        )
    return word


def _bert_layers(cfg: TransformerConfig, w: _Lookup) -> tuple[LayerWeights, ...]:
    """``encoder.layer.N``: the layer naming of BERT, RoBERTa and XLM-R."""
    layers = []
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        layers.append(
            LayerWeights(
                query=w.linear(p + "attention.self.query"),
                key=w.linear(p + "attention.self.key"),
                value=w.linear(p + "attention.self.value"),
                attention_output=w.linear(p + "attention.output.dense"),
                attention_norm=w.norm(p + "attention.output.LayerNorm"),
                ffn_in=w.linear(p + "intermediate.dense"),
                ffn_out=w.linear(p + "output.dense"),
                output_norm=w.norm(p + "output.LayerNorm"),
            )
        )
    return tuple(layers)


def _bert(cfg: TransformerConfig, w: _Lookup) -> MaskedLMWeights:
    word = w.get("embeddings.word_embeddings.weight")
    decoder = _decoder(cfg, w, "cls.predictions.decoder.weight", word)
    return MaskedLMWeights(
        config=cfg,
        word_embeddings=word,
        position_embeddings=w.get("embeddings.position_embeddings.weight"),
        token_type_embedding=w.get("embeddings.token_type_embeddings.weight")[0],
        embedding_norm=w.norm("embeddings.LayerNorm"),
        layers=_bert_layers(cfg, w),
        head_transform=w.linear("cls.predictions.transform.dense"),
        head_norm=w.norm("cls.predictions.transform.LayerNorm"),
        decoder_weight=decoder,
        decoder_bias=w.get("cls.predictions.bias", "cls.predictions.decoder.bias"),
    )


def _distilbert(cfg: TransformerConfig, w: _Lookup) -> MaskedLMWeights:
    layers = []
    for i in range(cfg.num_layers):
        p = f"transformer.layer.{i}."
        layers.append(
            LayerWeights(
                query=w.linear(p + "attention.q_lin"),
                key=w.linear(p + "attention.k_lin"),
                value=w.linear(p + "attention.v_lin"),
                attention_output=w.linear(p + "attention.out_lin"),
                attention_norm=w.norm(p + "sa_layer_norm"),
                ffn_in=w.linear(p + "ffn.lin1"),
                ffn_out=w.linear(p + "ffn.lin2"),
                output_norm=w.norm(p + "output_layer_norm"),
            )
        )
    word = w.get("embeddings.word_embeddings.weight")
    decoder = _decoder(cfg, w, "vocab_projector.weight", word)
    return MaskedLMWeights(
        config=cfg,
        word_embeddings=word,
        position_embeddings=w.get("embeddings.position_embeddings.weight"),
        token_type_embedding=None,
        embedding_norm=w.norm("embeddings.LayerNorm"),
        layers=tuple(layers),
        head_transform=w.linear("vocab_transform"),
        head_norm=w.norm("vocab_layer_norm"),
        decoder_weight=decoder,
        decoder_bias=w.get("vocab_projector.bias"),
    )


def _roberta(cfg: TransformerConfig, w: _Lookup) -> MaskedLMWeights:
    """RoBERTa/XLM-R: BERT's encoder under ``roberta.``, the head under ``lm_head.``."""
    word = w.get("embeddings.word_embeddings.weight")
    decoder = _decoder(cfg, w, "lm_head.decoder.weight", word)
    return MaskedLMWeights(
        config=cfg,
        word_embeddings=word,
        position_embeddings=w.get("embeddings.position_embeddings.weight"),
        # one row in RoBERTa checkpoints (type_vocab_size 1); row 0 is the one inputs use
        token_type_embedding=w.get("embeddings.token_type_embeddings.weight")[0],
        embedding_norm=w.norm("embeddings.LayerNorm"),
        layers=_bert_layers(cfg, w),
        head_transform=w.linear("lm_head.dense"),
        head_norm=w.norm("lm_head.layer_norm"),
        decoder_weight=decoder,
        decoder_bias=w.get("lm_head.bias", "lm_head.decoder.bias"),
    )


def _split_rows(path: Path, name: str, weight: Array, parts: int, rows: int) -> list[Array]:
    if weight.shape[0] != parts * rows:
        raise ModelError(
            f"{path}: {name} has {weight.shape[0]} rows, config.json implies {parts} x {rows}"
        )
    return [weight[i * rows : (i + 1) * rows] for i in range(parts)]


def _gte_layer(cfg: TransformerConfig, w: _Lookup, i: int) -> LayerWeights:
    """Layer ``i`` of a GTE checkpoint in either naming.

    new-impl's (``NewForMaskedLM``, and what transformers' ``GteForMaskedLM.save_pretrained``
    writes too, its conversion mapping turning the split weights back):
    ``encoder.layer.N.{attention.qkv_proj, attention.o_proj, attn_ln, mlp.up_gate_proj,
    mlp.down_proj, mlp_ln}``; q | k | v are the thirds of ``qkv_proj`` (``q_proj``, ... when
    ``pack_qkv`` was false), up | gate the halves of ``up_gate_proj`` (no bias; ``gelu(gate) *
    up``). transformers' module names (a state dict saved without the conversion):
    ``layers.N.{self_attn.{q,k,v,o}_proj, mlp.{up,gate,down}_proj, post_attention_layernorm,
    post_mlp_layernorm}``.
    """
    h, inter = cfg.hidden_size, cfg.intermediate_size
    zeros = np.zeros(inter, np.float32)
    p = f"encoder.layer.{i}."
    if not w.has(p + "attn_ln.weight"):
        p = f"layers.{i}."
        return LayerWeights(
            query=w.linear(p + "self_attn.q_proj"),
            key=w.linear(p + "self_attn.k_proj"),
            value=w.linear(p + "self_attn.v_proj"),
            attention_output=w.linear(p + "self_attn.o_proj"),
            attention_norm=w.norm(p + "post_attention_layernorm"),
            ffn_in=Linear(w.get(p + "mlp.up_proj.weight"), zeros),
            ffn_out=w.linear(p + "mlp.down_proj"),
            output_norm=w.norm(p + "post_mlp_layernorm"),
            ffn_gate=Linear(w.get(p + "mlp.gate_proj.weight"), zeros),
        )
    if w.has(p + "attention.qkv_proj.weight"):
        name = p + "attention.qkv_proj"
        weights = _split_rows(w.path, name + ".weight", w.get(name + ".weight"), 3, h)
        biases = _split_rows(w.path, name + ".bias", w.get(name + ".bias"), 3, h)
        q, k, v = (Linear(wt, b) for wt, b in zip(weights, biases, strict=True))
    else:
        q, k, v = (w.linear(p + f"attention.{n}_proj") for n in "qkv")
    name = p + "mlp.up_gate_proj.weight"
    up, gate = _split_rows(w.path, name, w.get(name), 2, inter)
    return LayerWeights(
        query=q,
        key=k,
        value=v,
        attention_output=w.linear(p + "attention.o_proj"),
        attention_norm=w.norm(p + "attn_ln"),
        ffn_in=Linear(up, zeros),
        ffn_out=w.linear(p + "mlp.down_proj"),
        output_norm=w.norm(p + "mlp_ln"),
        ffn_gate=Linear(gate, zeros),
    )


def _gte(cfg: TransformerConfig, w: _Lookup) -> MaskedLMWeights:
    """NewForMaskedLM and GteForMaskedLM: the encoder under ``new.`` or ``gte.`` (layers:
    ``_gte_layer``), the head ``lm_head.{dense, norm or layer_norm, decoder}``, the decoder
    weight tied to the word embeddings when absent. No position table (rotary)."""
    word = w.get("embeddings.word_embeddings.weight")
    decoder = _decoder(cfg, w, "lm_head.decoder.weight", word)
    if w.has("lm_head.decoder.bias"):
        decoder_bias = w.get("lm_head.decoder.bias")
    else:  # what transformers loads then: _init_weights zeroes a Linear's bias
        log.warning("%s: no lm_head.decoder.bias; using zeros, as transformers would", w.path)
        decoder_bias = np.zeros(word.shape[0], np.float32)
    head_norm = "lm_head.norm" if w.has("lm_head.norm.weight") else "lm_head.layer_norm"
    return MaskedLMWeights(
        config=cfg,
        word_embeddings=word,
        position_embeddings=None,
        # row 0 of the token-type table when the config has one (gte-base-en-v1.5 has none)
        token_type_embedding=(
            w.get("embeddings.token_type_embeddings.weight")[0] if cfg.type_vocab_size else None
        ),
        embedding_norm=w.norm("embeddings.LayerNorm"),
        layers=tuple(_gte_layer(cfg, w, i) for i in range(cfg.num_layers)),
        head_transform=w.linear("lm_head.dense"),
        head_norm=w.norm(head_norm),
        decoder_weight=decoder,
        decoder_bias=decoder_bias,
    )


@dataclass(frozen=True)
class Architecture:
    """How to read one architecture: its config.json, and its weight names."""

    model_types: tuple[str, ...]  # config.json's model_type, when "architectures" is absent
    read_config: Callable[[str, Path, dict[str, Any]], TransformerConfig]
    read_weights: Callable[[TransformerConfig, _Lookup], MaskedLMWeights]
    prefixes: tuple[str, ...]  # tried in order before each weight name ("" last: no prefix)
    # The vocabulary may be padded past the tokenizer's (new-impl: a multiple of 64, 30528 rows
    # for BERT's 30522 tokens): see ``padded_vocabulary``.
    pads_vocabulary: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "BertForMaskedLM": Architecture(("bert",), _bert_config, _bert, ("bert.", "")),
    "DistilBertForMaskedLM": Architecture(
        ("distilbert",), _distilbert_config, _distilbert, ("distilbert.", "")
    ),
    "RobertaForMaskedLM": Architecture(("roberta",), _roberta_config, _roberta, ("roberta.", "")),
    "XLMRobertaForMaskedLM": Architecture(
        ("xlm-roberta",), _roberta_config, _roberta, ("roberta.", "")
    ),
    "NewForMaskedLM": Architecture(
        ("new",), _gte_new_config, _gte, ("new.", "gte.", ""), pads_vocabulary=True
    ),
    "GteForMaskedLM": Architecture(
        ("gte",), _gte_config, _gte, ("gte.", "new.", ""), pads_vocabulary=True
    ),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

# A padded vocabulary has fewer extra rows than this (see Architecture.pads_vocabulary).
VOCABULARY_PADDING = 64


def padded_vocabulary(cfg: TransformerConfig, tokens: int) -> bool:
    """Whether the checkpoint's vocabulary is a tokenizer's of ``tokens`` entries plus padding:
    an architecture that pads it (GTE), by fewer than 64 rows. No token has the ids of those rows:
    no input holds them, and their logits must never be output (``drop_vocabulary_rows``)."""
    arch = ARCHITECTURES.get(cfg.architecture)
    return (
        arch is not None
        and arch.pads_vocabulary
        and tokens < cfg.vocab_size < tokens + VOCABULARY_PADDING
    )


def drop_vocabulary_rows(w: MaskedLMWeights, tokens: int) -> MaskedLMWeights:
    """The weights with the vocabulary cut to its first ``tokens`` rows (word embeddings, decoder
    weight and bias; a tied decoder stays tied)."""
    word = w.word_embeddings[:tokens]
    tied = w.decoder_weight is w.word_embeddings
    return replace(
        w,
        config=replace(w.config, vocab_size=tokens),
        word_embeddings=word,
        decoder_weight=word if tied else w.decoder_weight[:tokens],
        decoder_bias=w.decoder_bias[:tokens],
    )


def load_masked_lm(folder: str | Path) -> MaskedLMWeights:
    """Load a masked-LM checkpoint folder of a supported architecture as numpy weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: not a folder; give a Hugging Face checkpoint folder")
    cfg = read_config(folder)
    path = weights_file(folder)
    state = read_state_dict(path)
    arch = ARCHITECTURES[cfg.architecture]
    weights = arch.read_weights(cfg, _Lookup(path, state, arch.prefixes))
    _check_shapes(path, weights)
    return weights


def _check_shapes(path: Path, w: MaskedLMWeights) -> None:
    c = w.config
    h = c.hidden_size
    expected = {
        "word_embeddings": (w.word_embeddings.shape, (c.vocab_size, h)),
        "decoder weight": (w.decoder_weight.shape, (c.vocab_size, h)),
        "decoder bias": (w.decoder_bias.shape, (c.vocab_size,)),
        "ffn_in": (w.layers[0].ffn_in.weight.shape, (c.intermediate_size, h))
        if w.layers
        else ((), ()),
    }
    if w.position_embeddings is not None:
        expected["position_embeddings"] = (
            w.position_embeddings.shape,
            (c.max_position_embeddings, h),
        )
    for i, layer in enumerate(w.layers):
        expected[f"layer {i} query"] = (layer.query.weight.shape, (h, h))
        if layer.ffn_gate is not None:
            expected[f"layer {i} gate"] = (layer.ffn_gate.weight.shape, (c.intermediate_size, h))
    for name, (got, want) in expected.items():
        if got != want:
            raise ModelError(f"{path}: {name} has shape {got}, config.json implies {want}")
    if h % c.num_heads:
        raise ModelError(f"{path}: hidden size {h} is not a multiple of {c.num_heads} heads")
    if c.rotary != (w.position_embeddings is None):
        raise ModelError(f"{path}: a position table goes with absolute positions, not rotary ones")
    if any(c.gated_mlp != (layer.ffn_gate is not None) for layer in w.layers):
        raise ModelError(f"{path}: gated_mlp is {c.gated_mlp}, but the layers say otherwise")
    if c.rotary and c.head_size % 2:
        raise ModelError(f"{path}: rotary embeddings need an even head size, not {c.head_size}")
