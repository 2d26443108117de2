"""An in-memory tier store: the fake that unit tests of the tier manager run against.
It keeps the same header and checksums as the real tiers, so the conformance suite
(corruption, truncation, wrong version) applies to it unchanged."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from kvnode.agent.tiers.base import SlotBuffers, StatelessStore, TierStats, read_back, sealed_header
from kvnode.agent.tiers.format import (
    HEADER_BYTES,
    NO_FINGERPRINT,
    ChunkMeta,
    decode_header,
)
from kvnode.errors import CorruptEntry


class MemoryStore(StatelessStore):
    def __init__(self, bytes_max: int, name: str = "memory") -> None:
        self.name = name
        self.bytes_max = bytes_max
        self.stats = TierStats(name)
        self.blobs: OrderedDict[bytes, bytearray] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0

    def size_of(self, key: bytes) -> int | None:
        with self._lock:
            blob = self.blobs.get(key)
        return None if blob is None else max(0, len(blob) - HEADER_BYTES)

    def may_probe(self, key: bytes) -> bool:
        return False

    def probe(self, key: bytes) -> int | None:
        return self.size_of(key)

    def put(
        self,
        key: bytes,
        slot: SlotBuffers,
        checksum: int,
        fingerprint: bytes = NO_FINGERPRINT,
        meta: ChunkMeta | None = None,
    ) -> bool:
        t0 = time.perf_counter()
        total = HEADER_BYTES + slot.size
        if total > self.bytes_max or self.size_of(key) is not None:
            return False
        blob = bytearray(sealed_header(self.stats, key, slot, checksum, fingerprint, meta))
        for v in slot.views:
            blob += v
        with self._lock:
            while self._bytes + total > self.bytes_max and self.blobs:
                _, old = self.blobs.popitem(last=False)
                self._bytes -= len(old)
                self.stats.inc("evictions")
            self.blobs[key] = blob
            self._bytes += total
        self.stats.write_done(t0, slot.size)
        return True

    def read_into(self, key: bytes, slot: SlotBuffers) -> int | None:
        t0 = time.perf_counter()
        with self._lock:
            blob = self.blobs.get(key)
            if blob is not None:
                self.blobs.move_to_end(key)
        if blob is None:
            return None
        try:
            h = decode_header(blob, key)
            if h.raw_bytes != slot.size or len(blob) != h.total_bytes:
                raise CorruptEntry("length mismatch")
            pos = HEADER_BYTES
            for v in slot.views:
                v[:] = blob[pos : pos + len(v)]
                pos += len(v)
            got = read_back(h, slot, memoryview(blob)[:HEADER_BYTES])
        except CorruptEntry as exc:
            self.stats.error("corrupt entry dropped", exc, "corrupt")
            self.delete(key)
            raise
        self.stats.read_done(t0, slot.size)
        return got

    def delete(self, key: bytes) -> None:
        with self._lock:
            blob = self.blobs.pop(key, None)
            if blob is not None:
                self._bytes -= len(blob)

    def healthy(self) -> bool:
        return True

    def gauges(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self.blobs), "bytes": self._bytes, "bytes_max": self.bytes_max}

    def close(self) -> None:
        pass
