"""service.kafka.record_guard on real record-batch bytes (built by aiokafka's own batch builder, then
damaged the way foreign producers or broken disks do), read by aiokafka's real fetcher classes.

The end-to-end checks with kcat and Kafka's Java producer are in tests/reliability/test_rel_foreign_producers.py.
"""

from __future__ import annotations

import struct
from typing import Any

import kafka_batches
import pytest
from aiokafka import TopicPartition
from aiokafka.consumer import fetcher
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c

from service.kafka import record_guard
from service.kafka.record_guard import MARKER_HEADER, unreadable

TP = TopicPartition("t", 0)
READ_COMMITTED = 1  # aiokafka's isolation level value, as `sparse-ingest run` consumes
GZIP, SNAPPY, LZ4, ZSTD = 1, 2, 3, 4
PLACEHOLDER = "HEADERKEY"  # replaced by bytes that are not UTF-8 (same length)


def batch(
    base: int,
    n: int,
    compression: int = 0,
    bad_header_at: set[int] = frozenset(),  # type: ignore[assignment]
) -> bytes:
    """A v2 record batch of ``n`` records at offsets base..base+n-1."""
    builder = DefaultRecordBatchBuilder(2, compression, 0, -1, -1, -1, 10_000_000)
    for i in range(n):
        key = PLACEHOLDER if i in bad_header_at else "h"
        builder.append(i, 1_700_000_000_000 + i, f"k{i}".encode(), f"v{i}".encode(), [(key, b"x")])
    raw = bytearray(builder.build())
    struct.pack_into(">q", raw, 0, base)
    if bad_header_at:
        assert compression == 0, "damage uncompressed batches only"
        raw = bytearray(raw.replace(PLACEHOLDER.encode(), b"\xff\xfe" + b"A" * 7))
        fix_crc(raw)
    return bytes(raw)


def fix_crc(raw: bytearray) -> None:
    struct.pack_into(">I", raw, 17, calc_crc32c(bytes(raw[21:])))


def read(data: bytes, fetch_offset: int = 0) -> list[Any]:
    """What the consumer's fetcher hands over for one fetched partition."""
    record_guard.install()
    records = fetcher.MemoryRecords(data)
    partition = fetcher.PartitionRecords(TP, records, [], fetch_offset, None, None, True, 0)
    return list(partition)


def describe(records: list[Any]) -> list[tuple[int, str]]:
    out = []
    for r in records:
        marker = unreadable(list(r.headers))
        out.append((r.offset, marker.reason if marker else r.value.decode()))
    return out


@pytest.mark.parametrize("compression", [0, GZIP, SNAPPY, LZ4, ZSTD])
def test_every_codec_reads(compression: int) -> None:
    got = read(batch(0, 20, compression))
    assert describe(got) == [(i, f"v{i}") for i in range(20)]
    assert got[3].key == b"k3" and list(got[3].headers) == [("h", b"x")]


def test_a_header_key_that_is_not_utf8_costs_exactly_its_record() -> None:
    data = batch(0, 5) + batch(5, 6, bad_header_at={2, 4}) + batch(11, 3)
    got = read(data)
    assert describe(got) == [
        *[(i, f"v{i}") for i in range(5)],
        (5, "v0"),
        (6, "v1"),
        (7, "invalid_header"),
        (8, "v3"),
        (9, "invalid_header"),
        (10, "v5"),
        *[(11 + i, f"v{i}") for i in range(3)],
    ]
    bad = got[7]
    marker = unreadable(list(bad.headers))
    assert marker is not None and (marker.first_offset, marker.last_offset) == (7, 7)
    # the record's bytes are kept for the dead-letter topic; the key shown escaped
    assert bad.key == b"k2" and bad.value == b"v2"
    assert list(bad.headers)[1] == ("\\xff\\xfeAAAAAAA", b"x")
    assert "\\xff" not in marker.message  # no record bytes in the message


def test_salvage_starts_after_the_position() -> None:
    """Fetched from the middle of a batch (a restart committed there): nothing before it."""
    got = read(batch(0, 6, bad_header_at={4}), fetch_offset=3)
    assert describe(got) == [(3, "v3"), (4, "invalid_header"), (5, "v5")]


def test_an_unknown_codec_costs_exactly_its_batch() -> None:
    bad = bytearray(batch(4, 4, GZIP))
    attributes = struct.unpack_from(">h", bad, 21)[0]
    struct.pack_into(">h", bad, 21, (attributes & ~0x07) | 6)  # codec 6: not a Kafka codec
    fix_crc(bad)
    got = read(batch(0, 4) + bytes(bad) + batch(8, 2))
    assert describe(got) == [
        *[(i, f"v{i}") for i in range(4)],
        (7, "unreadable_batch"),  # one marker standing for offsets 4..7
        (8, "v0"),
        (9, "v1"),
    ]
    marker = unreadable(list(got[4].headers))
    assert marker is not None and (marker.first_offset, marker.last_offset) == (4, 7)
    assert got[4].key is None and got[4].value is None


def test_a_crc_mismatch_costs_exactly_its_batch() -> None:
    bad = bytearray(batch(2, 3))
    bad[-1] ^= 0xFF  # the value's last byte; the CRC no longer matches
    got = read(batch(0, 2) + bytes(bad) + batch(5, 1))
    # the rest of the fetch is left for the next one (from offset 5): nothing skipped
    assert describe(got) == [(0, "v0"), (1, "v1"), (4, "unreadable_batch")]


