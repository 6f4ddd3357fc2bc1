"""The same ingest and search scenario against Elasticsearch 9.5.3 and 8.19.21 (``es_any``):
the client negotiates the REST API version (README: Elasticsearch 8 and 9); updates, deletes,
stale versions, unchanged texts (the content-hash ``mget`` returns the stored vector on both),
``sparse_vector``/BM25/hybrid search, the ``search`` command and a reindex with an alias swap."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from service_support import (
    VECTOR_SOURCE,
    cli,
    create_topic,
    doc,
    metric,
    produce,
    running_service,
    service_settings,
    stored_vector,
    tombstone,
    wait_all_committed,
)

from service.elastic import delete_index, elasticsearch_client
from service.messages import META_FIELD
from service.reindex import alias_state, reindex

pytestmark = pytest.mark.integration  # needs the local stack


async def test_ingest_search_and_reindex_on_each_major(
    es_any: tuple[str, str],
    kafka_bootstrap: str,
    topic: str,
    index_name: str,
    default_encoder: Any,
    default_model_dir: Path,
) -> None:
    version, url = es_any
    alias = index_name
    settings = service_settings(kafka_bootstrap, url, topic, alias)
    es = elasticsearch_client(settings)
    try:
        await create_topic(kafka_bootstrap, topic, 2)
        records = [
            doc("cat", "the cat sat on the mat", version=1),
            doc("dog", "a dog barked at the mailman", version=1),
            doc("fish", "fish swim in the river", version=1),
            doc("gone", "to be deleted", version=1),
            doc("cat", "a small cat sleeps on a warm windowsill", version=3),
            doc("cat", "stale text that must lose", version=2),  # older: stale
            tombstone("gone", version=2),
        ]
        await produce(kafka_bootstrap, topic, records)
        async with running_service(settings, default_encoder) as svc:
            assert svc.cluster is not None
            assert svc.cluster.version == version
            assert svc.cluster.api_version == int(version.split(".")[0])
            await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
            assert metric(svc, "sparse_ingest_documents_stale_total", {"source": "elasticsearch", "topic": topic}) + metric(svc, "sparse_ingest_documents_stale_total", {"source": "batch", "topic": topic}) >= 1  # fmt: skip
            # the same text again with a newer version: the stored vector is reused (mget)
            await produce(
                kafka_bootstrap, topic, [doc("dog", "a dog barked at the mailman", version=5)]
            )
            await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
            assert metric(svc, "sparse_ingest_documents_skipped_unchanged_total") == 1
            await es.indices.refresh(index=alias)
            assert svc.searcher is not None
            vector = default_encoder.encode_queries(["cat windowsill"])[0]
            for mode in ("sparse", "bm25", "hybrid"):
                hits = await svc.searcher.search(mode, "cat windowsill", vector, 3)  # type: ignore[arg-type]
                assert hits and hits[0].id == "cat", (mode, hits)
                assert hits[0].source["body"] == "a small cat sleeps on a warm windowsill"
            # hybrid's two rankings side by side rank exactly as one after the other
            parallel = await svc.searcher.search("hybrid", "cat windowsill", vector, 3)
            svc.searcher.parallel_rankings = False
            try:
                serial = await svc.searcher.search("hybrid", "cat windowsill", vector, 3)
            finally:
                svc.searcher.parallel_rankings = True
            assert [(h.id, h.score) for h in parallel] == [(h.id, h.score) for h in serial]
        assert (await es.count(index=alias))["count"] == 3
        dog = await es.get(index=alias, id="dog")
        assert dog["_version"] == 5 and dog["_source"][META_FIELD]["version"] == 5

        env = {"SPARSE_INGEST_ES_URL": url, "SPARSE_INGEST_ES_INDEX": alias,
               "SPARSE_INGEST_MODEL_DIR": str(default_model_dir)}  # fmt: skip
        out = await asyncio.to_thread(cli, ["search", "cat windowsill", "--json"], env)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)[0]["id"] == "cat"

        # a reindex with other vectors (index-time pruning): new index, alias swapped
        before = await alias_state(es, alias)
        pruned = settings.model_copy(update={"es_prune_below": 0.3})
        result = await reindex(
            pruned, default_model_dir, encoder=default_encoder, exit_after_swap=True, progress_s=0.5
        )
        after = await alias_state(es, alias)
        assert result.swapped and after.indices == (result.index,) != before.indices
        await es.indices.refresh(index=alias)
        assert (await es.count(index=alias))["count"] == 3
        # naming the vector field returns it on both (9 leaves vectors out of _source otherwise)
        cat = (await es.get(index=alias, id="cat", source_includes=["body", *VECTOR_SOURCE]))[
            "_source"
        ]
        assert cat["body"] == "a small cat sleeps on a warm windowsill"
        assert min((stored_vector(cat) or {"": 0.0}).values()) >= 0.3
    finally:
        await delete_index(es, f"{alias}*")
        await es.close()
