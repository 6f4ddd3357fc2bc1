"""Scale: what ingest and search cost as one index grows (10 thousand -> 100 thousand -> 1 million).

    .venv/bin/python bench/scale_bench.py ../shared/eval/scifact \\
        --sizes 10000,100000,300000,1000000 --es-heap 4g --side-up-to 300000 --out results/scale

One index in the service's own mapping (the default: passages, nested ``sparse_vector``) grows
through the sizes; after each step it reports:

- ingest docs/s of the step, written by the service's sink (``ElasticsearchSink.write``: the
  versioned bulk the write stage sends, one writer, the service's bulk settings; the time inside
  those calls and the final refresh, not the time drawing documents), without Kafka and without
  the encoder (encoding a million documents would take hours on 2 cores; the
  encoder's own rate is bench/encoder_bench.py's);
- bytes per document: the whole store, and per field (``_disk_usage``): the passages' vectors
  against the text fields' inverted index; and the whole store of a **BM25-only index** of the
  same documents (their title and body in the service's text mapping, nothing else), grown
  beside it;
- query latency p50/p95/p99, one query at a time, top 10, for sparse exact (``"prune": false``),
  sparse as the service sends it (Elasticsearch 8.19+/9.x maps ``sparse_vector`` with
  ``index_options.prune: true``, so the query is pruned with the default ``pruning_config``
  unless it says otherwise), BM25 and hybrid (the service's), and the share of the exact top 10
  the pruned query keeps. Every query runs every mode, in an order rotated query by query (no
  mode always first, or always right after another with the same tokens); ``--warmup`` queries
  run once, unrecorded, before each step's; the load average is reported with them;
- hybrid twice: as the service runs it (its two rankings side by side) and with the rankings one
  after the other (``hybrid_serial_rankings``, as before they ran side by side), both in the
  rotation, and how many of the second's top 10 the first returns (the HYBRID table).

Index-time pruning (the service's ``SPARSE_INGEST_ES_PRUNE_BELOW``): ``--side-up-to N`` grows a
side index of the same documents, weights below ``--side-prune-below`` (0.3) dropped, up to N
documents; its writes follow the main index's batch by batch (none competes with another), and
its exact and as-sent queries join the rotation, so both indexes are measured under the same
load. It reports its bytes, latency, nDCG@10 and what share of the unpruned index's exact top 10
its queries keep. (``--prune-below`` prunes the main index itself; ``--compare
results/scale/scale.json`` then compares with an earlier run of the same ``--seed``.)

What is real and what is drawn: the dataset's documents are encoded by the default model (their
passages are real vectors of real text) and written first; every later document takes the text
of a random real document, its title and its body (BM25 sees real words), and its passages are
drawn from the measured distribution of the real ones: passages per document, non-zero tokens per
passage, each token in its measured share of passages and each weight from that token's own
measured weights. The queries are the dataset's test queries, encoded by the model. The report
says how many documents are real. Each run's JSON records its parameters (``params``: seed,
``--real-docs``, ``--batch``, the sampler, the Elasticsearch version, the passage model's digest);
``--compare`` refuses a run whose seed, real documents or passage model differ.

Runs a private Elasticsearch (a ``LocalStack`` named ``scale``, heap ``--es-heap``) unless
``--es-url`` is given. Prints the table and writes ``scale.json`` and ``scale.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import itertools
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elasticsearch.exceptions import GeneralAvailabilityWarning  # noqa: E402
from elasticsearch.helpers import async_bulk  # noqa: E402

from encoder import SparseEncoder  # noqa: E402
from encoder.cpu import cpu_name  # noqa: E402
from encoder.passages import Passage  # noqa: E402
from service.builder import load_encoder  # noqa: E402
from service.config import load_settings  # noqa: E402
from service.elastic import describe_cluster, elasticsearch_client  # noqa: E402
from service.messages import RecordRef, Upsert, content_hash  # noqa: E402
from service.search import Mode, Searcher, best_passage_query, sparse_query  # noqa: E402
from service.sink import ElasticsearchSink, IndexConfig  # noqa: E402
from tooling.eval.beir import load_beir  # noqa: E402
from tooling.eval.metrics import ndcg_at_k  # noqa: E402

# _disk_usage is a technical preview: it is what measures bytes per field
warnings.filterwarnings("ignore", category=GeneralAvailabilityWarning)

TEXT_FIELDS = ("title", "body")
PASSAGES = "passages"
VECTOR = "tokens"


# ----------------------------------------------------------------------------- the sampler
# Tokens in at least this share of real passages are the head: a drawn passage takes each with
# a probability fitted to its share and the passage's size (one vectorized draw, Pareto
# sampling: exactly the expected number of head tokens); the others, the tail, fill the passage
# by weighted sampling with replacement (rarely a duplicate there). So each token's share of
# drawn passages is its share of real ones, and each passage's non-zeros a real passage's.
HEAD_SHARE = 0.005
# in each run's parameters: another sampler draws other documents from the same model
SAMPLER = "head-pareto/tail-weighted v2"


@dataclass
class PassageModel:
    """The measured distribution of real passages, to draw realistic ones from."""

    tokens: list[str]  # vocabulary seen in real passages
    doc_freq: np.ndarray  # per token: in how many passages it appears (sampling weight)
    weights: np.ndarray  # every measured weight, grouped by token
    offsets: np.ndarray  # token t's weights: weights[offsets[t]:offsets[t] + counts[t]]
    counts: np.ndarray
    nnz: np.ndarray  # non-zeros per real passage
    per_doc: np.ndarray  # passages per real document

    def __post_init__(self) -> None:
        n_passages = max(len(self.nnz), 1)
        self.share = self.doc_freq / n_passages  # p_t: the share of real passages holding t
        head = self.share >= HEAD_SHARE
        self.head = np.flatnonzero(head)
        self.tail = np.flatnonzero(~head)
        tail_df = self.doc_freq[self.tail]
        self.tail_cdf = np.cumsum(tail_df) / tail_df.sum() if len(self.tail) else tail_df
        self.sizes, self.rate, self.reach = self._fit_inclusion()
        # per measured size (row) and head token: the inclusion probability's inverse odds
        # (Pareto sampling's rank divisor), and how many head tokens such a passage expects
        include = -np.expm1(-np.outer(self.reach, self.rate))
        self.head_expected = include.sum(axis=1)
        with np.errstate(divide="ignore"):
            self.head_odds = ((1 - include) / include).astype(np.float32)

    def _fit_inclusion(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """How a passage of ``k`` non-zeros includes head token ``t``: with probability
        ``1 - exp(-rate[t] * reach[k])`` (a race: each token arrives at its own rate, the
        first ``k`` are in). ``reach`` is such that the head's and the tail's tokens number
        ``k`` on average; ``rate`` such that over the measured ``k`` the token is in its share
        ``p_t`` of passages. (The naive ``min(1, p_t * k / mean)`` overfills short passages
        with frequent tokens, and the trimming then costs those tokens their share.) Tail
        tokens are in the linear part, ``rate ~ p_t / E[reach]``: only their sum counts here.
        Fitted by alternating Newton steps (concave: monotone from below; kept >= 0, so no
        exponent is positive), all tokens at once.
        Returns the measured sizes ``k``, ``rate`` per head token and ``reach`` per size."""
        sizes, freq = np.unique(self.nnz, return_counts=True)
        prob = freq / max(freq.sum(), 1)
        share = np.minimum(self.share[self.head], 1 - 1e-4)  # in every passage: rate finite
        tail_share = float(self.share[self.tail].sum())
        reach = sizes.astype(np.float64)
        mean_reach = max(float(prob @ reach), 1e-12)
        rate = share / mean_reach
        for _ in range(30):
            before = rate
            for _ in range(30):  # rate: sum_k prob_k (1 - exp(-rate reach_k)) = p_t
                e = np.exp(-np.outer(rate, reach))
                miss = share - (1 - e) @ prob
                rate = np.maximum(rate + miss / np.maximum((e * reach) @ prob, 1e-300), 0.0)
                if np.abs(miss).max() < 1e-9:
                    break
            mean_reach = max(float(prob @ reach), 1e-12)
            tail_rate = tail_share / mean_reach
            for _ in range(30):  # reach: sum_t (1 - exp(-rate_t reach_k)) = k
                e = np.exp(-np.outer(reach, rate))
                miss = sizes - (1 - e).sum(axis=1) - tail_rate * reach
                # (bounded: a size no fewer tokens could fill stays finite)
                step = miss / np.maximum(e @ rate + tail_rate, 1e-300)
                reach = np.clip(reach + step, 0.0, 1e100)
                if np.abs(miss).max() < 1e-6:
                    break
            if np.abs(rate - before).max() <= 1e-9 * max(float(rate.max(initial=0)), 1e-12):
                break
        return sizes, rate, reach

    @classmethod
    def measure(cls, docs: Sequence[Sequence[Passage]]) -> PassageModel:
        by_token: dict[str, list[float]] = {}
        nnz = []
        for passages in docs:
            for p in passages:
                nnz.append(len(p.vector))
                for token, weight in p.vector.items():
                    by_token.setdefault(token, []).append(weight)
        tokens = sorted(by_token)
        counts = np.array([len(by_token[t]) for t in tokens], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        weights = np.concatenate([np.array(by_token[t], dtype=np.float32) for t in tokens])
        return cls(
            tokens,
            counts.astype(np.float64),
            weights,
            offsets,
            counts,
            np.array(nnz, dtype=np.int64),
            np.array([len(p) for p in docs], dtype=np.int64),
        )

    def digest(self) -> str:
        """sha256 (16 hex digits) of the measured arrays: two runs drew from the same model."""
        h = hashlib.sha256()
        h.update("\n".join(self.tokens).encode())
        for a, dtype in (
            (self.doc_freq, "<f8"),
            (self.weights, "<f4"),
            (self.offsets, "<i8"),
            (self.counts, "<i8"),
            (self.nnz, "<i8"),
            (self.per_doc, "<i8"),
        ):
            h.update(b"\0")
            h.update(np.ascontiguousarray(a, dtype=dtype).tobytes())
        return h.hexdigest()[:16]

    def draw_tokens(self, rng: np.random.Generator, want: int) -> np.ndarray:
        """``want`` distinct token indices (fewer only if the vocabulary runs out): the head
        as many as a passage of that size holds on average (rounded at random), each with its
        fitted probability; the rest from the tail, by document frequency."""
        level = min(int(np.searchsorted(self.sizes, want)), len(self.sizes) - 1)
        expected = float(self.head_expected[level])
        count = min(int(expected) + int(rng.random() < expected % 1), want, len(self.head))
        head = self.head[:0]
        if count:  # Pareto sampling: exactly ``count`` tokens, each in with its probability
            u = rng.random(len(self.head), dtype=np.float32)
            rank = u / (1 - u) * self.head_odds[level]  # (a NaN, 0 * inf, partitions last)
            head = self.head[np.argpartition(rank, count - 1)[:count]]
        need = min(want - len(head), len(self.tail))
        tail = np.empty(0, dtype=np.int64)
        for _ in range(8 if need else 0):  # duplicates are rare in the tail: once is enough
            draws = np.searchsorted(self.tail_cdf, rng.random(need + need // 8 + 4), "right")
            both = np.concatenate([tail, np.minimum(draws, len(self.tail) - 1)])
            _, first = np.unique(both, return_index=True)
            tail = both[np.sort(first)][:need]  # distinct, in the order drawn
            if len(tail) == need:
                break
        return np.concatenate([head, self.tail[tail]])

    def draw(self, rng: np.random.Generator, text_len: int) -> list[Passage]:
        """One document's passages (their offsets split ``text_len`` evenly)."""
        n = int(self.per_doc[rng.integers(len(self.per_doc))])
        out = []
        for i in range(n):
            picked = self.draw_tokens(rng, int(self.nnz[rng.integers(len(self.nnz))]))
            at = self.offsets[picked] + rng.integers(0, self.counts[picked])
            tokens = self.tokens
            vector = {
                tokens[t]: w
                for t, w in zip(picked.tolist(), self.weights[at].tolist(), strict=True)
            }
            start, end = text_len * i // n, text_len * (i + 1) // n
            out.append(Passage(start, end, vector))
        return out