def test_a_corrupt_compressed_payload_costs_exactly_its_batch() -> None:
    bad = bytearray(batch(0, 30, ZSTD))
    bad[70:90] = b"\x00" * 20
    fix_crc(bad)
    got = read(bytes(bad) + batch(30, 1))
    assert describe(got) == [(29, "unreadable_batch"), (30, "v0")]


def test_marker_header_cannot_come_from_the_wire() -> None:
    with pytest.raises(UnicodeEncodeError):
        MARKER_HEADER.encode("utf-8")
    assert unreadable([("h", b"x")]) is None
    assert unreadable([]) is None


def read_committed(data: bytes) -> list[Any]:
    record_guard.install()
    records = fetcher.MemoryRecords(data)
    return list(fetcher.PartitionRecords(TP, records, [], 0, None, None, True, READ_COMMITTED))


def one(offset: int, value: bytes) -> bytes:
    return kafka_batches.batch(offset, [(0, 0, b"k", value, [])])


def test_a_crc_mismatch_does_not_trust_the_offsets_in_the_damaged_header() -> None:
    """lastOffsetDelta is covered by the CRC: damaged, it claimed offsets up to 1,000,001, and
    the marker skipped the next batch's good record."""
    bad = bytearray(kafka_batches.batch(1, [(0, 0, b"k", b"b1", []), (1, 0, b"k", b"b2", [])]))
    struct.pack_into(">i", bad, 23, 1_000_000)
    got = read(one(0, b"g0") + bytes(bad) + one(3, b"g3"))
    assert describe(got) == [(0, "g0"), (2, "unreadable_batch")]  # then a new fetch from 3
    marker = unreadable(list(got[1].headers))
    assert marker is not None and (marker.first_offset, marker.last_offset) == (1, 2)


def test_a_damaged_transaction_marker_does_not_escape_the_guard() -> None:
    txn = kafka_batches.batch(0, [(0, 0, b"k", b"t0", [])], transactional=True, producer_id=7)
    marker = bytearray(kafka_batches.control_batch(1, 7, abort=False))
    marker[-1] ^= 0xFF  # fails its CRC
    got = read_committed(txn + bytes(marker) + one(2, b"g2"))
    assert describe(got) == [(0, "t0"), (1, "unreadable_batch")]  # then a new fetch from 2


def test_an_unparsable_transaction_marker_is_taken_as_abort() -> None:
    """A control batch whose CRC holds but whose record does not parse: taken as an ABORT
    marker, which only ends the producer's aborted state (harmless if it committed)."""
    broken = kafka_batches.batch(
        1, [], transactional=True, control=True, producer_id=7, raw_records=b"\x7f", count=1,
        last_offset_delta=0,
    )  # fmt: skip
    txn = kafka_batches.batch(0, [(0, 0, b"k", b"t0", [])], transactional=True, producer_id=7)
    assert describe(read_committed(txn + broken + one(2, b"g2"))) == [(0, "t0"), (2, "g2")]


def test_a_null_header_key_costs_exactly_its_record() -> None:
    raw = kafka_batches.record(0, 0, b"a", b"c0", [(None, b"x")])
    raw += kafka_batches.record(1, 0, b"b", b"GOOD-c1", [])
    data = kafka_batches.batch(0, [], raw_records=raw, count=2, last_offset_delta=1)
    got = read(data + one(2, b"g2"))
    assert describe(got) == [(0, "invalid_header"), (1, "GOOD-c1"), (2, "g2")]
    assert got[0].key == b"a" and got[0].value == b"c0"


def test_a_damaged_abort_marker_does_not_hide_later_committed_data() -> None:
    """Producer 7's transaction at 0 is aborted; its ABORT marker at 1 fails its CRC. Reading on
    with producer 7 still "aborted" skipped its committed transaction at 2..3: the fetch stops
    at the damaged marker, and the next one (from 2, with the broker's aborted list for that
    range) reads the committed data."""
    aborted = kafka_batches.batch(0, [(0, 0, b"k", b"ab", [])], transactional=True, producer_id=7)
    abort = bytearray(kafka_batches.control_batch(1, 7, abort=True))
    abort[-1] ^= 0xFF
    committed = kafka_batches.batch(2, [(0, 0, b"k", b"c2", [])], transactional=True, producer_id=7)
    commit = kafka_batches.control_batch(3, 7, abort=False)
    record_guard.install()
    first = fetcher.PartitionRecords(
        TP, fetcher.MemoryRecords(aborted + bytes(abort) + committed + commit), [(7, 0)], 0,
        None, None, True, READ_COMMITTED,
    )  # fmt: skip
    assert describe(list(first)) == [(1, "unreadable_batch")]
    assert first.next_fetch_offset == 2
    second = fetcher.PartitionRecords(
        TP, fetcher.MemoryRecords(committed + commit), [], 2, None, None, True, READ_COMMITTED
    )
    assert describe(list(second)) == [(2, "c2")]


def test_a_damaged_length_field_does_not_let_the_marker_cover_good_records() -> None:
    """The batch length is outside every CRC: 16 bytes short, the next 'batch' starts in the
    middle of the payload. The marker covers the damaged batch's first offset only."""
    bad = bytearray(kafka_batches.batch(1, [(0, 0, b"k", b"b1", []), (1, 0, b"k", b"b2", [])]))
    struct.pack_into(">i", bad, 8, struct.unpack_from(">i", bad, 8)[0] - 16)
    got = read(one(0, b"g0") + bytes(bad) + one(3, b"g3") + one(4, b"g4"))
    assert describe(got)[0] == (0, "g0")
    markers = [unreadable(list(r.headers)) for r in got[1:]]
    assert all(m is not None and m.last_offset <= 2 for m in markers), markers
