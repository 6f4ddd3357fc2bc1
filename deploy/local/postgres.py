"""The stack's optional Postgres (``--cdc``): a private cluster for logical decoding.

``start`` makes a new cluster on each ``up`` (``initdb``, the role and database ``sparse``,
``wal_level=logical``: see ``deploy.local.cdc``) and runs ``postgres -D data`` on a free
port; ``ready_probe`` logs in with ``psql``. As root the cluster belongs to the system user
``sparseingest`` and lives under ``/var/lib/sparse-ingest/runs/<name>-<hash>-postgres``
(``<run_dir>/postgres`` links there). ``params``/``execute`` serve
``LocalStack.postgres_params``/``postgres_exec``.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.local import cdc
from deploy.local.errors import StackError
from deploy.local.layout import (
    ES_USER,
    replace_with_link,
    run_work_dir,
    running_as_root,
    system_base,
)
from deploy.local.procs import pick_port
from deploy.local.state import HOST, StackInfo, Wait

if TYPE_CHECKING:
    from deploy.local.runtime import StackRuntime


def ready_probe(entry: dict[str, Any]) -> Callable[[], bool]:
    bin_dir, params = Path(entry["bin_dir"]), cdc.PostgresParams.from_entry(entry)
    return lambda: cdc.postgres_ready(bin_dir, params)


def _cluster_dir(stack: StackRuntime) -> tuple[Path, tuple[int, int] | None]:
    """(the cluster's folder, (uid, gid) to run as or None): ``<run_dir>/postgres``, or as
    root a folder of the Elasticsearch user under the ES base dir, linked from there."""
    link = stack.run_dir / "postgres"
    if not running_as_root():
        return link, None
    base, user = system_base()
    work = run_work_dir(base, stack.name, stack.run_dir, "-postgres")
    replace_with_link(link, work)
    return work, user


def start(stack: StackRuntime, info: StackInfo, state: dict[str, Any], taken: set[int]) -> Wait:
    """Make a new cluster and start it; fills ``info``'s Postgres fields."""
    bin_dir, version = cdc.find_postgres()
    port = pick_port(stack.postgres_port, "Postgres", taken)
    work, user = _cluster_dir(stack)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    work.chmod(0o700)
    if user is not None:
        os.chown(work, *user)
    params = cdc.PostgresParams(
        HOST, port, cdc.POSTGRES_USER, secrets.token_urlsafe(12), cdc.POSTGRES_DB
    )
    stack.log(f"creating a Postgres {version} cluster in {work} ...")
    data = work / "data"
    cdc.init_postgres(bin_dir, data, params, user, cdc.postgres_settings(port))
    log_file = work / "postgres.log"
    as_user = f" as user {ES_USER}" if user else ""
    stack.log(f"starting Postgres {version} on {HOST}:{port}{as_user} ...")
    stack._spawn(
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


def _recorded(stack: StackRuntime) -> tuple[Path, cdc.PostgresParams]:
    entry = stack._entry(stack._load_state(), "postgres")
    return Path(entry["bin_dir"]), cdc.PostgresParams.from_entry(entry)


def params(stack: StackRuntime) -> cdc.PostgresParams:
    """Host, port, user, password and database of the stack's Postgres."""
    return _recorded(stack)[1]


def execute(stack: StackRuntime, sql: str, timeout: float = 60.0) -> str:
    """``LocalStack.postgres_exec``: ``sql`` through ``psql`` -> its output."""
    bin_dir, recorded = _recorded(stack)
    proc = cdc.psql(bin_dir, recorded, sql, timeout)
    if proc.returncode != 0:
        raise StackError(f"psql failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout
