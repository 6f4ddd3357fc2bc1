"""Records in the Confluent wire format, with their schemas fetched by id from a schema registry.

Wire format: magic byte 0, the schema id as 4 bytes big-endian, then the payload; for Protobuf
an array of message indexes (zigzag varints: a count, then the indexes; a single 0 for the first
message of the file) comes before the message. The registry is any Confluent-compatible one:
Confluent Schema Registry, Apicurio Registry under ``/apis/ccompat/v7``, Karapace, Redpanda.

Split in two so that decoding stays synchronous: ``await fetch(ids)`` for the ids of a batch
(the network, once per id: ids are immutable), then ``decode`` for each record (CPU only).

The libraries that do the work: fastavro (Avro), jsonschema + referencing (JSON Schema), protobuf's
descriptor pool and message factory (Protobuf, no generated code). A Protobuf schema comes from
the registry either as a serialized FileDescriptorProto (base64; Confluent with
``?format=serialized``, and any registry where the schema was registered so, as the Python
client does) or as ``.proto`` text (Apicurio always, whatever ``format`` says): text is compiled
with protoc from grpcio-tools, in a subprocess (a compiler crash on a hostile schema must not end
the service), once per schema id.

Decoded values are plain JSON data for Elasticsearch: bytes as base64 text, decimals as strings,
dates and times as ISO 8601 strings, enums as their names, non-finite floats as "NaN",
"Infinity", "-Infinity" (the Protobuf JSON mapping's spelling). Details of errors never hold a
record's content (it may be personal data): only types, lengths, positions, field names.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import decimal
import importlib.util
import io
import logging
import math
import os
import ssl
import struct
import sys
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
import fastavro
import jsonschema
import orjson
import referencing
import referencing.exceptions
import referencing.jsonschema
import regex
from fastavro import _read_py as fastavro_py
from google.protobuf import (
    any_pb2,  # noqa: F401  (the well-known types: loaded into the default pool for imports)
    api_pb2,  # noqa: F401
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,  # noqa: F401
    empty_pb2,  # noqa: F401
    field_mask_pb2,  # noqa: F401
    json_format,
    message_factory,
    source_context_pb2,  # noqa: F401
    struct_pb2,  # noqa: F401
    timestamp_pb2,  # noqa: F401
    type_pb2,  # noqa: F401
    wrappers_pb2,  # noqa: F401
)
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from google.protobuf.message import DecodeError, Message
from yarl import URL

from service.messages import BadRecord

log = logging.getLogger(__name__)

Format = Literal["avro", "json-schema", "protobuf"]

MAGIC_BYTE = 0
HEADER_BYTES = 5
# The registry's names of the schema types (``schemaType``; absent means AVRO).
_REGISTRY_TYPE: dict[str, str] = {"avro": "AVRO", "json-schema": "JSON", "protobuf": "PROTOBUF"}
_TYPE_NAME = {"AVRO": "Avro", "JSON": "JSON Schema", "PROTOBUF": "Protobuf"}
# Concurrent requests to the registry (per SchemaRegistry) and protoc runs.
MAX_CONCURRENT_REQUESTS = 8
MAX_CONCURRENT_PROTOC = 2
PROTOC_TIMEOUT_S = 60.0
# An id the registry did not have is asked again after this long: ids are immutable, but a
# registry may be restored from a backup, or be the wrong one for a while.
UNKNOWN_RETRY_S = 300.0
MAX_SCHEMA_ID = 2**31 - 1  # ids are signed 32-bit integers (Confluent's serializers)
# JSON Schema "pattern": a regular expression with catastrophic backtracking must not hold the
# event loop (and the group's heartbeats) for minutes
PATTERN_TIMEOUT_S = 0.1
# an Avro decimal's bytes: at most what its precision needs (and never more than this)
MAX_DECIMAL_BYTES = 512
MAX_REFERENCE_DEPTH = 32
MAX_MESSAGE_INDEXES = 100
_DETAIL_CHARS = 300
_AUTH_HINT = (
    "set SPARSE_INGEST_SCHEMA_REGISTRY_USERNAME and SPARSE_INGEST_SCHEMA_REGISTRY_PASSWORD "
    "(a user that may read schemas and subjects)"
)


class RegistryUnavailable(Exception):
    """The registry did not answer (down, 5xx, timeout): retry later, nothing is lost."""


class _SchemaProblem(Exception):
    """A schema that cannot be used (remembered for its id: ids are immutable)."""


def wire_schema_id(data: bytes | None) -> int | None:
    """The schema id of a wire-format payload, else None."""
    if data is None or len(data) < HEADER_BYTES or data[0] != MAGIC_BYTE:
        return None
    return int.from_bytes(data[1:HEADER_BYTES], "big")


# --- parsed schemas -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Avro:
    schema: Any  # fastavro's parsed schema
    recursive: bool  # read with fastavro's Python reader (its C reader overflows the stack)
    schema_type: str = "AVRO"


@dataclass(frozen=True, slots=True)
class _Json:
    validator: Any  # a jsonschema Validator
    schema_type: str = "JSON"


@dataclass(slots=True)
class _Proto:
    pool: descriptor_pool.DescriptorPool
    top: tuple[Descriptor, ...]  # the file's messages, in order (message index 0, 1, ...)
    classes: dict[tuple[int, ...], type[Message]] = field(default_factory=dict)
    schema_type: str = "PROTOBUF"


@dataclass(frozen=True, slots=True)
class _Unsupported:
    schema_type: str
    detail: str


@dataclass(frozen=True, slots=True)
class _Unknown:
    retry_at: float


_Entry = _Avro | _Json | _Proto | _Unsupported | _Unknown


@dataclass(frozen=True, slots=True)
class _Ref:
    """A referenced schema: the name it is imported/referred to by, and its text."""

    name: str
    schema_type: str
    schema: str


class SchemaRegistry:
    """Schemas by id from a Confluent-compatible registry, cached (ids are immutable)."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        verify: bool = True,
        timeout_s: float = 10.0,
        max_cached: int = 10_000,
    ) -> None:
        base = URL(url.strip().rstrip("/"))
        if not base.is_absolute() or base.scheme not in ("http", "https"):
            raise ValueError("the schema registry URL must be an absolute http(s):// URL")
        if base.user is not None and username is None:  # http://user:password@host
            username, password = base.user, base.password
        if password is not None and username is None:
            raise ValueError("a schema registry password needs a username")
        self._base = base.with_user(None).with_password(None).with_query(None).with_fragment(None)
        self._shown = str(self._base)  # never the credentials
        self._headers = {"Accept": "application/vnd.schemaregistry.v1+json, application/json"}
        if username is not None:  # Basic authentication (aiohttp's BasicAuth is deprecated)
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
        self._ssl: ssl.SSLContext | bool = True
        if not verify:
            self._ssl = False
        elif ca_file:
            self._ssl = ssl.create_default_context(cafile=ca_file)  # a bad file fails here
        self._timeout_s = timeout_s
        self._max_cached = max(1, max_cached)
        self._cache: OrderedDict[int, _Entry] = OrderedDict()
        self._inflight: dict[int, asyncio.Future[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._requests = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
        self._protoc = asyncio.Semaphore(MAX_CONCURRENT_PROTOC)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def known(self, schema_id: int) -> bool:
        """fetched already (found, or known to be unknown)"""
        entry = self._cache.get(schema_id)
        if isinstance(entry, _Unknown):
            return time.monotonic() < entry.retry_at
        return entry is not None

    async def fetch(self, schema_ids: Iterable[int]) -> None:
        """Fetch the schemas not known yet (concurrently, bounded). A 404 is remembered as unknown
        (decode then raises BadRecord('unknown_schema', ...)); an outage raises RegistryUnavailable
        (nothing remembered). 401/403: raise RegistryUnavailable too but with a message naming
        SPARSE_INGEST_SCHEMA_REGISTRY_USERNAME/PASSWORD."""
        wanted = list(dict.fromkeys(schema_ids))
        missing = [i for i in wanted if not self.known(i)]
        results = await asyncio.gather(
            *(self._fetch_shared(i) for i in missing), return_exceptions=True
        )
        # the batch's ids stay (it decodes next), whatever the bound: the oldest others go
        for schema_id in wanted:
            if schema_id in self._cache:
                self._cache.move_to_end(schema_id)
        keep = set(wanted)
        while len(self._cache) > self._max_cached:
            oldest = next(iter(self._cache))
            if oldest in keep:
                break
            del self._cache[oldest]
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:  # a bug first, then the first outage
            if not isinstance(failure, RegistryUnavailable):
                raise failure
        if failures:
            raise failures[0]

    def decode(self, data: bytes, expected: Format, where: str) -> object:
        """The payload as plain JSON data. Raises BadRecord: 'not_wire_format',
        'unknown_schema', 'schema_type_mismatch', 'schema_mismatch', 'unsupported_schema'.
        The schema id must have been fetched (``fetch``) before: a RuntimeError otherwise."""
        schema_id = wire_schema_id(data)
        if schema_id is None:
            raise BadRecord("not_wire_format", _not_wire_format(data, where))
        entry = self._cache.get(schema_id)
        if entry is None:
            raise RuntimeError(f"schema id {schema_id} was not fetched before decode()")
        self._cache.move_to_end(schema_id)
        if isinstance(entry, _Unknown):
            raise BadRecord(
                "unknown_schema",
                f"{where}: schema id {schema_id} is not in the schema registry at {self._shown}",
            )
        wanted = _REGISTRY_TYPE.get(expected)
        if wanted is None:
            raise ValueError(f"expected must be one of {sorted(_REGISTRY_TYPE)}, not {expected!r}")
        if entry.schema_type != wanted:
            got = _TYPE_NAME.get(entry.schema_type, entry.schema_type)
            raise BadRecord(
                "schema_type_mismatch",
                f"{where} is written with schema id {schema_id}, of type {got}, "
                f"where {expected} is configured",
            )
        if isinstance(entry, _Unsupported):
            raise BadRecord("unsupported_schema", f"{where}: schema id {schema_id}: {entry.detail}")
        payload = memoryview(data)[HEADER_BYTES:]
        if isinstance(entry, _Avro):
            return _decode_avro(entry, payload, where, schema_id)
        if isinstance(entry, _Json):
            return _decode_json(entry, payload, where, schema_id)
        return _decode_protobuf(entry, payload, where, schema_id)

    # --- fetching ---------------------------------------------------------------------------

    async def _fetch_shared(self, schema_id: int) -> None:
        """One request per id however many batches ask for it at once; remembered when done
        (even if the batch that asked was cancelled meanwhile)."""
        future = self._inflight.get(schema_id)
        if future is None:
            future = asyncio.ensure_future(self._remember_fetched(schema_id))
            self._inflight[schema_id] = future
            future.add_done_callback(lambda f: self._fetch_done(schema_id, f))
        await asyncio.shield(future)

    def _fetch_done(self, schema_id: int, future: asyncio.Future[None]) -> None:
        self._inflight.pop(schema_id, None)
        if not future.cancelled():
            future.exception()  # retrieved: whoever awaited it reports it

    async def _remember_fetched(self, schema_id: int) -> None:
        self._cache[schema_id] = await self._fetch_one(schema_id)

    async def _fetch_one(self, schema_id: int) -> _Entry:
        what = f"schema id {schema_id}"
        if schema_id > MAX_SCHEMA_ID:
            # Confluent's serializers write a signed 32-bit id and its registry answers such an
            # id with a bare 404 (a path that does not parse), which reads as a wrong URL
            return _Unknown(time.monotonic() + UNKNOWN_RETRY_S)
        body = await self._get(f"schemas/ids/{schema_id}", what)
        if body is None:
            return _Unknown(time.monotonic() + UNKNOWN_RETRY_S)
        if _schema_type(body) == "PROTOBUF" and not _is_serialized_proto(body.get("schema")):
            # Confluent turns .proto text into a FileDescriptorProto on request (no protoc
            # needed); Apicurio ignores the parameter and answers the text again
            try:
                serialized = await self._get(f"schemas/ids/{schema_id}", what, format="serialized")
            except RegistryUnavailable:  # a registry that refuses the parameter: protoc then
                serialized = None
            if serialized is not None and _is_serialized_proto(serialized.get("schema")):
                body = serialized
        return await self._load(schema_id, body)

    async def _load(self, schema_id: int, body: dict[str, Any]) -> _Entry:
        """A registry's answer for a schema id, parsed (references fetched)."""
        schema_type = _schema_type(body)
        schema = body.get("schema")
        if not isinstance(schema, str):
            raise RegistryUnavailable(
                f"the schema registry at {self._shown} answered schema id {schema_id} "
                "without a schema string"
            )
        try:
            refs = await self._references(body.get("references"), schema_type)
            if schema_type == "AVRO":
                return _parse_avro(schema, refs)
            if schema_type == "JSON":
                return _parse_json(schema, refs)
            if schema_type == "PROTOBUF":
                return await self._parse_protobuf(schema_id, schema, refs)
            raise _SchemaProblem(f"the schema type {schema_type!r} is not supported")
        except _SchemaProblem as e:
            return _Unsupported(schema_type, _clip(str(e)))
        except RegistryUnavailable:
            raise
        except RecursionError:
            return _Unsupported(schema_type, "the schema nests too deeply")
        except OSError as e:  # running protoc failed (no file descriptors, memory): try again
            raise RegistryUnavailable(
                f"schema id {schema_id} could not be compiled now ({type(e).__name__}: {e})"
            ) from e
        except Exception as e:  # a library's surprise on an odd schema must not stop the stream
            log.exception("schema id %d (%s) cannot be used", schema_id, schema_type)
            return _Unsupported(schema_type, _clip(f"it cannot be used: {type(e).__name__}: {e}"))

    async def _references(self, refs: object, schema_type: str) -> list[_Ref]:
        """The referenced schemas, transitively: dependencies before their dependents, once."""
        out: list[_Ref] = []
        seen: set[tuple[str, str]] = set()

        async def visit(refs: object, depth: int) -> None:
            if refs is None:
                return
            if not isinstance(refs, list):
                raise _SchemaProblem("its references are not a list")
            if refs and depth >= MAX_REFERENCE_DEPTH:
                raise _SchemaProblem(f"references nest deeper than {MAX_REFERENCE_DEPTH} levels")
            for ref in refs:
                name = ref.get("name") if isinstance(ref, dict) else None
                subject = ref.get("subject") if isinstance(ref, dict) else None
                version = ref.get("version") if isinstance(ref, dict) else None
                if (
                    not isinstance(name, str)
                    or not isinstance(subject, str)
                    or not isinstance(version, int | str)
                    or isinstance(version, bool)
                ):
                    raise _SchemaProblem("a reference without a name, subject and version")
                key = (subject, str(version))
                if key in seen:
                    continue
                seen.add(key)
                what = f"reference {name!r} (subject {subject!r} version {version})"
                path = f"subjects/{quote(subject, safe='')}/versions/{quote(str(version), safe='')}"
                params = {"format": "serialized"} if schema_type == "PROTOBUF" else {}
                body = await self._get(path, what, **params)
                if body is None:
                    raise _SchemaProblem(f"its {what} is not in the schema registry")
                text = body.get("schema")
                if not isinstance(text, str):
                    raise _SchemaProblem(f"its {what} came without a schema string")
                await visit(body.get("references"), depth + 1)
                out.append(_Ref(name, _schema_type(body), text))

        await visit(refs, 0)
        return out

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=MAX_CONCURRENT_REQUESTS),
                headers=self._headers,
            )
        return self._session

    async def probe(self) -> str | None:
        """What is wrong with the settings, if the registry says so (``GET subjects``: a wrong
        URL, refused credentials), else None. An outage raises RegistryUnavailable."""
        url = URL(f"{self._base}/subjects", encoded=True)
        try:
            async with self._requests, self._client().get(url) as resp:
                status, raw = resp.status, await resp.read()
        except (TimeoutError, aiohttp.ClientError) as e:
            raise RegistryUnavailable(
                f"the schema registry at {self._shown} could not be reached: {type(e).__name__}"
            ) from e
        if status in (401, 403):
            return f"the schema registry at {self._shown} refused the credentials: {_AUTH_HINT}"
        if status >= 500:
            raise RegistryUnavailable(f"the schema registry at {self._shown} answered {status}")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if status != 200 or not isinstance(body, list):
            return (
                f"{self._shown} answered {status} to GET subjects without the list of a schema "
                "registry: give the Confluent-compatible API's base URL (Apicurio Registry: "
                ".../apis/ccompat/v7)"
            )
        return None

    async def _get(self, path: str, what: str, **params: str) -> dict[str, Any] | None:
        """The JSON object answered, None for the registry's own 404, else RegistryUnavailable."""
        url = URL(f"{self._base}/{path}", encoded=True)
        if params:
            url = url.with_query(params)
        try:
            async with self._requests, self._client().get(url) as resp:
                status = resp.status
                raw = await resp.read()
        except TimeoutError as e:
            raise RegistryUnavailable(
                f"the schema registry at {self._shown} did not answer within "
                f"{self._timeout_s:g} s (fetching {what})"
            ) from e
        except aiohttp.ClientError as e:
            raise RegistryUnavailable(
                f"the schema registry at {self._shown} could not be reached (fetching {what}): "
                f"{type(e).__name__}: {_clip(str(e))}"
            ) from e
        try:
            body: object = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if status == 200:
            if not isinstance(body, dict):
                raise RegistryUnavailable(
                    f"the schema registry at {self._shown} answered {what} with something that "
                    "is not a JSON object: is the URL the registry's Confluent-compatible API?"
                )
            return body
        code = body.get("error_code") if isinstance(body, dict) else None
        message = body.get("message") if isinstance(body, dict) else None
        said = f": {_clip(message)}" if isinstance(message, str) and message else ""
        if status == 404 and isinstance(code, int) and 40400 <= code < 40500:
            return None
        if status == 404:
            raise RegistryUnavailable(
                f"the schema registry at {self._shown} answered 404 without a registry error "
                f"(fetching {what}): is that the registry's Confluent-compatible API? "
                "(Apicurio Registry: .../apis/ccompat/v7)"
            )
        if status in (401, 403):
            raise RegistryUnavailable(
                f"the schema registry at {self._shown} refused the request (HTTP {status}, "
                f"fetching {what}){said}: {_AUTH_HINT}"
            )
        raise RegistryUnavailable(
            f"the schema registry at {self._shown} answered HTTP {status} (fetching {what}){said}"
        )

    # --- Protobuf ---------------------------------------------------------------------------

    async def _parse_protobuf(self, schema_id: int, schema: str, refs: list[_Ref]) -> _Proto:
        binary: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        text: dict[str, str] = {}
        for ref in refs:
            if ref.schema_type != "PROTOBUF":
                raise _SchemaProblem(f"its reference {ref.name!r} is a {ref.schema_type} schema")
            proto = _serialized_proto(ref.schema)
            if proto is not None:
                proto.name = ref.name  # what its dependents import it as
                binary[ref.name] = proto
            else:
                text[ref.name] = ref.schema
        main = _serialized_proto(schema)
        if main is not None and not text:
            files = dict(binary)
            files[main.name] = main
            return _proto_schema(files, main.name)
        if main is not None:  # protoc compiles the text it imports; it is given as it is
            target = main.name or f"sparse_ingest_schema_{schema_id}.proto"
            binary[target] = main
        else:
            target = f"sparse_ingest_schema_{schema_id}.proto"
            text[target] = schema
        async with self._protoc:
            files = await _compile_protos(text, binary, target)
        return _proto_schema(files, target)

    async def _remember(self, schema_id: int, body: dict[str, Any]) -> None:
        """Parses a registry's answer for an id and caches it (what fetch does after its GET)."""
        self._cache[schema_id] = await self._load(schema_id, body)


