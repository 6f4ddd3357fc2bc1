"""Encoder benchmark: throughput, peak memory and INT8 fidelity.

    .venv/bin/python bench/encoder_bench.py --scifact ../shared/eval/scifact --random-base

For each model (the default SPLADE-tiny, and with ``--random-base`` a randomly initialised
BERT-base-shaped model exported by our exporter) and each workload (texts of exactly 64/128/256/512
tokens, and the SciFact corpus), it runs in a fresh subprocess each of:

- ``int8``: our SparseEncoder on ``model.onnx`` (INT8, fused SPLADE pooling in the graph)
- ``fp32``: our SparseEncoder on ``model.fp32.onnx``
- ``ort-fp32-numpy``: the usual export (graph outputs logits [batch, seq, vocab]) and SPLADE
  pooling in numpy, as fastembed does; same sorted token-budget batches, texts cut at 512 tokens
- ``torch``: PyTorch eager (transformers), only when torch and transformers are importable
- ``gemm-int8``: the GEMM-bound reference, a graph of only the model's MatMuls (same shapes,
  same dynamic INT8 quantization) run on batches of the same token count

and reports real tokens/s (padding excluded), documents/s and peak RSS (``ru_maxrss`` of the
subprocess). ``--fidelity`` adds INT8-vs-FP32 on the default model over SciFact: cosine per
document, top-10 overlap of brute-force retrieval per query, and nDCG@10 of both.

The machine is shared and noisy: configurations run one after the other in the same run, each
timed as the best of ``--repeat`` passes; ``--rounds 2`` runs the whole list twice and keeps the best.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encoder import (  # noqa: E402
    EncodeStats,
    SparseEncoder,
    available_cpus,
    cpu_features,
    fetch_default_model,
)
from encoder.fetch import cache_root, fetch_source  # noqa: E402
from encoder.registry import DEFAULT_MODEL_NAME  # noqa: E402

LENGTHS = (64, 128, 256, 512)
KINDS = ("int8", "fp32", "ort-fp32-numpy", "torch", "gemm-int8")


# ------------------------------------------------------------------------------- workloads


def fixed_length_texts(tokenizer_json: Path, length: int, count: int, seed: int = 0) -> list[str]:
    """``count`` texts of exactly ``length`` tokens ([CLS] and [SEP] included)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    # whole words (WordPiece "word", byte-level BPE "Ġword", SentencePiece "▁word") that stay one
    # token each wherever they stand in a text of space-separated words
    candidates = sorted(
        {
            w
            for w in (t.removeprefix("Ġ").removeprefix("▁") for t in tok.get_vocab())
            if w.isalpha() and w.isascii() and w.islower() and len(w) > 2
        }
    )
    encoded = tok.encode_batch([f"{w} {w}" for w in candidates], add_special_tokens=False)
    words = [w for w, e in zip(candidates, encoded, strict=True) if len(e.ids) == 2]
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(words, length - 2)) for _ in range(count)]
    counts = [len(e.ids) for e in tok.encode_batch(texts)]
    assert set(counts) == {length}, set(counts)
    return texts


def scifact_texts(folder: Path, limit: int | None = None) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    with (folder / "corpus.jsonl").open() as fh:
        for line in fh:
            doc = json.loads(line)
            ids.append(str(doc["_id"]))
            texts.append(f"{doc.get('title', '')} {doc['text']}".strip())
    if limit:
        ids, texts = ids[:limit], texts[:limit]
    return ids, texts


def workload_texts(spec: dict[str, Any], tokenizer_json: Path) -> list[str]:
    if spec["type"] == "fixed":
        return fixed_length_texts(tokenizer_json, spec["length"], spec["docs"])
    return scifact_texts(Path(spec["path"]), spec["docs"])[1]


# ---------------------------------------------------------------------------------- models


