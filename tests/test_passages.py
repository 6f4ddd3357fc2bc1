"""Long documents as passages (README: Long documents): where texts are cut, what the encoder
returns for each piece, and the whole service on Elasticsearch 9 and 8 with
``SPARSE_INGEST_LONG_TEXT=passages``: a document is scored by its best passage, and search (the
searcher, ``POST /search`` and ``sparse-ingest search``) hands back that passage, found past the
first 512 tokens of its document, where truncation (ELSER's limit) never looks."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from service_support import (
    cli,
    cosine,
    create_topic,
    doc,
    metric,
    produce,
    running_service,
    service_settings,
    tombstone,
    wait_all_committed,
)

from encoder import ModelError, Passage, SparseEncoder
from encoder.passages import passage_spans
from service.batches import BatchProcessor
from service.builder import build_sink, long_text_options
from service.config import ConfigError, load_settings
from service.elastic import delete_index, elasticsearch_client
from service.errors import StartupError
from service.messages import (
    META_FIELD,
    BadRecord,
    MessageContract,
    RecordRef,
    Upsert,
    content_hash,
    decode_record,
    indexed_text,
)
from service.metrics import Metrics
from service.reindex import reindex
from service.search import Mode, PassageHit, Searcher
from service.sink import ElasticsearchSink, IndexConfig, _stored_passages
from tooling.eval.variants import long_text_variant

# ------------------------------------------------------------------------------ spans (pure)


@st.composite
def _token_flags(draw: st.DrawFn) -> tuple[int, int, int, list[bool], list[bool]]:
    n = draw(st.integers(0, 400))
    window = draw(st.integers(1, 80))
    overlap = draw(st.integers(0, window // 2))
    words = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    sentences = [w and draw(st.booleans()) for w in words]
    return n, window, overlap, words, sentences


@settings(max_examples=300, deadline=None)
@given(_token_flags())
def test_spans_cover_every_token_within_window_and_overlap(
    case: tuple[int, int, int, list[bool], list[bool]],
) -> None:
    n, window, overlap, words, sentences = case
    spans = passage_spans(n, window, overlap, words, sentences)
    assert spans[0][0] == 0 and spans[-1][1] == n
    for (start, end), (next_start, next_end) in itertools.pairwise(spans):
        assert next_start > start and next_end > end  # forward, always
        assert end - next_start <= overlap  # neighbours share at most `overlap` tokens
        assert next_start <= end  # no token left out between them
    assert all(0 < end - start <= window for start, end in spans) or n == 0


def test_spans_prefer_sentence_then_word_boundaries() -> None:
    n, window = 100, 40
    words = [i % 3 == 0 for i in range(n)]  # a word every 3 tokens
    sentences = [False] * n
    sentences[33] = True  # a sentence starts in the last quarter of the first window
    spans = passage_spans(n, window, 8, words, sentences)
    assert spans[0] == (0, 33)  # cut before the sentence, and the next starts with it
    assert spans[1][0] == 33
    sentences[30] = True  # a sentence starts in the overlap: repeat it whole
    assert passage_spans(n, window, 8, words, sentences)[1][0] == 30
    # no sentence near: the last word start before the window's end, and the next passage
    # starts at the first word start of the overlap
    no_sentences = passage_spans(n, window, 8, words, [False] * n)
    assert no_sentences[0] == (0, 39) and no_sentences[1][0] == 33
    # no boundary at all (one 100-token word): the window's length
    assert passage_spans(n, window, 0, [i == 0 for i in range(n)], [False] * n)[0] == (0, 40)
    assert passage_spans(10, window, 8, words, sentences) == [(0, 10)]
    with pytest.raises(ValueError, match="overlap"):
        passage_spans(n, window, 21, words, sentences)


# ------------------------------------------------------------------------------ encoder

FILLER = [
    "The committee reviewed the annual budget and approved funding for road repairs.",
    "Farmers in the valley planted wheat early because the spring was unusually warm.",
    "A new bakery opened downtown, selling sourdough bread and almond pastries.",
    "The orchestra rehearsed a symphony by Dvorak for the winter concert season.",
    "Engineers replaced the old water pipes under the main street over the summer.",
    "Students at the school built a small robot that sorts recycled bottles.",
]
NEEDLE = (
    "The lighthouse keeper logged the tide heights every dawn and warned fishing boats when "
    "the fog rolled over the harbour rocks."
)
QUERY = "lighthouse keeper warning boats about fog"


def long_document(encoder: SparseEncoder, before_tokens: int = 1100) -> str:
    """Filler paragraphs for more than ``before_tokens`` tokens, then the needle, then more."""
    paragraphs: list[str] = []
    i = 0
    while encoder.count_tokens(["\n\n".join(paragraphs)])[0] < before_tokens:
        paragraphs.append(" ".join(FILLER[(i + k) % len(FILLER)] for k in range(3)))
        i += 1
    return "\n\n".join([*paragraphs, NEEDLE, *paragraphs[:2]])


@pytest.fixture(scope="module")
def passage_encoder(default_model_dir: Path) -> SparseEncoder:
    """The encoder of the service's default settings: passages of 256 tokens."""
    options = long_text_options(load_settings(model_dir=default_model_dir))
    assert options["long_text"] == "passages" and options["window_tokens"] == 256
    return SparseEncoder.load(default_model_dir, **options)


