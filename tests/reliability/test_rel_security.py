"""Security: Elasticsearch over TLS (CA file) with basic auth, Kafka over SSL, SASL_PLAINTEXT
and SASL_SSL (PLAIN, SCRAM-SHA-256/512); clear errors at start for a wrong password, API key or
CA; secrets never in the logs, /metrics, /readyz or error messages.

API keys are only tested as refused: the integ-test Elasticsearch cannot create them (its
.security index needs the analysis-common module, which that distribution leaves out)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import scenarios
from reliability_harness import REPO, service_env

from deploy.local import LocalStack
from deploy.local.certs import make_ca

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _es_basic(info: Any) -> dict[str, Any]:
    user, password = info.es_auth
    return {"es_username": user, "es_password": password, "es_ca_certs": info.es_ca_certs}


def _kafka(info: Any, protocol: str, mechanism: str | None = None) -> tuple[str, dict[str, Any]]:
    settings: dict[str, Any] = {"kafka_security_protocol": protocol}
    if "SSL" in protocol:
        settings["kafka_ssl_cafile"] = info.kafka_ca_file
    if mechanism:
        user, password = info.kafka_sasl
        settings.update(
            kafka_sasl_mechanism=mechanism, kafka_sasl_username=user, kafka_sasl_password=password
        )
    return info.kafka_listeners[protocol], settings


def _assert_clean(run: scenarios.SecureRun) -> None:
    assert run.result.ok, run.result.summary()
    assert run.result.check.dlq_found == run.result.check.dlq_expected > 0
    assert run.search_status == 200
    assert run.result.extra["exit_code"] == 0, run.logs[-3000:]
    assert not run.leaks, run.leaks
    assert run.result.extra["http_writes"] == {}, run.result.extra["http_writes"]
    assert '"ready":true' in run.readyz.replace(" ", ""), run.readyz


async def test_es_tls_basic_auth_and_kafka_sasl_ssl_scram(
    fault_env: scenarios.Env, fault_stack: LocalStack
) -> None:
    info = fault_stack.info
    kafka, kafka_settings = _kafka(info, "SASL_SSL", "SCRAM-SHA-512")
    run = await scenarios.secure_ingest(
        fault_env,
        "TLS + basic auth, SASL_SSL SCRAM-SHA-512",
        kafka,
        {**_es_basic(info), **kafka_settings},
        secrets=[info.es_auth[1], info.kafka_sasl[1]],
    )
    _assert_clean(run)


async def test_password_in_the_es_url_and_kafka_ssl(
    fault_env: scenarios.Env, fault_stack: LocalStack
) -> None:
    """A password given inside SPARSE_INGEST_ES_URL works and is masked wherever the URL is
    shown (log line, /readyz)."""
    info = fault_stack.info
    user, password = info.es_auth
    url = info.es_url.replace("https://", f"https://{user}:{password}@")
    kafka, kafka_settings = _kafka(info, "SSL")
    run = await scenarios.secure_ingest(
        fault_env,
        "password in the ES URL, Kafka SSL",
        kafka,
        {"es_url": url, "es_ca_certs": info.es_ca_certs, **kafka_settings},
        secrets=[password],
        docs=150,
    )
    _assert_clean(run)
    assert f"{user}:**********@" in run.readyz


async def test_kafka_sasl_plaintext_plain(
    fault_env: scenarios.Env, fault_stack: LocalStack
) -> None:
    info = fault_stack.info
    kafka, kafka_settings = _kafka(info, "SASL_PLAINTEXT", "PLAIN")
    run = await scenarios.secure_ingest(
        fault_env,
        "TLS + basic auth, SASL_PLAINTEXT PLAIN",
        kafka,
        {**_es_basic(info), **kafka_settings},
        secrets=[info.es_auth[1], info.kafka_sasl[1]],
        docs=150,
    )
    _assert_clean(run)


def _run_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "run", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _bad_settings(info: Any, case: str, tmp: Path) -> tuple[str, dict[str, Any], str, list[str]]:
    """(kafka, settings, expected message, secrets) for a misconfiguration."""
    es = _es_basic(info)
    password = info.es_auth[1]
    wrong = "Wr0ng-" + password[::-1]
    other_ca = str(make_ca(tmp / "other-ca", "some other CA")[0])
    plain = info.kafka_listeners["PLAINTEXT"]
    if case == "es-wrong-password":
        return plain, {**es, "es_password": wrong}, "refused the credentials", [wrong, password]
    if case == "es-wrong-api-key":
        key = "V3JvbmdJZDpXcm9uZ0tleQ=="
        return (
            plain,
            {"es_api_key": key, "es_ca_certs": info.es_ca_certs},
            "refused the credentials",
            [key],
        )
    if case == "es-no-ca":
        return plain, {**es, "es_ca_certs": None}, "SPARSE_INGEST_ES_CA_CERTS", [password]
    if case == "es-other-ca":
        return plain, {**es, "es_ca_certs": other_ca}, "SPARSE_INGEST_ES_CA_CERTS", [password]
    if case == "es-plain-http":
        url = info.es_url.replace("https://", "http://")
        es.pop("es_ca_certs")
        return plain, {**es, "es_url": url}, "does it want https://?", [password]
    if case == "es-ca-missing-file":
        missing = str(tmp / "no-such-ca.crt")
        return (
            plain,
            {**es, "es_ca_certs": missing},
            "SPARSE_INGEST_ES_CA_CERTS: no such file",
            [password],
        )
    if case == "es-ca-with-http":
        url = info.es_url.replace("https://", "http://")
        return plain, {**es, "es_url": url}, "SPARSE_INGEST_ES_URL is not https://", [password]
    kafka, settings = _kafka(info, "SASL_SSL", "SCRAM-SHA-256")
    if case == "kafka-wrong-password":
        settings["kafka_sasl_password"] = wrong
        return (
            kafka,
            {**es, **settings},
            "SPARSE_INGEST_KAFKA_SASL",
            [wrong, password, info.kafka_sasl[1]],
        )
    if case == "kafka-ca-missing-file":
        settings["kafka_ssl_cafile"] = str(tmp / "no-such-ca.crt")
        return (
            kafka,
            {**es, **settings},
            "SPARSE_INGEST_KAFKA_SSL_CAFILE: no such file",
            [password, info.kafka_sasl[1]],
        )
    if case == "kafka-other-ca":
        settings["kafka_ssl_cafile"] = other_ca
        return (
            kafka,
            {**es, **settings},
            "SPARSE_INGEST_KAFKA_SSL_CAFILE",
            [password, info.kafka_sasl[1]],
        )
    if case == "kafka-plaintext-to-ssl":
        ssl_listener = info.kafka_listeners["SSL"]
        return ssl_listener, {**es, "kafka_security_protocol": "PLAINTEXT"}, "Kafka", [password]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "es-wrong-password",
        "es-wrong-api-key",
        "es-no-ca",
        "es-other-ca",
        "es-plain-http",
        "es-ca-missing-file",
        "es-ca-with-http",
        "kafka-wrong-password",
        "kafka-ca-missing-file",
        "kafka-other-ca",
        "kafka-plaintext-to-ssl",
    ],
)
def test_wrong_credentials_or_ca_stop_the_service_at_start_with_a_clear_error(
    case: str, fault_stack: LocalStack, default_model_dir: Path, tmp_path: Path
) -> None:
    info = fault_stack.info
    kafka, settings, message, secrets = _bad_settings(info, case, tmp_path)
    es_url = settings.pop("es_url", info.es_url)
    env = service_env(kafka, es_url, "t", "i", "g", model_dir=default_model_dir, **settings)
    if settings.get("es_ca_certs", "") is None:
        env.pop("SPARSE_INGEST_ES_CA_CERTS", None)
    code, output = _run_cli(env)
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("sparse-ingest: ")]
    assert len(lines) == 1, output
    if "no such file" in message or "not https" in message:  # bad settings: exit 2, listed
        assert code == 2, output
        assert "invalid configuration" in lines[0], output
        assert message in output, output
    else:  # refused at start: exit 1
        assert code == 1, output
        assert message in lines[0], output
    for secret in secrets:
        assert secret not in output, f"secret {secret[:4]}... in the output:\n{output}"


def test_check_prints_settings_with_secrets_masked(
    fault_stack: LocalStack, default_model_dir: Path
) -> None:
    info = fault_stack.info
    user, password = info.es_auth
    kafka, settings = _kafka(info, "SASL_SSL", "PLAIN")
    url = info.es_url.replace("https://", f"https://{user}:{password}@")
    env = service_env(
        kafka,
        url,
        "t",
        "i",
        "g",
        model_dir=default_model_dir,
        http_bearer_token="tok-3141592",
        es_api_key=None,
        **settings,
    )
    code, output = _run_cli(env, "--check")
    assert code == 0, output
    for secret in (password, info.kafka_sasl[1], "tok-3141592"):
        assert secret not in output
    assert "SPARSE_INGEST_KAFKA_SASL_PASSWORD=**********" in output
    assert f"SPARSE_INGEST_ES_URL=https://{user}:**********@" in output