# Random models of real shapes (``--random``): name -> (shape in encoder.synthetic, tokenizer).
# "wordpiece" is the default model's BERT tokenizer (vocabulary 30522; GTE's 30528 rows are cut
# to it as for the real doc-v3-gte); "bpe" is a byte-level BPE tokenizer as RoBERTa's, trained on
# a small built-in text by the tests' trainer and padded with unused special tokens to the
# model's vocabulary, so the shapes are the real ones but SciFact texts split into more tokens
# than the real tokenizer would make: for those models only the fixed-length workloads run.
RANDOM_SHAPES = {
    "bert-base": ("BERT_BASE", "wordpiece"),
    "granite-30m": ("GRANITE_30M_SPARSE", "bpe"),
    "gte-base": ("GTE_BASE", "wordpiece"),
}


def _random_name(shape: str) -> str:
    return f"random-{shape}"


def _shape_of(model_name: str) -> str | None:
    return next((s for s in RANDOM_SHAPES if _random_name(s) == model_name), None)


def _bpe_tokenizer(vocab_size: int) -> Path:
    """A RoBERTa-style byte-level BPE tokenizer folder with exactly ``vocab_size`` tokens."""
    from tokenizers import AddedToken, Tokenizer

    folder = cache_root() / "bench" / f"bpe-tokenizer-{vocab_size}"
    if (folder / "tokenizer.json").is_file():
        return folder
    sys.path.insert(0, str(ROOT / "tests"))
    from trained_tokenizers import train_roberta_tokenizer

    train_roberta_tokenizer(folder, vocab_size=1200)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(f"<extra_{i}>", special=True) for i in range(missing)])
    tok.save(str(folder / "tokenizer.json"))
    return folder


def prepare_models(args: argparse.Namespace) -> dict[str, Path]:
    """Model folders: the default model, and the random models asked for (exported once)."""
    models = {DEFAULT_MODEL_NAME: fetch_default_model()} if not args.no_default else {}
    for shape in args.random:
        name = _random_name(shape)
        out = cache_root() / "bench" / name
        if not _is_current(out):
            from encoder.export import export_model

            weights = _random_weights(name)
            tokenizer = RANDOM_SHAPES[shape][1]
            src = (
                fetch_source(DEFAULT_MODEL_NAME)  # its tokenizer (vocabulary 30522)
                if tokenizer == "wordpiece"
                else _bpe_tokenizer(weights.config.vocab_size)
            )
            print(f"exporting a random {shape} into {out} ...", file=sys.stderr)
            export_model(src, out, weights=weights, name=name)
        models[name] = out
    return models


def _random_weights(model_name: str) -> Any:
    from encoder import synthetic

    shape = _shape_of(model_name)
    assert shape is not None, model_name
    return synthetic.random_masked_lm(getattr(synthetic, RANDOM_SHAPES[shape][0]), seed=0)


def _is_current(folder: Path) -> bool:
    from encoder.errors import ModelError
    from encoder.export import EXPORTER_VERSION
    from encoder.metadata import read_metadata

    try:
        return read_metadata(folder).exporter_version == EXPORTER_VERSION
    except ModelError:
        return False


def _weights_for(model_dir: Path) -> Any:
    from encoder.checkpoint import load_masked_lm
    from encoder.metadata import read_metadata

    name = read_metadata(model_dir).name
    if _shape_of(name):
        return _random_weights(name)
    return load_masked_lm(fetch_source(DEFAULT_MODEL_NAME))


def _helper_dir(model_dir: Path) -> Path:
    from encoder.metadata import read_metadata

    meta = read_metadata(model_dir)  # helpers follow the exporter: rebuilt when it changes
    path = cache_root() / "bench" / "helpers" / meta.name / meta.exporter_version.replace("/", "-")
    path.mkdir(parents=True, exist_ok=True)
    return path


def logits_model(model_dir: Path) -> Path:
    """The usual export of the same weights: logits [batch, seq, vocab], FP32, no pooling."""
    path = _helper_dir(model_dir) / "logits.fp32.onnx"
    if not path.is_file():
        import onnx

        from encoder.graph import GraphOptions, build_graph

        onnx.save(build_graph(_weights_for(model_dir), GraphOptions(head="logits")), str(path))
    return path