def test_encoder_passages_offsets_and_vectors(passage_encoder: SparseEncoder) -> None:
    enc = passage_encoder
    text = long_document(enc)
    short, long = enc.encode_passages(["a short text", text])
    assert [(p.start, p.end) for p in short] == [(0, len("a short text"))]
    assert len(long) >= 2 and long[0].start == 0 and long[-1].end == len(text)
    for p, nxt in itertools.pairwise(long):
        assert p.start < nxt.start <= p.end  # overlapping, in order, nothing skipped
        assert text[nxt.start - 1].isspace()  # passages start at a word
        assert text[p.end - 1] in ".!?" or text[p.end].isspace()  # and end at one
    for p in long:  # each passage's vector is the model's vector of its text alone (INT8
        # scales activations per batch: close, not equal)
        alone = enc.encode_documents([text[p.start : p.end]])[0]
        assert cosine(alone, p.vector) > 0.98
    needle = next(p for p in long if NEEDLE in text[p.start : p.end])
    assert enc.count_tokens([text[: needle.start]])[0] > 512  # past ELSER's cut
    top = sorted(needle.vector, key=needle.vector.__getitem__, reverse=True)[:30]
    assert "lighthouse" in top
    # encode_documents in this mode: the passages max-merged into one vector
    merged = enc.encode_documents([text])[0]
    expected: dict[str, float] = {}
    for p in long:
        for token, weight in p.vector.items():
            expected[token] = max(weight, expected.get(token, 0.0))
    assert cosine(merged, expected) > 0.98


def test_window_settings_and_fingerprints(default_model_dir: Path) -> None:
    base = SparseEncoder.load(default_model_dir)
    assert base.window_tokens == base.metadata.max_length - 2
    small = SparseEncoder.load(default_model_dir, long_text="passages", window_tokens=64)
    assert small.window_tokens == 64
    text = " ".join(FILLER * 4)
    assert len(small.encode_passages([text])[0]) > 2
    fingerprints = {
        base.fingerprint,
        small.fingerprint,
        SparseEncoder.load(default_model_dir, long_text="passages").fingerprint,
        SparseEncoder.load(default_model_dir, window_tokens=64).fingerprint,
    }
    assert len(fingerprints) == 4  # the mode and the window change the vectors: re-encode
    # an unset window keeps the fingerprint of earlier releases (no reindex after upgrading)
    assert SparseEncoder.load(default_model_dir, window_tokens=0).fingerprint == base.fingerprint
    with pytest.raises(ModelError, match="SPARSE_INGEST_WINDOW_TOKENS"):
        SparseEncoder.load(default_model_dir, window_tokens=10_000)
    with pytest.raises(ModelError, match="SPARSE_INGEST_WINDOW_OVERLAP"):
        SparseEncoder.load(default_model_dir, window_tokens=64, window_overlap=40)


def test_cjk_sentence_ends_need_no_space(passage_encoder: SparseEncoder) -> None:
    small = SparseEncoder.load(
        passage_encoder.model_dir, long_text="passages", window_tokens=16, window_overlap=0
    )
    text = "東京都は日本の首都です。" * 4  # 12 characters a sentence, no spaces
    passages = small.encode_passages([text])[0]
    assert len(passages) > 1
    assert all(text[p.start : p.end].endswith("。") for p in passages)


