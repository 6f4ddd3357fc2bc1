"""What each long-text mode costs the encoder: the same corpus encoded as ``truncate``,
``chunk`` (windows max-merged) and ``passages``, at each window size, side by side in one run.

    .venv/bin/python bench/long_text_bench.py ../shared/eval/scifact --windows 256,510

For each mode and window: tokens fed to the model per document (overlaps counted), vectors
stored per document, non-zero weights stored per document, encoder seconds and documents/s
(best of ``--repeat`` passes over the corpus, one encoder, 2 threads by default). Retrieval
quality and index sizes of the same configurations come from ``sparse-ingest eval`` (README:
Long documents); this isolates the encoding cost, which ``eval``'s end-to-end docs/s mixes with
Kafka, Elasticsearch and a shared machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encoder import EncodeStats, SparseEncoder, cpu_features, fetch_default_model  # noqa: E402
from encoder.cpu import cpu_name  # noqa: E402
from encoder.metadata import LONG_TEXT_MODES  # noqa: E402
from tooling.eval.beir import load_beir  # noqa: E402

MODES = ("truncate", "chunk", "passages")  # cheapest first


def measure(
    model_dir: Path, mode: str, window: int, texts: list[str], repeat: int, threads: int
) -> dict[str, Any]:
    assert mode in LONG_TEXT_MODES, mode
    encoder = SparseEncoder.load(
        model_dir,
        long_text=mode,
        window_tokens=window,
        threads=threads,
    )
    best = float("inf")
    stats = EncodeStats()
    vectors = nonzeros = 0
    for _ in range(repeat):
        stats = EncodeStats()
        started = time.perf_counter()
        if mode == "passages":
            out = encoder.encode_passages(texts, stats)
            vectors = sum(len(p) for p in out)
            nonzeros = sum(len(x.vector) for p in out for x in p)
        else:
            docs = encoder.encode_documents(texts, stats)
            vectors, nonzeros = len(docs), sum(len(v) for v in docs)
        best = min(best, time.perf_counter() - started)
    encoder.close()
    n = len(texts)
    return {
        "mode": mode,
        "window_tokens": encoder.window_tokens,
        "docs": n,
        "seconds": best,
        "docs_per_s": n / best,
        "model_tokens_per_doc": stats.tokens / n,
        "windows_per_doc": stats.windows / n,
        "vectors_per_doc": vectors / n,
        "nonzeros_per_doc": nonzeros / n,
        "tokens_per_s": stats.tokens / best,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"### Long-text modes: encoding cost, {report['dataset']} ({report['docs']:,} documents)",
        "",
        f"{report['model']}, INT8, {report['threads']} threads, {report['cpu']}; best of "
        f"{report['repeat']} passes. Command: `{report['command']}`",
        "",
        "| mode | window | model tokens/doc | windows/doc | vectors stored/doc | non-zeros/doc "
        "| encoder docs/s | tokens/s | relative cost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = min(r["seconds"] for r in report["results"])
    for r in report["results"]:
        lines.append(
            f"| {r['mode']} | {r['window_tokens']} | {r['model_tokens_per_doc']:.0f} "
            f"| {r['windows_per_doc']:.2f} | {r['vectors_per_doc']:.2f} "
            f"| {r['nonzeros_per_doc']:.0f} | {r['docs_per_s']:.1f} | {r['tokens_per_s']:,.0f} "
            f"| {r['seconds'] / base:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("beir_dir", help="a BEIR dataset folder (corpus.jsonl)")
    parser.add_argument("--model", help="model folder (default: the default model)")
    parser.add_argument("--windows", default="256,510", help="window sizes in tokens")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--limit-docs", type=int)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/long-text")
    args = parser.parse_args(argv)

    model_dir = Path(args.model) if args.model else fetch_default_model()
    data = load_beir(args.beir_dir)
    texts = [f"{title} {body}".strip() for title, body in data.corpus.values()]
    texts = texts[: args.limit_docs] if args.limit_docs else texts
    report: dict[str, Any] = {
        "dataset": data.name,
        "docs": len(texts),
        "model": model_dir.name,
        "threads": args.threads,
        "repeat": args.repeat,
        "cpu": cpu_name(),
        "cpu_features": {k: v for k, v in cpu_features().items() if v},
        "command": "python bench/long_text_bench.py " + " ".join(argv or sys.argv[1:]),
        "results": [],
    }
    for mode in args.modes.split(","):
        for window in (int(w) for w in args.windows.split(",")):
            result = measure(model_dir, mode, window, texts, args.repeat, args.threads)
            report["results"].append(result)
            print(json.dumps(result), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_text_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "long_text_bench.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
