"""Retrieval metrics against hand-computed values; the eval machinery on a SciFact subset."""

from __future__ import annotations

import json
import math
import os
import random
import struct
from pathlib import Path

import pytest

from tooling.eval.beir import BeirData, load_beir, subset
from tooling.eval.checks import (
    FEATURE_REL_PRECISION,
    brute_force_top,
    check_scores,
    inverted,
    lucene_feature,
    lucene_vector,
    query_as_sent,
)
from tooling.eval.metrics import evaluate, mrr_at_k, ndcg_at_k, recall_at_k
from tooling.eval.report import REFERENCE_NDCG, markdown
from tooling.eval.runner import EvalConfig, run_eval
from tooling.eval.variants import Variant, select_variants


# The shared eval data: SPARSE_INGEST_EVAL_DATA, else shared/eval/scifact beside the checkout
# or beside a folder above it (a clone in a sub-folder of the workspace finds it too).
def _shared_scifact() -> Path:
    checkout = Path(__file__).resolve().parents[1]
    for folder in checkout.parents:
        candidate = folder / "shared" / "eval" / "scifact"
        if candidate.is_dir():
            return candidate
    return checkout.parent / "shared" / "eval" / "scifact"


SCIFACT = Path(os.environ.get("SPARSE_INGEST_EVAL_DATA") or _shared_scifact())
LOG2_3 = math.log2(3)  # discount at rank 2

# ------------------------------------------------------------------------------ metrics


def test_ndcg_graded_hand_computed() -> None:
    # gains 0, 1, 2 at ranks 1..3: DCG = 1/log2(3) + 2/log2(4); ideal 2, 1: 2/1 + 1/log2(3)
    rel = {"b": 1, "c": 2}
    expected = (1 / LOG2_3 + 2 / 2) / (2 + 1 / LOG2_3)
    assert ndcg_at_k(["a", "b", "c"], rel, 10) == pytest.approx(expected)
    assert expected == pytest.approx(0.619906, abs=1e-6)
    assert ndcg_at_k(["c", "b", "a"], rel, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["b", "c"], rel, 1) == pytest.approx(1 / 2)  # ideal@1 is the grade-2 doc


def test_ndcg_cutoff_duplicates_and_non_relevant_judgements() -> None:
    rel = {"x": 1, "n": 0}
    ranking = [f"d{i}" for i in range(10)] + ["x"]
    assert ndcg_at_k(ranking, rel, 10) == 0.0  # relevant doc at rank 11
    assert ndcg_at_k(["n", "x"], rel, 10) == pytest.approx(1 / LOG2_3)  # 0-graded doc is no gain
    assert ndcg_at_k(["x", "x"], {"x": 1, "y": 1}, 10) == pytest.approx(1 / (1 + 1 / LOG2_3))
    assert ndcg_at_k(["a"], {"n": 0}, 10) == 0.0  # nothing relevant: 0, not a division by 0


def test_recall_hand_computed() -> None:
    rel = {"a": 1, "b": 2, "c": 1, "z": 0}
    assert recall_at_k(["a", "q", "b"], rel, 100) == pytest.approx(2 / 3)
    assert recall_at_k(["a", "q", "b"], rel, 2) == pytest.approx(1 / 3)
    assert recall_at_k(["z"], rel, 100) == 0.0
    assert recall_at_k(["a", "a", "a"], rel, 100) == pytest.approx(1 / 3)


def test_mrr_hand_computed() -> None:
    rel = {"b": 1, "c": 1}
    assert mrr_at_k(["a", "b", "c"], rel, 10) == pytest.approx(0.5)
    assert mrr_at_k(["c"], rel, 10) == 1.0
    assert mrr_at_k([f"d{i}" for i in range(10)] + ["b"], rel, 10) == 0.0
    assert mrr_at_k(["a", "a", "b"], rel, 10) == pytest.approx(0.5)  # duplicates count once