# --- helpers: the registry's answers --------------------------------------------------------


def _schema_type(body: dict[str, Any]) -> str:
    schema_type = body.get("schemaType")
    return schema_type.upper() if isinstance(schema_type, str) and schema_type else "AVRO"


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 1] + "…"


def _not_wire_format(data: bytes | None, where: str) -> str:
    if data is None:
        return f"{where} is null, not a schema registry wire-format payload"
    if len(data) < HEADER_BYTES:
        return (
            f"{where} has {len(data)} byte(s), fewer than the {HEADER_BYTES} of the schema "
            "registry wire format's header"
        )
    if data[0] == 1:
        return (
            f"{where} starts with magic byte 1 (a schema GUID), which is not supported: "
            "only magic byte 0 (a schema id)"
        )
    return f"{where} does not start with the schema registry wire format's magic byte 0"


# --- Avro -----------------------------------------------------------------------------------


def _parse_avro(schema: str, refs: list[_Ref]) -> _Avro:
    named: dict[str, Any] = {}
    try:
        for ref in refs:
            if ref.schema_type != "AVRO":
                raise _SchemaProblem(f"its reference {ref.name!r} is a {ref.schema_type} schema")
            fastavro.parse_schema(orjson.loads(ref.schema), named)
        parsed = fastavro.parse_schema(orjson.loads(schema), named)
    except _SchemaProblem:
        raise
    except RecursionError as e:
        raise _SchemaProblem("the Avro schema nests too deeply") from e
    except Exception as e:  # fastavro raises SchemaParseException, UnknownType, ValueError, ...
        raise _SchemaProblem(f"not a valid Avro schema: {type(e).__name__}: {e}") from e
    recursive, zero_width = _avro_shape(parsed, named)
    if zero_width:
        raise _SchemaProblem(
            "it has an array of items that take zero bytes (null, or records of nothing but "
            "nulls): a record of a few bytes could claim billions of them"
        )
    return _Avro(parsed, recursive)