def expected_postings(model: PassageModel, vectors: Sequence[dict[str, float]], docs: int) -> float:
    """The postings an exact query walks in an index of ``docs`` documents, mean over the
    queries: each token's share of passages times the passages (a document holds the mean
    measured number); tokens no real passage holds have none."""
    share = dict(zip(model.tokens, model.share.tolist(), strict=True))
    passages = docs * float(model.per_doc.mean())
    per_query = [sum(share.get(t, 0.0) for t in v) * passages for v in vectors]
    return statistics.fmean(per_query) if per_query else float("nan")


# ----------------------------------------------------------------------------- measuring
def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


@dataclass
class Step:
    docs: int
    real_docs: int
    ingest_docs_per_s: float
    ingest_seconds: float
    store_bytes_per_doc: float
    vector_bytes_per_doc: float
    text_bytes_per_doc: float
    segments: int
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    pruned_top10_kept: float = float("nan")
    # against the unpruned run's exact top 10 (``--compare``): exact and as sent
    unpruned_top10_kept: dict[str, float] = field(default_factory=dict)
    load_average: float = float("nan")  # 1-minute, after the queries
    # SciFact's nDCG@10 per mode, every drawn document a distractor (none is judged relevant)
    ndcg10: dict[str, float] = field(default_factory=dict)
    exact_top10: list[list[str]] = field(default_factory=list)
    # the BM25-only index of the same documents (their title and body, nothing else): its
    # whole store per document, and its ingest rate
    bm25_only_store_bytes_per_doc: float = float("nan")
    bm25_only_ingest_docs_per_s: float = float("nan")
    # the side index (``--side-prune-below``: the same documents, index-time pruned), measured
    # in the same step, its queries alternating with this index's: ingest_docs_per_s,
    # store/vector bytes per document, latency_ms and ndcg10 (sparse_exact, sparse), and
    # kept: the share of *this* index's exact top 10 its exact and as-sent queries return
    side: dict[str, Any] = field(default_factory=dict)
    # postings a sparse query walks, expected from the measured token shares: the mean over
    # the queries of sum over its tokens of (passages holding the token) (exact query)
    query_postings: float = float("nan")
    largest_segment_share: float = float("nan")  # of the index's Lucene documents
    # hybrid with its rankings side by side vs one after the other: the share of the latter's
    # top 10 the former returns (1.0: the same documents)
    hybrid_same_top10: float = float("nan")


