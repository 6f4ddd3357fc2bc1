"""Poison input: every kind of bad record ends in the dead-letter topic; the rest lands."""

from __future__ import annotations

import pytest
import scenarios

pytestmark = pytest.mark.integration


async def test_poison_records_are_dead_lettered_and_the_stream_goes_on(
    rel_env: scenarios.Env,
) -> None:
    result = await scenarios.poison(rel_env, docs=1000, huge=True)
    assert result.ok, result.summary()
    assert result.check.dlq_expected >= 19
    assert result.check.dlq_found == result.check.dlq_expected
    assert result.check.dlq_reasons["too_large"] == 1
