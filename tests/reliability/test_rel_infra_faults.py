"""Elasticsearch stopped and restarted, Elasticsearch answering 429, the Kafka broker restarted:
each mid-stream, on a stack of its own; nothing lost, nothing stale, nothing extra."""

from __future__ import annotations

import pytest
import scenarios

pytestmark = pytest.mark.integration


async def test_elasticsearch_stopped_and_restarted_mid_stream(fault_env: scenarios.Env) -> None:
    result = await scenarios.es_restart(fault_env, docs=1200, outage_s=20.0)
    assert result.ok, result.summary()
    assert result.extra["unavailable"] >= 1  # the service really met a dead Elasticsearch
    assert result.recovery_s, result.summary()


async def test_elasticsearch_429s_are_retried_until_written(fault_env: scenarios.Env) -> None:
    result = await scenarios.es_rejections(fault_env, docs=1200, writers=3, noise_s=10.0)
    assert result.ok, result.summary()
    assert result.extra["node_write_rejections"] > 0, result.summary()
    assert sum(result.extra["service_item_errors"].values()) > 0, result.summary()


async def test_kafka_broker_restarted_mid_stream(fault_env: scenarios.Env) -> None:
    result = await scenarios.kafka_restart(fault_env, docs=1200, downtime_s=8.0)
    assert result.ok, result.summary()
    assert result.recovery_s, result.summary()