def _avro_shape(schema: Any, named: dict[str, Any]) -> tuple[bool, bool]:
    """(recursive, has an array of zero-byte items) for a parsed Avro schema."""
    recursive = False
    zero_array = False
    widths: dict[str, bool] = {}  # named type -> may take zero bytes (after its visit)
    stack: list[str] = []

    def zero(s: Any) -> bool:
        """Whether a value of ``s`` may be encoded in zero bytes; notes what it finds."""
        nonlocal recursive, zero_array
        if isinstance(s, str):
            if s == "null":
                return True
            if s in named:
                if s in stack:
                    recursive = True
                    return False  # a recursive reference: a value of it is in a union
                if s not in widths:
                    widths[s] = zero(named[s])
                return widths[s]
            return False  # the other primitives take at least one byte
        if isinstance(s, list):  # a union: the branch index takes a byte
            for branch in s:
                zero(branch)
            return False
        if isinstance(s, dict):
            kind = s.get("type")
            if kind in ("record", "error"):
                name = s.get("name", "")
                stack.append(name)
                try:
                    empty = all([zero(f["type"]) for f in s.get("fields", [])])
                finally:
                    stack.pop()
                widths[name] = empty
                return empty
            if kind == "array":
                if zero(s["items"]):
                    zero_array = True
                return False  # the block count takes a byte
            if kind == "map":
                zero(s["values"])
                return False
            if kind == "fixed":
                return int(s.get("size", 1)) == 0
            if kind == "enum":
                return False
            return zero(kind)
        return False

    zero(schema)
    return recursive, zero_array