async def segment_layout(es: Any, index: str) -> tuple[int, float]:
    """The index's searchable segments and the largest one's share of its Lucene documents
    (a shard searches its segments in slices on several threads: one dominant segment leaves
    one thread most of the work)."""
    resp = await es.indices.segments(index=index)
    docs = [
        seg["num_docs"]
        for shards in resp["indices"][index]["shards"].values()
        for shard in shards
        for seg in shard["segments"].values()
        if seg.get("search", True)
    ]
    return len(docs), (max(docs) / sum(docs) if docs and sum(docs) else float("nan"))


async def disk_usage(es: Any, index: str) -> tuple[float, float, float]:
    """Bytes of the store, of the passages' vectors and of the text fields' inverted index
    (BM25). (The store from here, not from index stats: those cache the size for 10 s.)"""
    # minutes at a million documents: far past the client's default request timeout
    resp = await es.options(request_timeout=1800).indices.disk_usage(
        index=index, run_expensive_tasks=True
    )
    fields = resp[index]["fields"]
    vector = sum(v["total_in_bytes"] for k, v in fields.items() if k.endswith(f".{VECTOR}"))
    text = sum(v["total_in_bytes"] for k, v in fields.items() if k in TEXT_FIELDS)
    return float(resp[index]["store_size_in_bytes"]), float(vector), float(text)