def gemm_model(model_dir: Path) -> Path:
    """Only the MatMuls of the model (same shapes, same INT8 quantization), chained."""
    path = _helper_dir(model_dir) / "gemm.int8.onnx"
    if path.is_file():
        return path
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from encoder.export import QuantizeOptions, quantize_int8
    from encoder.graph import GraphOptions
    from encoder.metadata import read_metadata

    meta = read_metadata(model_dir)
    h, inter, vocab = meta.hidden_size, meta.intermediate_size, meta.vocab_size
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def matmul(x: str, k: int, n: int, name: str) -> str:
        w = (rng.standard_normal((k, n), dtype=np.float32) / math.sqrt(k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}.w"))
        nodes.append(helper.make_node("MatMul", [x, f"{name}.w"], [name], name=f"{name}.node"))
        return name

    x = "x"
    for i in range(meta.num_layers):
        q = matmul(x, h, h, f"l{i}.q")
        k = matmul(q, h, h, f"l{i}.k")
        v = matmul(k, h, h, f"l{i}.v")
        o = matmul(v, h, h, f"l{i}.o")
        f1 = matmul(o, h, inter, f"l{i}.ffn_in")
        x = matmul(f1, inter, h, f"l{i}.ffn_out")
    x = matmul(x, h, h, "head.transform")
    chunks = GraphOptions().vocab_chunks
    bounds = np.linspace(0, vocab, chunks + 1).astype(int)
    tails = []
    for j in range(chunks):
        y = matmul(x, h, int(bounds[j + 1] - bounds[j]), f"vocab{j}")
        tails.append(f"{y}.first")  # keep a 1x1 slice so the output stays tiny
        starts, ends = f"{y}.s", f"{y}.e"
        inits.append(numpy_helper.from_array(np.array([0, 0], np.int64), starts))
        inits.append(numpy_helper.from_array(np.array([1, 1], np.int64), ends))
        nodes.append(helper.make_node("Slice", [y, starts, ends], [tails[-1]]))
    nodes.append(helper.make_node("Concat", tails, ["y"], axis=1))
    graph = helper.make_graph(
        nodes,
        "gemm_reference",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", h])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, chunks])],
        inits,
    )
    fp32 = path.with_name("gemm.fp32.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fp32))
    quantize_int8(fp32, path, QuantizeOptions())
    fp32.unlink()
    return path


# ---------------------------------------------------------------------------------- worker


def peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss it is not inherited across fork+exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _best_of(fn: Any, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process: one (model, kind, workload); returns figures and peak RSS."""
    model_dir = Path(spec["model_dir"])
    kind = spec["kind"]
    threads = spec["threads"]
    texts = workload_texts(spec["workload"], model_dir / "tokenizer.json")
    result: dict[str, Any] = {}
    if kind in ("int8", "fp32"):
        enc = SparseEncoder.load(
            model_dir,
            threads=threads,
            max_batch_tokens=spec["max_batch_tokens"],
            max_batch_docs=spec["max_batch_docs"],
            model_file="model.fp32.onnx" if kind == "fp32" else None,
        )
        enc.encode_documents(texts[:8])  # warm the arena on real shapes
        stats = EncodeStats()

        def once() -> None:
            nonlocal stats
            stats = EncodeStats()
            enc.encode_documents(texts, stats)

        seconds = _best_of(once, spec["repeat"])
        result.update(
            tokens=stats.tokens,
            padded_tokens=stats.padded_tokens,
            batches=stats.batches,
            inference_share=stats.inference_seconds / stats.total_seconds,
        )
    elif kind == "ort-fp32-numpy":
        seconds, tokens = _numpy_pooling(spec, model_dir, texts)
        result.update(tokens=tokens)
    elif kind == "torch":
        seconds, tokens = _torch_eager(spec, model_dir, texts)
        result.update(tokens=tokens)
    elif kind == "gemm-int8":
        import onnxruntime as ort

        from encoder.metadata import read_metadata

        meta = read_metadata(model_dir)
        batch = spec["max_batch_tokens"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(gemm_model(model_dir)), opts)
        x = np.random.default_rng(0).standard_normal((batch, meta.hidden_size), dtype=np.float32)
        sess.run(None, {"x": x})
        n_runs = max(2, spec["gemm_tokens"] // batch)

        def runs() -> None:
            for _ in range(n_runs):
                sess.run(None, {"x": x})

        seconds = _best_of(runs, spec["repeat"])
        result.update(tokens=batch * n_runs)
        texts = []
    else:
        raise ValueError(kind)
    result.update(
        seconds=seconds,
        docs=len(texts),
        tokens_per_s=result["tokens"] / seconds,
        docs_per_s=len(texts) / seconds if texts else None,
        peak_rss_mb=peak_rss_mb(),
    )
    return result


def _batches(lengths: Sequence[int], spec: dict[str, Any]) -> list[list[int]]:
    from encoder.batching import plan_batches

    return plan_batches(lengths, spec["max_batch_tokens"], spec["max_batch_docs"])


def _numpy_pooling(spec: dict[str, Any], model_dir: Path, texts: list[str]) -> tuple[float, int]:
    """The fastembed way: logits out of ORT, log1p(relu(.)) * mask, max over seq in numpy."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from encoder.features import FeatureTable

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(512)
    tok.no_padding()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = spec["threads"]
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(logits_model(model_dir)), opts)
    table = FeatureTable.from_tokenizer(tok, sess.get_outputs()[0].shape[-1])
    tokens = 0

    def once() -> None:
        nonlocal tokens
        encs = tok.encode_batch(texts)
        lengths = [len(e.ids) for e in encs]
        tokens = sum(lengths)
        for batch in _batches(lengths, spec):
            width = max(lengths[i] for i in batch)
            ids = np.zeros((len(batch), width), np.int64)
            mask = np.zeros_like(ids)
            for r, i in enumerate(batch):
                ids[r, : lengths[i]] = encs[i].ids
                mask[r, : lengths[i]] = 1
            logits = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            weights = np.log1p(np.maximum(logits, 0)) * mask[:, :, None]
            table.to_dicts(weights.max(axis=1))

    once()
    return _best_of(once, spec["repeat"]), tokens


def _torch_eager(spec: dict[str, Any], model_dir: Path, texts: list[str]) -> tuple[float, int]:
    import torch
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertForMaskedLM

    from encoder.metadata import read_metadata

    torch.set_num_threads(spec["threads"])
    meta = read_metadata(model_dir)
    if meta.name == "random-bert-base":
        model = BertForMaskedLM(BertConfig())  # random, BERT-base shape
    else:
        model = BertForMaskedLM.from_pretrained(str(fetch_source(DEFAULT_MODEL_NAME)))
    model.eval()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(512)
    tok.no_padding()
    tokens = 0

    def once() -> None:
        nonlocal tokens
        encs = tok.encode_batch(texts)
        lengths = [len(e.ids) for e in encs]
        tokens = sum(lengths)
        with torch.inference_mode():
            for batch in _batches(lengths, spec):
                width = max(lengths[i] for i in batch)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, i in enumerate(batch):
                    ids[r, : lengths[i]] = torch.tensor(encs[i].ids)
                    mask[r, : lengths[i]] = 1
                logits = model(input_ids=ids, attention_mask=mask).logits
                (torch.log1p(torch.relu(logits)) * mask[..., None]).amax(1).numpy()

    once()
    return _best_of(once, spec["repeat"]), tokens


def spawn_worker(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -------------------------------------------------------------------------------- fidelity


@dataclass
class EvalData:
    doc_ids: list[str]
    docs: list[str]
    qids: list[str]
    queries: list[str]
    qrels: dict[str, set[str]]


def load_eval(scifact: Path) -> EvalData:
    doc_ids, docs = scifact_texts(scifact)
    queries: dict[str, str] = {}
    with (scifact / "queries.jsonl").open() as fh:
        for line in fh:
            q = json.loads(line)
            queries[str(q["_id"])] = q["text"]
    qrels: dict[str, set[str]] = {}
    with (scifact / "qrels" / "test.tsv").open() as fh:
        for line in fh:
            parts = line.strip().split("\t")
            if len(parts) >= 3 and parts[0] != "query-id" and float(parts[2]) > 0:
                qrels.setdefault(parts[0], set()).add(parts[1])
    qids = [q for q in queries if q in qrels]
    return EvalData(doc_ids, docs, qids, [queries[q] for q in qids], qrels)


@dataclass
class EvalRun:
    docs: list[dict[str, float]]
    queries: list[dict[str, float]]
    top10: list[list[int]]
    ndcg10: float


def evaluate(enc: SparseEncoder, data: EvalData) -> EvalRun:
    """Encode corpus and queries; brute-force dot-product retrieval; nDCG@10 (binary qrels)."""
    dvecs = enc.encode_documents(data.docs)
    qvecs = enc.encode_queries(data.queries)
    postings: dict[str, tuple[list[int], list[float]]] = {}
    for d, vec in enumerate(dvecs):
        for t, w in vec.items():
            p = postings.setdefault(t, ([], []))
            p[0].append(d)
            p[1].append(w)
    arrays = {t: (np.array(i), np.array(w, np.float32)) for t, (i, w) in postings.items()}
    tops, ndcg = [], []
    for qid, qvec in zip(data.qids, qvecs, strict=True):
        scores = np.zeros(len(data.docs), np.float32)
        for t, w in qvec.items():
            if t in arrays:
                idx, vals = arrays[t]
                scores[idx] += w * vals
        top = np.argsort(-scores, kind="stable")[:10].tolist()
        tops.append(top)
        rel = data.qrels[qid]
        dcg = sum(1 / math.log2(r + 2) for r, d in enumerate(top) if data.doc_ids[d] in rel)
        ndcg.append(dcg / sum(1 / math.log2(r + 2) for r in range(min(len(rel), 10))))
    return EvalRun(dvecs, qvecs, tops, float(np.mean(ndcg)))


def compare_runs(int8: EvalRun, fp32: EvalRun) -> dict[str, Any]:
    vocab: dict[str, int] = {}
    cos: list[float] = []
    for start in range(0, len(fp32.docs), 512):
        pairs = list(
            zip(int8.docs[start : start + 512], fp32.docs[start : start + 512], strict=True)
        )
        for a, b in pairs:
            for t in (*a, *b):
                vocab.setdefault(t, len(vocab))
        ma = np.zeros((len(pairs), len(vocab)), np.float32)
        mb = np.zeros_like(ma)
        for r, (a, b) in enumerate(pairs):
            ma[r, [vocab[t] for t in a]] = list(a.values())
            mb[r, [vocab[t] for t in b]] = list(b.values())
        cos.extend(
            ((ma * mb).sum(1) / (np.linalg.norm(ma, axis=1) * np.linalg.norm(mb, axis=1))).tolist()
        )
    overlap = [len(set(a) & set(b)) / 10 for a, b in zip(int8.top10, fp32.top10, strict=True)]
    return {
        "doc_cosine_mean": float(np.mean(cos)),
        "doc_cosine_min": float(np.min(cos)),
        "top10_overlap": float(np.mean(overlap)),
        "ndcg@10_int8": int8.ndcg10,
        "ndcg@10_fp32": fp32.ndcg10,
        "ndcg@10_delta": int8.ndcg10 - fp32.ndcg10,
        "doc_nonzero_mean": float(np.mean([len(v) for v in int8.docs])),
        "query_nonzero_mean": float(np.mean([len(v) for v in int8.queries])),
    }


def fidelity_report(
    model_dir: Path,
    scifact: Path,
    threads: int,
    variants: dict[str, Path] | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """INT8 vs FP32 on SciFact for model.onnx (and for each variant folder's model.onnx);
    ``limit``: the first N documents only (retrieval over those)."""
    data = load_eval(scifact)
    if limit:
        data = EvalData(
            data.doc_ids[:limit], data.docs[:limit], data.qids, data.queries, data.qrels
        )
    fp32 = evaluate(
        SparseEncoder.load(model_dir, threads=threads, model_file="model.fp32.onnx"), data
    )
    out: dict[str, Any] = {"docs": len(data.docs), "queries": len(data.qids)}
    for name, folder in {"model.onnx": model_dir, **(variants or {})}.items():
        out[name] = compare_runs(evaluate(SparseEncoder.load(folder, threads=threads), data), fp32)
        print(name, json.dumps(out[name]), file=sys.stderr, flush=True)
    return out


QUANT_VARIANTS: dict[str, dict[str, Any]] = {
    "per-channel": {"op_types": ("MatMul",)},
    "per-tensor": {"per_channel": False},
    "per-channel+vocab-fp32": {"fp32_groups": ("vocab",)},
    "per-channel+int8-embeddings": {"op_types": ("MatMul", "Gather")},  # the default
    # attention as standard ops (the control) and with its activation x activation MatMuls
    # (Q.K^T, P.V) quantized too (DynamicQuantizeLinear on both inputs + MatMulInteger)
    # the exporter's default before version 3: ORT's SkipLayerNormalization kernel
    "skip-layernorm": {"graph": {"skip_layernorm": True}},
    # the exporter's default before version 4: com.microsoft MultiHeadAttention and BiasGelu
    "mha+bias-gelu": {"graph": {"attention": "mha", "bias_gelu": True}},
    "mha": {"graph": {"attention": "mha"}},
    "bias-gelu": {"graph": {"bias_gelu": True}},
    "plain-attention": {"graph": {"attention": "plain"}},
    "plain-attention+attention-int8": {"graph": {"attention": "plain"}, "const_b_only": False},
    "qattention": {
        "graph": {"attention": "attention"},
        "op_types": ("MatMul", "Gather", "Attention"),
    },
}


def quant_variants(model_name: str, model_dir: Path, names: Sequence[str] = ()) -> dict[str, Path]:
    """Export each quantization variant of a model (once) into the bench cache."""
    from encoder.export import QuantizeOptions, export_model
    from encoder.graph import GraphOptions

    out = {}
    for name, kw in QUANT_VARIANTS.items():
        if names and name not in names:
            continue
        kw = dict(kw)
        graph = GraphOptions(**kw.pop("graph", {}))
        folder = cache_root() / "bench" / "quant" / model_name / name
        if not _is_current(folder):
            print(f"exporting {model_name} {name} ...", file=sys.stderr, flush=True)
            export_model(
                fetch_source(DEFAULT_MODEL_NAME),
                folder,
                weights=_weights_for(model_dir),
                name=f"{model_name}.{name}",
                keep_fp32=False,
                quantize_options=QuantizeOptions(**kw),
                graph_options=graph,
            )
        out[name] = folder
    return out


# ------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scifact", type=Path, help="BEIR SciFact folder (corpus.jsonl, ...)")
    parser.add_argument("--random-base", action="store_true", help="same as --random bert-base")
    parser.add_argument(
        "--random", default="", help=f"random models of these shapes: {','.join(RANDOM_SHAPES)}"
    )
    parser.add_argument("--no-default", action="store_true", help="leave the default model out")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--fixed-tokens", type=int, default=0, help="tokens per fixed workload")
    parser.add_argument("--scifact-docs", default="tiny=1000,base=200", help="docs per model")
    parser.add_argument("--threads", type=int, default=available_cpus())
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--max-batch-docs", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--fidelity", action="store_true", help="INT8 vs FP32 on SciFact")
    parser.add_argument(
        "--fidelity-docs",
        type=int,
        default=500,
        help="SciFact documents when --random is given (all of them otherwise)",
    )
    parser.add_argument(
        "--quant-study",
        action="store_true",
        help="fidelity (default model) and speed of each quantization variant",
    )
    parser.add_argument("--variants", help="--quant-study: only these variants (comma list)")
    parser.add_argument("--rss-check", action="store_true", help="BERT-base INT8, 32 x 256 batches")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "tmp" / "encoder_bench.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.random = [r for r in args.random.split(",") if r] + (["bert-base"] * args.random_base)
    unknown = set(args.random) - set(RANDOM_SHAPES)
    if unknown:
        parser.error(f"--random: unknown {sorted(unknown)}; known: {', '.join(RANDOM_SHAPES)}")
    args.random = list(dict.fromkeys(args.random))
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    from encoder.runtime import DEFAULT_MAX_BATCH_DOCS

    models = prepare_models(args)
    kinds = [k for k in args.kinds.split(",") if k]
    if "torch" in kinds and not _have_torch():
        print("torch/transformers not installed: skipping the PyTorch eager rows", file=sys.stderr)
        kinds.remove("torch")
    docs_per_model = dict(kv.split("=") for kv in args.scifact_docs.split(","))
    batch_tokens = {name: _batch_tokens(args, folder) for name, folder in models.items()}
    batch_docs = args.max_batch_docs or DEFAULT_MAX_BATCH_DOCS
    jobs = []
    for model_name, model_dir in models.items():
        base = model_name != DEFAULT_MODEL_NAME
        for length in [int(x) for x in args.lengths.split(",") if x]:
            total = args.fixed_tokens or (65536 if base else 262144)
            workload = {"type": "fixed", "length": length, "docs": max(8, total // length)}
            jobs.append((model_name, model_dir, f"{length} tokens", workload))
        shape = _shape_of(model_name)
        if args.scifact and not (shape and RANDOM_SHAPES[shape][1] == "bpe"):
            limit = int(docs_per_model["base" if base else "tiny"]) or None
            workload = {"type": "scifact", "path": str(args.scifact), "docs": limit}
            jobs.append((model_name, model_dir, f"scifact[{limit or 'all'}]", workload))
    if args.rss_check and "random-bert-base" in models:
        jobs.append(
            (
                "random-bert-base",
                models["random-bert-base"],
                "rss 32x256",
                {"type": "fixed", "length": 256, "docs": 128, "rss": True},
            )
        )
    for model_dir in models.values():  # build the helper graphs once, outside the timings
        if "ort-fp32-numpy" in kinds:
            logits_model(model_dir)
        if "gemm-int8" in kinds:
            gemm_model(model_dir)

    started = time.time()
    load_before = os.getloadavg()
    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    for _ in range(args.rounds):
        for model_name, model_dir, label, workload in jobs:
            for kind in kinds:
                if workload.get("rss") and kind != "int8":
                    continue
                if kind == "gemm-int8" and workload["type"] != "scifact":
                    continue  # one GEMM reference per model (it does not depend on texts)
                spec = {
                    "model_dir": str(model_dir),
                    "kind": kind,
                    "workload": workload,
                    "threads": args.threads,
                    "max_batch_tokens": 8192 if workload.get("rss") else batch_tokens[model_name],
                    "max_batch_docs": 32 if workload.get("rss") else batch_docs,
                    "repeat": args.repeat,
                    "gemm_tokens": 65536 if model_name != DEFAULT_MODEL_NAME else 262144,
                }
                res = spawn_worker(spec)
                key = (model_name, label, kind)
                old = results.get(key)
                if old is None or "error" in old or res.get("seconds", math.inf) < old["seconds"]:
                    results[key] = res
                _print_row(model_name, label, kind, results[key])
    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "threads": args.threads,
        "max_batch_tokens": batch_tokens,
        "max_batch_docs": batch_docs,
        "cpu": platform.processor() or platform.machine(),
        "cpu_features": cpu_features(),
        "results": [
            {"model": m, "workload": w, "kind": k, **r} for (m, w, k), r in results.items()
        ],
    }
    _summary(report, results)
    if args.quant_study and args.scifact:
        report["quant_study"] = quant_study(args, models, batch_tokens, batch_docs, docs_per_model)
    if args.fidelity and args.scifact and DEFAULT_MODEL_NAME in models:
        print("\nfidelity: INT8 vs FP32, default model, SciFact ...", file=sys.stderr)
        report["fidelity"] = fidelity_report(
            models[DEFAULT_MODEL_NAME],
            args.scifact,
            args.threads,
            limit=args.fidelity_docs if args.random else None,  # the same texts as theirs
        )
        print(json.dumps(report["fidelity"], indent=2))
    if args.fidelity and args.scifact:
        # random weights: what INT8 costs on each architecture's arithmetic, on real text (a
        # trained model's activations differ, so this is the architecture's share, not the model's)
        for model_name, model_dir in models.items():
            if model_name == DEFAULT_MODEL_NAME:
                continue
            print(f"\nfidelity: INT8 vs FP32, {model_name}, SciFact ...", file=sys.stderr)
            report.setdefault("fidelity_random", {})[model_name] = fidelity_report(
                model_dir, args.scifact, args.threads, limit=args.fidelity_docs
            )
            print(json.dumps(report["fidelity_random"][model_name], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def _batch_tokens(args: argparse.Namespace, model_dir: Path) -> int:
    """--max-batch-tokens, else the runtime's default for the model (1024 or 2048)."""
    from encoder.metadata import read_metadata
    from encoder.runtime import default_max_batch_tokens

    return int(args.max_batch_tokens or default_max_batch_tokens(read_metadata(model_dir)))


def quant_study(
    args: argparse.Namespace,
    models: dict[str, Path],
    batch_tokens: dict[str, int],
    batch_docs: int,
    docs_per_model: dict[str, str],
) -> dict[str, Any]:
    study: dict[str, Any] = {}
    for model_name, model_dir in models.items():
        names = [v for v in args.variants.split(",") if v] if args.variants else []
        variants = quant_variants(model_name, model_dir, names)
        limit = int(docs_per_model["tiny" if model_name == DEFAULT_MODEL_NAME else "base"]) or None
        speed: dict[str, Any] = {}
        runs = [(name, folder, "int8") for name, folder in variants.items()]
        runs.append(("fp32 (the model's own FP32 graph)", model_dir, "fp32"))
        for _ in range(args.rounds):
            for name, folder, kind in runs:
                res = spawn_worker(
                    {
                        "model_dir": str(folder),
                        "kind": kind,
                        "workload": {"type": "scifact", "path": str(args.scifact), "docs": limit},
                        "threads": args.threads,
                        "max_batch_tokens": batch_tokens[model_name],
                        "max_batch_docs": batch_docs,
                        "repeat": args.repeat,
                    }
                )
                if name not in speed or res.get("seconds", math.inf) < speed[name]["seconds"]:
                    speed[name] = res
                _print_row(model_name, f"quant {name}", kind, res)
        study[model_name] = {"speed": speed}
        if model_name == DEFAULT_MODEL_NAME:
            study[model_name]["fidelity"] = fidelity_report(
                model_dir, args.scifact, args.threads, variants
            )
    return study


def _have_torch() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def _print_row(model: str, label: str, kind: str, r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{model:18s} {label:16s} {kind:15s} ERROR {r['error']}", flush=True)
        return
    docs = f"{r['docs_per_s']:9.1f}" if r.get("docs_per_s") else "        -"
    print(
        f"{model:18s} {label:16s} {kind:15s} {r['tokens_per_s']:10.0f} tok/s {docs} docs/s "
        f"{r['peak_rss_mb']:7.0f} MB",
        flush=True,
    )


def _summary(report: dict[str, Any], results: dict[tuple[str, str, str], dict[str, Any]]) -> None:
    summary: dict[str, Any] = {}
    for (model, label, kind), r in results.items():
        if kind != "int8" or "error" in r or not label.startswith("scifact"):
            continue
        row: dict[str, Any] = {"int8_tokens_per_s": r["tokens_per_s"]}
        fp32 = results.get((model, label, "fp32"), {})
        if "tokens_per_s" in fp32:
            row["speedup_vs_our_fp32"] = r["tokens_per_s"] / fp32["tokens_per_s"]
        torch = results.get((model, label, "torch"), {})
        if "tokens_per_s" in torch:
            row["speedup_vs_pytorch_eager"] = r["tokens_per_s"] / torch["tokens_per_s"]
        gemm = next((v for (m, _, k), v in results.items() if m == model and k == "gemm-int8"), {})
        if "tokens_per_s" in gemm:
            row["fraction_of_gemm_reference"] = r["tokens_per_s"] / gemm["tokens_per_s"]
        summary[model] = row
    rss = next((r for (m, w, k), r in results.items() if w == "rss 32x256"), None)
    if rss and "peak_rss_mb" in rss:
        summary["bert_base_int8_32x256_peak_rss_mb"] = rss["peak_rss_mb"]
    report["summary"] = summary
    print("\nsummary:", json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