def test_evaluate_means_over_judged_queries() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 1, "c": 1}, "q3": {"x": 0}}
    run = {"q1": ["a"], "q2": ["x", "c"], "q3": ["x"]}
    got = evaluate(run, qrels)
    assert got["queries"] == 2  # q3 has nothing relevant
    ndcg_q2 = (1 / LOG2_3) / (1 + 1 / LOG2_3)
    assert got["ndcg@10"] == pytest.approx((1 + ndcg_q2) / 2)
    assert got["recall@100"] == pytest.approx((1 + 0.5) / 2)
    assert got["mrr@10"] == pytest.approx((1 + 0.5) / 2)
    assert evaluate({}, qrels)["ndcg@10"] == 0.0  # missing queries score 0


# ------------------------------------------------------------------------------ helpers


def test_lucene_feature_keeps_nine_significant_bits() -> None:
    rnd = random.Random(1)
    assert lucene_feature(1.0) == 1.0
    vec = {f"t{i}": rnd.uniform(1e-3, 5.0) for i in range(100)}
    assert lucene_vector(vec) == {t: lucene_feature(w) for t, w in vec.items()}
    assert lucene_feature(0.5) == 0.5
    for _ in range(2000):
        w = rnd.uniform(1e-3, 5.0)
        w32 = struct.unpack("<f", struct.pack("<f", w))[0]
        stored = lucene_feature(w)
        assert stored <= w32
        assert (w32 - stored) / w32 < FEATURE_REL_PRECISION


def test_brute_force_and_score_check() -> None:
    docs = {"a": [{"x": 1.0, "y": 0.5}], "b": [{"y": 2.0}], "c": [{"z": 1.0}]}
    query = {"x": 1.0, "y": 1.0}
    assert brute_force_top(query, inverted(docs), 2) == [("b", 2.0), ("a", 1.5)]
    # passages: a document scores as its best passage, not the sum or the max-merge
    passages = {"a": [{"x": 1.0}, {"y": 1.2}], "b": [{"x": 0.9, "y": 0.9}]}
    assert brute_force_top(query, inverted(passages), 2) == [("b", 1.8), ("a", 1.2)]
    runs = {
        "sparse_exact": {"q": [("b", lucene_feature(2.0)), ("a", lucene_feature(1.5))]},
        "sparse": {"q": [("b", 2.0)]},
    }
    got = check_scores(runs, {"q": query}, docs, k=2)
    assert got["sparse_exact"]["max_rel_err"] < FEATURE_REL_PRECISION
    assert got["sparse_exact"]["within_1pct"] == 1.0
    assert got["sparse_exact"]["same_top_k_as_brute_force"] == 1.0
    assert got["sparse_exact"]["same_top_k_scores_lucene_emulated"] == 1.0
    assert got["sparse"]["top_k_overlap_with_brute_force"] == 0.5
    assert query_as_sent({f"t{i}": float(i) for i in range(600)}).keys() == {
        f"t{i}" for i in range(88, 600)
    }  # the 512 heaviest tokens, as service.search sends them


