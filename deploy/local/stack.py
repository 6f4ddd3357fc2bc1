"""``LocalStack``: the local stack's orchestrator, single-node Kafka (KRaft) + single-node
Elasticsearch (+ Prometheus), and on request Postgres, Kafka Connect with Debezium, and
Apicurio Registry.

It holds no service's details: its settings, state file and process plumbing come from
``deploy.local.runtime.StackRuntime`` (its base), and it composes the service modules:
``deploy.local.kafka``, ``.elasticsearch`` (and its file realm), ``.prometheus``,
``.postgres``, ``.registry``, ``.connect``, and ``.faults`` (stop/start/pause one service).
Here: ``fetch``, ``up`` (start order, waiting, cleanup on failure), ``status``, ``down``, the
context manager, and the public methods that hand over to those modules.

Every service runs in its own session (process group) so that ``down`` can stop the whole
group by PID from any shell; PIDs, ports and URLs are kept in ``<run_dir>/state.json``
(``deploy.local.state``). As root, Elasticsearch and Postgres run as the system user
``sparseingest`` with their files under ``/var/lib/sparse-ingest`` (``deploy.local.layout``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from deploy.local import artifacts as fetching
from deploy.local import cdc, faults
from deploy.local import connect as connect_svc  # *_svc: up(connect=...) must not hide them
from deploy.local import elasticsearch as es_svc
from deploy.local import kafka as kafka_svc
from deploy.local import postgres as postgres_svc
from deploy.local import prometheus as prometheus_svc
from deploy.local import registry as registry_svc
from deploy.local.errors import StackAlreadyRunningError, StackError
from deploy.local.kafka import new_kafka_cluster_id
from deploy.local.layout import DEFAULT_ES_BASE, ES_BASE_ENV, ES_USER, ensure_system_user
from deploy.local.procs import alive
from deploy.local.runtime import StackRuntime
from deploy.local.state import (
    HOST,
    SERVICES,
    Log,
    ServiceStatus,
    StackInfo,
    StackStatus,
    Wait,
)
from deploy.local.versions import KAFKA_PARTITIONS

__all__ = [
    "DEFAULT_ES_BASE",
    "ES_BASE_ENV",
    "ES_USER",
    "HOST",
    "KAFKA_PARTITIONS",
    "SERVICES",
    "LocalStack",
    "Log",
    "ServiceStatus",
    "StackInfo",
    "StackStatus",
    "ensure_system_user",
    "new_kafka_cluster_id",
]


class LocalStack(StackRuntime):
    """A named local stack with its state in ``run_dir``.

    >>> with LocalStack(name="dev") as stack:   # up() on enter, down() on exit
    ...     print(stack.info.kafka_bootstrap, stack.info.es_url)
    """

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
        waits: list[Wait] = []
        try:
            if kafka:
                waits.append(kafka_svc.start(self, info, state, taken))
            if elasticsearch:
                waits.append(es_svc.start(self, info, state, taken))
            if prometheus:
                waits.append(prometheus_svc.start(self, info, state, taken, prometheus_config))
            if postgres:
                waits.append(postgres_svc.start(self, info, state, taken))
            if registry:
                waits.append(registry_svc.start(self, info, state, taken))
            if connect:
                # Connect asks Kafka for its cluster id first thing: start it once Kafka answers.
                self._wait_ready([w for w in waits if w[0] == "kafka"], state)
                waits = [w for w in waits if w[0] != "kafka"]
                waits.append(connect_svc.start(self, info, state, taken))
            self._wait_ready(waits, state)
        except BaseException:
            self._stop_services(state, timeout=15.0)
            self._save_state({**state, "services": {}})
            raise
        info.versions["startup_seconds"] = f"{time.monotonic() - started:.1f}"
        state["info"] = info.to_dict()
        self._save_state(state)
        return info

    # ------------------------------------------------------------------ status / down
    def status(self) -> StackStatus:
        state = self._load_state()
        info = state.get("info", {})
        statuses = []
        for service, entry in state["services"].items():
            running = alive(entry["pid"], entry.get("start_time"))
            url = f"{HOST}:{entry['port']}" if service == "kafka" else entry["url"]
            healthy = running and faults.ready_probe(service, state)()
            version = entry.get("version") or info.get("versions", {}).get(service)
            statuses.append(
                ServiceStatus(
                    service, entry["pid"], running, healthy, url, entry.get("log"), version
                )
            )
        return StackStatus(self.name, self.run_dir, statuses)

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

    # ------------------------------------------------------------------ one service (faults)
    def stop_service(self, service: str, timeout: float = 30.0) -> str:
        """Stop one service (SIGTERM to its process group, SIGKILL after ``timeout``) and keep
        its data, config and ports, so that :meth:`start_service` brings it back as it was.
        Returns "stopped", "killed" or "not running"."""
        return faults.stop_service(self, service, timeout)

    def start_service(self, service: str) -> None:
        """Start a service stopped with :meth:`stop_service` again (same command, data, ports,
        settings) and wait until it is ready."""
        faults.start_service(self, service)

    def wait_ready(self, service: str) -> None:
        """Wait (up to ``startup_timeout``) until a running service answers its probe."""
        faults.wait_ready(self, service)

    def pause_service(self, service: str) -> None:
        """Freeze one service (SIGSTOP to its process group): it keeps its sockets but answers
        nothing, like a node stuck in a long GC pause. :meth:`resume_service` thaws it."""
        faults.pause_service(self, service)

    def resume_service(self, service: str) -> None:
        faults.resume_service(self, service)

    def restart_service(self, service: str, downtime: float = 0.0, timeout: float = 30.0) -> str:
        """:meth:`stop_service`, wait ``downtime`` seconds, :meth:`start_service`."""
        result = self.stop_service(service, timeout)
        time.sleep(downtime)
        self.start_service(service)
        return result

    # ------------------------------------------------------------------ Elasticsearch file realm
    def es_file_roles(self, roles: dict[str, dict[str, Any]]) -> Path:
        """Add or replace file-realm roles: ``roles.yml`` in the node's config folder, one role a
        line as ``"name": {body}`` in JSON (which is YAML). ``body`` is what ``PUT
        /_security/role/<name>`` takes, e.g. ``{"indices": [{"names": ["ro-*"], "privileges":
        ["read"]}]}``. Roles written before stay. Elasticsearch reloads the file within about a
        second; :meth:`es_file_user` waits until its user has what its roles grant, so write
        the roles first. Returns the path of ``roles.yml``."""
        return es_svc.file_roles(self, roles)

    def es_file_user(
        self, name: str, password: str, roles: Sequence[str], timeout: float = 60.0
    ) -> tuple[str, str]:
        """Add (or replace) a file-realm user with these roles (``bin/elasticsearch-users
        useradd NAME -p PASSWORD -r ROLE1,ROLE2``, run as the Elasticsearch user with the node's
        environment), then wait until ``GET /_security/_authenticate`` as that user answers 200
        with exactly these roles and ``GET /_security/user/_privileges`` shows what the file
        roles among them grant (polling; StackError after ``timeout`` seconds). Passwords need
        6+ characters. Returns ``(name, password)``, e.g. for ``basic_auth``."""
        return es_svc.file_user(self, name, password, roles, timeout)

    # ------------------------------------------------------------------ Postgres / Connect (CDC)
    @property
    def postgres_params(self) -> cdc.PostgresParams:
        """Host, port, user, password and database of the stack's Postgres."""
        return postgres_svc.params(self)

    def postgres_exec(self, sql: str, timeout: float = 60.0) -> str:
        """Run ``sql`` (one or more statements) with ``psql`` as the stack's Postgres role and
        return its output (unaligned, tuples only: ``SELECT 1, 'a'`` gives ``1|a``). StackError
        with psql's message when a statement fails."""
        return postgres_svc.execute(self, sql, timeout)

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
        return connect_svc.add_connector(self, name, config, timeout)

    def connect_delete_connector(self, name: str) -> None:
        """Delete connector ``name`` (its offsets stay in the offsets file; its replication slot,
        if any, stays in Postgres) and forget it for restarts."""
        connect_svc.delete_connector(self, name)

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