async def timed_queries(
    es: Any,
    index: str,
    searcher: Searcher,
    queries: list[tuple[str, dict[str, float]]],
    side: str | None = None,
    warmup: Sequence[tuple[str, dict[str, float]]] = (),
    order: np.random.Generator | None = None,
) -> tuple[dict[str, dict[str, float]], float, dict[str, list[list[str]]]]:
    """Latency per mode; the share of the exact top 10 the pruned query keeps; every query's
    top 10 per mode. With ``side`` (an index of the same documents), its exact and as-sent
    queries too (modes ``side_sparse_exact``, ``side_sparse``). Each query runs every mode, in
    an order drawn from ``order`` query by query (a random permutation: no mode is always first,
    or always right after another with the same tokens). ``warmup``: other queries, run once
    in every mode first, unrecorded."""
    vector_path = f"{PASSAGES}.{VECTOR}"

    def sparse(target: str, vector: dict[str, float], exact: bool) -> Any:
        inner = sparse_query(vector_path, vector, True)
        if exact:
            inner["sparse_vector"]["prune"] = False
        # as the service sends it: the field's index_options decide (prune: true by default)
        query = best_passage_query(PASSAGES, inner, inner_hits=False)

        async def go() -> list[str]:
            resp = await es.search(index=target, query=query, size=10, source=False)
            return [h["_id"] for h in resp["hits"]["hits"]]

        return go

    # the service's hybrid with its two rankings one after the other (as before they ran side
    # by side), for the side-by-side figures
    serial_rankings = copy.copy(searcher)
    serial_rankings.parallel_rankings = False

    def service(mode: Mode, text: str, vector: dict[str, float], on: Searcher = searcher) -> Any:
        async def go() -> list[str]:
            return [h.id for h in await on.search(mode, text, vector, 10)]

        return go

    modes = ["sparse_exact", "sparse", "bm25", "hybrid", "hybrid_serial_rankings"]
    if side:
        modes += ["side_sparse_exact", "side_sparse"]
    lat: dict[str, list[float]] = {mode: [] for mode in modes}
    ranked: dict[str, list[list[str]]] = {mode: [] for mode in modes}
    order = order or np.random.default_rng(0)
    for i, (text, vector) in enumerate([*warmup, *queries]):
        calls = {
            "sparse_exact": sparse(index, vector, True),
            "sparse": sparse(index, vector, False),
            "bm25": service("bm25", text, vector),
            "hybrid": service("hybrid", text, vector),
            "hybrid_serial_rankings": service("hybrid", text, vector, serial_rankings),
        }
        if side:
            calls["side_sparse_exact"] = sparse(side, vector, True)
            calls["side_sparse"] = sparse(side, vector, False)
        for at in order.permutation(len(modes)):
            mode = modes[at]
            t0 = time.perf_counter()
            ids = await calls[mode]()
            if i >= len(warmup):
                lat[mode].append(time.perf_counter() - t0)
                ranked[mode].append(ids)
    table = {
        mode: {f"p{q}": percentile(v, q) * 1000 for q in (50, 95, 99)} for mode, v in lat.items()
    }
    return table, share_kept(ranked["sparse_exact"], ranked["sparse"]), ranked


def share_kept(reference: list[list[str]], got: list[list[str]]) -> float:
    """Mean share of each query's reference top 10 found in its ``got`` top 10."""
    shares = [len(set(r) & set(g)) / len(r) for r, g in zip(reference, got, strict=True) if r]
    return statistics.fmean(shares) if shares else float("nan")


def compared_run(path: Path | None) -> tuple[dict[int, list[list[str]]], dict[str, Any] | None]:
    """The exact top 10 per query, per size, of an earlier run (``--compare``), and that run's
    parameters (None for a run written before they were recorded)."""
    if path is None:
        return {}, None
    run = json.loads(path.read_text())
    top10 = {s["docs"]: s["exact_top10"] for s in run["steps"] if s.get("exact_top10")}
    return top10, run.get("params")


def run_params(args: argparse.Namespace) -> dict[str, Any]:
    """What a run records before it measures anything (``run`` adds the passage model's digest
    and the Elasticsearch version)."""
    return {
        "seed": args.seed, "real_docs": args.real_docs, "batch": args.batch, "sampler": SAMPLER,
        "queries": args.queries, "warmup": args.warmup, "query_order": QUERY_ORDER,
        "phases": PHASES, "side_up_to": args.side_up_to,
        "side_prune_below": args.side_prune_below, "serial": args.serial,
    }  # fmt: skip


# Elasticsearch's concurrent segment search (on by default since 8.12)
PARALLEL = "search.query_phase_parallel_collection_enabled"

# how a run orders each query's modes, and writes its indexes (another way measures otherwise)
QUERY_ORDER = "random permutation per query"
PHASES = "main, side, BM25-only: one after another per step, merges settled between"


# what must match for ``--compare`` to mean anything: the same real documents, the same
# measured model, the same draws
COMPARED = ("seed", "real_docs", "model_digest", "sampler")


def check_comparable(path: Path, previous: dict[str, Any] | None, params: dict[str, Any]) -> None:
    """SystemExit when the run in ``path`` was made with other parameters (of ``COMPARED``,
    those ``params`` has yet); a warning for a run that did not record them."""
    if previous is None:
        print(
            f"warning: {path} records no parameters (an older run): cannot check that its "
            f"seed, real documents and passage model match this run's",
            file=sys.stderr,
        )
        return
    differ = [
        f"{k} {previous[k]!r} there, {params[k]!r} here"
        for k in COMPARED
        if k in params and k in previous and previous[k] != params[k]
    ]
    if differ:
        raise SystemExit(
            f"--compare {path}: that run drew other documents ({'; '.join(differ)}); "
            f"run the unpruned index again with this run's parameters"
        )
    missing = [k for k in COMPARED if k in params and k not in previous]
    if missing:
        print(f"warning: {path} does not record {', '.join(missing)}", file=sys.stderr)


# ----------------------------------------------------------------------------- the run
async def checked_write(sink: ElasticsearchSink, batch: list[Upsert]) -> None:
    outcome = await sink.write(batch)
    if outcome.rejected or outcome.retry:
        raise RuntimeError(f"writes refused: {outcome.rejected[:1]} {outcome.retry[:1]}")


async def bm25_write(es: Any, index: str, batch: list[tuple[str, dict[str, str]]]) -> None:
    """Documents' title and body, nothing else, into the BM25-only index (a plain bulk: no
    versions, no lookup)."""
    actions = ({"_index": index, "_id": doc_id, "_source": fields} for doc_id, fields in batch)
    _, errors = await async_bulk(es, actions, chunk_size=len(batch), raise_on_error=False)
    if errors:
        raise RuntimeError(f"BM25-only writes refused: {errors}")


def written_fields(fields: Sequence[str]) -> tuple[str, dict[str, str]]:
    """A dataset document ``(title, text)`` as the bench writes it: the text the service encodes
    (the fields joined with a space, as the service joins its text fields) and the fields
    indexed for BM25, each the dataset's own."""
    title, body = fields
    return " ".join(t for t in fields if t), {"title": title, "body": body}