def _bounded_decimal_reader(read: Any) -> Any:
    """fastavro's decimal reader, refusing more bytes than the precision needs: a decimal of a
    million bytes takes minutes to convert (and overflows in the end)."""

    def bounded(data: bytes, writer_schema: Any = None, reader_schema: Any = None) -> Any:
        schema = writer_schema or {}
        precision = int(schema.get("precision") or 0)
        # log2(10) / 8 bytes per digit; a fixed decimal has the size its schema gives
        needed = max(int(precision * 0.4152) + 2, int(schema.get("size") or 0))
        limit = min(MAX_DECIMAL_BYTES, needed)
        if len(data) > limit:
            raise ValueError("decimal bytes longer than its precision allows")
        return read(data, writer_schema, reader_schema)

    return bounded


# One table serves fastavro's C and Python readers (this process's readers only).
for _name in ("bytes-decimal", "fixed-decimal"):
    fastavro.read.LOGICAL_READERS[_name] = _bounded_decimal_reader(
        fastavro.read.LOGICAL_READERS[_name]
    )


def _decode_avro(entry: _Avro, payload: memoryview, where: str, schema_id: int) -> object:
    stream = io.BytesIO(payload)
    try:
        if entry.recursive:  # fastavro's C reader has no depth limit: its stack would overflow
            value = fastavro_py.schemaless_reader(stream, entry.schema)
        else:
            value = fastavro.schemaless_reader(stream, entry.schema)
    except EOFError as e:
        raise BadRecord(
            "schema_mismatch",
            f"{where} ({len(payload)} bytes of Avro) is truncated for its schema id {schema_id}",
        ) from e
    except UnicodeDecodeError as e:
        raise BadRecord(
            "schema_mismatch",
            f"{where} has a string that is not UTF-8 at byte {e.start} of a value "
            f"(Avro, schema id {schema_id})",
        ) from e
    except RecursionError as e:
        raise BadRecord(
            "schema_mismatch", f"{where} nests too deeply (Avro, schema id {schema_id})"
        ) from e
    except Exception as e:  # e.g. a union or enum index out of range, an impossible date
        raise BadRecord(
            "schema_mismatch",
            f"{where} cannot be read with its Avro schema id {schema_id} ({type(e).__name__})",
        ) from e
    left = len(payload) - stream.tell()
    if left:
        raise BadRecord(
            "schema_mismatch",
            f"{where} has {left} byte(s) left over after its Avro value (schema id {schema_id}): "
            "not written with that schema",
        )
    try:
        return _plain(value)
    except RecursionError as e:
        raise BadRecord(
            "schema_mismatch", f"{where} nests too deeply (Avro, schema id {schema_id})"
        ) from e


