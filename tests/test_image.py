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
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "image"

pytestmark = [pytest.mark.image, pytest.mark.integration, pytest.mark.slow]


def _podman_possible() -> str | None:
    """Why the image cannot be built here, or None. Rootless podman on cgroup v1 ignores
    --cpus and mmdebstrap needs subuids: as another user only with SPARSE_INGEST_TEST_IMAGE=1."""
    needed = ("podman", "runc", "mmdebstrap")
    if os.geteuid() != 0 and os.environ.get("SPARSE_INGEST_TEST_IMAGE") != "1":
        return "not root (set SPARSE_INGEST_TEST_IMAGE=1 to run it with rootless podman)"
    if all(shutil.which(tool) for tool in needed):
        return None
    if shutil.which("apt-get"):
        return None  # scripts/image installs them
    return f"{', '.join(t for t in needed if not shutil.which(t))} missing and no apt-get"


@pytest.mark.timeout(1500)
def test_image_builds_and_ingests(kafka_bootstrap: str, es_url: str) -> None:
    why = _podman_possible()
    if why:
        pytest.skip(f"cannot build the image: {why}")
    command = [sys.executable, str(SCRIPT), "all", "--kafka", kafka_bootstrap, "--es", es_url]
    # its own session: on a timeout the whole group goes (podman build, mmdebstrap, the
    # container), first with SIGINT so that its cleanup runs
    proc = subprocess.Popen(
        [*command, "--no-gzip"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=1450)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        pytest.fail("scripts/image ran past 1450 s:\n" + (stdout + stderr)[-4000:])
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    output = done.stdout + done.stderr
    print(output)
    assert done.returncode == 0, output[-6000:]
    summary_line = [line for line in done.stdout.splitlines() if line.startswith("[image] summary")]
    assert summary_line, output[-3000:]
    summary = json.loads(summary_line[-1].split(" ", 2)[2])
    smoke = summary["smoke"]
    assert smoke["threads"] == 1
    assert smoke["indexed"] >= smoke["committed"] >= smoke["taken"] >= 20
    assert summary["size"]["raw"] < 600_000_000, summary["size"]