async def run(args: argparse.Namespace, es_url: str) -> tuple[list[Step], dict[str, Any]]:
    rng = np.random.default_rng(args.seed)
    params = run_params(args)  # (main checked these against --compare's run)
    reference, previous = compared_run(args.compare)
    data = load_beir(args.dataset)
    settings = load_settings(es_url=es_url, es_index=args.index)
    encoder: SparseEncoder = load_encoder(settings)
    ids = list(data.corpus)[: args.real_docs or None]
    documents = [written_fields(data.corpus[i]) for i in ids]
    texts = [text for text, _ in documents]
    print(f"encoding {len(texts):,} real documents as passages ...", flush=True)
    t0 = time.perf_counter()
    real = await encoder.aencode_passages(texts)
    print(f"   {len(texts) / (time.perf_counter() - t0):.1f} docs/s", flush=True)
    model = PassageModel.measure(real)
    params["model_digest"] = model.digest()
    if args.compare and previous is not None:
        check_comparable(args.compare, previous, {"model_digest": params["model_digest"]})
    qids = list(data.queries)[: args.queries]
    texts_q = [data.queries[q] for q in qids]
    queries = list(zip(texts_q, encoder.encode_queries(texts_q), strict=True))

    def real_id(doc: str) -> str:
        """The dataset's id of a written document ("d17"), or a drawn one's own."""
        n = int(doc[1:])
        return ids[n] if n < len(ids) else doc

    es = elasticsearch_client(settings)
    params["elasticsearch"] = (await describe_cluster(es)).version  # (no GET / here)
    if args.serial:  # (a cluster setting: a given --es-url gets it back at the end)
        await es.cluster.put_settings(persistent={PARALLEL: False})
    sink = ElasticsearchSink(
        es,
        IndexConfig(
            index=args.index, vector_field=VECTOR, text_fields=TEXT_FIELDS,
            refresh_interval=settings.es_refresh_interval, passage_field=PASSAGES,
            number_of_replicas=0, prune_below=args.prune_below,
        ),
        model_name=str(encoder.metadata.name),
        chunk_size=settings.es_bulk_chunk_size,
        max_chunk_bytes=settings.es_bulk_max_bytes,
    )  # fmt: skip
    sink.fingerprint = "scale-bench"
    await es.options(ignore_status=404).indices.delete(index=f"{args.index}*")
    index = await sink.ensure_index(create=True)
    searcher = Searcher(es, index, VECTOR, TEXT_FIELDS, passage_field=PASSAGES)
    side_sink: ElasticsearchSink | None = None
    side = ""
    if args.side_up_to:  # the same documents, index-time pruned
        side_sink = ElasticsearchSink(
            es,
            replace(sink.config, index=f"{args.index}-side", prune_below=args.side_prune_below),
            model_name=sink.model_name,
            chunk_size=settings.es_bulk_chunk_size,
            max_chunk_bytes=settings.es_bulk_max_bytes,
        )
        side_sink.fingerprint = "scale-bench-side"
        side = await side_sink.ensure_index(create=True)
    # BM25 alone: the same documents' title and body in the service's text mapping, nothing
    # else (no vectors, no passages, no bookkeeping)
    bm25_index = f"{args.index}-bm25"
    bm25_body = IndexConfig(
        index=bm25_index, vector_field=VECTOR, text_fields=TEXT_FIELDS,
        refresh_interval=settings.es_refresh_interval, number_of_replicas=0,
    ).body()  # fmt: skip
    bm25_body["mappings"]["properties"] = {
        name: m for name, m in bm25_body["mappings"]["properties"].items() if name in TEXT_FIELDS
    }
    await es.indices.create(index=bm25_index, **bm25_body)
    # warm-up queries: document titles, encoded as queries (none of the measured queries)
    titles = [t for t, _ in (data.corpus[i] for i in ids) if t][: args.warmup]
    warmup = list(zip(titles, encoder.encode_queries(titles), strict=True)) if titles else []
    order = np.random.default_rng(args.seed + 1)  # the modes' order per query (not the draws)
    steps: list[Step] = []
    written = 0
    sources = np.zeros(max(args.sizes), dtype=np.int32)  # each document's real text

    def batches(draw: np.random.Generator, begin: int, stop: int) -> Any:
        """Documents ``begin..stop`` in batches; the drawn ones from ``draw`` (the same state
        draws the same documents: the side index's phase replays the main index's)."""
        for low in range(begin, stop, args.batch):
            batch = []
            for n in range(low, min(stop, low + args.batch)):
                if n < len(texts):
                    of, passages = n, real[n]
                else:  # the text, title and body of a random real document
                    of = int(draw.integers(len(texts)))
                    passages = model.draw(draw, len(texts[of]))
                sources[n] = of
                text, fields = documents[of]
                batch.append(
                    Upsert(
                        RecordRef("scale", 0, n, 0), f"d{n}", 1, text, dict(fields),
                        content_hash=content_hash(sink.fingerprint, text), passages=passages,
                    )
                )  # fmt: skip
            yield batch

    async def settle(name: str) -> float:
        """Refresh ``name`` and wait until no merge runs on any of the bench's indexes (so the
        next phase, or the queries, do not share the cores with this one's merges)."""
        t0 = time.perf_counter()
        await es.options(request_timeout=1800).indices.refresh(index=name)
        refreshed = time.perf_counter() - t0
        while True:
            stats = await es.indices.stats(index=f"{args.index}*", metric="merge")
            if stats["_all"]["total"]["merges"]["current"] == 0:
                return refreshed
            await asyncio.sleep(0.5)

    try:
        for size in args.sizes:
            begin = written
            with_side = side_sink is not None and size <= args.side_up_to
            if side_sink is not None and not with_side and side:  # past its last step
                await es.options(ignore_status=404).indices.delete(index=side)
                side = ""
            state = rng.bit_generator.state
            # phase 1: the main index (its ingest rate: the time inside the writes and refresh)
            t0 = time.perf_counter()
            in_writes = 0.0  # seconds inside sink.write (drawing documents is not ingest)
            for batch in batches(rng, begin, size):
                t1 = time.perf_counter()
                await checked_write(sink, batch)
                in_writes += time.perf_counter() - t1
            in_writes += await settle(index)
            seconds = time.perf_counter() - t0
            written = size
            # phase 2: the side index, the same documents (the same draws, replayed)
            side_seconds = 0.0
            if with_side:
                assert side_sink is not None
                replay = np.random.Generator(type(rng.bit_generator)())
                replay.bit_generator.state = state
                for batch in batches(replay, begin, size):
                    t1 = time.perf_counter()
                    await checked_write(side_sink, batch)
                    side_seconds += time.perf_counter() - t1
                side_seconds += await settle(side)
            # phase 3: the BM25-only index, the same texts
            bm25_seconds = 0.0
            for low in range(begin, size, args.batch):
                chunk = [
                    (f"d{n}", documents[int(sources[n])][1])
                    for n in range(low, min(size, low + args.batch))
                ]
                t1 = time.perf_counter()
                await bm25_write(es, bm25_index, chunk)
                bm25_seconds += time.perf_counter() - t1
            bm25_seconds += await settle(bm25_index)
            # the store as on disk (disk_usage flushes too)
            await es.options(request_timeout=1800).indices.flush(index=f"{args.index}*")
            stats = await es.indices.stats(index=index, metric="segments")
            primaries = stats["indices"][index]["primaries"]
            store_b, vector_b, text_b = await disk_usage(es, index)
            bm25_store, _, _ = await disk_usage(es, bm25_index)
            side_store, side_vector, _ = await disk_usage(es, side) if with_side else (0, 0, 0)
            await settle(f"{args.index}*")
            _, largest = await segment_layout(es, index)
            side_segments = await segment_layout(es, side) if with_side else (0, float("nan"))
            latency, kept_share, ranked = await timed_queries(
                es, index, searcher, queries, side if with_side else None, warmup, order
            )
            unpruned: dict[str, float] = {}
            if written in reference:
                unpruned = {
                    mode: share_kept(reference[written], ranked[mode])
                    for mode in ("sparse_exact", "sparse")
                }
            ndcg = {
                mode: statistics.fmean(
                    ndcg_at_k([real_id(d) for d in ranking], data.qrels[qid])
                    for qid, ranking in zip(qids, rankings, strict=True)
                )
                for mode, rankings in ranked.items()
            }
            step = Step(
                docs=written, real_docs=min(written, len(texts)),
                ingest_docs_per_s=(written - begin) / in_writes, ingest_seconds=seconds,
                store_bytes_per_doc=store_b / written,
                vector_bytes_per_doc=vector_b / written, text_bytes_per_doc=text_b / written,
                segments=primaries["segments"]["count"], latency_ms=latency,
                pruned_top10_kept=kept_share, unpruned_top10_kept=unpruned,
                load_average=os.getloadavg()[0], ndcg10=ndcg,
                exact_top10=ranked["sparse_exact"],
                bm25_only_store_bytes_per_doc=bm25_store / written,
                bm25_only_ingest_docs_per_s=(written - begin) / bm25_seconds,
                query_postings=expected_postings(model, [v for _, v in queries], written),
                largest_segment_share=largest,
                hybrid_same_top10=share_kept(ranked["hybrid_serial_rankings"], ranked["hybrid"]),
            )  # fmt: skip
            if with_side:
                step.side = {
                    "prune_below": args.side_prune_below,
                    "ingest_docs_per_s": (written - begin) / side_seconds,
                    "store_bytes_per_doc": side_store / written,
                    "vector_bytes_per_doc": side_vector / written,
                    "segments": side_segments[0],
                    "largest_segment_share": side_segments[1],
                    "latency_ms": {
                        mode: latency.pop(f"side_{mode}") for mode in ("sparse_exact", "sparse")
                    },
                    "ndcg10": {
                        mode: ndcg.pop(f"side_{mode}") for mode in ("sparse_exact", "sparse")
                    },
                    "kept": {
                        mode: share_kept(ranked["sparse_exact"], ranked[f"side_{mode}"])
                        for mode in ("sparse_exact", "sparse")
                    },
                }
            steps.append(step)
            print(row(step), flush=True)
            report(args, steps, "(in progress)", params)
    finally:
        if not args.keep:
            await es.options(ignore_status=404).indices.delete(index=f"{args.index}*")
        if args.serial:
            await es.cluster.put_settings(persistent={PARALLEL: None})
        await es.close()
    return steps, params


