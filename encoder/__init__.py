"""SPLADE sparse encoder: ONNX (INT8) on the CPU, exported from Hugging Face weights without torch.

from encoder import SparseEncoder, fetch_default_model
enc = SparseEncoder.load(fetch_default_model())
enc.encode_documents(["some text"])  # [{"token": weight, ...}]
"""

from encoder.cpu import available_cpus, cpu_features
from encoder.errors import ModelError
from encoder.features import es_feature_name
from encoder.fetch import cache_root, default_model_dir, fetch_default_model, fetch_model
from encoder.metadata import FidelityInfo, ModelMetadata, QuantizationInfo
from encoder.passages import Passage
from encoder.registry import MODELS, ModelDescription
from encoder.runtime import EncodeStats, SparseEncoder, SparseVector

__all__ = [
    "MODELS",
    "EncodeStats",
    "FidelityInfo",
    "ModelDescription",
    "ModelError",
    "ModelMetadata",
    "Passage",
    "QuantizationInfo",
    "SparseEncoder",
    "SparseVector",
    "available_cpus",
    "cache_root",
    "cpu_features",
    "default_model_dir",
    "es_feature_name",
    "fetch_default_model",
    "fetch_model",
]
