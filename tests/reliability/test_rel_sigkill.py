"""SIGKILL at random points, ten times, restarted each time: nothing lost, nothing stale."""

from __future__ import annotations

import pytest
import scenarios

pytestmark = pytest.mark.integration


@pytest.mark.timeout(360)
async def test_sigkill_ten_times_loses_nothing(rel_env: scenarios.Env) -> None:
    result = await scenarios.sigkill(rel_env, docs=1500, kills=10, seconds_per_kill=5.0)
    assert result.ok, result.summary()
    assert result.check.expected_docs > 1000
    assert result.recovery_s, result.summary()  # replacements do make progress
