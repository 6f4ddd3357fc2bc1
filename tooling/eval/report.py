"""The eval's report as a markdown table and a plot (PNG, when matplotlib is installed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Published nDCG@10 figures the results are read against, per dataset (none for the others).
REFERENCE_NDCG = {"scifact": {"bm25_beir": 0.665, "elser_v2": 0.718}}


def markdown(report: dict[str, Any]) -> str:
    ref = report["reference_ndcg@10"]
    lines = [
        f"### {report['dataset']}: {report['docs']:,} documents, {report['queries']} queries, "
        f"model {report.get('model', '?')}",
        "",
        "nDCG@10 / recall@100 / MRR@10. *sparse* and *hybrid* are the queries as the service "
        "sends them (Elasticsearch's default query-time token pruning applies); *exact* adds "
        '`"prune": false`. Hybrid = RRF (k=60) of the top 100 sparse and BM25 hits.'
        + (
            f" Published nDCG@10: BM25 (BEIR) {ref['bm25_beir']}, ELSER v2 {ref['elser_v2']}."
            if ref
            else ""
        ),
        "",
        "| variant | BM25 | sparse | sparse exact | hybrid | hybrid exact | store MB | vector field MB | non-zeros/doc | vectors/doc | store bytes/doc | index docs/s | sparse ms p50/p99 | hybrid ms p50/p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(v: dict[str, Any], mode: str) -> str:
        q = v.get("query_ms", {}).get(mode)
        return f"{q['p50']:.1f} / {q['p99']:.1f}" if q else "n/a"

    def cell(m: dict[str, float]) -> str:
        return f"{m['ndcg@10']:.3f} / {m['recall@100']:.3f} / {m['mrr@10']:.3f}"

    for v in report["variants"]:
        m, ix = v["metrics"], v["index"]
        field_mb = (
            "n/a" if ix["vector_field_bytes"] is None else f"{ix['vector_field_bytes'] / 1e6:.1f}"
        )
        window = f" {v['window_tokens']}" if v.get("window_tokens") else ""
        per_doc = ix.get("passages", ix["docs"]) / max(1, ix["docs"])
        lines.append(
            f"| {v['name']} ({v['quantization']}, {v['long_text']}{window}, "
            f"prune < {v['prune_below']:g}) "
            f"| {cell(m['bm25'])} | {cell(m['sparse'])} | {cell(m['sparse_exact'])} "
            f"| {cell(m['hybrid'])} | {cell(m['hybrid_exact'])} "
            f"| {ix['store_bytes'] / 1e6:.1f} | {field_mb} | {ix['avg_nonzeros']:.0f} "
            f"| {per_doc:.2f} | {ix['store_bytes'] / max(1, ix['docs']):,.0f} "
            f"| {ix['docs_per_s']:.0f} | {ms(v, 'sparse')} | {ms(v, 'hybrid')} |"
        )
    beir = report.get("bm25_beir_setup")
    if beir:
        lines += [
            "",
            "BM25 with BEIR's query (`multi_match` best_fields, tie_breaker 0.5) and analyzer "
            f"{beir['analyzer']} (BEIR: `english`), same Elasticsearch and documents: "
            f"{cell(beir)}. Our BM25 column uses the service's mapping (standard analyzer) and "
            "query (tie_breaker 0).",
        ]
    lines += ["", "Elasticsearch `_score` against the brute-force dot product (top 10 hits):", ""]
    lines += [
        "| variant | query | hits | max rel. error | within 1% | max error, 9-bit emulated "
        "| same top-10 ids | same top-10 scores, 9-bit emulated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in report["variants"]:
        c = v["es_vs_brute_force"]
        for mode, label in (("sparse_exact", "exact"), ("sparse", "as sent (pruned)")):
            r = c[mode]
            lines.append(
                f"| {v['name']} | {label} | {r['hits']} | {r['max_rel_err']:.3%} "
                f"| {r['within_1pct']:.1%} | {r['max_rel_err_lucene_emulated']:.2e} "
                f"| {r['same_top_k_as_brute_force']:.0%} "
                f"| {r['same_top_k_scores_lucene_emulated']:.0%} |"
            )
    return "\n".join(lines) + "\n"


def plot_quality(report: dict[str, Any], path: Path) -> bool:
    """nDCG@10 per variant and mode, and index size against quality; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    variants = report["variants"]
    modes = [("bm25", "BM25"), ("sparse", "sparse"), ("sparse_exact", "sparse exact"),
             ("hybrid", "hybrid"), ("hybrid_exact", "hybrid exact")]  # fmt: skip
    ref = report["reference_ndcg@10"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(modes)
    values = []
    for j, (mode, label) in enumerate(modes):
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(variants))]
        ys = [v["metrics"][mode]["ndcg@10"] for v in variants]
        values += ys
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    if ref:
        ax.axhline(
            ref["bm25_beir"], color="grey", ls="--", lw=1, label=f"BEIR BM25 {ref['bm25_beir']}"
        )
        ax.axhline(
            ref["elser_v2"], color="black", ls=":", lw=1, label=f"ELSER v2 {ref['elser_v2']}"
        )
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels([v["name"] for v in variants], fontsize=8)
    ax.set_ylabel("nDCG@10")
    low = min([*values, *ref.values()])
    high = max([*values, *ref.values()])
    ax.set_ylim(max(0.0, low - 0.08), min(1.0, high + 0.05))
    ax.set_title(
        f"{report['dataset']} ({report['docs']:,} docs, {report['queries']} queries), "
        f"{report.get('model', '')}",
        fontsize=10,
    )
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    # pruning compared on the first variant's model file and long-text handling (the default):
    # one point per threshold
    first = variants[0]
    pruned = [
        v
        for v in variants
        if v["model_file"] is None
        and (v["long_text"], v.get("window_tokens"))
        == (first["long_text"], first.get("window_tokens"))
    ]
    pruned = pruned or variants
    for v in pruned:
        ix = v["index"]
        size = ix["vector_field_bytes"] or ix["store_bytes"]
        y = v["metrics"]["sparse_exact"]["ndcg@10"]
        ax2.scatter(size / 1e6, y)
        ax2.annotate(
            f"prune < {v['prune_below']:g}\n{ix['avg_nonzeros']:.0f} nnz/doc",
            (size / 1e6, y),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    field_known = all(v["index"]["vector_field_bytes"] for v in pruned)
    ax2.set_xlabel(("sparse_vector field" if field_known else "index store") + " size, MB")
    ax2.set_ylabel("sparse exact nDCG@10")
    ax2.set_title(f"Index-time pruning (INT8, {first['long_text']})", fontsize=10)
    ax2.grid(True, alpha=0.3)
    ys2 = [v["metrics"]["sparse_exact"]["ndcg@10"] for v in pruned]
    ax2.set_ylim(min(ys2) - 0.02, max(ys2) + 0.02)
    ax2.margins(x=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
