"""Soak: the real service (``sparse-ingest run`` as a subprocess) fed at a steady rate for a
long time (30 minutes by default); its resident memory sampled; nothing lost at the end.

    .venv/bin/python bench/soak.py                       # 30 min at 50 records/s
    .venv/bin/python bench/soak.py --minutes 5 --rate 100 --json results/soak.json

Starts its own Kafka + Elasticsearch (``deploy.local``) unless ``--kafka`` and ``--es-url``
point at running ones. Prints RSS over time (start, after warm-up, end, max), the catch-up time
after the last record and the exact end-state check; exit status 1 if the check failed or RSS
grew by more than ``--max-growth`` (30 %) between the end of warm-up and the end. The CI
version is tests/reliability/test_rel_soak.py (2 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "reliability"), str(ROOT)]

import scenarios  # noqa: E402
from reliability_harness import FaultResult  # noqa: E402

from deploy.local import LocalStack  # noqa: E402

MB = 1024 * 1024


def log(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace, work: Path) -> FaultResult:
    from encoder import fetch_default_model

    model_dir = Path(args.model) if args.model else fetch_default_model()
    stack = None
    kafka, es_url = args.kafka, args.es_url
    if not (kafka and es_url):
        stack = LocalStack(name="bench-soak", run_dir=work / "stack", log=log)
        info = stack.up()
        kafka, es_url = info.kafka_bootstrap, info.es_url
    assert kafka and es_url
    env = scenarios.Env(kafka=kafka, es_url=es_url, work=work, model_dir=model_dir, log=log)
    overrides = {"encoder_threads": args.threads} if args.threads else {}
    try:
        return await scenarios.soak(
            env,
            minutes=args.minutes,
            rate=args.rate,
            warmup_s=args.warmup,
            sample_s=args.sample,
            service_overrides=overrides,
        )
    finally:
        if stack is not None:
            stack.down(remove_data=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=50.0, help="records per second")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds before the baseline")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--max-growth", type=float, default=0.30)
    parser.add_argument("--threads", type=int, help="SPARSE_INGEST_ENCODER_THREADS")
    parser.add_argument("--kafka", help="bootstrap of a running Kafka")
    parser.add_argument("--es-url", help="URL of a running Elasticsearch")
    parser.add_argument("--model", help="model folder (default: the default model)")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--work", help="keep the service logs here (default: temp, removed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        result = asyncio.run(run(args, Path(args.work)))
    else:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            result = asyncio.run(run(args, Path(tmp)))
    samples = result.extra["rss_samples"]
    step = max(1, len(samples) // 20)
    print(f"\n{'t (s)':>8}  {'RSS (MB)':>9}")
    for t, rss in [*samples[::step], samples[-1]]:
        print(f"{t:8.0f}  {rss / MB:9.1f}")
    growth = result.extra["growth"]
    metrics = result.extra.get("metrics", {})
    print(
        f"\n{result.fault}: {result.records} records, "
        f"{metrics.get('sparse_ingest_documents_indexed_total', 0):.0f} indexed, "
        f"check {'OK' if result.ok else 'FAILED: ' + result.check.problems()}"
    )
    print(
        f"RSS start {samples[0][1] / MB:.0f} MB, after warm-up {result.extra['rss_warm'] / MB:.0f} "
        f"MB, end {result.extra['rss_end'] / MB:.0f} MB ({growth:+.1%}), max "
        f"{result.extra['rss_max'] / MB:.0f} MB; caught up {result.extra['catch_up_s']}s after "
        f"the last record; wall {result.wall_s:.0f}s"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({**result.row(), **{k: v for k, v in result.extra.items()}}, indent=2)
        )
    return 0 if result.ok and growth <= args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())
