"""Command line of the local stack: ``sparse-ingest stack ...`` / ``python -m deploy.local ...``.

``add_subcommands(subparsers)`` adds ``stack fetch|up|down|status`` to the main CLI; each
leaf parser sets ``handler=function(args) -> int``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from deploy.local.artifacts import fetch
from deploy.local.errors import StackError
from deploy.local.paths import DEFAULT_STACK_NAME
from deploy.local.stack import SERVICES, LocalStack
from deploy.local.versions import (
    APICURIO_VERSION,
    CONNECT_VERSION,
    DEBEZIUM_VERSION,
    ELASTICSEARCH_VERSION,
    ELASTICSEARCH_VERSIONS,
    ES_VERSION_ENV,
)


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _stack(args: argparse.Namespace) -> LocalStack:
    return LocalStack(
        name=args.name,
        run_dir=args.run_dir,
        kafka_port=getattr(args, "kafka_port", None),
        es_port=getattr(args, "es_port", None),
        prometheus_port=getattr(args, "prometheus_port", None),
        postgres_port=getattr(args, "postgres_port", None),
        connect_port=getattr(args, "connect_port", None),
        registry_port=getattr(args, "registry_port", None),
        es_version=getattr(args, "es_version", None),
        security=getattr(args, "security", False),
        es_tls=getattr(args, "es_tls", False),
        kafka_security=getattr(args, "kafka_security", False),
        es_settings=_pairs(getattr(args, "es_setting", None)),
        kafka_settings=_pairs(getattr(args, "kafka_setting", None)),
        startup_timeout=getattr(args, "timeout", 180.0),
        log=_err,
    )


def _pairs(items: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _guard(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args))
        except StackError as exc:
            _err(f"error: {exc}")
            return 1

    return run


def cmd_fetch(args: argparse.Namespace) -> int:
    result = fetch(
        kafka=not args.no_kafka,
        elasticsearch=not args.no_elasticsearch,
        java=True,
        log=_err,
        es_version=args.es_version,
        connect=args.cdc,
        registry=args.registry,
    )
    what = ", ".join(result.downloaded) or "nothing (all cached)"
    print(f"cache: {result.cache}")
    if result.java:
        print(f"java:  {result.java.describe()}")
    if result.kafka_libs:
        print(f"kafka: {result.kafka_libs}")
    if result.elasticsearch_home:
        print(f"elasticsearch: {result.elasticsearch_home}")
    if result.connect_home:
        print(f"connect: {result.connect_home}")
    if result.registry_home:
        print(f"registry: {result.registry_home}")
    print(f"downloaded: {what} in {result.seconds:.1f}s")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    start = time.monotonic()
    info = _stack(args).up(
        kafka=not args.no_kafka,
        elasticsearch=not args.no_elasticsearch,
        prometheus=args.prometheus,
        prometheus_config=args.prometheus_config,
        postgres=args.cdc,
        connect=args.cdc,
        registry=args.registry,
    )
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        print(info.describe())
        print(
            f"ready in {time.monotonic() - start:.1f}s; stop with `sparse-ingest stack down"
            f"{'' if args.name == DEFAULT_STACK_NAME else ' --name ' + args.name}`"
        )
        for key, value in info.env().items():
            print(f"export {key}={value}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    results = _stack(args).down(timeout=args.timeout, remove_data=args.purge)
    if not results:
        print(f"stack {args.name!r}: nothing was running")
    for service, outcome in results.items():
        print(f"{service}: {outcome}")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    start = time.monotonic()
    result = _stack(args).restart_service(args.service, downtime=args.downtime)
    print(f"{args.service}: {result}, started again, ready in {time.monotonic() - start:.1f}s")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = _stack(args).status()
    if args.json:
        print(json.dumps([vars(s) for s in status.services], indent=2))
    else:
        print(status.describe())
    return 0 if status.healthy else 1


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--name", default=DEFAULT_STACK_NAME, help="stack name (default: %(default)s)"
    )
    parser.add_argument(
        "--run-dir",
        default=None,
        help="where state and logs go (default: $SPARSE_INGEST_RUN_DIR or "
        "~/.cache/sparse-ingest/run/NAME)",
    )


def _es_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--es-version",
        default=None,
        metavar="VERSION",
        help=f"Elasticsearch version, 8.11+ or 9.x (tested: {', '.join(ELASTICSEARCH_VERSIONS)}; "
        f"default: ${ES_VERSION_ENV} or {ELASTICSEARCH_VERSION})",
    )


def _cdc_flags(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--cdc",
        action="store_true",
        help=f"{verb} Postgres and Kafka Connect {CONNECT_VERSION} with Debezium "
        f"{DEBEZIUM_VERSION}'s Postgres connector",
    )
    parser.add_argument(
        "--registry",
        action="store_true",
        help=f"{verb} Apicurio Registry {APICURIO_VERSION} (Confluent-compatible API)",
    )


def _add(subparsers: Any) -> None:
    p = subparsers.add_parser("fetch", help="download Kafka, Elasticsearch (and a JDK if needed)")
    p.add_argument("--no-kafka", action="store_true")
    p.add_argument("--no-elasticsearch", action="store_true")
    _es_version(p)
    _cdc_flags(p, "also download")
    p.set_defaults(handler=_guard(cmd_fetch))

    p = subparsers.add_parser(
        "up", help="start Kafka + Elasticsearch (+ Prometheus, CDC, registry) and wait"
    )
    _common(p)
    p.add_argument("--no-kafka", action="store_true", help="do not start Kafka")
    p.add_argument("--no-elasticsearch", action="store_true", help="do not start Elasticsearch")
    _es_version(p)
    p.add_argument("--prometheus", action="store_true", help="also start Prometheus")
    p.add_argument("--prometheus-config", default=None, help="scrape config for Prometheus")
    _cdc_flags(p, "also start")
    p.add_argument("--kafka-port", type=int, default=None, help="fixed Kafka port")
    p.add_argument("--es-port", type=int, default=None, help="fixed Elasticsearch HTTP port")
    p.add_argument("--prometheus-port", type=int, default=None, help="fixed Prometheus port")
    p.add_argument("--postgres-port", type=int, default=None, help="fixed Postgres port")
    p.add_argument("--connect-port", type=int, default=None, help="fixed Connect REST port")
    p.add_argument("--registry-port", type=int, default=None, help="fixed registry port")
    p.add_argument("--security", action="store_true", help="Elasticsearch with security on")
    p.add_argument(
        "--es-tls", action="store_true", help="Elasticsearch over https (implies --security)"
    )
    p.add_argument(
        "--kafka-security",
        action="store_true",
        help="Kafka SSL, SASL_PLAINTEXT and SASL_SSL listeners (PLAIN, SCRAM-SHA-256/512)",
    )
    p.add_argument(
        "--es-setting",
        action="append",
        metavar="KEY=VALUE",
        help="extra elasticsearch.yml setting (repeatable), e.g. thread_pool.write.queue_size=1",
    )
    p.add_argument(
        "--kafka-setting",
        action="append",
        metavar="KEY=VALUE",
        help="extra server.properties setting (repeatable)",
    )
    p.add_argument("--timeout", type=float, default=180.0, help="readiness timeout, seconds")
    p.add_argument("--json", action="store_true", help="print StackInfo as JSON")
    p.set_defaults(handler=_guard(cmd_up))

    p = subparsers.add_parser(
        "restart", help="stop one service and start it again (same data, ports, settings)"
    )
    _common(p)
    p.add_argument("service", choices=list(SERVICES))
    p.add_argument("--downtime", type=float, default=0.0, help="seconds to stay stopped")
    p.add_argument("--timeout", type=float, default=180.0, help="readiness timeout, seconds")
    p.set_defaults(handler=_guard(cmd_restart))

    p = subparsers.add_parser("down", help="stop the stack (SIGTERM, then SIGKILL)")
    _common(p)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before SIGKILL")
    p.add_argument("--purge", action="store_true", help="also delete data, logs and state")
    p.set_defaults(handler=_guard(cmd_down))

    p = subparsers.add_parser("status", help="what is running and healthy (exit 1 if not all)")
    _common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_guard(cmd_status))


def add_subcommands(subparsers: Any) -> None:
    """Add ``stack fetch|up|down|status`` to the main ``sparse-ingest`` CLI."""
    stack = subparsers.add_parser("stack", help="local Kafka + Elasticsearch (+ Prometheus)")
    _add(stack.add_subparsers(dest="stack_command", metavar="ACTION", required=True))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__)
    _add(parser.add_subparsers(dest="stack_command", metavar="ACTION", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))
