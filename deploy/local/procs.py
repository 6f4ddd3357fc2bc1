"""Ports and processes: free ports, start a service in its own session, stop it by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

from deploy.local.errors import PortInUseError


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def pick_port(requested: int | None, what: str, taken: set[int], host: str = "127.0.0.1") -> int:
    """``requested`` if given (it must be free), else a fresh free port not in ``taken``."""
    if requested:
        if port_in_use(requested, host):
            raise PortInUseError(
                f"{what}: port {requested} on {host} is already in use. Stop whatever listens "
                f"there (`ss -ltnp 'sport = :{requested}'`), or leave the port out to get a "
                "free one."
            )
        taken.add(requested)
        return requested
    for _ in range(100):
        port = free_port(host)
        if port not in taken:
            taken.add(port)
            return port
    raise PortInUseError(f"{what}: could not find a free port")  # pragma: no cover


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may contain spaces
    return raw[raw.rindex(")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """Clock ticks since boot at which ``pid`` started (tells a reused PID apart)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def alive(pid: int, start_time: int | None = None) -> bool:
    """Is ``pid`` running (not a zombie) and, if given, the same process as recorded?"""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start_time is None or int(fields[19]) == start_time


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (0.0 when it is gone)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) PIDs whose process group is ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _reap(pid: int) -> None:
    """Collect an exited child of ours so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_group(pgid: int, start_time: int | None, timeout: float = 30.0) -> str:
    """SIGTERM the whole process group, wait, SIGKILL what is left; returns what happened."""
    if not alive(pgid, start_time) and not group_members(pgid):
        _reap(pgid)
        return "not running"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pgid)
        if not group_members(pgid):
            return "stopped"
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and group_members(pgid):
        _reap(pgid)
        time.sleep(0.1)
    _reap(pgid)
    return "killed"


def tail(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(data.splitlines()[-lines:])
