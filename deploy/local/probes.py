"""Readiness probes with the standard library only.

- Kafka: a raw ApiVersions (v0) request, then a Metadata request (the highest non-flexible
  version the broker supports, v4..v8) that must list at least one broker, then FindCoordinator
  (v1/v2) for a group, which must name a coordinator: consumer groups can join at once (a fresh
  broker creates ``__consumer_offsets`` on that first request; clients that come earlier log
  ``GroupCoordinatorNotAvailableError`` and retry).
- Elasticsearch: ``GET /_cluster/health`` must say yellow or green.
- Prometheus: ``GET /-/ready`` must answer 200.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass

_API_METADATA = 3
_API_FIND_COORDINATOR = 10
_API_VERSIONS = 18


@dataclass(frozen=True)
class KafkaMetadata:
    brokers: list[tuple[int, str, int]]  # (node_id, host, port)
    cluster_id: str | None
    controller_id: int
    metadata_version: int


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(value)

    def string(self) -> str | None:
        n = self.take(">h")
        if n < 0:
            return None
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.decode()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("Kafka closed the connection")
        buf += chunk
    return bytes(buf)


def _request(sock: socket.socket, api_key: int, version: int, corr: int, body: bytes) -> _Reader:
    client_id = b"sparse-ingest-probe"
    header = struct.pack(">hhih", api_key, version, corr, len(client_id)) + client_id
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    reader = _Reader(_recv_exact(sock, size))
    if reader.take(">i") != corr:
        raise ConnectionError("Kafka answered with a wrong correlation id")
    return reader


def _api_versions(sock: socket.socket) -> dict[int, tuple[int, int]]:
    r = _request(sock, _API_VERSIONS, 0, 1, b"")
    error = r.take(">h")
    if error != 0:
        raise ConnectionError(f"ApiVersions error code {error}")
    versions: dict[int, tuple[int, int]] = {}
    for _ in range(r.take(">i")):
        key, lo, hi = r.take(">h"), r.take(">h"), r.take(">h")
        versions[key] = (lo, hi)
    return versions


def kafka_coordinator_ready(host: str, port: int, timeout: float = 5.0) -> bool:
    """Does the broker name a group coordinator (FindCoordinator v1/v2, error code 0)?"""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        lo, hi = _api_versions(sock).get(_API_FIND_COORDINATOR, (0, -1))
        version = min(hi, 2)  # v3+ is the flexible encoding
        if version < max(lo, 1):
            return False
        group = b"sparse-ingest-probe"
        body = struct.pack(">h", len(group)) + group + struct.pack(">b", 0)  # key, type=group
        r = _request(sock, _API_FIND_COORDINATOR, version, 2, body)
        r.take(">i")  # throttle_time_ms
        return r.take(">h") == 0


def kafka_metadata(host: str, port: int, timeout: float = 5.0) -> KafkaMetadata:
    """Ask a broker for cluster metadata; raises OSError/ConnectionError when not ready."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        versions = _api_versions(sock)
        lo, hi = versions.get(_API_METADATA, (0, -1))
        version = min(hi, 8)
        if version < max(lo, 4):
            raise ConnectionError(f"no Metadata version in 4..8 supported (broker: {lo}..{hi})")
        # topics: empty array (= none), allow_auto_topic_creation=false, and from v8 the two
        # include_*_authorized_operations flags.
        body = struct.pack(">ib", 0, 0) + (struct.pack(">bb", 0, 0) if version >= 8 else b"")
        r = _request(sock, _API_METADATA, version, 2, body)
        r.take(">i")  # throttle_time_ms (v3+)
        brokers = []
        for _ in range(r.take(">i")):
            node_id = r.take(">i")
            bhost = r.string() or ""
            bport = r.take(">i")
            r.string()  # rack
            brokers.append((node_id, bhost, bport))
        cluster_id = r.string()
        controller_id = r.take(">i")
    return KafkaMetadata(brokers, cluster_id, controller_id, version)


def kafka_ready(bootstrap: str, timeout: float = 5.0) -> bool:
    host, _, port = bootstrap.rpartition(":")
    try:
        return bool(kafka_metadata(host, int(port), timeout).brokers) and kafka_coordinator_ready(
            host, int(port), timeout
        )
    except (OSError, ConnectionError, struct.error, ValueError, UnicodeDecodeError):
        return False


def http_json(
    url: str,
    timeout: float = 5.0,
    auth: tuple[str, str] | None = None,
    cafile: str | None = None,
) -> tuple[int, object]:
    """GET ``url``; returns (status, parsed JSON or text). Raises OSError if unreachable.
    ``cafile``: the CA to trust for an https URL."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def elasticsearch_health(
    url: str,
    timeout: float = 5.0,
    auth: tuple[str, str] | None = None,
    cafile: str | None = None,
) -> str | None:
    """The cluster health status ("green", "yellow", "red"), or None if unreachable."""
    try:
        status, body = http_json(f"{url}/_cluster/health", timeout, auth, cafile)
    except OSError:
        return None
    if status == 200 and isinstance(body, dict):
        return str(body.get("status"))
    return None


def elasticsearch_ready(
    url: str,
    timeout: float = 5.0,
    auth: tuple[str, str] | None = None,
    cafile: str | None = None,
) -> bool:
    return elasticsearch_health(url, timeout, auth, cafile) in ("yellow", "green")


def prometheus_ready(url: str, timeout: float = 5.0) -> bool:
    try:
        status, _ = http_json(f"{url}/-/ready", timeout)
    except OSError:
        return False
    return status == 200
