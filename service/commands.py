"""``sparse-ingest run`` and ``sparse-ingest search``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from service.config import ConfigError, load_settings

log = logging.getLogger(__name__)


def add_subcommands(subparsers: Any) -> None:
    run = subparsers.add_parser(
        "run",
        help="consume Kafka, encode, write to Elasticsearch (settings: SPARSE_INGEST_* variables)",
        description="Run the ingest service. Every setting is an environment variable "
        "SPARSE_INGEST_<NAME>; see README.md. `sparse-ingest run --check` validates them and exits.",
    )
    run.add_argument("--check", action="store_true", help="validate the settings and exit")
    run.set_defaults(handler=_run)

    search = subparsers.add_parser("search", help="search the index with a query text")
    search.add_argument("query")
    search.add_argument("--mode", choices=["sparse", "bm25", "hybrid"], default="hybrid")
    search.add_argument("--size", type=int, default=10)
    search.add_argument("--index", help="index (default: SPARSE_INGEST_ES_INDEX)")
    search.add_argument("--es-url", help="Elasticsearch URL (default: SPARSE_INGEST_ES_URL)")
    search.add_argument("--model", help="model folder (default: SPARSE_INGEST_MODEL_DIR)")
    search.add_argument("--json", action="store_true", help="print JSON")
    search.set_defaults(handler=_search)


def _settings(**overrides: Any) -> Any:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        print(f"sparse-ingest: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args: argparse.Namespace) -> int:
    from service.app import run_forever
    from service.errors import StartupError

    settings = _settings()
    if args.check:
        for name, value in settings.redacted().items():
            print(f"SPARSE_INGEST_{name.upper()}={value}")
        return 0
    try:
        return asyncio.run(run_forever(settings))
    except StartupError as exc:
        print(f"sparse-ingest: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from encoder import ModelError

        if isinstance(exc, ModelError):
            print(f"sparse-ingest: {exc}", file=sys.stderr)
            return 1
        raise


def _search(args: argparse.Namespace) -> int:
    settings = _settings(es_index=args.index, es_url=args.es_url, model_dir=args.model)
    return asyncio.run(_search_async(settings, args))


async def _search_async(settings: Any, args: argparse.Namespace) -> int:
    from elasticsearch import NotFoundError

    from service.builder import build_sink, load_encoder, searcher_for
    from service.elastic import check_elasticsearch, elasticsearch_client
    from service.errors import StartupError

    encoder = load_encoder(settings)
    es = elasticsearch_client(settings)
    try:
        try:
            await check_elasticsearch(es, settings)
            searcher = searcher_for(build_sink(settings, es, encoder))
        except StartupError as exc:
            print(f"sparse-ingest: {exc}", file=sys.stderr)
            return 1
        try:
            await searcher.follow_mapping(settings.es_passage_field)
        except NotFoundError:
            print(
                f"sparse-ingest: index or alias {settings.es_index!r} does not exist "
                "(SPARSE_INGEST_ES_INDEX, --index)",
                file=sys.stderr,
            )
            return 1
        vector = None if args.mode == "bm25" else encoder.encode_queries([args.query])[0]
        hits = await searcher.search(args.mode, args.query, vector, args.size)
        if args.json:
            print(json.dumps([h.as_dict() for h in hits]))
            return 0
        print(f"{args.mode} search in {settings.es_index!r} for {args.query!r}: {len(hits)} hit(s)")
        for rank, hit in enumerate(hits, 1):
            title = next(
                (str(hit.source[f]) for f in settings.text_fields if hit.source.get(f)), ""
            )
            print(f"{rank:>3}. {hit.score:8.4f}  {hit.id}  {title[:90]}")
            if hit.passage is not None:
                p = hit.passage
                text = " ".join((p.text or "(text not available)").split())
                print(f"       passage {p.ordinal + 1}, characters {p.start}-{p.end}: {text[:300]}")
        return 0
    finally:
        await es.close()
