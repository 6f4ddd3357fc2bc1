"""What ``/readyz`` asks: is the model loaded, does Elasticsearch answer, is the pipeline
consuming. Each check returns ``(ok, detail)``; :class:`service.http.HttpApi` runs them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from elasticsearch import AsyncElasticsearch, AuthorizationException

from service.config import Settings

Check = Callable[[], Awaitable[tuple[bool, str]]]


class Readiness:
    """The checks of one running service. ``index``: the index written (may be behind an
    alias); ``consumer`` and ``pipeline_running`` are set once the Kafka side has started."""

    def __init__(self, settings: Settings, encoder: Any, es: AsyncElasticsearch) -> None:
        self.settings = settings
        self.encoder = encoder
        self.es = es
        self.index: str | None = None
        self.consumer: Any | None = None
        self.pipeline_running: Callable[[], bool] = lambda: True
        self._es_monitor = True  # the user may read cluster health (else: index checks)

    def checks(self) -> dict[str, Check]:
        return {"model": self.model, "elasticsearch": self.elasticsearch, "kafka": self.kafka}

    async def model(self) -> tuple[bool, str]:
        if self.encoder is None:
            return False, "not loaded"
        return True, str(getattr(self.encoder.metadata, "name", ""))

    async def elasticsearch(self) -> tuple[bool, str]:
        where = self.settings.es_url_redacted
        if self._es_monitor:
            try:
                health = await asyncio.wait_for(self.es.cluster.health(), 5)
            except AuthorizationException:
                self._es_monitor = False  # least privilege: no cluster health, check the index
            else:
                status = str(health.get("status"))
                return status in ("green", "yellow"), f"{where} cluster {status}"
        await asyncio.wait_for(
            self.es.search(
                index=self.index or self.settings.es_index, size=0, track_total_hits=False
            ),
            5,
        )
        return True, f"{where} index {self.index} answers (no monitor privilege: health unknown)"

    async def kafka(self) -> tuple[bool, str]:
        if self.consumer is None:
            return True, "not consuming"
        topics = await asyncio.wait_for(self.consumer.topics(), 5)
        missing = [t for t in self.settings.kafka_topics if t not in topics]
        if not self.pipeline_running():
            return False, "pipeline stopped"
        return True, f"assigned {len(self.consumer.assignment())} partition(s)" + (
            f"; topics not created yet: {missing}" if missing else ""
        )
