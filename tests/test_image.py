"""The container image, built and run for real: ``scripts/image all`` against the session stack.

podman (with runc) builds the Dockerfile on the Dockerfile's default base when local storage has
it, else on a Debian bookworm base bootstrapped with mmdebstrap (no registry needed; cached under
~/.cache/sparse-ingest/image). Then the smoke test: the container (host network, read-only root,
``--cpus 1``) ingests from the session's Kafka into its Elasticsearch; /healthz, /readyz,
/metrics, /search, the HEALTHCHECK command, non-root, thread count = CPU quota, SIGTERM drain.
See scripts/image for every check.

It installs podman/runc/mmdebstrap when missing (apt, as root; ``scripts/setup`` already does) and
skips only where that is impossible (not root and no podman). Cold (no base, no build cache) it
takes a few minutes: mmdebstrap plus pip downloading the dependencies inside the build.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "image"

pytestmark = [pytest.mark.image, pytest.mark.integration, pytest.mark.slow]


def _podman_possible() -> str | None:
    """Why the image cannot be built here, or None."""
    needed = ("podman", "runc", "mmdebstrap")
    if all(shutil.which(tool) for tool in needed):
        return None
    if os.geteuid() == 0 and shutil.which("apt-get"):
        return None  # scripts/image installs them
    return f"{', '.join(t for t in needed if not shutil.which(t))} missing and not root for apt"


@pytest.mark.timeout(1500)
def test_image_builds_and_ingests(kafka_bootstrap: str, es_url: str) -> None:
    why = _podman_possible()
    if why:
        pytest.skip(f"cannot build the image: {why}")
    command = [sys.executable, str(SCRIPT), "all", "--kafka", kafka_bootstrap, "--es", es_url]
    done = subprocess.run(
        [*command, "--no-gzip"],
        capture_output=True,
        text=True,
        timeout=1450,
        check=False,
    )
    output = done.stdout + done.stderr
    print(output)
    assert done.returncode == 0, output[-6000:]
    summary_line = [line for line in done.stdout.splitlines() if line.startswith("[image] summary")]
    assert summary_line, output[-3000:]
    summary = json.loads(summary_line[-1].split(" ", 2)[2])
    smoke = summary["smoke"]
    assert smoke["threads"] == 1
    assert smoke["indexed"] >= smoke["committed"] >= 20
    assert summary["size"]["raw"] < 600_000_000, summary["size"]