def test_load_and_subset(tmp_path: Path) -> None:
    (tmp_path / "qrels").mkdir()
    corpus = [{"_id": f"d{i}", "title": f"t{i}", "text": f"text {i}"} for i in range(10)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in corpus) + "\n")
    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(4)]
    (tmp_path / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    (tmp_path / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq0\td1\t1\nq0\td2\t2\nq1\td5\t1\nq2\td9\t1\n"
    )
    data = load_beir(tmp_path)
    assert set(data.queries) == {"q0", "q1", "q2"}  # q3 is not judged
    assert data.qrels["q0"] == {"d1": 1, "d2": 2}
    assert data.corpus["d3"] == ("t3", "text 3")
    small = subset(data, limit_docs=3)
    assert set(small.corpus) == {"d1", "d2", "d5"}  # q0 and q1 fit, q2 does not
    assert set(small.queries) == {"q0", "q1"}
    five = subset(data, limit_docs=5)
    assert len(five.corpus) == 5 and set(five.queries) == {"q0", "q1", "q2"}
    assert {"d1", "d2", "d5", "d9"} <= set(five.corpus)
    two = subset(data, max_queries=1, limit_docs=3)
    assert set(two.queries) == {"q0"} and len(two.corpus) == 3
    assert [v.name for v in select_variants("model.fp32.onnx", [0.1], None)] == [
        "int8",
        "fp32",
        "int8-truncate",
        "int8-prune0.1",
    ]
    assert select_variants(None, [], "int8-prune0.5")[0].prune_below == 0.5
    chosen = select_variants(None, [], "int8-passages256,int8-chunk")
    assert [(v.long_text, v.window_tokens) for v in chosen] == [("passages", 256), ("chunk", 0)]
    with pytest.raises(SystemExit, match="unknown variant"):
        select_variants(None, [], "int8-passagesX")


# ------------------------------------------------------------------------------ end to end


def _scifact_subset(queries: int, others: int) -> BeirData:
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT} (set SPARSE_INGEST_EVAL_DATA)")
    data = load_beir(SCIFACT)
    first = list(data.qrels)[:queries]
    relevant = {d for q in first for d in data.qrels[q]}
    return subset(data, max_queries=queries, limit_docs=len(relevant) + others)


@pytest.mark.integration
async def test_eval_on_scifact_subset(
    kafka_bootstrap: str, es_url: str, default_model_dir: Path
) -> None:
    data = _scifact_subset(30, 250)
    assert len(data.queries) == 30
    data.corpus["empty-doc"] = ("", "   ")  # no text: dead-lettered, counted, not a crash
    config = EvalConfig(
        kafka_bootstrap,
        es_url,
        default_model_dir,
        [Variant("int8"), Variant("int8-prune0.3", prune_below=0.3)],
        check_queries=30,
        prefix="test-eval",
    )
    report = await run_eval(data, config, say=lambda _: None)
    assert report["docs"] == len(data.corpus)
    full, pruned = report["variants"]
    for v in (full, pruned):
        m = v["metrics"]
        # 330 documents: far easier than the full corpus, but a broken pipeline scores ~0
        assert m["sparse_exact"]["ndcg@10"] > 0.5, m
        assert m["sparse"]["ndcg@10"] > 0.5, m
        assert m["bm25"]["ndcg@10"] > 0.5, m
        check = v["es_vs_brute_force"]["sparse_exact"]
        assert check["hits"] >= 30 * 9
        assert check["max_rel_err"] <= 0.01, check  # the field keeps ~9 significant bits
        assert check["max_rel_err_lucene_emulated"] < 1e-5, check  # exactly what Lucene stores
        assert check["top_k_overlap_with_brute_force"] >= 0.9, check
        # the same k best scores as a brute force over every document (ranking up to ties)
        assert check["same_top_k_scores_lucene_emulated"] >= 0.95, check
        assert v["index"]["docs"] == len(data.corpus)
        assert v["index"]["store_bytes"] > 0
    assert pruned["index"]["avg_nonzeros"] < full["index"]["avg_nonzeros"]
    assert full["index"]["skipped_docs"] == 1
    assert report["reference_ndcg@10"] == REFERENCE_NDCG["scifact"]
    assert "Published nDCG@10" in markdown(report)
    other = {**report, "dataset": "nfcorpus", "reference_ndcg@10": {}}
    assert "Published" not in markdown(other)  # another dataset: SciFact's anchors are not its
    # the default: passages of 256 tokens, each document scored by its best (brute force above)
    assert (full["long_text"], full["window_tokens"]) == ("passages", 256)
    assert full["index"]["passages"] > full["index"]["docs"]  # long abstracts: 2+ passages
    assert set(full["query_ms"]) == {"bm25", "sparse", "hybrid"}
    assert "| int8-prune0.3 " in markdown(report)
