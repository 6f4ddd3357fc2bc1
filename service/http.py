"""HTTP on one port: /metrics, /healthz, /readyz, POST /encode, POST /search.

Nothing here writes to Elasticsearch. Request bodies are size-limited and validated; errors are
JSON ``{"error": "..."}`` with a 4xx status that says what to fix. When a bearer token is
configured, /encode and /search require ``Authorization: Bearer <token>``.

Load shedding: at most ``HttpLimits.max_concurrent`` /encode and /search requests are at work at
once (encoding or searching; a request is counted from after its body is validated until its
answer is ready). One more is refused at once with 429, ``Retry-After`` and a JSON error; there is
no wait queue here, because admitted requests already queue at the encoder (one query thread, one
inference call at a time): a second queue would only add latency the client cannot see, while a
429 lets it back off or go to another replica.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from pydantic import SecretStr

from service.metrics import CONTENT_TYPE, Metrics
from service.search import MODES, Searcher

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]

# Seconds a refused (429) client is asked to wait. Admitted work takes milliseconds to about a
# second (BERT-base query under full ingest: p50 0.29 s), so one second frees most slots.
RETRY_AFTER_S = 1


@dataclass(slots=True)
class HttpLimits:
    max_body_bytes: int = 64 * 1024
    max_query_chars: int = 2000
    max_texts: int = 32
    max_size: int = 100
    bearer_token: SecretStr | None = None
    max_concurrent: int = 8  # /encode and /search at work at once; one more gets 429


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class HttpApi:
    def __init__(
        self,
        metrics: Metrics,
        encoder: Any,
        searcher: Searcher | None,
        checks: dict[str, ReadyCheck],
        limits: HttpLimits,
    ) -> None:
        self.metrics = metrics
        self.encoder = encoder
        self.searcher = searcher
        self.checks = checks
        self.limits = limits
        self._at_work = 0  # /encode and /search requests admitted and not yet answered

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_body_bytes, middlewares=[self._mw])
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_post("/encode", self.encode)
        app.router.add_post("/search", self.search)
        return app

    @web.middleware
    async def _mw(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        endpoint = (
            request.match_info.route.resource.canonical
            if request.match_info.route.resource
            else "unknown"
        )
        try:
            if request.method == "POST" and self.limits.bearer_token is not None:
                expected = f"Bearer {self.limits.bearer_token.get_secret_value()}"
                got = request.headers.get("Authorization", "")
                if not hmac.compare_digest(got.encode(), expected.encode()):
                    raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer ...)")
            response = await handler(request)
        except ApiError as exc:
            response = _json({"error": str(exc)}, exc.status)
            response.headers.update(exc.headers)
        except web.HTTPRequestEntityTooLarge:
            response = _json(
                {"error": f"request body over the limit of {self.limits.max_body_bytes} bytes"}, 413
            )
        except web.HTTPException as exc:
            response = _json({"error": exc.reason}, exc.status)
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            response = _json({"error": "internal error; see the service log"}, 500)
        self.metrics.http_requests.labels(endpoint, str(response.status)).inc()
        return response

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        resp = web.Response(body=self.metrics.render())
        resp.headers["Content-Type"] = CONTENT_TYPE
        return resp

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        results: dict[str, Any] = {}
        ready = True
        for name, check in self.checks.items():
            try:
                ok, detail = await check()
            except Exception as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            results[name] = {"ok": ok, "detail": detail}
            ready = ready and ok
        self.metrics.ready.set(1 if ready else 0)
        return _json({"ready": ready, "checks": results}, 200 if ready else 503)

    @contextmanager
    def _work_slot(self, endpoint: str) -> Iterator[None]:
        """Admit one request's encode/search work, or refuse it with 429 when
        ``max_concurrent`` are at work already (no waiting: see the module docstring)."""
        limit = self.limits.max_concurrent
        if self._at_work >= limit:
            self.metrics.http_rejected.labels(endpoint, "max_concurrent").inc()
            raise ApiError(
                429,
                f"overloaded: {limit} /encode and /search requests are at work, the most this "
                f"service takes at once (SPARSE_INGEST_HTTP_MAX_CONCURRENT); retry after "
                f"{RETRY_AFTER_S} s (Retry-After), back off on repeated 429s, or send fewer "
                "requests at once",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self._at_work += 1
        self.metrics.http_inflight.inc()
        try:
            yield
        finally:
            self._at_work -= 1
            self.metrics.http_inflight.dec()

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        return body

    def _text(self, body: dict[str, Any], name: str) -> str:
        value = body.get(name)
        if not isinstance(value, str) or not value.strip():
            raise ApiError(400, f"'{name}' must be a non-empty string")
        if len(value) > self.limits.max_query_chars:
            raise ApiError(
                413,
                f"'{name}' is {len(value)} characters; the limit is {self.limits.max_query_chars}",
            )
        return value

    def _int(self, body: dict[str, Any], name: str, default: int, high: int) -> int:
        value = body.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise ApiError(400, f"'{name}' must be an integer from 1 to {high}")
        return value

    async def encode(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        as_query = body.get("query", False)
        if not isinstance(as_query, bool):
            raise ApiError(400, "'query' must be true or false")
        top = self._int(body, "top", 50, 100_000)
        if "texts" in body:
            texts = body["texts"]
            if not isinstance(texts, list) or not texts or len(texts) > self.limits.max_texts:
                raise ApiError(
                    400, f"'texts' must be a list of 1 to {self.limits.max_texts} strings"
                )
            texts = [self._text({"t": t}, "t") for t in texts]
        else:
            texts = [self._text(body, "text")]
        with self._work_slot("/encode"):
            start = time.perf_counter()
            if as_query:
                vectors = await self.encoder.aencode_queries(texts)
            else:
                vectors = await self.encoder.aencode_documents(texts, priority=True)
            took = time.perf_counter() - start
        out = [dict(sorted(v.items(), key=lambda kv: kv[1], reverse=True)[:top]) for v in vectors]
        return _json(
            {
                "model": self.encoder.metadata.name,
                "took_ms": round(took * 1000, 2),
                "vectors": out,
                "non_zero": [len(v) for v in vectors],
            }
        )

    async def search(self, request: web.Request) -> web.Response:
        if self.searcher is None:
            raise ApiError(503, "search is not configured (no Elasticsearch)")
        body = await self._body(request)
        text = self._text(body, "query")
        mode = body.get("mode", "hybrid")
        if mode not in MODES:
            raise ApiError(400, f"'mode' must be one of {list(MODES)}")
        size = self._int(body, "size", 10, self.limits.max_size)
        with self._work_slot("/search"):
            start = time.perf_counter()
            vector = None
            if mode != "bm25":
                vector = (await self.encoder.aencode_queries([text]))[0]
            hits = await self.searcher.search(mode, text, vector, size)
        return _json(
            {
                "mode": mode,
                "took_ms": round((time.perf_counter() - start) * 1000, 2),
                "hits": [h.as_dict() for h in hits],
            }
        )
