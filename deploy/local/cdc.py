"""Change data capture in the local stack: Postgres, Kafka Connect + Debezium, a schema registry.

The helpers :class:`~deploy.local.stack.LocalStack` uses to start them (``up(postgres=True,
connect=True, registry=True)``):

- **Postgres**: Debian's server binaries (``/usr/lib/postgresql/<major>/bin``), a private
  cluster made with ``initdb`` in the run dir, ``wal_level=logical``, TCP on 127.0.0.1 only (no
  Unix socket), one database and one login role with ``REPLICATION`` and a password, owner of
  that database (made in single-user mode before the server starts). Postgres refuses to run
  as root: as root it runs as the stack's system user, like Elasticsearch.
- **Kafka Connect** standalone (the 4.3.0 runtime, see ``versions``) with Debezium's Postgres
  connector on its plugin path: JsonConverter without schemas by default, offsets in a file of
  the run dir. Standalone Connect keeps connector configs in memory only, so each connector
  added through :meth:`LocalStack.connect_add_connector` is also written to a JSON file that is
  given to ``ConnectStandalone`` when the service is started again: a restart resumes each
  connector from its stored offsets.
- **Apicurio Registry** (in-memory storage) with its Confluent-compatible API.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.local.errors import ServiceStartError, StackError
from deploy.local.versions import (
    DEBEZIUM_POSTGRES_CONNECTOR,
    POSTGRES_LIB_DIR,
    POSTGRES_MIN_MAJOR,
)

POSTGRES_DB = "sparse"
POSTGRES_USER = "sparse"  # LOGIN REPLICATION, owner of POSTGRES_DB
POSTGRES_SUPERUSER = "postgres"
REGISTRY_API = "/apis/ccompat/v7"  # Apicurio's Confluent-compatible API


# ---------------------------------------------------------------- Postgres
@dataclass(frozen=True)
class PostgresParams:
    """How to connect to the stack's Postgres as its application role."""

    host: str
    port: int
    user: str
    password: str
    dbname: str

    @property
    def dsn(self) -> str:
        """``postgresql://USER:PASSWORD@HOST:PORT/DB`` (libpq URI, psycopg and psql take it)."""
        password = urllib.parse.quote(self.password, safe="")
        return f"postgresql://{self.user}:{password}@{self.host}:{self.port}/{self.dbname}"

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> PostgresParams:
        return cls(entry["host"], entry["port"], entry["user"], entry["password"], entry["dbname"])

    def to_entry(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": self.dbname,
        }


def find_postgres() -> tuple[Path, str]:
    """(bin dir, version) of the newest Postgres server in ``/usr/lib/postgresql/*/bin``."""
    found = []
    base = Path(POSTGRES_LIB_DIR)
    for child in base.iterdir() if base.is_dir() else []:
        binary = child / "bin" / "postgres"
        if child.name.isdigit() and int(child.name) >= POSTGRES_MIN_MAJOR and binary.is_file():
            found.append((int(child.name), child / "bin"))
    if not found:
        raise StackError(
            f"no Postgres server found in {POSTGRES_LIB_DIR}/<major>/bin: install Debian's "
            "(`apt-get install postgresql`; `scripts/setup` does it). The stack runs its own "
            "cluster, Debian's service need not run."
        )
    bin_dir = max(found)[1]
    proc = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=False
    )
    match = re.search(r"\) (\S+)", proc.stdout)
    return bin_dir, match.group(1) if match else bin_dir.parent.name


def postgres_settings(port: int) -> dict[str, Any]:
    """The lines appended to ``postgresql.conf``: logical decoding for Debezium, TCP on
    127.0.0.1 only, small memory, no durability (a throwaway dev cluster)."""
    return {
        "listen_addresses": "127.0.0.1",
        "port": port,
        "unix_socket_directories": "",
        "wal_level": "logical",
        "max_replication_slots": 10,
        "max_wal_senders": 10,
        "max_connections": 40,
        "shared_buffers": "32MB",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "logging_collector": "off",
        "log_line_prefix": "%m [%p] ",
        "timezone": "UTC",
    }


def _conf_value(value: Any) -> str:
    return str(value) if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"