def _plain(value: Any) -> Any:
    """fastavro's values as JSON data."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _non_finite(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, decimal.Decimal):
        return format(value, "f")  # never exponent notation: "0.0000001", not "1E-7"
    if isinstance(value, dt.date | dt.time):  # datetime is a date
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"no JSON form for a {type(value).__name__}")


def _non_finite(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


# --- JSON Schema ----------------------------------------------------------------------------


def _parse_json(schema: str, refs: list[_Ref]) -> _Json:
    try:
        contents = orjson.loads(schema)
    except orjson.JSONDecodeError as e:
        raise _SchemaProblem(f"the JSON Schema is not JSON ({e})") from e
    if not isinstance(contents, dict | bool):
        raise _SchemaProblem("the JSON Schema is neither an object nor a boolean")
    cls = jsonschema.validators.validator_for(contents, default=jsonschema.Draft7Validator)
    try:
        cls.check_schema(contents)
    except jsonschema.SchemaError as e:
        raise _SchemaProblem(
            f"not a valid JSON Schema: {e.message} (at {_pointer(e.absolute_path)})"
        ) from e
    default = referencing.jsonschema.specification_with(
        cls.META_SCHEMA.get("$schema", ""), default=referencing.jsonschema.DRAFT7
    )
    resources: list[tuple[str, referencing.Resource[Any]]] = []
    for ref in refs:
        if ref.schema_type != "JSON":
            raise _SchemaProblem(f"its reference {ref.name!r} is a {ref.schema_type} schema")
        try:
            resource = referencing.Resource.from_contents(
                orjson.loads(ref.schema), default_specification=default
            )
        except (orjson.JSONDecodeError, referencing.exceptions.CannotDetermineSpecification) as e:
            raise _SchemaProblem(f"its reference {ref.name!r} is not a JSON Schema") from e
        resources.append((ref.name, resource))
        if resource.id():
            resources.append((str(resource.id()), resource))
    registry: referencing.Registry[Any] = referencing.Registry().with_resources(resources)
    bounded = jsonschema.validators.extend(
        cls,
        {
            "uniqueItems": _unique_items,
            "pattern": _pattern,
            "patternProperties": _pattern_properties,
        },
    )
    return _Json(bounded(contents, registry=registry))


class _TooSlow(Exception):
    """A regular expression of the schema took too long on a value."""


def _search(pattern: str, text: str) -> bool:
    try:
        return regex.search(pattern, text, timeout=PATTERN_TIMEOUT_S) is not None
    except TimeoutError as e:
        raise _TooSlow from e


def _canonical(value: Any) -> Any:
    """JSON Schema equality: 1 and 1.0 are equal, true and 1 are not; key order is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return value


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Iterable[Any]:
    """jsonschema's own check compares every pair (quadratic on a long array): by hashing."""
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[bytes] = set()
    for item in instance:
        key = orjson.dumps([type(item) is bool, _canonical(item)], option=orjson.OPT_SORT_KEYS)
        if key in seen:
            yield jsonschema.ValidationError("has non-unique elements")
            return
        seen.add(key)


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterable[Any]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield jsonschema.ValidationError("does not match its pattern")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterable[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _decode_json(entry: _Json, payload: memoryview, where: str, schema_id: int) -> object:
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise BadRecord(
            "schema_mismatch",
            f"{where} ({len(payload)} bytes after the header) is not JSON: the error is at "
            f"byte {e.pos} (JSON Schema id {schema_id})",
        ) from e
    try:
        error = jsonschema.exceptions.best_match(entry.validator.iter_errors(value))
    except referencing.exceptions.Unresolvable as e:
        raise BadRecord(
            "unsupported_schema",
            f"{where}: JSON Schema id {schema_id} refers to {_clip(str(e.ref))!r}, "
            "which is not among its references",
        ) from e
    except RecursionError as e:
        raise BadRecord(
            "schema_mismatch", f"{where} nests too deeply (JSON Schema id {schema_id})"
        ) from e
    except _TooSlow as e:
        raise BadRecord(
            "schema_mismatch",
            f"{where}: a 'pattern' of JSON Schema id {schema_id} took more than "
            f"{PATTERN_TIMEOUT_S:g} s on a value (catastrophic backtracking): taken as a mismatch",
        ) from e
    if error is not None:
        raise BadRecord(
            "schema_mismatch",
            f"{where} fails its JSON Schema (id {schema_id}) at {_pointer(error.absolute_path)}: "
            f"keyword {error.validator!r} (schema path {_pointer(error.absolute_schema_path)})",
        )
    return value


def _pointer(path: Iterable[object]) -> str:
    """A JSON pointer: field names and list positions only, never values."""
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in path]
    return "/" + "/".join(parts) if parts else "/ (the top)"


