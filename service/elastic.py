"""The Elasticsearch client for 8.x and 9.x servers, and what the service learns at start.

elasticsearch-py 9 asks every request to be answered in REST API version 9
(``Accept: application/vnd.elasticsearch+json; compatible-with=9``); an 8.x server refuses
that (``400 media_type_header_exception: Accept version must be either version 8 or 7``).
:class:`CompatibleTransport` negotiates instead: its first request says what the client
speaks, and when the server answers with the versions it accepts, every request from then on
asks for the newest of those (9.x accepts ``compatible-with=8`` too, so a server upgraded from
8 to 9 under a running service goes on working; one upgraded past what the client asks for is
renegotiated on the first refusal).

:func:`describe_cluster` finds the server's version (node info, with the ``monitor`` privilege)
or, without any cluster privilege, its major (the API version negotiated): the service runs
with index privileges only (README: Least privilege).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any

from elastic_transport import AsyncTransport, HttpHeaders, TlsError, TransportApiResponse
from elasticsearch import (
    ApiError,
    AsyncElasticsearch,
    AuthenticationException,
    OrjsonSerializer,
)
from elasticsearch import ConnectionError as EsConnectionError
from elasticsearch import __versionstr__ as CLIENT_VERSION

from service.config import Settings
from service.errors import StartupError

log = logging.getLogger(__name__)

CLIENT_MAJOR = int(CLIENT_VERSION.partition(".")[0])
# sparse_vector fields exist since 8.11
MIN_VERSION = (8, 11)
_COMPATIBLE_WITH = re.compile(r"compatible-with=\d+")
_ACCEPTED = re.compile(r"must be either version (\d+) or (\d+)")


def accepted_versions(status: int, body: Any) -> tuple[int, ...]:
    """The REST API versions a server names when it refuses the one asked for (empty when the
    response is not such a refusal)."""
    if status != 400 or not isinstance(body, dict):
        return ()
    error = body.get("error")
    if not isinstance(error, dict) or error.get("type") != "media_type_header_exception":
        return ()
    cause = error.get("caused_by")
    reason = str(cause.get("reason", "")) if isinstance(cause, dict) else ""
    match = _ACCEPTED.search(reason or str(error.get("reason", "")))
    return tuple(sorted({int(g) for g in match.groups()}, reverse=True)) if match else ()


class CompatibleTransport(AsyncTransport):
    """A transport that asks for the REST API version the server accepts (see the module)."""

    compatible_with: int | None = None  # None: what the client asks for (its major)
    refused: tuple[int, ...] = ()  # versions the server named when it refused ours

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negotiated = False
        self._lock = asyncio.Lock()

    def _with_version(self, headers: Any) -> Any:
        if self.compatible_with is None or not isinstance(headers, dict | HttpHeaders):
            return headers
        out = HttpHeaders(headers)
        for name in ("accept", "content-type"):
            value = out.get(name)
            if value and "compatible-with=" in value:
                out[name] = _COMPATIBLE_WITH.sub(f"compatible-with={self.compatible_with}", value)
        return out

    async def perform_request(  # type: ignore[override]
        self, method: str, target: str, *, headers: Any = None, **kwargs: Any
    ) -> TransportApiResponse:
        if headers is None:
            headers = HttpHeaders()
        if not self._negotiated and method == "HEAD":
            # a refused HEAD has no body to say which versions would do: ask with a GET first
            await self.negotiate(headers)
        sent = self.compatible_with
        response = await super().perform_request(
            method, target, headers=self._with_version(headers), **kwargs
        )
        versions = accepted_versions(response.meta.status, response.body)
        if versions and versions[0] != sent:  # refused what was sent: again, as now agreed
            if versions[0] != self.compatible_with:  # not switched meanwhile by another request
                self._switch(versions)
            response = await super().perform_request(
                method, target, headers=self._with_version(headers), **kwargs
            )
        self._negotiated = True
        return response

    async def negotiate(self, headers: Any) -> None:
        async with self._lock:
            if self._negotiated:
                return
            probe_headers = HttpHeaders(headers)
            for name in ("accept", "content-type"):
                if name in probe_headers:
                    del probe_headers[name]
            probe_headers["accept"] = (
                f"application/vnd.elasticsearch+json; compatible-with={CLIENT_MAJOR}"
            )
            response = await super().perform_request(  # 200, or 403 without `monitor`
                "GET", "/_nodes/_local/none", headers=self._with_version(probe_headers)
            )
            versions = accepted_versions(response.meta.status, response.body)
            if versions:
                self._switch(versions)
            self._negotiated = True

    def _switch(self, versions: tuple[int, ...]) -> None:
        self.refused = versions
        log.info(
            "Elasticsearch accepts REST API versions %s: asking for %d",
            "/".join(map(str, versions)),
            versions[0],
        )
        self.compatible_with = versions[0]


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """What the service knows of the server: its version when a request could say it, and the
    REST API version the client speaks with it."""

    version: str | None
    api_version: int
    how: str  # where the version came from

    @property
    def major_minor(self) -> tuple[int, int] | None:
        if not self.version:
            return None
        parts = re.findall(r"\d+", self.version)[:2]
        return (int(parts[0]), int(parts[1])) if len(parts) == 2 else None

    def describe(self) -> str:
        version = self.version or f"{self.api_version}.x (version hidden: {self.how})"
        return f"Elasticsearch {version}, REST API version {self.api_version}"

    def too_old(self) -> bool:
        mm = self.major_minor
        return (mm is not None and mm < MIN_VERSION) or self.api_version < MIN_VERSION[0]


def compat_transport(client: AsyncElasticsearch) -> CompatibleTransport | None:
    transport = client.transport
    return transport if isinstance(transport, CompatibleTransport) else None


async def describe_cluster(client: AsyncElasticsearch) -> ClusterInfo:
    """The server's version from the local node's info (``monitor`` privilege); without that
    privilege only the major version the server speaks is known. Raises what the request
    raised when it is not a 403 (unreachable, bad credentials, refused API version)."""
    quick = client.options(max_retries=0)
    version: str | None = None
    how = "the user has no monitor privilege"
    try:
        # Not `GET /`: minimal distributions (the integ-test zip) answer it 405, which the
        # transport takes for a dead node; it needs `monitor` as well.
        nodes = await quick.nodes.info(node_id="_local", metric="process")
        found = sorted({str(n.get("version")) for n in nodes.body.get("nodes", {}).values()})
        version = ", ".join(found) or None
        how = "nodes info"
    except ApiError as exc:
        if exc.meta.status != 403:
            raise
    transport = compat_transport(client)
    api_version = (
        transport.compatible_with if transport and transport.compatible_with else CLIENT_MAJOR
    )
    return ClusterInfo(version=version, api_version=api_version, how=how)


async def delete_index(client: AsyncElasticsearch, name: str) -> list[str]:
    """Delete index ``name``, or the indices behind alias ``name`` (Elasticsearch refuses to
    delete an alias's indices by the alias's name). Returns what was deleted; none is an error."""
    resp = await client.options(ignore_status=404).indices.get(index=name)
    indices = [i for i in resp.body if isinstance(resp.body.get(i), dict)] if resp.body else []
    if resp.meta.status == 404 or not indices:
        return []
    await client.options(ignore_status=404).indices.delete(index=",".join(indices))
    return indices


def connections_per_node(settings: Settings) -> int:
    """Enough connections that writes never queue behind searches: a hybrid search holds two
    at once (its rankings run side by side), each of ``http_max_concurrent`` searches may be
    one, and the ingest side holds up to four (a bulk, a look-up, the readiness and the
    outage probes). Waiting for a free connection counts against the request's timeout."""
    return max(10, 2 * settings.http_max_concurrent + 4)