def test_window_settings_the_service_refuses(default_model_dir: Path) -> None:
    # 0: all the model takes (an eval variant's bare mode name means that too)
    full = long_text_options(load_settings(model_dir=default_model_dir, window_tokens=0))
    assert full["window_tokens"] == 0
    variant = long_text_variant("int8-passages")
    assert variant is not None and variant.window_tokens == 0
    with pytest.raises(ConfigError, match="SPARSE_INGEST_WINDOW_TOKENS"):
        load_settings(window_tokens=8)
    for name in ("sparse_ingest", "a.b", "title", "id", "tokens"):
        with pytest.raises(ConfigError, match="SPARSE_INGEST_ES_PASSAGE_FIELD"):
            load_settings(es_passage_field=name)
    with pytest.raises(ConfigError, match="SPARSE_INGEST_ES_PASSAGE_FIELD"):
        load_settings(text_fields=["passages.body"])
    # truncate never overlaps windows: any overlap is fine
    SparseEncoder.load(default_model_dir, long_text="truncate", window_overlap=400)
    # windows so small that a document of MAX_TEXT_CHARS characters (CJK: a token each) could
    # exceed Elasticsearch's 10,000 nested objects: refused at the start, naming the settings
    tiny = SparseEncoder.load(default_model_dir, long_text="passages", window_tokens=16)
    with pytest.raises(StartupError, match="SPARSE_INGEST_WINDOW_TOKENS"):
        build_sink(load_settings(window_tokens=16), None, tiny)  # type: ignore[arg-type]
    assert len(tiny._passage_units(["中" * 200_000])) > 10_000  # what it guards against
    build_sink(load_settings(window_tokens=16, max_text_chars=50_000), None, tiny)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ sink, search


def _sink(prune_below: float = 0.0) -> ElasticsearchSink:
    config = IndexConfig("docs", passage_field="passages", prune_below=prune_below)
    sink = ElasticsearchSink(None, config, model_name="m")  # type: ignore[arg-type]
    sink.fingerprint = "fp"
    return sink


def test_passages_mapping_and_bulk_action() -> None:
    sink = _sink(prune_below=0.5)
    props = sink.config.body()["mappings"]["properties"]
    assert "tokens" not in props  # one vector per passage, none per document
    assert props["passages"]["type"] == "nested"
    assert props["passages"]["properties"]["tokens"] == {"type": "sparse_vector"}
    assert props["passages"]["properties"]["start"] == {"type": "integer", "index": False}
    assert sink.config.vector_path == "passages.tokens"
    up = Upsert(RecordRef("t", 0, 7), "d", 3, "one two", {"body": "one two"})
    up.passages = [Passage(0, 3, {"one": 1.0, "x": 0.1}), Passage(4, 7, {"two": 2.0})]
    action = sink._bulk_action(up, "now")
    assert action["_source"]["passages"] == [
        {"start": 0, "end": 3, "tokens": {"one": 1.0}},  # pruned per passage
        {"start": 4, "end": 7, "tokens": {"two": 2.0}},
    ]
    assert "tokens" not in action["_source"] and action["version"] == 3
    # what the content-hash look-up reads back; anything malformed is not reused
    raw = [{"start": 0, "end": 3, "tokens": {"one": 1.0}}]
    assert _stored_passages(raw, "tokens") == [Passage(0, 3, {"one": 1.0})]
    for bad in (None, [], [{"start": "0", "end": 3, "tokens": {}}], [{"start": 0, "end": 3}], [1]):
        assert _stored_passages(bad, "tokens") is None


@pytest.mark.parametrize(
    "mapped",
    [{"type": "text"}, {"properties": {"tokens": {"type": "float"}}},
     {"type": "nested", "properties": {"tokens": {"type": "float"}}}],
)  # fmt: skip
def test_an_index_not_made_for_passages_is_refused(mapped: dict[str, Any]) -> None:
    body = {"mappings": {"properties": {"passages": mapped}}}
    with pytest.raises(ValueError, match="SPARSE_INGEST_LONG_TEXT=passages"):
        _sink()._vector_unmapped("docs-1", body)
    assert _sink()._vector_unmapped("docs-1", {"mappings": {"properties": {}}})