def init_postgres(
    bin_dir: Path,
    data: Path,
    params: PostgresParams,
    user: tuple[int, int] | None,
    settings: dict[str, Any],
) -> None:
    """``initdb`` a cluster in ``data`` (which must not exist; its parent is the cwd and must
    belong to ``user``), append ``settings`` to its ``postgresql.conf``, and create the
    application role and database in single-user mode."""
    work = data.parent
    pwfile = work / ".pwfile"
    pwfile.write_text(secrets.token_urlsafe(12) + "\n")  # the superuser's, used by nobody
    if user is not None:
        os.chown(pwfile, *user)
    run_as: dict[str, Any] = {"cwd": work, "capture_output": True, "text": True, "check": False}
    if user is not None:
        run_as.update(user=user[0], group=user[1], extra_groups=[])
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", POSTGRES_SUPERUSER]
    initdb += [f"--pwfile={pwfile}", "--auth-local=scram-sha-256", "--auth-host=scram-sha-256"]
    initdb += ["-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]
    proc = subprocess.run(initdb, timeout=300, **run_as)
    pwfile.unlink()
    if proc.returncode != 0:
        raise ServiceStartError(
            f"initdb failed (exit {proc.returncode}):\n$ {' '.join(initdb)}\n"
            + (proc.stdout + proc.stderr)[-3000:]
        )
    conf = data / "postgresql.conf"
    with conf.open("a") as fh:
        fh.write("\n# generated by deploy.local\n")
        fh.writelines(f"{k} = {_conf_value(v)}\n" for k, v in settings.items())
    password = params.password.replace("'", "''")
    sql = (
        f"CREATE ROLE \"{params.user}\" LOGIN REPLICATION PASSWORD '{password}';\n"
        f'CREATE DATABASE "{params.dbname}" OWNER "{params.user}";\n'
    )
    single = [str(bin_dir / "postgres"), "--single", "-D", str(data), "-F"]
    single += ["-c", "listen_addresses=", POSTGRES_SUPERUSER]
    proc = subprocess.run(single, input=sql, timeout=300, **run_as)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 or "ERROR:" in output:
        raise ServiceStartError(
            f"creating the role and database in single-user mode failed:\n{output[-3000:]}"
        )


def postgres_ready(bin_dir: Path, params: PostgresParams, timeout: float = 10.0) -> bool:
    """Does the application role log in and run ``SELECT 1``?"""
    try:
        proc = psql(bin_dir, params, "SELECT 1", timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and proc.stdout.strip() == "1"


def psql(
    bin_dir: Path, params: PostgresParams, sql: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``sql`` with psql as the application role (unaligned, tuples only, stop at the first
    error); the password goes through ``PGPASSWORD``, not the command line."""
    cmd = [str(bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
    cmd += ["-h", params.host, "-p", str(params.port), "-U", params.user, "-d", params.dbname]
    env = {**os.environ, "PGPASSWORD": params.password, "PGCONNECT_TIMEOUT": "5"}
    return subprocess.run(
        cmd, input=sql, env=env, capture_output=True, text=True, check=False, timeout=timeout
    )


# ---------------------------------------------------------------- Kafka Connect
def connect_worker_properties(
    bootstrap: str, rest_host: str, rest_port: int, offsets: Path, plugin_path: Path
) -> dict[str, Any]:
    """A standalone worker: JSON keys and values without the schema envelope, offsets in a
    file (flushed every second, so that a restart repeats little), REST on ``rest_port``."""
    return {
        "bootstrap.servers": bootstrap,
        "key.converter": "org.apache.kafka.connect.json.JsonConverter",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable": "false",
        "value.converter.schemas.enable": "false",
        "offset.storage.file.filename": str(offsets),
        "offset.flush.interval.ms": 1000,
        "listeners": f"http://{rest_host}:{rest_port}",
        "rest.advertised.host.name": rest_host,
        "rest.advertised.port": rest_port,
        "plugin.path": str(plugin_path),
        # Debezium and the runtime declare their plugins for the ServiceLoader: no class scan.
        "plugin.discovery": "service_load",
    }


def connect_log4j2(log_file: Path) -> str:
    """log4j2 properties: everything to ``log_file``, the clients' config dumps left out."""
    return "\n".join(
        [
            "status = warn",
            "appender.file.type = File",
            "appender.file.name = file",
            f"appender.file.fileName = {log_file}",
            "appender.file.layout.type = PatternLayout",
            "appender.file.layout.pattern = [%d] %p %m (%c)%n",
            "rootLogger.level = info",
            "rootLogger.appenderRef.file.ref = file",
            "logger.config.name = org.apache.kafka.common.config",
            "logger.config.level = warn",
            "logger.clients.name = org.apache.kafka.clients",
            "logger.clients.level = warn",
            "",
        ]
    )


def http(method: str, url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    """(status, parsed JSON or text) of one JSON request; HTTP errors are returned, not raised
    (OSError when unreachable)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        return status, text


def connector_status(url: str, name: str, timeout: float = 10.0) -> Any:
    """``GET /connectors/NAME/status`` (None when Connect does not answer)."""
    try:
        _, body = http(
            "GET", f"{url}/connectors/{urllib.parse.quote(name, safe='')}/status", None, timeout
        )
    except OSError:
        return None
    return body


def validation_errors(url: str, name: str, config: dict[str, str]) -> list[str]:
    """``KEY: error`` for each error ``PUT /connector-plugins/CLASS/config/validate`` finds.

    ``POST /connectors`` itself answers an invalid Debezium 3.6 config with a bare 500 (a
    NullPointerException in Connect 4.3: Debezium declares a key it gives no value,
    ``internal.legacy.snapshot.max.threads``), so the reason is asked for separately."""
    plugin = urllib.parse.quote(config.get("connector.class", ""), safe="")
    try:
        status, body = http(
            "PUT", f"{url}/connector-plugins/{plugin}/config/validate", {**config, "name": name}
        )
    except OSError as exc:
        return [f"(validation request failed: {exc})"]
    if status != 200 or not isinstance(body, dict):
        return [f"(validation answered {status}: {str(body)[:300]})"]
    return [
        f"{value['name']}: {error}"
        for item in body.get("configs", [])
        if (value := item.get("value"))
        for error in value.get("errors", [])
    ]


def connect_ready(url: str, connectors: list[str], timeout: float = 5.0) -> bool:
    """Is the worker up (``GET /health`` 200, i.e. started) and are ``connectors`` and their
    tasks RUNNING?"""
    try:
        status, _ = http("GET", f"{url}/health", None, timeout)
    except OSError:
        return False
    if status != 200:
        return False
    return all(
        connector_state(connector_status(url, n, timeout))[0] == "RUNNING" for n in connectors
    )


def registry_ready(url: str, timeout: float = 5.0) -> bool:
    """Does the registry's Confluent-compatible API (``url``) list its subjects?"""
    try:
        status, _ = http("GET", f"{url}/subjects", None, timeout)
    except OSError:
        return False
    return status == 200


def connector_state(status: Any) -> tuple[str, str | None]:
    """From ``GET /connectors/NAME/status``: ("RUNNING", None) when the connector and all its
    tasks (at least one) run; ("FAILED", the trace) when it or a task failed; else
    ("PENDING", what is not running yet)."""
    if not isinstance(status, dict) or "connector" not in status:
        return "PENDING", f"no status yet ({str(status)[:200]})"
    connector = status["connector"]
    if connector.get("state") == "FAILED":
        return "FAILED", f"connector FAILED:\n{connector.get('trace', '(no trace)')}"
    tasks = status.get("tasks") or []
    for task in tasks:
        if task.get("state") == "FAILED":
            return "FAILED", f"task {task.get('id')} FAILED:\n{task.get('trace', '(no trace)')}"
    if connector.get("state") != "RUNNING":
        return "PENDING", f"connector {connector.get('state')}"
    if not tasks:
        return "PENDING", "no task yet"
    waiting = [f"task {t.get('id')} {t.get('state')}" for t in tasks if t.get("state") != "RUNNING"]
    return ("PENDING", ", ".join(waiting)) if waiting else ("RUNNING", None)


def debezium_postgres_config(
    params: PostgresParams,
    topic_prefix: str,
    tables: Sequence[str] | str,
    slot_name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The config of Debezium's Postgres connector for ``params``: ``pgoutput`` (built into
    Postgres 10+), topics ``<topic_prefix>.<schema>.<table>``, only ``tables``
    (``schema.table``, regular expressions as Debezium takes them), its own replication slot
    (default: ``topic_prefix`` made a legal slot name) and publication of the same name,
    created for those tables (``publication.autocreate.mode=filtered``), snapshot mode left at
    its default (``initial``). ``extra`` settings (e.g. ``{"snapshot.mode": "no_data"}``) win.
    Values are strings, as Connect's REST API takes them."""
    tables = [tables] if isinstance(tables, str) else list(tables)
    slot = slot_name or re.sub(r"[^a-z0-9_]", "_", topic_prefix.lower())[:63]
    config: dict[str, Any] = {
        "connector.class": DEBEZIUM_POSTGRES_CONNECTOR,
        "tasks.max": 1,
        "database.hostname": params.host,
        "database.port": params.port,
        "database.user": params.user,
        "database.password": params.password,
        "database.dbname": params.dbname,
        "topic.prefix": topic_prefix,
        "plugin.name": "pgoutput",
        "slot.name": slot,
        "publication.name": slot,
        "publication.autocreate.mode": "filtered",
        "table.include.list": ",".join(tables),
    }
    config.update(extra or {})
    return {k: connect_value(v) for k, v in config.items()}


def connect_value(value: Any) -> str:
    """A connector config value as Connect's REST API takes it (a string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
