"""Records the Kafka client cannot read must not stop the stream.

aiokafka parses fetched record batches lazily, inside ``consumer.getmany()``. A batch it
cannot read (a codec it lacks, a CRC that does not match, a payload that does not decompress)
or a record it cannot parse (a header key that is not UTF-8: legal bytes on the wire, but
aiokafka decodes header keys as UTF-8) raises out of ``getmany()``. Worse than stopping the
consumer: the records other partitions had already handed over in that call are lost to the
caller while their positions have moved on, and the bad partition is fetched again from the
same offset and fails again, forever.

:func:`install` makes the fetcher read each batch through :class:`GuardedMemoryRecords`: a
batch that cannot be read becomes one *unreadable* marker record covering exactly its offsets,
and a batch in which one record cannot be parsed is read again record by record
(:func:`salvage_records`), so that the good records of that batch come through and each bad one
becomes a marker of its own. The partition moves past exactly the bad offsets; the markers go
to the dead-letter topic (:func:`unreadable`) with the bytes that could be had.

A marker is an ordinary record whose first header key is :data:`MARKER_HEADER`. That key holds
a lone surrogate, which UTF-8 decoding never produces, so no real header can look like it.

This reaches into aiokafka's fetcher (``aiokafka.consumer.fetcher.MemoryRecords`` and
``PartitionRecords``); :func:`install` checks that they are still what it expects and refuses
to start otherwise. ``tests/test_record_guard.py`` pins the behaviour on real batches.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import codec
from aiokafka.consumer import fetcher
from aiokafka.record.util import calc_crc32c, decode_varint

log = logging.getLogger(__name__)

MARKER_HEADER = "\udc80sparse-ingest.unreadable"

# v2 record batch header (Kafka's DefaultRecordBatch): byte offsets of the fields used here.
_LENGTH = 8  # int32 batch length, counted after the first 12 bytes
_LOG_OVERHEAD = 12
_MAGIC = 16
_ATTRIBUTES = 21  # int16
_LAST_OFFSET_DELTA = 23  # int32
_FIRST_TIMESTAMP = 27  # int64
_MAX_TIMESTAMP = 35  # int64
_RECORDS_COUNT = 57  # int32
_RECORDS = 61
_LOG_APPEND_TIME = 1
_ABORT_MARKER_KEY = struct.pack(">hh", 0, 0)  # control record key: version 0, type 0 (ABORT)

_DECODERS: dict[int, Callable[[bytes], bytes]] = {
    1: codec.gzip_decode,
    2: codec.snappy_decode,
    3: codec.lz4_decode,
    4: codec.zstd_decode,
}


@dataclass(frozen=True, slots=True)
class Unreadable:
    """What a marker record stands for: offsets ``first..last`` could not be read."""

    reason: str  # unreadable_batch | invalid_header | corrupt_record
    message: str
    first_offset: int
    last_offset: int


class _Record:
    """A record as aiokafka's fetcher reads it (``PartitionRecords._consumer_record``)."""

    __slots__ = ("headers", "key", "offset", "timestamp", "timestamp_type", "value")
    checksum = None

    def __init__(
        self,
        offset: int,
        timestamp: int,
        timestamp_type: int,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]],
    ) -> None:
        self.offset = offset
        self.timestamp = timestamp
        self.timestamp_type = timestamp_type
        self.key = key
        self.value = value
        self.headers = headers


def _marker(
    what: Unreadable,
    timestamp: int,
    timestamp_type: int = 0,
    key: bytes | None = None,
    value: bytes | None = None,
    headers: list[tuple[str, bytes | None]] | None = None,
) -> _Record:
    info = orjson.dumps(
        {
            "reason": what.reason,
            "message": what.message,
            "first_offset": what.first_offset,
            "last_offset": what.last_offset,
        }
    )
    # The marker sits at the last offset it covers: the fetcher moves past it (offset + 1).
    return _Record(
        what.last_offset,
        timestamp,
        timestamp_type,
        key,
        value,
        [(MARKER_HEADER, info), *(headers or [])],
    )


def unreadable(headers: Sequence[tuple[str, bytes | None]]) -> Unreadable | None:
    """The marker's description when ``headers`` are a marker record's, else None."""
    if not headers or headers[0][0] != MARKER_HEADER or headers[0][1] is None:
        return None
    info = orjson.loads(headers[0][1])
    return Unreadable(
        info["reason"], info["message"], int(info["first_offset"]), int(info["last_offset"])
    )