# --- Protobuf -------------------------------------------------------------------------------


def _is_serialized_proto(schema: object) -> bool:
    return isinstance(schema, str) and _serialized_proto(schema) is not None


def _serialized_proto(schema: str) -> descriptor_pb2.FileDescriptorProto | None:
    """A base64 FileDescriptorProto, else None (then it is .proto text)."""
    try:
        raw = base64.b64decode(schema.strip(), validate=True)
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
    except (binascii.Error, ValueError, DecodeError):
        return None
    return proto if proto.name or proto.message_type else None


def _proto_schema(files: dict[str, descriptor_pb2.FileDescriptorProto], main: str) -> _Proto:
    """A pool of its own (versions of one file must not meet), the files added deps first."""
    pool = descriptor_pool.DescriptorPool()
    by_name = {proto.name or name: proto for name, proto in files.items()}
    added: set[str] = set()

    def add(name: str, via: str, depth: int = 0) -> None:
        if name in added:
            return
        if depth > MAX_REFERENCE_DEPTH:
            raise _SchemaProblem("its imports nest too deeply (or in a cycle)")
        proto = by_name.get(name)
        if proto is None:
            well_known = _well_known(name)
            if well_known is None:
                raise _SchemaProblem(
                    f"{via} imports {name!r}, which is neither among its references nor a "
                    "well-known type (google/protobuf/*.proto)"
                )
            proto = well_known
        for dependency in proto.dependency:
            add(dependency, name, depth + 1)
        try:
            pool.Add(proto)
        except (TypeError, ValueError) as e:
            raise _SchemaProblem(f"{name!r} cannot be loaded: {e}") from e
        added.add(name)

    main_proto = files.get(main) or by_name[main]
    add(main_proto.name, main_proto.name)
    try:
        top = tuple(
            pool.FindMessageTypeByName(_qualified(main_proto.package, m.name))
            for m in main_proto.message_type
        )
    except KeyError as e:
        raise _SchemaProblem(f"a message of {main_proto.name!r} cannot be found: {e}") from e
    if not top:
        raise _SchemaProblem("the Protobuf schema defines no message")
    return _Proto(pool, top)


