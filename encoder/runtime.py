"""``SparseEncoder``: tokenize, batch to a token budget, run the ONNX session, make dicts."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from encoder.batching import plan_batches, window_starts
from encoder.checkpoint import SUPPORTED_ARCHITECTURES
from encoder.cpu import available_cpus, cpu_features
from encoder.errors import ModelError
from encoder.features import FeatureTable
from encoder.gate import SessionGate
from encoder.graph import ORT_DISABLED_OPTIMIZERS, OUTPUT_NAME
from encoder.metadata import (
    IDF_FILE,
    LONG_TEXT_MODES,
    MODEL_FILE,
    TOKENIZER_FILE,
    LongTextMode,
    ModelMetadata,
    QuantizationInfo,
    document_fingerprint,
    read_idf,
    read_metadata,
)
from encoder.passages import Passage, passage_spans
from encoder.pooling import WindowMerger
from encoder.registry import POOLINGS

log = logging.getLogger(__name__)

# Tokens per inference call (padding counted) when none is given, chosen by the model's width.
# Measured on 2 cores, exporter 4, SciFact INT8 (docs/encoder.md, Performance): BERT-base runs 10%
# faster at 1024 than at 2048 (5,348 vs 4,862 tok/s, median of 3; FP32 too: 1,419 vs 1,288), as
# its [tokens, 3072] activations and attention scores stay closer to the cache; SPLADE-tiny, whose
# cost is the vocabulary projection, runs 19% slower at 1024 (47,779 vs 58,869).
DEFAULT_MAX_BATCH_TOKENS = 2048
WIDE_MODEL_MAX_BATCH_TOKENS = 1024
WIDE_MODEL_HIDDEN_SIZE = 512
DEFAULT_MAX_BATCH_DOCS = 64


def default_max_batch_tokens(meta: ModelMetadata) -> int:
    """The token budget per inference call for a model: 1024 for BERT-base-wide models (hidden
    size >= 512), 2048 for narrow ones such as SPLADE-tiny (see DEFAULT_MAX_BATCH_TOKENS)."""
    if meta.hidden_size >= WIDE_MODEL_HIDDEN_SIZE:
        return WIDE_MODEL_MAX_BATCH_TOKENS
    return DEFAULT_MAX_BATCH_TOKENS


SparseVector = dict[str, float]
_R = TypeVar("_R")


@dataclass
class EncodeStats:
    """Counters accumulated over encode calls (pass the same object to several calls)."""

    tokenize_seconds: float = 0.0  # tokenizer, windows and padded arrays
    inference_seconds: float = 0.0  # ONNX Runtime session.run
    pooling_seconds: float = 0.0  # window merge and {token: weight} dicts
    texts: int = 0
    tokens: int = 0  # real tokens fed to the model (special tokens included, padding not)
    padded_tokens: int = 0  # batch x longest, summed over batches (padding included)
    windows: int = 0
    batches: int = 0

    @property
    def total_seconds(self) -> float:
        return self.tokenize_seconds + self.inference_seconds + self.pooling_seconds


@dataclass(frozen=True)
class _Unit:
    doc: int
    ids: list[int]
    start: int = 0  # characters of the text the window covers (passages only)
    end: int = 0


# Tokens that end a sentence when whitespace follows them (passage boundaries), and the
# full-width ones of Chinese and Japanese, which need none.
_SENTENCE_END = frozenset(".!?;\u3002\uff01\uff1f")
_FULL_WIDTH_SENTENCE_END = frozenset("\u3002\uff01\uff1f")


class SparseEncoder:
    """A loaded, warmed SPLADE encoder. Build with ``SparseEncoder.load(model_dir)``.

    Calls are serialised by a lock (one inference at a time uses all the session's threads);
    the ``a*`` methods run on a dedicated single-thread executor, off the asyncio event loop.
    """

    def __init__(
        self,
        model_dir: Path,
        metadata: ModelMetadata,
        session: ort.InferenceSession,
        tokenizer: Tokenizer,
        *,
        threads: int,
        max_batch_tokens: int,
        max_batch_docs: int,
        idf: dict[str, float] | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.metadata = metadata
        # what the document vectors depend on (weights, tokenizer, long-text handling): set by
        # load(); a different fingerprint means different vectors for the same text
        self.fingerprint = ""
        self.threads = threads
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_docs = max_batch_docs
        self._session = session
        self._tok = tokenizer
        self._features = FeatureTable.from_tokenizer(tokenizer, metadata.vocab_size)
        self._idf = idf
        self._gate = SessionGate()
        self._executor: ThreadPoolExecutor | None = None
        self._query_executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        probe = "a"
        plain = tokenizer.encode(probe, add_special_tokens=False).ids
        full = tokenizer.encode(probe, add_special_tokens=True).ids
        cut = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
        self._prefix = full[:cut]
        self._suffix = full[cut + len(plain) :]
        model_window = metadata.max_length - len(self._prefix) - len(self._suffix)
        if not 0 <= metadata.window_tokens <= model_window or 0 < metadata.window_tokens < 16:
            raise ModelError(
                f"window of {metadata.window_tokens} tokens: between 16 and {model_window} (what "
                f"{metadata.name} takes besides its special tokens), or 0 for all of them "
                "(the service's SPARSE_INGEST_WINDOW_TOKENS)"
            )
        self._window: int = metadata.window_tokens or model_window
        if (
            metadata.long_text != "truncate"
            and not 0 <= metadata.window_overlap <= self._window // 2
        ):
            raise ModelError(
                f"window overlap of {metadata.window_overlap} tokens: between 0 and half the "
                f"window ({self._window // 2}; the service's SPARSE_INGEST_WINDOW_OVERLAP)"
            )
        # config.json's pad_token_id, recorded at export (load() fills it in for older folders)
        self._pad_id = 0 if metadata.pad_token_id is None else metadata.pad_token_id
        if not 0 <= self._pad_id < metadata.vocab_size:
            raise ModelError(
                f"{model_dir}: pad_token_id {self._pad_id} is outside the vocabulary "
                f"({metadata.vocab_size}); export the model again"
            )
        self._extra_inputs = {
            i.name for i in session.get_inputs() if i.name not in ("input_ids", "attention_mask")
        }

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        threads: int | None = None,
        max_batch_tokens: int | None = None,
        max_batch_docs: int = DEFAULT_MAX_BATCH_DOCS,
        long_text: LongTextMode | None = None,
        model_file: str | None = None,
        window_tokens: int | None = None,
        window_overlap: int | None = None,
    ) -> SparseEncoder:
        """Load an exported model folder.

        ``threads``: ONNX Runtime intra-op threads (default: the CPUs this process may use,
        affinity and cgroup quota). ``max_batch_tokens``: padded tokens per inference call
        (default: ``default_max_batch_tokens(metadata)``, 1024 or 2048). ``long_text``:
        ``"chunk"`` (overlapping windows, max-merged), ``"truncate"`` or ``"passages"`` (one
        vector per window: :meth:`encode_passages`); None takes the metadata default.
        ``window_tokens``: tokens per window, special tokens not counted (default: all the model
        takes); ``window_overlap``: tokens neighbouring windows share (default: the metadata's,
        64, but at most a quarter of a ``window_tokens`` given).
        ``model_file``: another ONNX file of the folder, e.g. ``"model.fp32.onnx"``.
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelError(
                f"{model_dir}: model folder not found; run `sparse-ingest model fetch-default` or "
                "export one with `sparse-ingest model export SRC_DIR OUT_DIR`"
            )
        meta = read_metadata(model_dir)
        if meta.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelError(
                f"{model_dir}: architecture {meta.architecture!r} is not supported "
                f"({', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if meta.pooling not in POOLINGS:  # the graph pools; an unknown kind is a newer export
            raise ModelError(
                f"{model_dir}: pooling {meta.pooling!r} is not supported ({', '.join(POOLINGS)}); "
                "upgrade sparse-ingest or export the model again"
            )
        if long_text is not None:
            if long_text not in LONG_TEXT_MODES:
                raise ValueError(
                    f"long_text must be one of {', '.join(LONG_TEXT_MODES)}, not {long_text!r}"
                )
            meta = replace(meta, long_text=long_text)
        if window_tokens is not None:
            meta = replace(meta, window_tokens=window_tokens)
            if window_overlap is None and window_tokens:  # the folder's overlap, at most 1/4
                meta = replace(meta, window_overlap=min(meta.window_overlap, window_tokens // 4))
        if window_overlap is not None:
            meta = replace(meta, window_overlap=window_overlap)
        fp32_file = meta.files.get("model_fp32")
        model_file = model_file or meta.files.get("model", MODEL_FILE)
        if model_file == fp32_file:
            meta = replace(meta, quantization=QuantizationInfo())
        model_path = model_dir / model_file
        tok_path = model_dir / TOKENIZER_FILE
        for path in (model_path, tok_path):
            if not path.is_file():
                raise ModelError(
                    f"{path}: missing from the model folder; export the model again "
                    "(`sparse-ingest model export` or `sparse-ingest model fetch-default`)"
                )
        try:
            tok = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises plain Exception
            raise ModelError(f"{tok_path}: cannot load the tokenizer ({exc})") from exc
        if meta.pad_token_id is None:  # exported before the metadata recorded it: BERT/DistilBERT
            meta = replace(meta, pad_token_id=tok.padding["pad_id"] if tok.padding else 0)
        tok.no_padding()
        tok.no_truncation()
        if tok.get_vocab_size(with_added_tokens=True) != meta.vocab_size:
            raise ModelError(
                f"{tok_path}: {tok.get_vocab_size(with_added_tokens=True)} tokens, but the model's "
                f"vocabulary is {meta.vocab_size}; the tokenizer does not belong to this model"
            )
        idf = None
        if meta.query_mode == "idf":
            idf = read_idf(model_dir / meta.files.get("idf", IDF_FILE))

        n_threads = threads if threads is not None else available_cpus()
        if n_threads < 1:
            raise ValueError("threads must be >= 1")
        session = _make_session(model_path, n_threads)
        outputs = session.get_outputs()
        inputs = {i.name for i in session.get_inputs()}
        if [o.name for o in outputs] != [OUTPUT_NAME] or not {
            "input_ids",
            "attention_mask",
        } <= inputs:
            raise ModelError(
                f"{model_path}: expected inputs input_ids, attention_mask and one output "
                f"{OUTPUT_NAME!r}, found inputs {sorted(inputs)} and outputs "
                f"{[o.name for o in outputs]}; export the model with sparse-ingest"
            )
        enc = cls(
            model_dir,
            meta,
            session,
            tok,
            threads=n_threads,
            max_batch_tokens=(
                default_max_batch_tokens(meta) if max_batch_tokens is None else max_batch_tokens
            ),
            max_batch_docs=max_batch_docs,
            idf=idf,
        )
        enc.fingerprint = document_fingerprint(model_path, tok_path, meta)
        enc._warm_up(model_path)
        features = cpu_features()
        log.info(
            "loaded %s (%s, %s, long text: %s) from %s with %d threads; CPU: %s",
            meta.name,
            meta.architecture,
            meta.quantization.label,
            meta.long_text,
            model_path,
            n_threads,
            ", ".join(k for k, v in features.items() if v) or "no AVX2/AVX-512",
        )
        return enc

    def _warm_up(self, model_path: Path) -> None:
        ids = np.array([self._prefix + [self._pad_id] * 6 + self._suffix], dtype=np.int64)
        out = self._run(ids, np.ones_like(ids))
        if out.shape != (1, self.metadata.vocab_size):
            raise ModelError(
                f"{model_path}: output shape {out.shape}, expected (1, {self.metadata.vocab_size}) "
                "(batch, vocabulary); the ONNX file does not match sparse_model.json"
            )

    # ---------------------------------------------------------------------------- encoding

    @property
    def long_text(self) -> LongTextMode:
        return self.metadata.long_text

    @property
    def window_tokens(self) -> int:
        """Tokens per window (special tokens not counted)."""
        return self._window

    @property
    def priority_burst(self) -> int:
        """Priority inference calls (queries, ``priority=True``) that may pass a waiting document
        call in a row; then that one goes (``encoder.gate``). The service sets it from
        ``SPARSE_INGEST_ENCODER_PRIORITY_BURST``."""
        return self._gate.burst

    @priority_burst.setter
    def priority_burst(self, value: int) -> None:
        self._gate.burst = value

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text as the model sees them (special tokens included, nothing cut)."""
        encs = self._encode_batch(texts, add_special_tokens=True)
        return [len(e.ids) for e in encs]

    def encode_documents(
        self, texts: Sequence[str], stats: EncodeStats | None = None, *, priority: bool = False
    ) -> list[SparseVector]:
        """One ``{token: weight}`` per text; long texts follow ``self.long_text``.
        ``priority``: an interactive call (an API request), served before waiting batches."""
        return [vecs[0] for vecs in self._encode(texts, stats, per_window=False, priority=priority)]

    def encode_passages(
        self, texts: Sequence[str], stats: EncodeStats | None = None
    ) -> list[list[Passage]]:
        """Per text, its passages in order: windows of ``window_tokens`` tokens that share at
        most ``window_overlap``, cut at sentence or word boundaries where one is near
        (:func:`encoder.batching.passage_spans`), each with its character offsets and its
        vector. A text that fits one window is one passage, ``[0, len(text))``."""
        if isinstance(texts, str):
            raise TypeError("pass a sequence of texts, not a single string")
        started = time.perf_counter()
        units = self._passage_units(texts)
        grouped: list[list[Passage]] = [[] for _ in texts]
        vectors = self._run_units(units, len(texts), stats, started)
        for unit, vec in zip(units, vectors, strict=True):
            grouped[unit.doc].append(Passage(unit.start, unit.end, vec))
        return grouped

    async def aencode_passages(
        self, texts: Sequence[str], stats: EncodeStats | None = None
    ) -> list[list[Passage]]:
        """:meth:`encode_passages` off the event loop (the document thread)."""
        return await self._off_loop(self.encode_passages, list(texts), stats)

    def encode_documents_chunks(
        self, texts: Sequence[str], stats: EncodeStats | None = None
    ) -> list[list[SparseVector]]:
        """Per text, one vector per window (overlapping windows of ``max_length`` tokens)."""
        return self._encode(texts, stats, per_window=True)

    def encode_queries(
        self, texts: Sequence[str], stats: EncodeStats | None = None
    ) -> list[SparseVector]:
        """Query vectors: the model itself, or inference-free IDF/tokenizer weights.

        Model inference for queries goes before waiting document batches (they wait for the one
        inference call in progress, and under a flood for one document call per
        ``priority_burst`` query calls)."""
        mode = self.metadata.query_mode
        if mode == "model":
            return [v[0] for v in self._encode(texts, stats, per_window=False, priority=True)]
        t0 = time.perf_counter()
        encs = self._encode_batch(texts, add_special_tokens=False)
        t1 = time.perf_counter()
        names, keep, tokens = self._features.names, self._features.keep, self._features.tokens
        out: list[SparseVector] = []
        for e in encs:
            vec: SparseVector = {}
            for i in e.ids:
                if not keep[i]:
                    continue
                weight = 1.0 if self._idf is None else self._idf.get(tokens[i], 0.0)
                if weight > 0.0:
                    vec[names[i]] = max(weight, vec.get(names[i], 0.0))
            out.append(vec)
        if stats is not None:
            stats.tokenize_seconds += t1 - t0
            stats.pooling_seconds += time.perf_counter() - t1
            stats.texts += len(texts)
        return out

    async def aencode_documents(
        self, texts: Sequence[str], stats: EncodeStats | None = None, *, priority: bool = False
    ) -> list[SparseVector]:
        """Off the event loop. ``priority``: an interactive request (e.g. ``POST /encode``): it
        runs on the query thread and goes before the ingest's waiting inference calls."""
        if priority:
            fn = functools.partial(self.encode_documents, priority=True)
            return await self._off_loop(fn, list(texts), stats, query=True)
        return await self._off_loop(self.encode_documents, list(texts), stats)

    async def aencode_queries(
        self, texts: Sequence[str], stats: EncodeStats | None = None
    ) -> list[SparseVector]:
        return await self._off_loop(self.encode_queries, list(texts), stats, query=True)

    def close(self) -> None:
        """Stop the async executor (the session is freed with the object)."""
        with self._executor_lock:
            for executor in (self._executor, self._query_executor):
                if executor is not None:
                    executor.shutdown(wait=True)
            self._executor = self._query_executor = None

    def __enter__(self) -> SparseEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------- internals

    async def _off_loop(
        self,
        fn: Callable[[list[str], EncodeStats | None], _R],
        texts: list[str],
        stats: EncodeStats | None,
        *,
        query: bool = False,
    ) -> _R:
        # Documents and queries on threads of their own: a query never queues behind a
        # document call, only (at the session gate) behind the inference call in progress.
        with self._executor_lock:
            if query:
                if self._query_executor is None:
                    self._query_executor = ThreadPoolExecutor(
                        1, thread_name_prefix="sparse-encoder-query"
                    )
                executor = self._query_executor
            else:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="sparse-encoder")
                executor = self._executor
        return await asyncio.get_running_loop().run_in_executor(executor, fn, texts, stats)

    def _encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool) -> list[Encoding]:
        # encode_batch_fast: no offsets, which we never use
        return self._tok.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)

    def _units(self, texts: Sequence[str], chunk: bool) -> list[_Unit]:
        encs = self._encode_batch(texts, add_special_tokens=False)
        prefix, suffix, window = self._prefix, self._suffix, self._window
        overlap = min(self.metadata.window_overlap, window // 2)
        units = []
        for doc, e in enumerate(encs):
            ids = e.ids
            if len(ids) <= window or not chunk:
                units.append(_Unit(doc, prefix + ids[:window] + suffix))
                continue
            for start in window_starts(len(ids), window, overlap):
                units.append(_Unit(doc, prefix + ids[start : start + window] + suffix))
        return units

    def _passage_units(self, texts: Sequence[str]) -> list[_Unit]:
        """The windows of ``long_text="passages"``, with the characters each covers."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)  # with offsets
        prefix, suffix, window = self._prefix, self._suffix, self._window
        overlap = min(self.metadata.window_overlap, window // 2)
        units = []
        for doc, (text, e) in enumerate(zip(texts, encs, strict=True)):
            ids = e.ids
            if len(ids) <= window:
                units.append(_Unit(doc, prefix + ids + suffix, 0, len(text)))
                continue
            # Characters of each token without the whitespace some tokenizers fold into a piece
            # (SentencePiece's "▁word" covers the space before it; byte-level BPE's "Ġword" too,
            # unless the post-processor trims offsets); WordPiece offsets have none.
            offsets = [_strip_span(text, start, end) for start, end in e.offsets]
            words = e.word_ids
            word_start = [i == 0 or words[i] != words[i - 1] for i in range(len(ids))]
            sentence_start = [False] * len(ids)
            for i in range(1, len(ids)):
                if not word_start[i]:
                    continue
                gap = text[offsets[i - 1][1] : offsets[i][0]]
                previous = text[offsets[i - 1][0] : offsets[i - 1][1]]
                if (gap and ("\n" in gap or previous in _SENTENCE_END)) or (
                    previous in _FULL_WIDTH_SENTENCE_END
                ):
                    sentence_start[i] = True
            spans = passage_spans(len(ids), window, overlap, word_start, sentence_start)
            for start, end in spans:
                units.append(
                    _Unit(
                        doc,
                        prefix + ids[start:end] + suffix,
                        0 if start == 0 else offsets[start][0],
                        len(text) if end == len(ids) else offsets[end - 1][1],
                    )
                )
        return units

    def _run(self, ids: np.ndarray, mask: np.ndarray, priority: bool = False) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": mask}
        for name in self._extra_inputs:  # token_type_ids of foreign exports: one segment
            feeds[name] = np.zeros_like(ids)
        with self._gate.hold(priority):  # one inference at a time owns the session's threads
            return self._session.run([OUTPUT_NAME], feeds)[0]

    def _encode(
        self,
        texts: Sequence[str],
        stats: EncodeStats | None,
        *,
        per_window: bool,
        priority: bool = False,
    ) -> list[list[SparseVector]]:
        """Per text: its window vectors (``per_window``) or a one-item list of its vector (its
        windows max-merged: ``chunk``, and ``passages`` for a single vector)."""
        if isinstance(texts, str):
            raise TypeError("pass a sequence of texts, not a single string")
        mode = self.metadata.long_text
        started = time.perf_counter()
        if mode == "passages" and not per_window:
            units = self._passage_units(texts)
        else:
            units = self._units(texts, chunk=per_window or mode != "truncate")
        if not per_window:
            merged = self._run_units(units, len(texts), stats, started, priority, merge=True)
            return [[vec] for vec in merged]
        grouped: list[list[SparseVector]] = [[] for _ in texts]
        vectors = self._run_units(units, len(texts), stats, started)
        for unit, vec in zip(units, vectors, strict=True):
            grouped[unit.doc].append(vec)
        return grouped

    def _run_units(
        self,
        units: Sequence[_Unit],
        n_texts: int,
        stats: EncodeStats | None,
        started: float,
        priority: bool = False,
        merge: bool = False,
    ) -> list[SparseVector]:
        """Run the model over the windows in token-budget batches. Returns one vector per
        window, or with ``merge`` one per text (its windows max-merged in a dense buffer until
        the last is done: :class:`encoder.pooling.WindowMerger`). ``started``: when tokenizing
        began (for ``stats``). A window of no tokens at all (an empty text, with a tokenizer
        that adds no special tokens) is ``{}`` and never reaches the model: a row with nothing to
        attend to has no output."""
        st = stats if stats is not None else EncodeStats()
        lengths = [len(u.ids) for u in units]
        live = [i for i, n in enumerate(lengths) if n]
        batches = [
            [live[j] for j in batch]
            for batch in plan_batches(
                [lengths[i] for i in live], self.max_batch_tokens, self.max_batch_docs
            )
        ]
        st.tokenize_seconds += time.perf_counter() - started
        st.texts += n_texts
        st.windows += len(units)
        st.tokens += sum(lengths)
        st.batches += len(batches)

        # the merger counts the texts that have windows to run (a text with an empty window has
        # only that one), numbered in text order
        live_docs = sorted({units[i].doc for i in live})
        merger_index = {doc: k for k, doc in enumerate(live_docs)}
        merger = (
            WindowMerger(np.bincount([merger_index[units[i].doc] for i in live]))
            if merge and live
            else None
        )
        per_unit: list[SparseVector] = [] if merge else [{} for _ in units]
        per_doc: list[SparseVector] = [{} for _ in range(n_texts)] if merge else []
        for batch in batches:
            t1 = time.perf_counter()
            width = max(lengths[i] for i in batch)
            ids = np.full((len(batch), width), self._pad_id, dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                ids[row, : lengths[i]] = units[i].ids
                mask[row, : lengths[i]] = 1
            st.padded_tokens += ids.size
            t2 = time.perf_counter()
            out = self._run(ids, mask, priority)
            t3 = time.perf_counter()
            if merger is not None:
                done, rows = merger.add([merger_index[units[i].doc] for i in batch], out)
                for k, vec in zip(done, self._features.to_dicts(rows), strict=True):
                    per_doc[live_docs[k]] = vec
            else:
                for i, vec in zip(batch, self._features.to_dicts(out), strict=True):
                    per_unit[i] = vec
            t4 = time.perf_counter()
            st.tokenize_seconds += t2 - t1
            st.inference_seconds += t3 - t2
            st.pooling_seconds += t4 - t3
        return per_doc if merge else per_unit


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """``text[start:end]`` without leading or trailing whitespace; a whitespace-only token (a
    byte-level "Ċ" newline, a lone "Ġ" or "▁") becomes empty at its end, so its whitespace is the
    gap before it, and a passage that starts with it starts after the whitespace."""
    piece = text[start:end]
    stripped = piece.strip()
    if not stripped:
        return end, end
    lead = len(piece) - len(piece.lstrip())
    return start + lead, start + lead + len(stripped)


def _make_session(model_path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(
            str(model_path),
            opts,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=ORT_DISABLED_OPTIMIZERS,
        )
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... classes
        raise ModelError(
            f"{model_path}: ONNX Runtime cannot load it ({str(exc).strip()[:300]}); the file is "
            "corrupt or not an ONNX model: export the model again"
        ) from exc
