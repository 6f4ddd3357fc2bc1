"""What a local stack records and reports.

- ``StackInfo``: how to reach a running stack (addresses, logs, credentials, versions), kept
  under ``"info"`` in ``<run_dir>/state.json`` and returned by ``LocalStack.up``;
- ``ServiceStatus`` / ``StackStatus``: what ``LocalStack.status`` finds;
- ``load_state`` / ``save_state``: ``state.json`` itself (pids, process start times, ports,
  URLs and how each process was launched: what ``down``/``status``/``start_service`` use from
  another shell);
- the constants every service shares: ``HOST``, ``SERVICES`` (start order), ``Log``, ``Wait``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Log = Callable[[str], None]
# (service, ready probe, stdout log): what ``up`` waits for once a service is started
Wait = tuple[str, Callable[[], bool], Path]
HOST = "127.0.0.1"
# in start order (down stops them in reverse); connect starts once Kafka is ready
SERVICES = ("kafka", "elasticsearch", "prometheus", "postgres", "registry", "connect")
STATE_FILE = "state.json"


def quiet(_: str) -> None:
    pass


def load_state(state_file: Path) -> dict[str, Any]:
    """The recorded state (``{"services": {}}`` when there is none or it is unreadable)."""
    try:
        data: dict[str, Any] = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return {"services": {}}
    data.setdefault("services", {})
    return data


def save_state(state_file: Path, state: dict[str, Any]) -> None:
    """Write ``state`` whole (temp file + rename: another shell never reads half of it)."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    tmp.replace(state_file)