def _describe(exc: BaseException) -> str:
    """The exception's type and message, without record bytes (UnicodeDecodeError's str()
    would quote the bytes it failed on)."""
    if isinstance(exc, UnicodeDecodeError):
        return f"UnicodeDecodeError: {exc.reason} at byte {exc.start}"
    return f"{type(exc).__name__}: {exc}"[:500]


def salvage_records(
    raw: bytes, after_offset: int
) -> Iterator[tuple[_Record | None, Unreadable | None]]:
    """Read a v2 record batch record by record, tolerating what aiokafka does not: yields
    ``(record, None)`` for each readable record after ``after_offset`` and ``(record, what)``
    for one that is not (a header key that is not UTF-8, or null: the record's key, value and
    header values are kept; such a header key is shown with backslash escapes, as Kafka
    clients cannot write it back). A record whose framing is broken ends the batch with
    ``(None, what)`` covering the offsets left."""
    base_offset = struct.unpack_from(">q", raw, 0)[0]
    attributes = struct.unpack_from(">h", raw, _ATTRIBUTES)[0]
    last_offset = base_offset + struct.unpack_from(">i", raw, _LAST_OFFSET_DELTA)[0]
    first_timestamp = struct.unpack_from(">q", raw, _FIRST_TIMESTAMP)[0]
    max_timestamp = struct.unpack_from(">q", raw, _MAX_TIMESTAMP)[0]
    count = struct.unpack_from(">i", raw, _RECORDS_COUNT)[0]
    timestamp_type = (attributes >> 3) & 1
    payload = bytes(raw[_RECORDS:])
    compression = attributes & 0x07
    if compression:
        payload = _DECODERS[compression](payload)
    pos = 0
    offset = after_offset
    for _ in range(count):
        try:
            length, pos = decode_varint(payload, pos)
            end = pos + length
            # attributes (one byte, unused), then the timestamp delta
            ts_delta, pos = decode_varint(payload, pos + 1)
            offset_delta, pos = decode_varint(payload, pos)
            offset = base_offset + offset_delta
            key, pos = _bytes(payload, pos)
            value, pos = _bytes(payload, pos)
            header_count, pos = decode_varint(payload, pos)
            raw_headers: list[tuple[bytes | None, bytes | None]] = []
            for _h in range(header_count):
                raw_key, pos = _bytes(payload, pos)
                h_value, pos = _bytes(payload, pos)
                raw_headers.append((raw_key, h_value))
            if pos != end:
                raise ValueError(f"record length {length} does not match its fields")
        except (ValueError, IndexError, struct.error) as exc:
            yield (
                None,
                Unreadable(
                    "corrupt_record",
                    f"record batch {base_offset}..{last_offset} cannot be parsed after offset "
                    f"{after_offset}: {_describe(exc)}",
                    max(after_offset + 1, base_offset),
                    last_offset,
                ),
            )
            return
        if offset <= after_offset:
            continue
        timestamp = max_timestamp if timestamp_type == _LOG_APPEND_TIME else first_timestamp
        if timestamp_type != _LOG_APPEND_TIME:
            timestamp += ts_delta
        bad: Unreadable | None = None
        headers: list[tuple[str, bytes | None]] = []
        for h_key_bytes, h_value in raw_headers:
            if h_key_bytes is None:  # Kafka header keys are strings, never null
                h_key_bytes = b""
                bad = Unreadable("invalid_header", "a header key is null", offset, offset)
            try:
                h_key: str = h_key_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                h_key = h_key_bytes.decode("utf-8", "backslashreplace")
                bad = Unreadable(
                    "invalid_header",
                    f"a header key is not UTF-8 ({_describe(exc)}); Kafka header keys are "
                    "UTF-8 strings",
                    offset,
                    offset,
                )
            headers.append((h_key, h_value))
        yield _Record(offset, timestamp, timestamp_type, key, value, headers), bad


def _bytes(payload: bytes, pos: int) -> tuple[bytes | None, int]:
    size, pos = decode_varint(payload, pos)
    if size < 0:
        return None, pos
    end = pos + size
    if end > len(payload):
        raise ValueError("a field runs past the end of the record batch")
    return payload[pos:end], end