HEADER = (
    "| documents (real) | ingest docs/s | store B/doc | vectors B/doc | text (BM25) B/doc | "
    "BM25-only index B/doc | segments (largest's share of documents) | "
    "sparse exact p50/p95/p99 ms | "
    "sparse as sent (pruned) p50/p95/p99 ms | pruned keeps of exact top 10 | "
    "BM25 p50/p95/p99 ms | hybrid p50/p95/p99 ms | nDCG@10 exact / as sent / BM25 / hybrid | "
    "load |\n|" + "---|" * 14
)


def lat_cell(m: dict[str, float]) -> str:
    return f"{m['p50']:.1f} / {m['p95']:.1f} / {m['p99']:.1f}"


def segments_cell(count: int, largest: float) -> str:
    return f"{count}" if math.isnan(largest) else f"{count} (largest {largest:.0%})"


def row(s: Step) -> str:
    ndcg = " / ".join(f"{s.ndcg10[m]:.3f}" for m in ("sparse_exact", "sparse", "bm25", "hybrid"))
    lat = s.latency_ms
    return (
        f"| {s.docs:,} ({s.real_docs:,}) | {s.ingest_docs_per_s:,.0f} | "
        f"{s.store_bytes_per_doc:,.0f} | {s.vector_bytes_per_doc:,.0f} | "
        f"{s.text_bytes_per_doc:,.0f} | {s.bm25_only_store_bytes_per_doc:,.0f} | "
        f"{segments_cell(s.segments, s.largest_segment_share)} | "
        f"{lat_cell(lat['sparse_exact'])} | {lat_cell(lat['sparse'])} | "
        f"{kept_cell(s)} | {lat_cell(lat['bm25'])} | {lat_cell(lat['hybrid'])} | {ndcg} | "
        f"{s.load_average:.1f} |"
    )


