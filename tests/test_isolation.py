"""A step that raises for one record must not stop the stream (issue 12): the batch is processed
record by record, the record that still fails is dead-lettered as ``internal_error``, every other
record of the batch is indexed. The fault is injected by wrapping the real encoder so that one
text's vector cannot be serialized (the bulk request raises SerializationError)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from elasticsearch import AsyncElasticsearch
from service_support import (
    create_topic,
    doc,
    metric,
    produce,
    read_topic,
    running_service,
    service_settings,
    wait_all_committed,
)

pytestmark = pytest.mark.integration


class PoisonedEncoder:
    """The real encoder, except that a text containing BOOM gets a vector orjson cannot write
    (one vector a document, or its passages')."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    async def aencode_documents(self, texts: Sequence[str], *args: Any, **kw: Any) -> Any:
        vectors = await self._encoder.aencode_documents(texts, *args, **kw)
        return [
            {**v, 7: 1.0} if "BOOM" in text else v  # an int key: not serializable
            for text, v in zip(texts, vectors, strict=True)
        ]

    async def aencode_passages(self, texts: Sequence[str], *args: Any, **kw: Any) -> Any:
        from encoder import Passage

        found = await self._encoder.aencode_passages(texts, *args, **kw)
        return [
            [Passage(p.start, p.end, {**p.vector, 7: 1.0}) for p in passages]
            if "BOOM" in text
            else passages
            for text, passages in zip(texts, found, strict=True)
        ]


async def test_a_record_that_makes_a_step_raise_is_dead_lettered_alone(
    kafka_bootstrap: str,
    es_url: str,
    topic: str,
    index_name: str,
    es: AsyncElasticsearch,
    default_encoder: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=1)
    records = [doc(f"d{i}", f"ordinary text {i}") for i in range(30)]
    records.insert(15, doc("boom", "this one goes BOOM"))
    await produce(kafka_bootstrap, topic, records)
    settings = service_settings(kafka_bootstrap, es_url, topic, index_name, batch_max_docs=64)
    async with running_service(settings, PoisonedEncoder(default_encoder)) as svc:
        await wait_all_committed(kafka_bootstrap, settings.kafka_group_id, topic)
        assert svc.pipeline_running
        assert metric(svc, "sparse_ingest_documents_indexed_total") == 30
        labels = {"reason": "internal_error"}
        assert metric(svc, "sparse_ingest_documents_dead_lettered_total", labels) == 1
    [letter] = await read_topic(kafka_bootstrap, settings.dead_letter_topic, 1)
    headers = {k: v.decode() for k, v in letter.headers}
    assert letter.key == b"boom" and headers["error.reason"] == "internal_error"
    assert "SerializationError" in headers["error.message"]
    await es.indices.refresh(index=index_name)
    assert (await es.count(index=index_name))["count"] == 30
    # the traceback is logged (where it was raised), its message quoting the record is not
    logged = "\n".join(caplog.text.splitlines())
    assert "Traceback" in logged and "SerializationError" in logged
    assert "this one goes BOOM" not in logged
