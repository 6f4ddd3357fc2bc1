"""The `sparse-ingest` command line.

Each package contributes its own subcommands through an ``add_subcommands(subparsers)``
function, so this module only wires them together:

- ``encoder.cli``: ``model export``, ``model fetch-default``, ``encode``
- ``deploy.local.cli``: ``stack up|down|status``
- ``service.commands``: ``run``, ``search``, ``demo``
- ``service.reindex``: ``reindex``, ``index status|retire``
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

_CONTRIBUTORS = (
    "encoder.cli",
    "deploy.local.cli",
    "service.commands",
    "service.faust_runner",
    "service.demo",
    "service.eval",
    "service.reindex",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-ingest",
        description="Kafka -> SPLADE sparse encoder (ONNX INT8) -> Elasticsearch sparse_vector",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in _CONTRIBUTORS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_subcommands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # per-request logs of the clients drown the service's own
        for noisy in ("elastic_transport", "aiokafka", "aiohttp.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
