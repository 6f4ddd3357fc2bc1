"""``sparse-ingest faust`` as a real worker process, for the tests of the Faust runner."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def faust_env(**settings: object) -> dict[str, str]:
    """The worker's environment: ours without any SPARSE_INGEST_* setting, plus ``settings``
    (``kafka_topics="t"`` -> ``SPARSE_INGEST_KAFKA_TOPICS=t``; None leaves one out)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSE_INGEST_")}
    if "SPARSE_INGEST_CACHE" in os.environ:
        env["SPARSE_INGEST_CACHE"] = os.environ["SPARSE_INGEST_CACHE"]
    values: dict[str, object] = {
        "http_port": 0,
        "batch_linger_ms": 100,
        "commit_interval_ms": 200,
        "encoder_threads": 1,
        **settings,
    }
    for name, value in values.items():
        if value is not None:
            env[f"SPARSE_INGEST_{name.upper()}"] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


class FaustWorker:
    """One ``python -m service.cli faust`` process at a time, in its own process group, with
    its working directory (Faust's data dir) and one log file per start under ``work``."""

    def __init__(self, env: dict[str, str], work: Path) -> None:
        self.env = env
        self.work = work
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = work / "faust-0.log"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / f"faust-{self.starts}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "faust"],
                env=self.env,
                cwd=self.work,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.work.glob("faust-*.log")))

    def assert_running(self) -> None:
        assert self.running(), f"the Faust worker exited:\n{self.log_text()[-3000:]}"

    async def wait_log(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not (match := rx.search(self.log_text())):
            self.assert_running()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {pattern!r} in {timeout:.0f}s:\n{self.log_text()[-3000:]}"
                )
            await asyncio.sleep(0.2)
        return match

    async def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait for the exit status; SIGKILL (status -9) after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait)
        return self.proc.returncode
