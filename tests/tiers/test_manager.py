"""TierManager against the real Index and a real mapped arena, with the in-memory store
(unit tests of movement logic) and the disk store (the real path)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from kvnode.agent.cache import Cache
from kvnode.agent.config import load_config
from kvnode.agent.index import Index, State
from kvnode.agent.index import Outcome as Status
from kvnode.agent.tiers.disk import DiskStore
from kvnode.agent.tiers.format import checksum
from kvnode.agent.tiers.manager import TierManager
from kvnode.agent.tiers.memory import MemoryStore
from kvnode.ipc.protocol import Lookup

PAGE = 64 * 1024
MiB = 1024 * 1024
CLIENT = 7


class GatedStore(MemoryStore):
    """A memory store whose I/O waits for ``gate``: a slow or stuck tier."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.up = True

    def put(self, *a: Any, **kw: Any) -> bool:
        self.gate.wait(10)
        return super().put(*a, **kw)

    def read_into(self, *a: Any, **kw: Any) -> Any:
        self.gate.wait(10)
        return super().read_into(*a, **kw)

    def healthy(self) -> bool:
        return self.up


class Harness:
    """The agent's side of the contract, in a few lines."""

    def __init__(self, arena: Any, stores: dict[str, Any], **overrides: Any) -> None:
        self.arena = arena
        self.cfg = load_config(env={}, overrides=overrides)
        self.index = Index(len(arena.buffer), PAGE, "lru")
        self.wakes = 0
        self.cache = Cache(
            self.index, lambda c: TierManager(self.cfg, arena, c, self._wake, stores=stores)
        )
        assert self.cache.tiers is not None
        self.tm = self.cache.tiers

    def _wake(self) -> None:
        self.wakes += 1

    def put(self, key: bytes, data: bytes, csum: int | None = None) -> Status:
        # Victims go to the tiers inside the reserve; the commit offers the chunk to
        # write-through tiers.
        st, e = self.cache.reserve(key, len(data), CLIENT)
        if st is not Status.OK:
            return st
        pos = 0
        for off, n in e.extents(PAGE):
            self.arena.buffer[off : off + n] = data[pos : pos + n]
            pos += n
        csum = checksum(data) if csum is None else csum
        assert self.cache.commit_many([key], CLIENT, [csum])[0] is Status.OK
        return Status.OK

    def evict_all(self) -> None:
        self.cache.evict(self.index.alloc.pages_total)

    def lookup(self, key: bytes) -> Lookup:
        if self.index.lookup(key) is not None:
            return Lookup.HIT
        return Lookup.PENDING if self.tm.on_lookup_miss(key) else Lookup.MISS

    def read(self, key: bytes) -> bytes:
        e = self.index.entries[key]
        return b"".join(self.arena.buffer[o : o + n] for o, n in e.extents(PAGE))

    def settle(self, timeout_s: float = 10.0) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self.tm.poll()
            if not self.tm.promoting and not self.tm.pending_writes():
                self.tm.poll()
                self.index.check()
                return
            time.sleep(0.002)
        raise AssertionError("tier jobs did not settle")


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def blob(i: int, n: int = MiB) -> bytes:
    return os.urandom(64) * (n // 64) + bytes([i]) * (n % 64)


@pytest.fixture
def mem() -> MemoryStore:
    return MemoryStore(256 * MiB, name="disk")


def test_write_back_holds_pages_until_copied_then_promotes(arena, mem):
    h = Harness(arena, {"disk": mem})
    datas = {key(i): blob(i) for i in range(6)}
    for k, d in datas.items():
        assert h.put(k, d) is Status.OK
    # 8 MiB arena: the 7th and 8th MiB entries push the oldest out through the disk.
    for i in (6, 7, 8):
        datas[key(i)] = blob(i)
        st = h.put(key(i), datas[key(i)])
        h.settle()
        if st is not Status.OK:  # pages held by write-back: free once copied
            assert h.put(key(i), datas[key(i)]) is Status.OK
    assert mem.size_of(key(0)) == MiB
    assert key(0) not in h.index.entries
    assert h.lookup(key(0)) is Lookup.PENDING
    assert h.lookup(key(0)) is Lookup.PENDING  # never promoted twice
    h.settle()
    assert h.lookup(key(0)) is Lookup.HIT
    assert h.read(key(0)) == datas[key(0)]
    assert h.index.entries[key(0)].checksum == checksum(datas[key(0)])
    s = h.tm.stats()["disk"]
    assert s["hits"] == 1 and s["reads"] == 1 and s["writes"] >= 1
    assert h.wakes >= 2


def test_write_through_copies_on_commit_and_stays_readable(arena):
    store = GatedStore(64 * MiB, name="disk")
    h = Harness(arena, {"disk": store}, **{"disk.write_policy": "write_through"})
    d = blob(1)
    h.put(key(1), d)
    assert h.tm.stats()["disk"]["queue_depth"] == 1
    assert h.lookup(key(1)) is Lookup.HIT  # readable while the copy is queued
    store.gate.set()
    h.settle()
    assert store.size_of(key(1)) == MiB
    # Already below: eviction needs no copy and frees the pages at once.
    out = h.index.evict_pages(h.index.alloc.pages_total)
    assert out.leaving == [] and out.removed == [key(1)]
    assert key(1) not in h.index.entries and h.index.counters.evict_unsaved == 0


def test_write_through_eviction_during_copy_is_held(arena):
    store = GatedStore(64 * MiB, name="disk")
    h = Harness(arena, {"disk": store}, **{"disk.write_policy": "write_through"})
    h.put(key(1), blob(1))
    # force it out while the copy waits: it leaves, but its pages stay until copied
    h.index.evict_pages(h.index.alloc.pages_total, keep=False)
    assert h.index.entries[key(1)].state is State.EVICTING
    store.gate.set()
    h.settle()
    assert key(1) not in h.index.entries
    assert store.size_of(key(1)) == MiB


def test_loop_calls_never_wait_for_io(arena):
    store = GatedStore(64 * MiB, name="disk")
    h = Harness(arena, {"disk": store}, **{"disk.queue_max": 4})
    for i in range(7):
        h.put(key(i), blob(i))
    store.blobs[key(99)] = bytearray(b"x")  # anything: reads block on the gate anyway
    t0 = time.perf_counter()
    for i in range(7, 20):
        h.put(key(i), blob(i))  # evictions queue copies or drop them; none waits
        h.lookup(key(99))
        h.tm.poll()
    assert time.perf_counter() - t0 < 1.0
    s = h.tm.stats()["disk"]
    # full queue: copies dropped by the tier, or victims dropped unsaved by the index
    assert s["queue_depth"] <= 4 and s["dropped"] + h.index.counters.evict_unsaved >= 1
    store.gate.set()
    h.settle()


def test_inflight_bound_and_missing_key(arena, mem):
    h = Harness(arena, {"disk": mem}, **{"promote.inflight_max": 2})
    for i in range(3):
        h.put(key(i), blob(i, 100_000))
    h.evict_all()
    h.settle()
    assert [h.lookup(key(i)) for i in range(3)] == [Lookup.PENDING, Lookup.PENDING, Lookup.MISS]
    assert h.tm.stats()["disk"]["promote_dropped"] == 1
    assert h.lookup(key(42)) is Lookup.MISS
    h.settle()
    assert h.lookup(key(2)) is Lookup.PENDING
    h.settle()
    assert all(h.lookup(key(i)) is Lookup.HIT for i in range(3))


def test_corrupt_copy_is_not_promoted(arena, mem):
    h = Harness(arena, {"disk": mem})
    h.put(key(1), blob(1))
    h.evict_all()
    h.settle()
    mem.blobs[key(1)][-1] ^= 0xFF
    assert h.lookup(key(1)) is Lookup.PENDING
    h.settle()
    assert key(1) not in h.index.entries  # reservation aborted
    assert h.lookup(key(1)) is Lookup.MISS
    assert h.tm.stats()["disk"]["corrupt"] == 1


def test_failing_tier_drops_and_lookups_miss(arena):
    store = GatedStore(64 * MiB, name="disk")
    store.gate.set()
    store.up = False
    h = Harness(arena, {"disk": store})
    h.put(key(1), blob(1))
    h.evict_all()
    assert key(1) not in h.index.entries  # not held: nothing to copy into
    assert h.tm.stats()["disk"]["dropped"] == 1
    assert h.lookup(key(1)) is Lookup.MISS


def test_s3_admission(arena, mem):
    s3 = MemoryStore(64 * MiB, name="s3")
    h = Harness(arena, {"disk": mem, "s3": s3}, **{"s3.admit_min_hits": 2})
    h.put(key(1), blob(1))
    h.put(key(2), blob(2))
    for _ in range(2):
        h.lookup(key(2))
    h.evict_all()
    h.settle()
    assert mem.size_of(key(1)) and mem.size_of(key(2))
    assert s3.size_of(key(1)) is None and s3.size_of(key(2)) == MiB


def test_promotion_from_s3_fills_write_through_disk(arena, mem):
    s3 = MemoryStore(64 * MiB, name="s3")
    h = Harness(arena, {"disk": mem, "s3": s3}, **{"disk.write_policy": "write_through"})
    d = blob(3)
    other = Harness(arena.__class__(__import__("mmap").mmap(-1, 8 * MiB)), {"s3": s3})
    other.put(key(3), d)
    other.evict_all()
    other.settle()
    assert h.lookup(key(3)) is Lookup.PENDING
    h.settle()
    assert h.read(key(3)) == d
    assert mem.size_of(key(3)) == MiB  # written through after promotion


def test_drop_removes_from_the_nodes_tiers_not_the_fleets_s3(arena, mem):
    s3 = MemoryStore(64 * MiB, name="s3")
    h = Harness(arena, {"disk": mem, "s3": s3})
    h.put(key(1), blob(1))
    h.evict_all()
    h.settle()
    assert s3.size_of(key(1)) is not None
    h.tm.drop(key(1))
    for _ in range(200):
        h.tm.poll()
        if mem.size_of(key(1)) is None:
            break
        time.sleep(0.01)
    h.settle()
    assert mem.size_of(key(1)) is None
    assert s3.size_of(key(1)) is not None  # only the bucket's lifecycle rules delete it


def test_flush_drains_write_back_within_deadline(arena, tmp_path):
    disk = DiskStore(str(tmp_path / "d"), 64 * MiB)
    h = Harness(arena, {"disk": disk})
    for i in range(6):
        h.put(key(i), blob(i))
    h.evict_all()
    assert h.tm.flush(10.0) == 0
    assert disk.gauges()["entries"] == 6
    h.tm.close()
    again = DiskStore(str(tmp_path / "d"), 64 * MiB)
    assert again.gauges()["entries"] == 6
