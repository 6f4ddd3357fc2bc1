"""Hand-built Kafka v2 record batches, for what aiokafka's batch builder cannot write: header
keys that are null or not UTF-8, control batches, flags and header fields set at will."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from aiokafka import codec
from aiokafka.record.util import calc_crc32c

Record = tuple[int, int, bytes | None, bytes | None, Sequence[tuple[bytes | None, bytes | None]]]
ENCODERS: dict[int, Callable[[bytes], bytes]] = {
    1: codec.gzip_encode,
    2: codec.snappy_encode,
    3: codec.lz4_encode,
    4: codec.zstd_encode,
}


def varint(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)  # zigzag
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def vbytes(b: bytes | None) -> bytes:
    return varint(-1) if b is None else varint(len(b)) + b


def record(
    offset_delta: int,
    ts_delta: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[bytes | None, bytes | None]],
) -> bytes:
    body = b"\x00" + varint(ts_delta) + varint(offset_delta) + vbytes(key) + vbytes(value)
    body += varint(len(headers))
    for hk, hv in headers:
        body += vbytes(hk) + vbytes(hv)
    return varint(len(body)) + body


def batch(
    base: int,
    recs: Sequence[Record],
    *,
    compression: int = 0,
    transactional: bool = False,
    control: bool = False,
    producer_id: int = -1,
    first_ts: int = 1_700_000_000_000,
    last_offset_delta: int | None = None,
    count: int | None = None,
    raw_records: bytes | None = None,
) -> bytes:
    """recs: (offset_delta, ts_delta, key, value, headers) each; ``raw_records`` instead."""
    payload = raw_records if raw_records is not None else b"".join(record(*r) for r in recs)
    if compression:
        payload = ENCODERS[compression](payload)
    attrs = compression | (0x10 if transactional else 0) | (0x20 if control else 0)
    lod = last_offset_delta if last_offset_delta is not None else max(r[0] for r in recs)
    max_ts = first_ts + max((r[1] for r in recs), default=0)
    n = count if count is not None else len(recs)
    epoch, sequence = (0, 0) if producer_id >= 0 else (-1, -1)
    after_crc = struct.pack(
        ">hiqqqhii", attrs, lod, first_ts, max_ts, producer_id, epoch, sequence, n
    )
    after_crc += payload
    rest = struct.pack(">ibI", 0, 2, calc_crc32c(after_crc)) + after_crc
    return struct.pack(">qi", base, len(rest)) + rest


def control_batch(base: int, producer_id: int, abort: bool = True) -> bytes:
    key = struct.pack(">hh", 0, 0 if abort else 1)
    value = struct.pack(">hi", 0, 0)
    return batch(
        base, [(0, 0, key, value, [])], transactional=True, control=True, producer_id=producer_id
    )