HYBRID_HEADER = (
    "| documents | rankings side by side p50/p95/p99 ms | one after the other p50/p95/p99 ms | "
    "same top 10 |\n|" + "---|" * 4
)


def hybrid_row(s: Step) -> str:
    lat = s.latency_ms
    same = s.hybrid_same_top10
    return (
        f"| {s.docs:,} | {lat_cell(lat['hybrid'])} | {lat_cell(lat['hybrid_serial_rankings'])} | "
        f"{'n/a' if math.isnan(same) else f'{same:.3f}'} |"
    )


SIDE_HEADER = (
    "| documents | ingest docs/s (unpruned in the same step) | store B/doc | vectors B/doc | "
    "segments | sparse exact p50/p95/p99 ms (unpruned) | as sent p50/p95/p99 ms (unpruned) | "
    "of the unpruned index's exact top 10, kept by: exact / as sent | "
    "nDCG@10 exact / as sent (unpruned) |\n|" + "---|" * 9
)


def side_row(s: Step) -> str:
    d = s.side
    lat, ndcg, kept = d["latency_ms"], d["ndcg10"], d["kept"]

    def less(side: float, main: float) -> str:
        return f"{side:,.0f} ({side / main - 1:+.0%})"

    return (
        f"| {s.docs:,} | {d['ingest_docs_per_s']:,.0f} ({s.ingest_docs_per_s:,.0f}) | "
        f"{less(d['store_bytes_per_doc'], s.store_bytes_per_doc)} | "
        f"{less(d['vector_bytes_per_doc'], s.vector_bytes_per_doc)} | "
        f"{segments_cell(d.get('segments', 0), d.get('largest_segment_share', math.nan))} | "
        f"{lat_cell(lat['sparse_exact'])} ({lat_cell(s.latency_ms['sparse_exact'])}) | "
        f"{lat_cell(lat['sparse'])} ({lat_cell(s.latency_ms['sparse'])}) | "
        f"{kept['sparse_exact']:.3f} / {kept['sparse']:.3f} | "
        f"{ndcg['sparse_exact']:.3f} / {ndcg['sparse']:.3f} "
        f"({s.ndcg10['sparse_exact']:.3f} / {s.ndcg10['sparse']:.3f}) |"
    )


