"""The reliability scenarios of tests/reliability/, full size, as one table.

Each fault runs against a real local stack of its own (Kafka + Elasticsearch, started here;
Elasticsearch with a one-thread, one-slot write queue so that other writers cause real 429s)
with a known stream of about ``--docs`` documents (creates, updates, deletes, re-creates), and
ends with an exact comparison of the index and of the dead-letter topic with the expected
state. Per fault: records in the topic, documents expected and found exactly (newest version,
its text and fields), missing, extra, stale versions (must be 0), wrong content, duplicate
writes (replays refused by Elasticsearch as not newer: at-least-once at work), dead letters
expected/found/duplicated, recovery time (from the end of the fault to the next commit), wall
time.

    .venv/bin/python bench/reliability.py                   # ~10,000 docs, every fault
    .venv/bin/python bench/reliability.py --docs 2000 --only sigkill,es-restart
    .venv/bin/python bench/reliability.py --json results/reliability.json

Faults: poison, sigkill, es-restart (a real stop + start), es-freeze (SIGSTOP/SIGCONT), es-429,
kafka-restart, churn (and --security: the same
stream over TLS + basic auth and Kafka SASL_SSL/SCRAM-SHA-512 on a second stack).
Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "reliability"), str(ROOT)]

import scenarios  # noqa: E402
from reliability_harness import FaultResult, table  # noqa: E402

from deploy.local import LocalStack  # noqa: E402

FAULTS = ("poison", "sigkill", "es-restart", "es-freeze", "es-429", "kafka-restart", "churn")


def log(message: str) -> None:
    print(f"[reliability] {message}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace, work: Path) -> list[FaultResult]:
    from encoder import SparseEncoder, fetch_default_model

    model_dir = Path(args.model) if args.model else fetch_default_model()
    encoder = SparseEncoder.load(model_dir)
    only = set(args.only.split(",")) if args.only else set(FAULTS)
    results: list[FaultResult] = []
    stack = LocalStack(
        name="bench-reliability",
        run_dir=work / "stack",
        es_settings={"thread_pool.write.size": 1, "thread_pool.write.queue_size": 1},
        log=log,
    )
    info = stack.up()
    assert info.kafka_bootstrap and info.es_url
    env = scenarios.Env(
        kafka=info.kafka_bootstrap,
        es_url=info.es_url,
        work=work,
        model_dir=model_dir,
        encoder=encoder,
        stack=stack,
        log=log,
        seed=args.seed,
    )
    n = args.docs
    plan: list[tuple[str, Any]] = [
        ("poison", lambda: scenarios.poison(env, docs=n, huge=True)),
        ("sigkill", lambda: scenarios.sigkill(env, docs=n, kills=args.kills)),
        ("es-restart", lambda: scenarios.es_restart(env, docs=n, outage_s=args.es_outage)),
        (
            "es-freeze",
            lambda: scenarios.es_restart(env, docs=n, outage_s=args.es_outage, freeze=True),
        ),
        (
            "es-429",
            lambda: scenarios.es_rejections(env, docs=n, writers=4, noise_s=20.0, client_retries=1),
        ),
        (
            "kafka-restart",
            lambda: scenarios.kafka_restart(env, docs=n, downtime_s=args.kafka_downtime),
        ),
        ("churn", lambda: scenarios.group_churn(env, docs=n, step_s=5.0)),
    ]
    try:
        for name, scenario in plan:
            if name not in only:
                continue
            log(f"--- {name}")
            started = time.monotonic()
            try:
                results.append(await scenario())
            except Exception as exc:  # a scenario that could not finish is a failed row
                log(f"{name} failed: {type(exc).__name__}: {exc}")
                failed = FaultResult(name, wall_s=time.monotonic() - started)
                failed.check.missing.append(f"scenario did not finish: {exc}")
                results.append(failed)
    finally:
        stack.down(remove_data=True)
    if args.security:
        results.append(await _security(args, work, model_dir, encoder))
    return results


async def _security(
    args: argparse.Namespace, work: Path, model_dir: Path, encoder: Any
) -> FaultResult:
    stack = LocalStack(
        name="bench-reliability-secure",
        run_dir=work / "secure",
        es_tls=True,
        kafka_security=True,
        log=log,
    )
    info = stack.up()
    try:
        assert info.es_url and info.es_auth and info.kafka_sasl
        env = scenarios.Env(
            kafka=info.kafka_listeners["PLAINTEXT"],
            es_url=info.es_url,
            work=work,
            model_dir=model_dir,
            encoder=encoder,
            es_auth=info.es_auth,
            es_ca=info.es_ca_certs,
            log=log,
            seed=args.seed,
        )
        user, password = info.es_auth
        kafka_user, kafka_password = info.kafka_sasl
        secure = await scenarios.secure_ingest(
            env,
            "TLS + basic auth, SASL_SSL SCRAM-SHA-512",
            info.kafka_listeners["SASL_SSL"],
            {
                "es_username": user,
                "es_password": password,
                "es_ca_certs": info.es_ca_certs,
                "kafka_security_protocol": "SASL_SSL",
                "kafka_sasl_mechanism": "SCRAM-SHA-512",
                "kafka_sasl_username": kafka_user,
                "kafka_sasl_password": kafka_password,
                "kafka_ssl_cafile": info.kafka_ca_file,
            },
            secrets=[password, kafka_password],
            docs=args.docs // 5,
        )
        if secure.leaks:
            secure.result.check.wrong.append(f"secrets leaked: {secure.leaks}")
        secure.result.notes.append(
            f"secrets found in logs/metrics/readyz: {secure.leaks or 'none'}"
        )
        return secure.result
    finally:
        stack.down(remove_data=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=10_000, help="documents per fault")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs (default %(default)s)")
    parser.add_argument("--es-outage", type=float, default=30.0, help="seconds ES is stopped")
    parser.add_argument("--kafka-downtime", type=float, default=15.0, help="seconds Kafka is down")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(FAULTS)}")
    parser.add_argument("--security", action="store_true", help="also the secure-stack run")
    parser.add_argument("--model", help="model folder (default: the default model)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="write the rows and notes here")
    parser.add_argument("--work", help="keep logs here (default: a temp dir, removed)")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("aiokafka", "elastic_transport", "service.kafka.pipeline", "service.batches"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    started = time.monotonic()
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        results = asyncio.run(run(args, work))
    else:
        with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
            results = asyncio.run(run(args, Path(tmp)))
    print()
    print(table(results))
    print()
    for r in results:
        for note in r.notes:
            print(f"- {r.fault}: {note}")
        if not r.ok:
            print(f"- {r.fault}: PROBLEMS: {r.check.problems()}")
    print(f"\ntotal {time.monotonic() - started:.0f}s, {args.docs} documents per fault")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                [
                    {**r.row(), "notes": r.notes, "recovery_all_s": r.recovery_s, "es": r.es_stats}
                    for r in results
                ],
                indent=2,
            )
        )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