class _GuardedBatch:
    """One record batch: the real one, read as aiokafka reads it, until it fails."""

    def __init__(
        self,
        batch: Any,
        raw: memoryview,
        owner: Any,
        next_base: int | None,
        on_corrupt: Callable[[], None] | None = None,
    ) -> None:
        self._on_corrupt = on_corrupt
        self._batch = batch
        self._raw = raw
        self._owner = owner
        self._next_base = next_base  # base offset of the batch after it in the fetch, if any
        self._crc_ok = True
        self._first_offset: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def __next__(self) -> Any:
        """A control batch's marker, read with next() by aiokafka under read_committed. One
        that cannot be read is taken as an ABORT marker: that only ends the producer's
        aborted state, which is harmless when its transaction was in fact committed (taking a
        damaged abort marker as a commit would skip the producer's later committed data)."""
        try:
            return next(self._batch)
        except StopIteration:
            raise
        except Exception as exc:
            log.warning("a transaction marker cannot be read (%s): taken as ABORT", _describe(exc))
            return _Record(self._batch.base_offset, -1, 0, _ABORT_MARKER_KEY, None, [])

    def validate_crc(self) -> bool:
        # A CRC mismatch makes aiokafka raise; here the batch becomes one unreadable marker,
        # and the rest of this fetch is left for the next one: its framing may be off too, and
        # the transaction state built from it (a damaged ABORT marker) cannot be trusted.
        self._crc_ok = bool(self._batch.validate_crc())
        self._first()  # fix the first unread offset before anything is taken
        if not self._crc_ok and self._on_corrupt is not None:
            self._on_corrupt()
        return True

    # Past a CRC mismatch, nothing after the base offset in the batch header can be trusted
    # (the CRC covers it): not the offsets it claims, not its transactional flags.
    @property
    def next_offset(self) -> int:
        return int(self._batch.next_offset) if self._crc_ok else self._trusted_last() + 1

    @property
    def producer_id(self) -> Any:
        return self._batch.producer_id if self._crc_ok else None

    @property
    def is_control_batch(self) -> bool:
        return bool(self._batch.is_control_batch) if self._crc_ok else False

    @property
    def is_transactional(self) -> bool:
        return bool(self._batch.is_transactional) if self._crc_ok else False

    def _position(self) -> int:
        return int(getattr(self._owner, "next_fetch_offset", 0) or 0)

    def _first(self) -> int:
        """The first offset not read yet, as it was when the batch was first looked at (the
        position moves on as the batch's records, or its marker, are taken)."""
        if self._first_offset is None:
            self._first_offset = max(int(self._batch.base_offset), self._position())
        return self._first_offset

    def _trusted_last(self) -> int:
        """The batch's last offset: from its header, or after a CRC mismatch from the next
        batch's base offset (outside the CRC), else only its first offset."""
        if self._crc_ok:
            return int(self._batch.next_offset) - 1
        if self._next_base is not None and self._next_base > self._first():
            return self._next_base - 1
        return self._first()

    def _whole_batch(self, reason: str, message: str) -> _Record:
        what = Unreadable(reason, message, self._first(), self._trusted_last())
        _log(self._owner, what)
        timestamp = getattr(self._batch, "max_timestamp", -1) if self._crc_ok else -1
        return _marker(what, timestamp)

    def __iter__(self) -> Iterator[Any]:
        if not self._crc_ok:
            yield self._whole_batch(
                "unreadable_batch", "the record batch fails its CRC check (corrupt data)"
            )
            return
        try:
            records = iter(self._batch)  # decompresses
        except Exception as exc:
            yield self._whole_batch(
                "unreadable_batch", f"the record batch cannot be decompressed: {_describe(exc)}"
            )
            return
        last_good = self._position() - 1
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except Exception as exc:
                log.debug("record batch needs a salvage read: %s", _describe(exc))
                break
            last_good = max(last_good, record.offset)
            yield record
        if self._raw[_MAGIC] < 2:  # legacy batches have no headers: nothing to salvage
            yield self._whole_batch("unreadable_batch", "a legacy record batch cannot be read")
            return
        for record, bad in salvage_records(bytes(self._raw), last_good):
            if bad is None:
                yield record
                continue
            _log(self._owner, bad)
            if record is None:
                yield _marker(bad, getattr(self._batch, "max_timestamp", -1))
            else:
                yield _marker(
                    bad,
                    record.timestamp,
                    record.timestamp_type,
                    record.key,
                    record.value,
                    record.headers,
                )


