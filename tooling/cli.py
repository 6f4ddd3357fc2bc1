"""The tooling's subcommands of ``sparse-ingest``: ``demo`` and ``eval``.

``service.cli`` registers them through :func:`add_subcommands` when this package is importable
(a checkout; the product wheel and image do not hold it). The heavy modules (the service, the
encoder, the local stack) are imported when a command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import tooling.demo
import tooling.eval


def add_subcommands(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="start Kafka + Elasticsearch, fetch the model, stream documents through, search",
        description=tooling.demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--documents", type=int, default=2000, help="documents to stream (max ~1900)")
    demo.add_argument("--keep", action="store_true", help="leave everything running until Ctrl-C")
    demo.add_argument("--http-port", type=int, default=8080)
    demo.add_argument("--stack-name", default="demo")
    demo.add_argument(
        "--cdc",
        action="store_true",
        help="a Postgres table through Debezium instead: update a row, watch the search change",
    )
    demo.set_defaults(handler=_demo)

    p = subparsers.add_parser(
        "eval",
        help="retrieval quality (nDCG@10, recall@100, MRR@10) on a BEIR dataset, end to end",
        description=tooling.eval.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "beir_dir",
        metavar="BEIR_DIR",
        help="corpus.jsonl, queries.jsonl, qrels/; or a BEIR dataset name (scifact, nfcorpus, "
        "fiqa, ...: downloaded once into the cache, checksum checked)",
    )
    p.add_argument("--model", help="model folder (default: the default model, fetched once)")
    p.add_argument("--limit-docs", type=int, help="a subset: judged docs first, then a sample")
    p.add_argument("--max-queries", type=int)
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="results", help="folder for JSON, markdown and PNG")
    p.add_argument(
        "--variants",
        help="comma-separated subset of: int8 (the service's default), fp32, int8-truncate, "
        "int8-prune<X>, int8-<chunk|truncate|passages>[<window tokens>] "
        "(default: int8, fp32, int8-truncate and the --prune ones)",
    )
    p.add_argument("--prune", default="0.1,0.3", help="index-time pruning thresholds to compare")
    p.add_argument(
        "--check-queries", type=int, default=50, help="queries for the brute-force check"
    )
    p.add_argument("--kafka", help="bootstrap servers (default: start a local stack)")
    p.add_argument("--es-url", help="Elasticsearch URL (default: start a local stack)")
    p.add_argument("--keep-indices", action="store_true")
    p.set_defaults(handler=_eval)


def _demo(args: argparse.Namespace) -> int:
    if args.cdc:
        from tooling.demo.cdc import run_cdc_demo

        documents = 300 if args.documents == 2000 else args.documents
        return run_cdc_demo(documents, args.http_port, f"{args.stack_name}-cdc", args.keep)
    from tooling.demo.stream import run_stream_demo

    return run_stream_demo(args)


def _eval(args: argparse.Namespace) -> int:
    from encoder import fetch_default_model
    from encoder.metadata import read_metadata
    from tooling.eval.beir import DatasetError, load_beir, resolve_beir_dir, subset
    from tooling.eval.report import markdown, plot_quality
    from tooling.eval.runner import EvalConfig, run_eval
    from tooling.eval.variants import select_variants

    try:  # first: a wrong name fails before the model is fetched
        beir_dir = resolve_beir_dir(args.beir_dir, say=print)
    except DatasetError as exc:
        print(f"sparse-ingest eval: {exc}", file=sys.stderr)
        return 2
    model_dir = Path(args.model).expanduser() if args.model else fetch_default_model()
    meta = read_metadata(model_dir)
    prunes = [float(x) for x in args.prune.split(",") if x.strip()]
    variants = select_variants(meta.files.get("model_fp32"), prunes, args.variants)
    data = subset(load_beir(beir_dir, args.split), limit_docs=args.limit_docs,
                  max_queries=args.max_queries)  # fmt: skip
    stack = None
    kafka, es_url = args.kafka, args.es_url
    if not (kafka and es_url):
        from deploy.local import LocalStack

        stack = LocalStack(name="eval")
        info = stack.up(kafka=not kafka, elasticsearch=not es_url)
        kafka, es_url = kafka or info.kafka_bootstrap, es_url or info.es_url
    assert kafka and es_url
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval_{data.name}" + (f"_{len(data.corpus)}docs" if args.limit_docs else "")
    command = "sparse-ingest " + " ".join(sys.argv[1:])

    def save(report: dict[str, Any]) -> str:
        report["command"] = command
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        table = markdown(report)
        (out / f"{stem}.md").write_text(table)
        return table

    try:
        config = EvalConfig(kafka, es_url, model_dir, variants, args.check_queries,
                            keep_indices=args.keep_indices)  # fmt: skip
        started = time.perf_counter()
        report = asyncio.run(run_eval(data, config, checkpoint=save))
        report["seconds"] = time.perf_counter() - started
    finally:
        if stack is not None:
            stack.down()
    table = save(report)
    png = plot_quality(report, out / f"{stem}.png")
    print()
    print(table)
    print(f"wrote {out / stem}.json, .md" + (", .png" if png else " (no matplotlib: no plot)"))
    return 0
