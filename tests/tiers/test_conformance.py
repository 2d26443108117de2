"""One suite, every tier store: memory (the fake), disk (buffered and O_DIRECT), S3
(plain and lz4) against a loopback endpoint."""

from __future__ import annotations

import os
import struct

import pytest

from kvnode.agent.tiers.base import SlotBuffers
from kvnode.agent.tiers.format import HEADER_BYTES, ChunkMeta, checksum
from kvnode.errors import CorruptEntry

PAGE = 64 * 1024
KEY = bytes(range(16))


def slot_at(arena, pages, size):
    return SlotBuffers(memoryview(arena.buffer), pages, PAGE, size)


def fill(slot, data: bytes) -> None:
    pos = 0
    for v in slot.views:
        v[:] = data[pos : pos + len(v)]
        pos += len(v)


def read_back(slot) -> bytes:
    return b"".join(bytes(v) for v in slot.views)


def payload(n: int, seed: int = 0) -> bytes:
    # half random, half repetitive: lz4 has something to do, corruption shows anywhere
    rnd = os.urandom(n // 2)
    return rnd + bytes([seed % 251]) * (n - len(rnd))


def put(store, arena, key=KEY, size=200_000, pages=((0, 2), (5, 2)), data=None):
    data = payload(size) if data is None else data
    src = slot_at(arena, list(pages), size)
    fill(src, data)
    assert store.put(key, src, checksum(data))
    return data


def get(store, arena, key=KEY, size=200_000, pages=((10, 4),)):
    dst = slot_at(arena, list(pages), size)
    for v in dst.views:
        v[:] = bytes(len(v))
    got = store.read_into(key, dst)
    return got, read_back(dst)


def test_round_trip_across_extents(kit, arena):
    store = kit.make()
    data = put(store, arena)
    assert store.size_of(KEY) == len(data)
    csum, back = get(store, arena)
    assert back == data
    assert csum == checksum(data)
    s = store.stats.snapshot()
    assert s["writes"] == 1 and s["reads"] == 1
    assert s["write_bytes"] == s["read_bytes"] == len(data)
    g = store.gauges()
    assert g["entries"] == 1 and g["bytes"] >= len(data)


def test_a_chunk_without_a_checksum_stays_unverified(kit, arena):
    """Stored without the writer's checksum, it comes back with none (never one the
    tier computed on the way), its bytes intact: the tier's own checksum still guards
    the copy. Its chunk metadata comes back with it."""
    store = kit.make()
    data = payload(200_000)
    src = slot_at(arena, [(0, 4)], len(data))
    fill(src, data)
    meta = ChunkMeta.of(b"p" * 16, [1, 2, 3])
    assert store.put(KEY, src, 0, meta=meta)
    dst = slot_at(arena, [(10, 4)], len(data))
    assert store.read_into(KEY, dst) == 0
    assert read_back(dst) == data and dst.meta == meta


def test_absent_key(kit, arena):
    store = kit.make()
    assert store.size_of(b"\x01" * 16) is None
    got, _ = get(store, arena, key=b"\x01" * 16)
    assert got is None


def test_second_put_of_same_key_is_skipped(kit, arena):
    store = kit.make()
    put(store, arena)
    src = slot_at(arena, [(0, 4)], 200_000)
    assert store.put(KEY, src, 0) is False


def test_put_refuses_bytes_that_fail_their_checksum(kit, arena):
    store = kit.make()
    src = slot_at(arena, [(0, 4)], 100_000)
    fill(src, payload(100_000))
    with pytest.raises(CorruptEntry):
        store.put(KEY, src, 12345)
    assert store.size_of(KEY) is None
    got, _ = get(store, arena, size=100_000)
    assert got is None


def test_delete(kit, arena):
    store = kit.make()
    put(store, arena)
    store.delete(KEY)
    assert store.size_of(KEY) is None
    assert get(store, arena)[0] is None


def _tamper_is_never_served(kit, arena, mutate):
    store = kit.make()
    put(store, arena)
    kit.set_raw(KEY, mutate(kit.get_raw(KEY)))
    errors = store.stats.snapshot()["errors"]
    with pytest.raises(CorruptEntry):
        get(store, arena)
    assert store.stats.snapshot()["errors"] > errors
    assert store.stats.snapshot()["corrupt"] >= 1
    assert store.size_of(KEY) is None  # dropped
    assert get(store, arena)[0] is None  # and removed: a second read finds nothing


def test_flipped_payload_byte(kit, arena):
    def flip(raw: bytes) -> bytes:
        b = bytearray(raw)
        b[len(b) - 7] ^= 0x40
        return bytes(b)

    _tamper_is_never_served(kit, arena, flip)


def test_flipped_header_byte(kit, arena):
    def flip(raw: bytes) -> bytes:
        b = bytearray(raw)
        b[40] ^= 0x01
        return bytes(b)

    _tamper_is_never_served(kit, arena, flip)


def test_truncated(kit, arena):
    _tamper_is_never_served(kit, arena, lambda raw: raw[: HEADER_BYTES + 1000])


def test_other_format_version(kit, arena):
    def version2(raw: bytes) -> bytes:
        b = bytearray(raw)
        struct.pack_into("<H", b, 4, 2)  # header checksum is not fixed up: either check fires
        return bytes(b)

    _tamper_is_never_served(kit, arena, version2)


def test_many_keys(kit, arena):
    store = kit.make()
    datas = {}
    for i in range(8):
        key = bytes([i]) * 16
        datas[key] = put(store, arena, key=key, size=10_000 + i, pages=((i, 1),))
    for key, data in datas.items():
        got, back = get(store, arena, key=key, size=len(data))
        assert back == data and got == checksum(data)