def kept_cell(s: Step) -> str:
    """Pruned against exact on this index; with ``--compare``, also both against the exact top
    10 of the unpruned run."""
    out = f"{s.pruned_top10_kept:.3f}"
    if s.unpruned_top10_kept:
        u = s.unpruned_top10_kept
        out += f" (of unpruned index: exact {u['sparse_exact']:.3f}, as sent {u['sparse']:.3f})"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a BEIR folder (its documents are the real ones)")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--real-docs", type=int, default=0, help="encode at most N (0: all)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256, help="documents a bulk write")
    parser.add_argument("--index", default="scale-bench")
    parser.add_argument("--es-url", help="an Elasticsearch to use (else a private one)")
    parser.add_argument("--es-heap", default="4g")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the index")
    parser.add_argument(
        "--prune-below",
        type=float,
        default=0.0,
        help="index-time pruning: drop weights below this (SPARSE_INGEST_ES_PRUNE_BELOW)",
    )
    parser.add_argument(
        "--side-up-to",
        type=int,
        default=0,
        help="also grow a side index of the same documents, index-time pruned at "
        "--side-prune-below, through the sizes up to this one (0: none), measured in the same "
        "steps; deleted after its last",
    )
    parser.add_argument("--side-prune-below", type=float, default=0.3)
    parser.add_argument(
        "--serial",
        action="store_true",
        help="search each shard's segments on one thread (search.query_phase_parallel_"
        "collection_enabled: false): latency then measures a query's work, whatever the "
        "segment layout",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=20,
        help="warm-up queries (document titles) run before each step's, unrecorded",
    )
    parser.add_argument(
        "--compare", type=Path, help="an earlier run's scale.json (same --seed, no pruning)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "scale")
    parser.add_argument("--plot-only", action="store_true", help="redraw --out/scale.png")
    args = parser.parse_args()
    if args.plot_only:
        print(plot(args.out))
        return 0
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: document counts separated by commas")
    if args.sizes[0] < 1 or any(b <= a for a, b in itertools.pairwise(args.sizes)):
        parser.error(f"--sizes {args.sizes}: positive and increasing (the index grows)")
    if args.batch < 1 or args.queries < 1 or args.warmup < 0:
        parser.error("--batch and --queries take at least 1, --warmup at least 0")
    if args.side_up_to and args.side_up_to < args.sizes[0]:
        parser.error(f"--side-up-to {args.side_up_to}: no step is that small (first size "
                     f"{args.sizes[0]})")  # fmt: skip
    if args.side_up_to and args.prune_below:
        parser.error("--side-up-to compares a pruned side index with an unpruned main index: "
                     "leave --prune-below out")  # fmt: skip
    if args.compare:  # before any Elasticsearch starts: what can be checked yet
        check_comparable(args.compare, compared_run(args.compare)[1], run_params(args))
    started = time.perf_counter()
    stack = None
    es_url = args.es_url
    if es_url is None:
        from deploy.local import LocalStack

        stack = LocalStack(name="scale", es_heap=args.es_heap)
        es_url = stack.up(kafka=False).es_url
    try:
        steps, params = asyncio.run(run(args, es_url))
    finally:
        if stack is not None:
            stack.down(remove_data=True)
    print("\n" + report(args, steps, f"{time.perf_counter() - started:,.0f} s in all", params))
    print(plot(args.out))
    return 0


def report(args: argparse.Namespace, steps: list[Step], wall: str, params: dict[str, Any]) -> str:
    """The table so far, written to ``--out`` (after each step: a long run that is stopped
    keeps what it measured). The JSON's ``params``: the seed, ``--real-docs``, ``--batch``,
    the sampler, the Elasticsearch version and the passage model's digest (``--compare``
    checks them)."""
    cores = len(os.sched_getaffinity(0))
    heap = "(given)" if args.es_url else args.es_heap
    head = (
        f"{cpu_name()}, {cores} cores; Elasticsearch heap {heap}; "
        f"`python bench/scale_bench.py {args.dataset} --sizes {','.join(map(str, args.sizes))}"
        f"{f' --real-docs {args.real_docs}' if args.real_docs else ''}"
        f"{f' --queries {args.queries}' if args.queries != 300 else ''}"
        f"{f' --warmup {args.warmup}' if args.warmup != 20 else ''}"
        f"{' --serial' if args.serial else ''}"
        f"{f' --prune-below {args.prune_below:g}' if args.prune_below else ''}"
        f"{f' --side-up-to {args.side_up_to}' if args.side_up_to else ''}"
        f"{f' --side-prune-below {args.side_prune_below:g}' if args.side_up_to else ''}"
        f"{f' --compare {args.compare}' if args.compare else ''}`, {wall}"
    )
    parts = [head, "\n".join([HEADER, *(row(s) for s in steps)])]
    hybrid = [s for s in steps if "hybrid_serial_rankings" in s.latency_ms]
    if hybrid:
        parts += [
            "Hybrid (the service's `mode: hybrid`), its two rankings (sparse, BM25) side by "
            "side, as the service runs them, and one after the other, in the same rotation:",
            "\n".join([HYBRID_HEADER, *(hybrid_row(s) for s in hybrid)]),
        ]
    sides = [s for s in steps if s.side]
    if sides:
        parts += [
            f"Side index, the same documents index-time pruned at "
            f"{sides[0].side['prune_below']:g} (`SPARSE_INGEST_ES_PRUNE_BELOW`), its queries "
            f"alternating with the unpruned index's:",
            "\n".join([SIDE_HEADER, *(side_row(s) for s in sides)]),
        ]
    text = "\n\n".join(parts)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"scale-prune{args.prune_below:g}" if args.prune_below else "scale"
    (args.out / f"{name}.md").write_text(text + "\n")
    (args.out / f"{name}.json").write_text(
        json.dumps({"setup": head, "params": params, "steps": [asdict(s) for s in steps]}, indent=2)
        + "\n"
    )
    return text


def plot(out: Path) -> Path | None:
    """``scale.png`` from the runs in ``out`` (``scale.json`` and any ``scale-prune*.json``):
    latency per mode, bytes per document and ingest rate against the documents in the index.
    None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = {
        "no index-time pruning" if f.stem == "scale" else f.stem.replace("scale-", "index-time "): (
            json.loads(f.read_text())
        )
        for f in sorted(out.glob("scale*.json"))
    }
    fig, (ax_lat, ax_bytes, ax_ingest) = plt.subplots(1, 3, figsize=(16, 4.8))
    styles = {"sparse_exact": "o-", "sparse": "s--", "bm25": "^:", "hybrid": "d-."}
    for label, run in runs.items():
        steps = run["steps"]
        docs = [s["docs"] for s in steps]
        for mode, style in styles.items():
            if label != "no index-time pruning" and mode in ("bm25", "hybrid"):
                continue
            ax_lat.plot(
                docs, [s["latency_ms"][mode]["p99"] for s in steps], style,
                label=f"{mode} p99 ({label})",
            )  # fmt: skip
        ax_bytes.plot(
            docs, [s["vector_bytes_per_doc"] for s in steps], "o-", label=f"vectors ({label})"
        )
        if label == "no index-time pruning":
            ax_bytes.plot(docs, [s["text_bytes_per_doc"] for s in steps], "^:", label="text (BM25)")
            ax_bytes.plot(docs, [s["store_bytes_per_doc"] for s in steps], "s--", label="store")
            bm25 = [
                (s["docs"], s["bm25_only_store_bytes_per_doc"])
                for s in steps
                if "bm25_only_store_bytes_per_doc" in s
            ]
            if bm25:
                ax_bytes.plot(*zip(*bm25, strict=True), "x-", label="BM25-only index (store)")
        ax_ingest.plot(docs, [s["ingest_docs_per_s"] for s in steps], "o-", label=label)
        side = [s for s in steps if s.get("side")]
        if side:  # the side index, measured in the same run
            name = f"index-time {side[0]['side']['prune_below']:g}, same run"
            sdocs = [s["docs"] for s in side]
            for mode in ("sparse_exact", "sparse"):
                ax_lat.plot(
                    sdocs, [s["side"]["latency_ms"][mode]["p99"] for s in side], styles[mode],
                    label=f"{mode} p99 ({name})",
                )  # fmt: skip
            ax_bytes.plot(
                sdocs, [s["side"]["vector_bytes_per_doc"] for s in side], "o-",
                label=f"vectors ({name})",
            )  # fmt: skip
            ax_ingest.plot(sdocs, [s["side"]["ingest_docs_per_s"] for s in side], "s--", label=name)
    ax_lat.axhline(100, color="grey", lw=0.8)
    for ax, title in (
        (ax_lat, "query latency p99 (ms), one shard"),
        (ax_bytes, "bytes per document"),
        (ax_ingest, "ingest docs/s through the sink"),
    ):
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("documents in the index")
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(next(iter(runs.values()))["setup"].split(";")[0], fontsize=9)
    fig.tight_layout()
    path = out / "scale.png"
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
