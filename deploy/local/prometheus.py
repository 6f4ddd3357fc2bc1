"""The stack's optional Prometheus (Debian's ``prometheus`` binary on PATH).

``start`` runs it on a free port with its storage in ``<run_dir>/prometheus/data`` (retention
1 d, ``--web.enable-lifecycle``) and the given scrape config, or one that scrapes itself;
``ready_probe`` waits for ``GET /-/ready``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.local import probes
from deploy.local.errors import StackError
from deploy.local.procs import pick_port
from deploy.local.state import HOST, StackInfo, Wait

if TYPE_CHECKING:
    from deploy.local.runtime import StackRuntime


def ready_probe(entry: dict[str, Any]) -> Callable[[], bool]:
    url = entry["url"]
    return lambda: probes.prometheus_ready(url, 3.0)


def start(
    stack: StackRuntime,
    info: StackInfo,
    state: dict[str, Any],
    taken: set[int],
    config: str | Path | None,
) -> Wait:
    """Start Prometheus (fresh data); fills ``info``'s Prometheus fields."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not os.access(binary, os.X_OK):
        raise StackError(
            "Prometheus is not installed (no `prometheus` on PATH): `apt-get install "
            "prometheus` (Debian) or put the binary on PATH."
        )
    port = pick_port(stack.prometheus_port, "Prometheus", taken)
    pdir = stack.run_dir / "prometheus"
    shutil.rmtree(pdir, ignore_errors=True)
    (pdir / "data").mkdir(parents=True)
    if config is None:
        config = pdir / "prometheus.yml"
        Path(config).write_text(
            "global:\n  scrape_interval: 5s\n"
            "scrape_configs:\n  - job_name: prometheus\n"
            f"    static_configs:\n      - targets: ['{HOST}:{port}']\n"
        )
    config = Path(config).resolve()
    if not config.is_file():
        raise StackError(f"Prometheus scrape config {config} does not exist")
    log_file = pdir / "prometheus.log"
    cmd = [binary, f"--config.file={config}", f"--storage.tsdb.path={pdir / 'data'}"]
    cmd += [f"--web.listen-address={HOST}:{port}", "--web.enable-lifecycle"]
    cmd += ["--storage.tsdb.retention.time=1d"]
    url = f"http://{HOST}:{port}"
    stack.log(f"starting Prometheus on {url} (config {config}) ...")
    stack._spawn("prometheus", cmd, log_file, state, cwd=pdir, extra={"port": port, "url": url})
    info.prometheus_url = url
    info.prometheus_log = log_file
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"version (\S+)", version.stdout + version.stderr)
    info.versions["prometheus"] = match.group(1) if match else "unknown"
    return "prometheus", lambda: probes.prometheus_ready(url, 3.0), log_file