def _qualified(package: str, name: str) -> str:
    return f"{package}.{name}" if package else name


def _well_known(name: str) -> descriptor_pb2.FileDescriptorProto | None:
    if not name.startswith("google/protobuf/"):
        return None
    try:
        found: FileDescriptor = descriptor_pool.Default().FindFileByName(name)
    except KeyError:
        return None
    return descriptor_pb2.FileDescriptorProto.FromString(found.serialized_pb)


def _safe_proto_path(name: str) -> str:
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or "\\" in name
        or "\0" in name
    ):
        raise _SchemaProblem(f"the reference name {name!r} is not a relative .proto path")
    return name


async def _compile_protos(
    text: dict[str, str], binary: dict[str, descriptor_pb2.FileDescriptorProto], main: str
) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """.proto text compiled by protoc (grpcio-tools), with the binary ones as its inputs."""
    if importlib.util.find_spec("grpc_tools") is None:
        raise _SchemaProblem(
            "it is .proto text, which needs protoc from the grpcio-tools package (not installed)"
        )
    with tempfile.TemporaryDirectory(prefix="sparse-ingest-protoc-") as tmp:
        args = _protoc_inputs(tmp, text, binary, main)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            *args,
            cwd=os.path.join(tmp, "src"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(process.communicate(), PROTOC_TIMEOUT_S)
        except TimeoutError as e:
            process.kill()
            await process.wait()
            raise _SchemaProblem(f"protoc did not finish within {PROTOC_TIMEOUT_S:g} s") from e
        if process.returncode != 0:
            said = err.decode("utf-8", "replace").replace(tmp + os.sep, "").strip()
            raise _SchemaProblem(
                f"protoc could not compile it (exit {process.returncode}): {said or 'no message'}"
            )
        return _protoc_output(tmp)


def _protoc_inputs(
    tmp: str, text: dict[str, str], binary: dict[str, descriptor_pb2.FileDescriptorProto], main: str
) -> list[str]:
    """Writes protoc's inputs under ``tmp`` (small files: a few ms); its arguments."""
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    for name, source in text.items():
        path = os.path.join(src, _safe_proto_path(name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
    args = [f"--proto_path={src}", "--include_imports", f"--descriptor_set_out={tmp}/out.pb"]
    if binary:
        given = descriptor_pb2.FileDescriptorSet()
        for name, proto in binary.items():
            given.file.append(proto)
            given.file[-1].name = name
        with open(os.path.join(tmp, "in.pb"), "wb") as f:
            f.write(given.SerializeToString())
        args.append(f"--descriptor_set_in={tmp}/in.pb")
    args.append(main)
    return args


def _protoc_output(tmp: str) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    with open(os.path.join(tmp, "out.pb"), "rb") as f:
        compiled = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    return {proto.name: proto for proto in compiled.file}


def _message_indexes(payload: memoryview) -> tuple[tuple[int, ...], int]:
    """The message indexes and where the message starts."""
    count, pos = _zigzag_varint(payload, 0)
    if count == 0:
        return (0,), pos
    if not 0 < count <= MAX_MESSAGE_INDEXES:
        raise ValueError(f"a message index count of {count}")
    indexes = []
    for _ in range(count):
        index, pos = _zigzag_varint(payload, pos)
        if index < 0:
            raise ValueError("a negative message index")
        indexes.append(index)
    return tuple(indexes), pos


def _zigzag_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 64, 7):
        if pos >= len(data):
            raise ValueError("the message indexes are truncated")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (value >> 1) ^ -(value & 1), pos
    raise ValueError("a message index varint longer than 64 bits")


def _message_class(entry: _Proto, indexes: tuple[int, ...]) -> type[Message]:
    cls = entry.classes.get(indexes)
    if cls is None:
        if indexes[0] >= len(entry.top):
            raise LookupError(f"message index {indexes[0]} of {len(entry.top)} top-level")
        descriptor = entry.top[indexes[0]]
        for index in indexes[1:]:
            if index >= len(descriptor.nested_types):
                raise LookupError(
                    f"nested message index {index} of {len(descriptor.nested_types)} "
                    f"in {descriptor.full_name}"
                )
            descriptor = descriptor.nested_types[index]
        cls = message_factory.GetMessageClass(descriptor)
        entry.classes[indexes] = cls
    return cls


def _decode_protobuf(entry: _Proto, payload: memoryview, where: str, schema_id: int) -> object:
    try:
        indexes, start = _message_indexes(payload)
        cls = _message_class(entry, indexes)
    except (ValueError, LookupError) as e:
        raise BadRecord(
            "schema_mismatch",
            f"{where} has message indexes that do not fit its Protobuf schema id {schema_id}: {e}",
        ) from e
    message = cls()
    try:
        message.ParseFromString(bytes(payload[start:]))
    except (DecodeError, RuntimeError, ValueError) as e:
        raise BadRecord(
            "schema_mismatch",
            f"{where} ({len(payload) - start} bytes of Protobuf) is not a valid "
            f"{cls.DESCRIPTOR.full_name} (schema id {schema_id})",
        ) from e
    try:
        return _proto_plain(message, entry.pool)
    except RecursionError as e:
        raise BadRecord(
            "schema_mismatch", f"{where} nests too deeply (Protobuf, schema id {schema_id})"
        ) from e
    except (ValueError, TypeError) as e:  # e.g. a Timestamp past year 9999, a NaN in a Value
        raise BadRecord(
            "schema_mismatch",
            f"{where} has a well-known type value with no JSON form ({type(e).__name__}; "
            f"{cls.DESCRIPTOR.full_name}, schema id {schema_id})",
        ) from e


_WRAPPERS = frozenset(
    f"google.protobuf.{n}Value"
    for n in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
_JSON_MAPPED = frozenset(
    {
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
        "google.protobuf.Struct",
        "google.protobuf.Value",
        "google.protobuf.ListValue",
        "google.protobuf.Empty",
    }
)


def _proto_plain(message: Message, pool: descriptor_pool.DescriptorPool) -> Any:
    """A message as JSON data: the .proto field names; 64-bit integers as numbers (not the
    JSON mapping's strings); fields without presence with their default values; fields with
    presence (messages, ``optional``, oneof members) only when set; well-known types in their
    JSON mapping (a Timestamp as RFC 3339 text, a wrapper as its value)."""
    descriptor = message.DESCRIPTOR
    name = descriptor.full_name
    if name in _WRAPPERS:
        return _proto_scalar(descriptor.fields_by_name["value"], message.value)
    if name in _JSON_MAPPED:
        return json_format.MessageToDict(message, preserving_proto_field_name=True)
    if name == "google.protobuf.Any":
        try:
            return json_format.MessageToDict(
                message, preserving_proto_field_name=True, descriptor_pool=pool
            )
        except (TypeError, KeyError, ValueError):  # a type not in its schema
            return {
                "@type": message.type_url,
                "value": base64.b64encode(message.value).decode("ascii"),
            }
    out: dict[str, Any] = {}
    for fd in descriptor.fields:
        value = getattr(message, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            key_fd = fd.message_type.fields_by_name["key"]
            value_fd = fd.message_type.fields_by_name["value"]
            out[fd.name] = {
                _map_key(key_fd, k): _proto_value(value_fd, v, pool) for k, v in value.items()
            }
        elif _is_repeated(fd):
            out[fd.name] = [_proto_value(fd, v, pool) for v in value]
        elif fd.has_presence and not message.HasField(fd.name):
            continue
        else:
            out[fd.name] = _proto_value(fd, value, pool)
    return out


def _is_repeated(fd: FieldDescriptor) -> bool:
    repeated = getattr(fd, "is_repeated", None)
    if repeated is not None:
        return bool(repeated)
    return bool(fd.label == FieldDescriptor.LABEL_REPEATED)


def _proto_value(fd: FieldDescriptor, value: Any, pool: descriptor_pool.DescriptorPool) -> Any:
    if fd.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
        return _proto_plain(value, pool)
    return _proto_scalar(fd, value)


def _proto_scalar(fd: FieldDescriptor, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_STRING and isinstance(value, bytes):
        # proto2 strings are not checked for UTF-8 when parsed: the bytes come through
        raise ValueError(f"string field {fd.name!r} is not valid UTF-8")
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    if fd.type == FieldDescriptor.TYPE_ENUM:
        enum_value = fd.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value  # open enums: the number
    if fd.type == FieldDescriptor.TYPE_FLOAT:
        return _shortest_float32(value) if math.isfinite(value) else _non_finite(value)
    if fd.type == FieldDescriptor.TYPE_DOUBLE:
        return value if math.isfinite(value) else _non_finite(value)
    return value


def _shortest_float32(value: float) -> float:
    """A float field's value as the shortest decimal that is the same float32 (0.1, not
    0.10000000149011612), as the Protobuf JSON mapping writes it."""
    packed = struct.pack("<f", value)
    for digits in range(6, 10):
        shorter = float(f"{value:.{digits}g}")
        if struct.pack("<f", shorter) == packed:
            return shorter
    return value


def _map_key(fd: FieldDescriptor, key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)