@dataclass
class StackInfo:
    """How to reach a running stack. ``None`` for a service that is not running."""

    name: str
    run_dir: Path
    kafka_bootstrap: str | None = None  # "127.0.0.1:PORT"
    es_url: str | None = None  # "http://127.0.0.1:PORT"
    prometheus_url: str | None = None  # "http://127.0.0.1:PORT"
    kafka_log: Path | None = None
    es_log: Path | None = None
    prometheus_log: Path | None = None
    es_auth: tuple[str, str] | None = None  # (user, password) when security is on
    es_ca_certs: Path | None = None  # the CA of an https Elasticsearch (es_tls)
    # kafka_security: bootstrap per listener ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    # the CA of the SSL listeners, and the (user, password) known to PLAIN and SCRAM-SHA-256/512.
    kafka_listeners: dict[str, str] = field(default_factory=dict)
    kafka_ca_file: Path | None = None
    kafka_sasl: tuple[str, str] | None = None
    # postgres=True: "postgresql://sparse:PASSWORD@127.0.0.1:PORT/sparse" (a login role with
    # REPLICATION, owner of the database); connect=True: Connect's REST API; registry=True:
    # the Confluent-compatible API of Apicurio Registry ("http://127.0.0.1:PORT/apis/ccompat/v7").
    postgres_dsn: str | None = None
    postgres_log: Path | None = None
    connect_url: str | None = None
    connect_log: Path | None = None
    registry_url: str | None = None
    registry_log: Path | None = None
    versions: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
        if self.es_auth is not None:
            data["es_auth"] = list(self.es_auth)
        if self.kafka_sasl is not None:
            data["kafka_sasl"] = list(self.kafka_sasl)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StackInfo:
        def path(key: str) -> Path | None:
            return Path(data[key]) if data.get(key) else None

        auth = data.get("es_auth")
        sasl = data.get("kafka_sasl")
        return cls(
            name=data["name"],
            run_dir=Path(data["run_dir"]),
            kafka_bootstrap=data.get("kafka_bootstrap"),
            es_url=data.get("es_url"),
            prometheus_url=data.get("prometheus_url"),
            kafka_log=path("kafka_log"),
            es_log=path("es_log"),
            prometheus_log=path("prometheus_log"),
            es_auth=(auth[0], auth[1]) if auth else None,
            es_ca_certs=path("es_ca_certs"),
            kafka_listeners=dict(data.get("kafka_listeners", {})),
            kafka_ca_file=path("kafka_ca_file"),
            kafka_sasl=(sasl[0], sasl[1]) if sasl else None,
            postgres_dsn=data.get("postgres_dsn"),
            postgres_log=path("postgres_log"),
            connect_url=data.get("connect_url"),
            connect_log=path("connect_log"),
            registry_url=data.get("registry_url"),
            registry_log=path("registry_log"),
            versions=dict(data.get("versions", {})),
            pids={k: int(v) for k, v in data.get("pids", {}).items()},
        )

    def describe(self) -> str:
        lines = [f"stack {self.name!r} (run dir {self.run_dir})"]
        if self.kafka_bootstrap:
            lines.append(f"  kafka:         bootstrap servers {self.kafka_bootstrap}")
            lines.append(f"                 log {self.kafka_log}")
            for proto, address in self.kafka_listeners.items():
                if proto != "PLAINTEXT":
                    lines.append(f"                 {proto} listener {address}")
            if self.kafka_ca_file:
                lines.append(f"                 CA {self.kafka_ca_file}")
            if self.kafka_sasl:
                lines.append(
                    f"                 SASL PLAIN/SCRAM-SHA-256/SCRAM-SHA-512 user "
                    f"{self.kafka_sasl[0]}, password {self.kafka_sasl[1]}"
                )
        if self.es_url:
            auth = f" (user {self.es_auth[0]}, password {self.es_auth[1]})" if self.es_auth else ""
            lines.append(f"  elasticsearch: {self.es_url}{auth}")
            lines.append(f"                 log {self.es_log}")
            if self.es_ca_certs:
                lines.append(f"                 CA {self.es_ca_certs}")
        if self.prometheus_url:
            lines.append(f"  prometheus:    {self.prometheus_url}")
            lines.append(f"                 log {self.prometheus_log}")
        for label, url, log in (
            ("postgres", self.postgres_dsn, self.postgres_log),
            ("connect", self.connect_url, self.connect_log),
            ("registry", self.registry_url, self.registry_log),
        ):
            if url:
                lines.append(f"  {label + ':':<15}{url}")
                lines.append(f"                 log {log}")
        if self.versions:
            text = ", ".join(f"{k} {v}" for k, v in sorted(self.versions.items()))
            lines.append(f"  versions:      {text}")
        return "\n".join(lines)

    def env(self) -> dict[str, str]:
        """Environment variables that point the test fixtures at this stack."""
        env = {}
        if self.kafka_bootstrap:
            env["SPARSE_INGEST_TEST_KAFKA"] = self.kafka_bootstrap
        if self.es_url:
            env["SPARSE_INGEST_TEST_ES"] = self.es_url
        return env


@dataclass
class ServiceStatus:
    service: str
    pid: int | None
    running: bool
    healthy: bool
    url: str | None
    log: str | None
    version: str | None = None

    def describe(self) -> str:
        state = "healthy" if self.healthy else ("running, NOT healthy" if self.running else "DEAD")
        version = f"  (version {self.version})" if self.version else ""
        return f"  {self.service:<14} pid {self.pid}  {state:<22} {self.url or ''}{version}"


@dataclass
class StackStatus:
    name: str
    run_dir: Path
    services: list[ServiceStatus]

    @property
    def healthy(self) -> bool:
        """True if something is recorded and all of it is running and healthy."""
        return bool(self.services) and all(s.healthy for s in self.services)

    @property
    def running(self) -> bool:
        return any(s.running for s in self.services)

    def describe(self) -> str:
        if not self.services:
            return f"stack {self.name!r}: nothing running (no state in {self.run_dir})"
        lines = [f"stack {self.name!r} (run dir {self.run_dir})"]
        lines += [s.describe() for s in self.services]
        return "\n".join(lines)