@pytest.mark.parametrize(
    "extra",
    [
        {"passages": [1]},
        # Elasticsearch reads a dotted key as a path: {"passages.tokens": {...}} would add a
        # passage with a vector of the record's choosing
        {"passages.tokens": {"spam": 99.0}},
        {"passages.start": 0},
        {"tokens.spam": 99.0},
        {"sparse_ingest.content_hash": "0"},
    ],
)
def test_a_documents_own_passages_field_is_reserved(extra: dict[str, Any]) -> None:
    sink = _sink()
    processor = BatchProcessor(None, sink, None, MessageContract(), Metrics(), model_name="m")  # type: ignore[arg-type]
    ref = RecordRef("t", 0, 1)
    value = json.dumps({"id": "a", "body": "text", **extra}).encode()
    with pytest.raises(BadRecord) as bad:
        decode_record(processor.contract, ref, b"a", value)
    assert bad.value.reason == "reserved_field"
    if "passages" in extra or "passages.start" in extra:  # other modes: an ordinary field
        assert decode_record(MessageContract(), ref, b"a", value) is not None


def test_the_passage_text_is_cut_only_from_the_text_that_was_encoded() -> None:
    searcher = Searcher(None, "docs", "tokens", ["title", "after.body"],  # type: ignore[arg-type]
                        passage_field="passages")  # fmt: skip
    source = {"title": "Notes", "body": "alpha beta gamma"}  # a change event's row
    text = "Notes alpha beta gamma"
    assert indexed_text(source, ["title", "after.body"]) == text

    def hit(stored_hash: str) -> dict[str, Any]:
        inner = {"_score": 2.5, "_nested": {"offset": 1},
                 "fields": {"passages.start": [6], "passages.end": [16]}}  # fmt: skip
        return {
            "_source": source,
            "fields": {
                f"{META_FIELD}.content_hash": [stored_hash],
                f"{META_FIELD}.model_fingerprint": ["fp"],
            },
            "inner_hits": {"passages": {"hits": {"hits": [inner]}}},
        }

    got = searcher._passage(hit(content_hash("fp", text)))
    assert got == PassageHit(6, 16, "alpha beta", 1, 2.5)
    # the text fields no longer give the text that was encoded (a setting changed): offsets
    # only, never a wrong piece of text
    stale = searcher._passage(hit(content_hash("fp", "another text")))
    assert stale is not None and stale.text is None and stale.start == 6


# ------------------------------------------------------------------------------ end to end


async def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


@pytest.mark.integration
async def test_passages_through_the_service_on_each_major(
    es_any: tuple[str, str],
    kafka_bootstrap: str,
    topic: str,
    index_name: str,
    passage_encoder: SparseEncoder,
    default_model_dir: Path,
) -> None:
    _, url = es_any
    settings = service_settings(kafka_bootstrap, url, topic, index_name, es_prune_below=0.2)
    text = long_document(passage_encoder)
    es = elasticsearch_client(settings)
    try:
        await create_topic(kafka_bootstrap, topic, 2)
        records = [
            doc("long", text, title="Town notes", version=1),
            doc("boats", "Fishing boats return to the harbour at dusk.", version=1),
            doc("bread", FILLER[2], version=1),
            doc("gone", "a lighthouse on a postcard", version=1),
            doc("long", "stale text about lighthouse keepers and fog", version=0),  # older
            tombstone("gone", version=2),
        ]
        await produce(kafka_bootstrap, topic, records)
        async with running_service(settings, passage_encoder) as svc:
            await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
            # the same text again, a newer version: its stored passages are reused (mget)
            await produce(kafka_bootstrap, topic, [doc("bread", FILLER[2], version=2)])
            await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
            assert metric(svc, "sparse_ingest_documents_skipped_unchanged_total") == 1
            await es.indices.refresh(index=index_name)

            # (Elasticsearch 9 returns vectors only when named)
            wanted = ["passages.tokens", "passages.start", "passages.end", "tokens", "title"]
            stored = (
                await es.get(index=index_name, id="long", source_includes=[*wanted, META_FIELD])
            )["_source"]
            passages = stored["passages"]
            assert len(passages) >= 2 and "tokens" not in stored  # no document-level vector
            assert stored["title"] == "Town notes" and stored[META_FIELD]["version"] == 1
            # index-time pruning applies to each passage
            assert all(p["tokens"] and min(p["tokens"].values()) >= 0.2 for p in passages)
            assert [p["start"] for p in passages] == sorted(p["start"] for p in passages)
            bread = await es.get(index=index_name, id="bread")
            assert bread["_version"] == 2 and len(bread["_source"]["passages"]) == 1

            full_text = f"Town notes {text}"  # the text fields joined, as encoded
            vector = passage_encoder.encode_queries([QUERY])[0]
            assert svc.searcher is not None
            modes: tuple[Mode, ...] = ("sparse", "hybrid")
            for mode in modes:
                hits = await svc.searcher.search(mode, QUERY, vector, 3)
                assert hits[0].id == "long", (mode, hits)
                best = hits[0].passage
                assert best is not None and best.text is not None
                assert NEEDLE in best.text, best
                assert best.text == full_text[best.start : best.end]
                assert passage_encoder.count_tokens([full_text[: best.start]])[0] > 512
                assert best.ordinal >= 1
            bm25 = await svc.searcher.search("bm25", QUERY, None, 3)
            assert bm25 and bm25[0].passage is None  # BM25 scores whole documents

            answer = await _post(
                f"http://127.0.0.1:{svc.http_port}/search",
                {"query": QUERY, "mode": "sparse", "size": 2},
            )
            first = answer["hits"][0]
            assert first["id"] == "long" and NEEDLE in first["passage"]["text"]
            assert best is not None
            assert (first["passage"]["start"], first["passage"]["end"]) == (best.start, best.end)
            assert "passages" not in first["source"] and "tokens" not in first["source"]
        assert (await es.count(index=index_name))["count"] == 3  # gone is deleted

        env = {"SPARSE_INGEST_ES_URL": url, "SPARSE_INGEST_ES_INDEX": index_name,
               "SPARSE_INGEST_MODEL_DIR": str(default_model_dir)}  # fmt: skip
        out = await asyncio.to_thread(cli, ["search", QUERY, "--mode", "sparse", "--json"], env)
        assert out.returncode == 0, out.stderr
        hits = json.loads(out.stdout)
        assert hits[0]["id"] == "long" and NEEDLE in hits[0]["passage"]["text"]
        out = await asyncio.to_thread(cli, ["search", QUERY, "--mode", "sparse"], env)
        assert "passage" in out.stdout and "lighthouse keeper" in out.stdout, out.stdout
    finally:
        await es.close()


