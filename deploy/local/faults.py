"""Fault injection on a running stack, for the reliability tests and benches: one service at a
time stopped and started again (``stop_service``/``start_service``, ``LocalStack.restart_service``:
same command, data, ports and settings, from what ``state.json`` recorded), or frozen and thawed
(``pause_service``/``resume_service``: SIGSTOP/SIGCONT to its process group, like a node in a
long GC pause); ``wait_ready`` waits for a running one.

``ready_probe`` is the readiness check of a recorded service (each service module's
``ready_probe``); ``LocalStack.status`` uses it too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.local import connect, elasticsearch, kafka, postgres, prometheus, registry
from deploy.local.errors import StackError
from deploy.local.layout import child_env
from deploy.local.procs import alive, stop_group

if TYPE_CHECKING:
    from deploy.local.runtime import StackRuntime


def ready_probe(service: str, state: dict[str, Any]) -> Callable[[], bool]:
    """The readiness check of ``service`` as ``state`` records it."""
    entry = state["services"][service]
    if service == "kafka":
        return kafka.ready_probe(entry)
    if service == "elasticsearch":
        return elasticsearch.ready_probe(entry, state.get("info", {}))
    if service == "postgres":
        return postgres.ready_probe(entry)
    if service == "connect":  # and the connectors it was given, running again
        return connect.ready_probe(entry)
    if service == "registry":
        return registry.ready_probe(entry)
    return prometheus.ready_probe(entry)


def stop_service(stack: StackRuntime, service: str, timeout: float = 30.0) -> str:
    """SIGTERM to its process group, SIGKILL after ``timeout``; its data, config and ports
    stay. Returns "stopped", "killed" or "not running"."""
    state = stack._load_state()
    entry = stack._entry(state, service)
    result = stop_group(entry["pid"], entry.get("start_time"), timeout)
    for proc in [p for p in stack._children if p.pid == entry["pid"]]:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            proc.wait(timeout=1)
        stack._children.remove(proc)
    stack.log(f"{service} (pid {entry['pid']}): {result}")
    return result


def start_service(stack: StackRuntime, service: str) -> None:
    """Start a stopped service again as recorded and wait until it is ready."""
    state = stack._load_state()
    entry = stack._entry(state, service)
    if alive(entry["pid"], entry.get("start_time")):
        raise StackError(f"{service} is still running (pid {entry['pid']})")
    launch = entry.pop("launch", None)
    if not launch:
        raise StackError(f"{service} was started by an older version: run `up` again")
    for key in ("pid", "start_time", "cmd"):
        entry.pop(key, None)
    env = None if launch.get("env") is None else child_env() | launch["env"]
    stdout_log = Path(launch["stdout"])
    user = tuple(launch["user"]) if launch.get("user") else None
    stack.log(f"starting {service} again ...")
    stack._spawn(
        service,
        state["services"][service]["cmd"],
        stdout_log,
        state,
        env=env,
        cwd=Path(launch["cwd"]) if launch.get("cwd") else None,
        user=user,
        extra=entry,
        launch_env=launch.get("env"),
    )
    stack._wait_ready([(service, ready_probe(service, state), stdout_log)], state)


def wait_ready(stack: StackRuntime, service: str) -> None:
    """Wait (up to ``startup_timeout``) until a running service answers its probe."""
    state = stack._load_state()
    entry = stack._entry(state, service)
    stdout = Path(entry.get("launch", {}).get("stdout") or entry.get("log") or "")
    stack._wait_ready([(service, ready_probe(service, state), stdout)], state)


def signal_service(stack: StackRuntime, service: str, sig: signal.Signals) -> None:
    """Send ``sig`` to a running service's process group (SIGSTOP: pause, SIGCONT: resume)."""
    entry = stack._entry(stack._load_state(), service)
    if not alive(entry["pid"], entry.get("start_time")):
        raise StackError(f"{service} is not running")
    os.killpg(entry["pid"], sig)
    stack.log(f"{service} (pid {entry['pid']}): {sig.name}")


def pause_service(stack: StackRuntime, service: str) -> None:
    signal_service(stack, service, signal.SIGSTOP)


def resume_service(stack: StackRuntime, service: str) -> None:
    signal_service(stack, service, signal.SIGCONT)
