"""Consumers joining and leaving the group mid-stream: each partition's records are written
exactly as the stream says, whoever held the partition at the time."""

from __future__ import annotations

import pytest
import scenarios

pytestmark = pytest.mark.integration


@pytest.mark.timeout(180)
async def test_members_joining_and_leaving_lose_nothing(rel_env: scenarios.Env) -> None:
    result = await scenarios.group_churn(rel_env, docs=700, step_s=1.5)
    assert result.ok, result.summary()
    consumed = result.extra["consumed"]
    assert set(consumed) == {"A", "B", "C", "D"}
    assert all(n > 0 for n in consumed.values()), consumed  # every member did some work
    assert sum(consumed.values()) >= result.records
