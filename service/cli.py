"""The `sparse-ingest` command line.

Each package contributes its own subcommands through an ``add_subcommands(subparsers)``
function, so this module only wires them together:

- ``encoder.cli``: ``model export``, ``model fetch-default``, ``encode``
- ``service.commands``: ``run``, ``search``
- ``service.faust_runner``: ``faust``
- ``service.reindex``: ``reindex``, ``index status|retire``

and, in a checkout of the repository only (developer tooling, not in the wheel or the image):

- ``deploy.local.cli``: ``stack fetch|up|down|status``
- ``tooling.cli``: ``demo``, ``eval``
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

_CONTRIBUTORS = ("encoder.cli", "service.commands", "service.faust_runner", "service.reindex")
# present in a checkout (make setup), absent from the product wheel and image
_TOOLING = ("deploy.local.cli", "tooling.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-ingest",
        description="Kafka -> SPLADE sparse encoder (ONNX INT8) -> Elasticsearch sparse_vector",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in _CONTRIBUTORS:
        importlib.import_module(module_name).add_subcommands(subparsers)
    for module_name in _TOOLING:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # only the tooling package itself may be missing, not what it imports
            if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
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
