"""The Faust runner's Kafka security: Faust's clients get what `run`'s clients get.

Pure mapping, no broker (the SASL_SSL worker test in tests/reliability/test_faust_security.py
runs it against the real listener)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from deploy.local.certs import make_ca
from service.config import load_settings
from service.faust_runner import broker_credentials
from service.kafka.clients import kafka_security


def _settings(tmp_path: Path, protocol: str) -> Any:
    values: dict[str, Any] = {"kafka_security_protocol": protocol}
    if "SSL" in protocol:
        values["kafka_ssl_cafile"] = make_ca(tmp_path / "ca")[0]
    if protocol.startswith("SASL"):
        values.update(
            kafka_sasl_mechanism="SCRAM-SHA-512",
            kafka_sasl_username="ingest",
            kafka_sasl_password="s3cret-pw",
        )
    return load_settings(**values)


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
def test_faust_clients_get_the_same_security_as_run(tmp_path: Path, protocol: str) -> None:
    settings = _settings(tmp_path, protocol)
    faust_side = dict(credentials_to_aiokafka_auth(broker_credentials(settings)))
    run_side = kafka_security(settings)
    # The SSL contexts are built separately: compare what they trust, not their identity.
    faust_context = faust_side.pop("ssl_context", None)
    run_context = run_side.pop("ssl_context", None)
    assert faust_side == run_side
    assert faust_side["security_protocol"] == protocol
    if "SSL" in protocol:
        assert isinstance(faust_context, ssl.SSLContext)
        assert isinstance(run_context, ssl.SSLContext)
        assert faust_context.get_ca_certs() == run_context.get_ca_certs() != []
        assert faust_context.verify_mode == ssl.CERT_REQUIRED
        assert faust_context.check_hostname == run_context.check_hostname
    else:
        assert faust_context is None and run_context is None


def test_the_sasl_password_is_not_in_the_credentials_repr(tmp_path: Path) -> None:
    """Faust prints its configuration (the worker banner, errors): the repr must not leak."""
    credentials = broker_credentials(_settings(tmp_path, "SASL_SSL"))
    assert "s3cret-pw" not in repr(credentials)
