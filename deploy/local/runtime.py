"""``StackRuntime``: what every service of a local stack shares, the base of ``LocalStack``.

It holds the stack's settings (the keyword arguments of ``LocalStack``), its state file
(``_load_state``/``_save_state``/``info``/``_entry``) and the process plumbing: ``_spawn``
starts a command in its own session (process group) and records how, so that ``down``,
``status`` and ``start_service`` can act on it from any shell; ``_wait_ready`` waits for the
probes of what was started; ``_stop_services`` stops them all. The service modules
(``deploy.local.kafka``, ``.elasticsearch``, ``.prometheus``, ``.postgres``, ``.registry``,
``.connect``, ``.faults``) each take a ``StackRuntime``.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Any

from deploy.local import certs
from deploy.local.errors import ServiceStartError, StackError
from deploy.local.java import JavaInfo, find_java
from deploy.local.paths import DEFAULT_STACK_NAME, cache_dir, default_run_dir
from deploy.local.procs import alive, process_start_time, stop_group, tail
from deploy.local.state import (
    SERVICES,
    STATE_FILE,
    Log,
    StackInfo,
    Wait,
    load_state,
    quiet,
    save_state,
)
from deploy.local.versions import (
    KAFKA_PARTITIONS,
    check_elasticsearch_version,
    default_elasticsearch_version,
)


class StackRuntime:
    """A named local stack's settings, state (``<run_dir>/state.json``) and processes."""

    def __init__(
        self,
        name: str = DEFAULT_STACK_NAME,
        run_dir: str | Path | None = None,
        *,
        cache: str | Path | None = None,
        kafka_port: int | None = None,
        es_port: int | None = None,
        prometheus_port: int | None = None,
        postgres_port: int | None = None,
        connect_port: int | None = None,
        registry_port: int | None = None,
        java_home: str | Path | None = None,
        kafka_partitions: int = KAFKA_PARTITIONS,
        kafka_heap: str = "512m",
        es_heap: str = "1g",
        es_version: str | None = None,
        security: bool = False,
        es_tls: bool = False,
        kafka_security: bool = False,
        es_settings: dict[str, Any] | None = None,
        kafka_settings: dict[str, Any] | None = None,
        connect_settings: dict[str, Any] | None = None,
        connect_heap: str = "512m",
        startup_timeout: float = 180.0,
        log: Log = quiet,
    ) -> None:
        self.name = name
        self.run_dir = Path(run_dir).resolve() if run_dir else default_run_dir(name)
        self.cache = Path(cache).resolve() if cache else cache_dir()
        self.kafka_port = kafka_port
        self.es_port = es_port
        self.prometheus_port = prometheus_port
        self.postgres_port = postgres_port
        self.connect_port = connect_port
        self.registry_port = registry_port
        self.java_home = java_home
        self.kafka_partitions = kafka_partitions
        self.kafka_heap = kafka_heap
        self.es_heap = es_heap
        # None: $SPARSE_INGEST_STACK_ES_VERSION or 9.5.3, checked when used (so that `down`
        # works whatever the variable says); an explicit version is checked here.
        self._es_version = check_elasticsearch_version(es_version) if es_version else None
        # es_tls: Elasticsearch over https with a CA made for the stack (implies security).
        # kafka_security: SSL, SASL_PLAINTEXT and SASL_SSL listeners besides PLAINTEXT, SASL
        # PLAIN + SCRAM-SHA-256/512 with one generated user.
        self.security = security or es_tls
        self.es_tls = es_tls
        self.kafka_security = kafka_security
        # Extra node settings, e.g. {"thread_pool.write.queue_size": 1} (elasticsearch.yml) or
        # {"group.min.session.timeout.ms": 1000} (server.properties); they win over ours.
        self.es_settings = dict(es_settings or {})
        self.kafka_settings = dict(kafka_settings or {})
        # Extra Connect worker properties, e.g. {"value.converter.schemas.enable": "true"}.
        self.connect_settings = dict(connect_settings or {})
        self.connect_heap = connect_heap
        self.startup_timeout = startup_timeout
        self.log = log
        self._children: list[subprocess.Popen[bytes]] = []

    @property
    def es_version(self) -> str:
        """The Elasticsearch version ``up`` starts (StackError if the env var names a bad one)."""
        return self._es_version or default_elasticsearch_version()

    # ------------------------------------------------------------------ state
    def _ca(self) -> tuple[Path, Path]:
        return certs.make_ca(self.run_dir / "tls")

    @property
    def state_file(self) -> Path:
        return self.run_dir / STATE_FILE

    def _load_state(self) -> dict[str, Any]:
        return load_state(self.state_file)

    def _save_state(self, state: dict[str, Any]) -> None:
        save_state(self.state_file, state)

    @property
    def info(self) -> StackInfo:
        """What ``state.json`` says (raises StackError if there is none)."""
        state = self._load_state()
        if "info" not in state:
            raise StackError(f"stack {self.name!r} is not up (no state in {self.run_dir})")
        return StackInfo.from_dict(state["info"])

    def _entry(self, state: dict[str, Any], service: str) -> dict[str, Any]:
        """A copy of ``service``'s record in ``state`` (StackError if there is none)."""
        entry = state["services"].get(service)
        if entry is None:
            known = ", ".join(state["services"]) or "nothing"
            raise StackError(f"stack {self.name!r} has no {service} (it has {known})")
        return dict(entry)

    # ------------------------------------------------------------------ processes
    def _java(self, min_feature: int, modules: tuple[str, ...] = ()) -> JavaInfo:
        return find_java(min_feature, self.java_home, True, modules, self.cache)

    def _spawn(
        self,
        service: str,
        cmd: list[str],
        log_file: Path,
        state: dict[str, Any],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        user: tuple[int, int] | None = None,
        extra: dict[str, Any] | None = None,
        launch_env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in its own session. ``launch_env``: the variables set on top of ours
        (recorded, with cmd/cwd/user, so that :meth:`start_service` can start it again)."""
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,  # own process group: down() stops the whole group
                user=user[0] if user else None,
                group=user[1] if user else None,
                extra_groups=[] if user else None,
            )
        self._children.append(proc)
        state["services"][service] = {
            "pid": proc.pid,
            "start_time": process_start_time(proc.pid),
            "cmd": cmd,
            **(extra or {}),
            "launch": {
                "cwd": str(cwd) if cwd else None,
                "env": launch_env,
                "user": list(user) if user else None,
                "stdout": str(log_file),
            },
        }
        self._save_state(state)
        return proc

    def _wait_ready(self, waits: list[Wait], state: dict[str, Any]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pending = list(waits)
        while pending:
            for item in list(pending):
                service, ready, stdout_log = item
                entry = state["services"][service]
                if ready():
                    self.log(f"{service} is ready")
                    pending.remove(item)
                elif not alive(entry["pid"], entry.get("start_time")):
                    raise ServiceStartError(
                        f"{service} exited during startup. Last lines of its logs:\n"
                        + self._log_tails(entry, stdout_log)
                    )
            if pending and time.monotonic() > deadline:
                service, _, stdout_log = pending[0]
                raise ServiceStartError(
                    f"{service} was not ready after {self.startup_timeout:.0f}s. Last lines of "
                    "its logs:\n" + self._log_tails(state["services"][service], stdout_log)
                )
            if pending:
                time.sleep(0.5)

    @staticmethod
    def _log_tails(entry: dict[str, Any], stdout_log: Path) -> str:
        parts = [f"--- {stdout_log}\n{tail(stdout_log)}"]
        if entry.get("log") and Path(entry["log"]) != stdout_log:
            parts.append(f"--- {entry['log']}\n{tail(Path(entry['log']))}")
        return "\n".join(parts)

    def _stop_services(self, state: dict[str, Any], timeout: float) -> dict[str, str]:
        results = {}
        # Reverse start order (Connect, ..., Kafka last; state.json keeps its keys sorted).
        order = {name: i for i, name in enumerate(SERVICES)}
        for service in sorted(state["services"], key=lambda s: -order.get(s, len(SERVICES))):
            entry = state["services"][service]
            results[service] = stop_group(entry["pid"], entry.get("start_time"), timeout)
            self.log(f"{service} (pid {entry['pid']}): {results[service]}")
        for proc in self._children:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self._children.clear()
        return results