class _BrokenFraming:
    """A batch whose framing cannot be read: one marker for one offset, then nothing."""

    producer_id = None
    is_control_batch = False
    is_transactional = False

    def __init__(self, owner: Any, exc: BaseException) -> None:
        self._offset = int(getattr(owner, "next_fetch_offset", 0) or 0)
        self._owner = owner
        self._exc = exc
        self.next_offset = self._offset + 1

    def validate_crc(self) -> bool:
        return True

    def __iter__(self) -> Iterator[_Record]:
        what = Unreadable(
            "unreadable_batch",
            f"the fetched data cannot be split into record batches: {_describe(self._exc)}",
            self._offset,
            self._offset,
        )
        _log(self._owner, what)
        yield _marker(what, -1)


def _log(owner: Any, what: Unreadable) -> None:
    tp = getattr(owner, "_tp", None)
    where = f"{tp.topic}/{tp.partition}" if tp is not None else "?"
    span = (
        f"@{what.first_offset}"
        if what.first_offset == what.last_offset
        else f"@{what.first_offset}..{what.last_offset}"
    )
    log.warning("%s%s cannot be read (%s): %s", where, span, what.reason, what.message)


_ORIGINAL_MEMORY_RECORDS: Any = fetcher.MemoryRecords
_ORIGINAL_PARTITION_RECORDS: Any = fetcher.PartitionRecords


class GuardedMemoryRecords:
    """aiokafka's ``MemoryRecords`` with each batch read through :class:`_GuardedBatch`."""

    def __init__(self, bytes_data: bytes) -> None:
        self._raw = memoryview(bytes_data)
        self._records = _ORIGINAL_MEMORY_RECORDS(bytes_data)
        self._pos = 0
        self._broken = False
        self.owner: Any = None  # the PartitionRecords reading it

    def size_in_bytes(self) -> int:
        return int(self._records.size_in_bytes())

    def has_next(self) -> bool:
        return not self._broken and bool(self._records.has_next())

    def next_batch(self) -> Any:
        start = self._pos
        try:
            length = struct.unpack_from(">i", self._raw, start + _LENGTH)[0]
            end = start + _LOG_OVERHEAD + length
            batch = self._records.next_batch()
        except Exception as exc:
            self._broken = True
            return _BrokenFraming(self.owner, exc)
        self._pos = end
        return _GuardedBatch(
            batch, self._raw[start:end], self.owner, self._valid_base_at(end), self._stop
        )

    def _stop(self) -> None:
        self._broken = True

    def _valid_base_at(self, pos: int) -> int | None:
        """The base offset of the batch at ``pos`` if a whole v2 batch with a matching CRC is
        there (the length field of the batch before it is outside any CRC: when it is damaged,
        ``pos`` points into garbage), else None."""
        raw = self._raw
        if len(raw) < pos + _RECORDS:
            return None
        length = struct.unpack_from(">i", raw, pos + _LENGTH)[0]
        end = pos + _LOG_OVERHEAD + length
        if length < _RECORDS - _LOG_OVERHEAD or end > len(raw) or raw[pos + _MAGIC] != 2:
            return None
        crc = struct.unpack_from(">I", raw, pos + _MAGIC + 1)[0]
        if crc != calc_crc32c(bytes(raw[pos + _ATTRIBUTES : end])):
            return None
        return int(struct.unpack_from(">q", raw, pos)[0])


class GuardedPartitionRecords(_ORIGINAL_PARTITION_RECORDS):
    def __init__(self, tp: Any, records: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(records, GuardedMemoryRecords):
            records.owner = self
        super().__init__(tp, records, *args, **kwargs)


def install() -> None:
    """Make every aiokafka consumer in this process read batches through the guard
    (idempotent)."""
    if fetcher.MemoryRecords is GuardedMemoryRecords:
        return
    expected = ("_unpack_records", "_consumer_record", "next_fetch_offset")
    ok = all(
        hasattr(_ORIGINAL_PARTITION_RECORDS, name) or name == "next_fetch_offset"
        for name in expected
    ) and hasattr(_ORIGINAL_MEMORY_RECORDS, "next_batch")
    if not ok:  # pragma: no cover - only with an aiokafka this module was not written for
        raise RuntimeError(
            "this aiokafka version reads record batches differently from what "
            "service.kafka.record_guard expects: pin aiokafka to the range in pyproject.toml"
        )
    fetcher.MemoryRecords = GuardedMemoryRecords
    fetcher.PartitionRecords = GuardedPartitionRecords