def elasticsearch_client(settings: Settings) -> AsyncElasticsearch:
    kwargs: dict[str, Any] = {
        "request_timeout": settings.es_request_timeout_s,
        "serializer": OrjsonSerializer(),  # bulk bodies are mostly float maps: ~5x faster
        "connections_per_node": connections_per_node(settings),
    }
    if settings.es_username:
        password = settings.es_password.get_secret_value() if settings.es_password else ""
        kwargs["basic_auth"] = (settings.es_username, password)
    if settings.es_api_key is not None:
        kwargs["api_key"] = settings.es_api_key.get_secret_value()
    if settings.es_ca_certs is not None:
        kwargs["ca_certs"] = str(settings.es_ca_certs)
    if settings.es_url.startswith("https"):
        kwargs["verify_certs"] = settings.es_verify_certs
    # negotiates the REST API version with 8.x and 9.x servers (service.elastic)
    return AsyncElasticsearch(settings.es_url, transport_class=CompatibleTransport, **kwargs)


async def check_elasticsearch(client: AsyncElasticsearch, settings: Settings) -> ClusterInfo:
    """The server's version, or :class:`StartupError` saying what to fix. Needs no cluster
    privilege (README: Least privilege): without ``monitor`` only the major version is known."""
    try:
        # One attempt, no retries: the client logs a traceback per retry, which would bury
        # the one line that says what to fix.
        info = await describe_cluster(client)
    except AuthenticationException:
        raise StartupError(
            f"Elasticsearch at {settings.es_url_redacted} refused the credentials: check "
            "SPARSE_INGEST_ES_USERNAME / SPARSE_INGEST_ES_PASSWORD or SPARSE_INGEST_ES_API_KEY"
        ) from None
    except EsConnectionError as exc:
        # str(exc) is just "TLS error" / "Connection error"; the cause is in .message.
        detail = str(getattr(exc, "message", "") or exc)
        hint = ""
        if isinstance(exc, TlsError) or "CERTIFICATE" in detail.upper():
            hint = " (TLS: set SPARSE_INGEST_ES_CA_CERTS to the cluster's CA file)"
        elif settings.es_url.startswith("http:") and "disconnected" in detail:
            hint = " (does it want https://?)"
        raise StartupError(
            f"cannot reach Elasticsearch at {settings.es_url_redacted} (SPARSE_INGEST_ES_URL){hint}: "
            f"{type(exc).__name__}: {detail}"
        ) from None
    except ApiError as exc:
        refused = accepted_versions(exc.meta.status, exc.body)
        why = (
            f"it speaks REST API versions {'/'.join(map(str, refused))} only"
            if refused
            else f"{exc.meta.status} {exc.message}"
        )
        raise StartupError(
            f"Elasticsearch at {settings.es_url_redacted} refused the client ({why}): "
            "sparse-ingest works with Elasticsearch 8.11 and later (8.x, 9.x)"
        ) from None
    if info.too_old():
        raise StartupError(
            f"{info.describe()} at {settings.es_url_redacted} is too old: sparse_vector fields "
            "need Elasticsearch 8.11 or later (8.x, 9.x); upgrade the cluster"
        )
    return info
