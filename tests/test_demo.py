"""``sparse-ingest demo`` (README, first screen), run in-process on the session's stack with a
smaller stream: every step passes its own checks (documents indexed, rewrites applied, deletes
gone, malformed records dead-lettered), and a long document is found by a passage past its
first 512 tokens (README: Long documents)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from tooling.demo.stream import _run

pytestmark = pytest.mark.integration  # needs the local stack


async def test_demo_runs_and_shows_a_passage_past_512_tokens(
    kafka_bootstrap: str,
    es_url: str,
    default_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = argparse.Namespace(documents=600, keep=False, http_port=0)
    rc = await _run(args, kafka_bootstrap, es_url, default_model_dir, time.monotonic())
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "whole module manuals" in out
    assert "best passage" in out and "past the first 512 tokens" in out, out
    assert "dead-lettered 2" in out


async def test_demo_with_a_small_stream(
    kafka_bootstrap: str,
    es_url: str,
    default_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """26 paragraphs: the changes of step 5 touch paragraphs only (never the manuals), and
    manuals too short to show a deep passage are said to be so, not a failure."""
    args = argparse.Namespace(documents=26, keep=False, http_port=0)
    rc = await _run(args, kafka_bootstrap, es_url, default_model_dir, time.monotonic())
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "5 rewrites, 20 metadata-only updates, 1 deletes" in out
