"""Load: the real service fed at a steady rate for 2 minutes (``SPARSE_INGEST_SOAK_MINUTES``
to change it; ``bench/soak.py`` runs 30 minutes): memory stays flat after warm-up, nothing is
lost. It fails when RSS grows by more than 30 % between the end of warm-up and the end."""

from __future__ import annotations

import os

import pytest
import scenarios

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MINUTES = float(os.environ.get("SPARSE_INGEST_SOAK_MINUTES", "2"))
MAX_GROWTH = 0.30


@pytest.mark.timeout(int(MINUTES * 60 + 240))
@pytest.mark.parametrize("minutes", [MINUTES])
async def test_soak_memory_stays_flat(rel_env: scenarios.Env, minutes: float) -> None:
    result = await scenarios.soak(
        rel_env, minutes=minutes, rate=60.0, warmup_s=min(30.0, minutes * 15)
    )
    assert result.ok, result.summary()
    growth = result.extra["growth"]
    assert growth <= MAX_GROWTH, result.summary()
    assert result.extra["exit_code"] == 0
    assert result.extra["catch_up_s"] < 30, result.summary()