@pytest.mark.integration
async def test_upgrading_a_chunk_index_refuses_then_reindexes_to_passages(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    chunk_encoder: SparseEncoder,
    passage_encoder: SparseEncoder,
    default_model_dir: Path,
) -> None:
    """README: Long documents, Upgrading. An index written with one vector a document (the
    default of earlier releases) is refused by a service with the new default, naming the
    setting that keeps it; `reindex` moves the alias to a passages index without downtime."""
    chunked = service_settings(kafka_bootstrap, es_url, topic, index_name, long_text="chunk")
    text = long_document(passage_encoder)
    await create_topic(kafka_bootstrap, topic, 1)
    await produce(kafka_bootstrap, topic, [doc("long", text), doc("short", FILLER[0])])
    async with running_service(chunked, chunk_encoder):
        await wait_all_committed(kafka_bootstrap, chunked.kafka_group_id, topic)

    # `sparse-ingest search` with the defaults searches the index as it was made
    env = {"SPARSE_INGEST_ES_URL": es_url, "SPARSE_INGEST_ES_INDEX": index_name,
           "SPARSE_INGEST_MODEL_DIR": str(default_model_dir)}  # fmt: skip
    out = await asyncio.to_thread(cli, ["search", QUERY, "--mode", "sparse", "--json"], env)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found[0]["id"] == "long" and "passage" not in found[0]

    settings = service_settings(kafka_bootstrap, es_url, topic, index_name)  # the defaults
    with pytest.raises(StartupError) as refused:
        async with running_service(settings, passage_encoder):
            pass
    message = str(refused.value)
    assert "SPARSE_INGEST_LONG_TEXT" in message and "chunk (windows max-merged)" in message
    assert "passages of 256 tokens" in message and "sparse-ingest reindex" in message

    result = await reindex(settings, default_model_dir, exit_after_swap=True, progress_s=0.5)
    assert result.swapped
    moved = settings.model_copy(update={"kafka_group_id": result.group})
    async with running_service(moved, passage_encoder) as svc:
        await wait_all_committed(kafka_bootstrap, result.group, topic)
        await svc.es.indices.refresh(index=index_name)  # type: ignore[union-attr]
        assert svc.searcher is not None
        vector = passage_encoder.encode_queries([QUERY])[0]
        hits = await svc.searcher.search("sparse", QUERY, vector, 2)
        assert hits[0].id == "long" and hits[0].passage is not None
        assert NEEDLE in (hits[0].passage.text or "")
    es = elasticsearch_client(settings)
    try:
        await delete_index(es, f"{index_name}*")
    finally:
        await es.close()
