"""What every tier store offers the tier manager, and the pieces they share.

A store moves bytes between arena slots and one lower tier. It is called from I/O
threads only (never the agent's loop) except for ``size_of`` and ``may_probe``, which
answer from memory and are safe from any thread. Operating errors are counted and
raised as ``TierError`` subclasses; a bad entry is dropped by the store before it
raises, so the caller never has to clean up after a store. ``TierStats.error`` counts
every operating error and logs each kind once, not once per request: a dead endpoint
or a full disk fails every request, and the log must stay readable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvnode.agent.tiers.format import (
    CODEC_NONE,
    NO_FINGERPRINT,
    ChunkMeta,
    Header,
    decode_meta,
    header_block,
    make_header,
)
from kvnode.errors import CorruptEntry
from kvnode.ipc.checksum import NO_CHECKSUM, checksum

log = logging.getLogger("kvnode.tiers")

RATE_SAMPLES_MAX = 256  # operations remembered for the recent-throughput gauges
ERROR_LOG_EVERY_S = 300.0  # an error kind seen again is reported at most this often


class SlotBuffers:
    """Writable views of one arena entry: ``views`` covers exactly ``size`` bytes;
    ``padded(align)`` extends the last extent into the entry's own page slack, which
    O_DIRECT needs (lengths that are multiples of the device block). A read fills
    ``meta`` with the chunk's metadata from the tier's header, when it has some."""

    __slots__ = ("size", "views", "meta", "_capacity")

    def __init__(
        self, arena: memoryview, pages: list[tuple[int, int]], page_bytes: int, size: int
    ) -> None:
        self.size = size
        self.meta: ChunkMeta | None = None
        self.views: list[memoryview] = []
        self._capacity: list[memoryview] = []
        left = size
        for start, count in pages:
            cap = arena[start * page_bytes : (start + count) * page_bytes]
            n = min(left, len(cap))
            self._capacity.append(cap)
            self.views.append(cap[:n])
            left -= n
        if left:
            raise ValueError("pages too small for size")  # programmer error

    @classmethod
    def of(cls, buf: memoryview | bytearray, size: int | None = None) -> SlotBuffers:
        """One contiguous buffer as a slot (tests, benchmarks)."""
        mv = memoryview(buf).cast("B")
        return cls(mv, [(0, 1)], len(mv), len(mv) if size is None else size)

    def padded(self, align: int) -> list[memoryview] | None:
        """Views rounded up to ``align``; None when the slack is too small."""
        out = list(self.views)
        if not out:
            return out
        last = len(out[-1])
        want = -(-last // align) * align
        if want > len(self._capacity[-1]):
            return None
        out[-1] = self._capacity[-1][:want]
        return out


def sealed_header(
    stats: TierStats,
    key: bytes,
    slot: SlotBuffers,
    writer_checksum: int,
    fingerprint: bytes = NO_FINGERPRINT,
    meta: ChunkMeta | None = None,
    stored_bytes: int | None = None,
    codec: int = CODEC_NONE,
) -> bytes:
    """The header block every store writes in front of a chunk. Pair check first: the
    arena bytes must still match the writer's checksum. A chunk without one (0) is
    flagged unverified; the header's checksum then guards only this tier's copy."""
    got = checksum(slot.views)
    if writer_checksum and got != writer_checksum:
        stats.error("arena bytes do not match their committed checksum", key.hex())
        raise CorruptEntry("arena bytes do not match their committed checksum")
    stored = slot.size if stored_bytes is None else stored_bytes
    h = make_header(key, slot.size, stored, got, codec, fingerprint, bool(writer_checksum))
    return header_block(h, meta)


def read_back(h: Header, slot: SlotBuffers, block: bytes | bytearray | memoryview) -> int:
    """After a read into ``slot``: the payload must match its header (else
    CorruptEntry). Returns the writer's checksum (NO_CHECKSUM for an unverified
    chunk) and fills ``slot.meta`` from the header block."""
    if checksum(slot.views) != h.checksum:
        raise CorruptEntry("payload checksum mismatch")
    slot.meta = decode_meta(block)
    return h.checksum if h.verified else NO_CHECKSUM


class TierStats:
    """Counters and gauges of one tier. Updated from I/O threads and the loop."""

    COUNTERS = (
        "hits", "misses", "reads", "writes", "read_bytes", "write_bytes", "errors",
        "dropped", "corrupt", "evictions", "deletes",
    )  # fmt: skip

    def __init__(self, name: str = "tier", clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        # error kind -> (when last logged, occurrences since): kinds are fixed strings
        # in the stores' code, so this map stays small.
        self._reported: dict[str, tuple[float, int]] = {}
        self._read_ops: deque[tuple[float, float, int]] = deque(maxlen=RATE_SAMPLES_MAX)
        self._write_ops: deque[tuple[float, float, int]] = deque(maxlen=RATE_SAMPLES_MAX)

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def error(self, kind: str, detail: object = "", *also: str) -> None:
        """Count one operating error (``errors`` and the counters in ``also``) and log
        it: the first time, then at most every ``ERROR_LOG_EVERY_S`` per kind with the
        number seen in between. ``kind`` must be a fixed string, never per key."""
        now = self._clock()
        with self._lock:
            self.counters["errors"] += 1
            for name in also:
                self.counters[name] += 1
            last, quiet = self._reported.get(kind, (None, 0))
            if last is not None and now - last < ERROR_LOG_EVERY_S:
                self._reported[kind] = (last, quiet + 1)
                return
            self._reported[kind] = (now, 0)
        more = f" ({quiet} more since the last report)" if quiet else ""
        log.warning("tier %s: %s: %s%s", self.name, kind, detail, more)

    def recovered(self, what: str) -> None:
        """The tier works again: log it once and let the next failure be reported."""
        with self._lock:
            self._reported.clear()
        log.warning("tier %s: %s", self.name, what)

    def read_done(self, t0: float, nbytes: int) -> None:
        self._done("reads", "read_bytes", self._read_ops, t0, nbytes)

    def write_done(self, t0: float, nbytes: int) -> None:
        self._done("writes", "write_bytes", self._write_ops, t0, nbytes)

    def _done(self, ops: str, nb: str, ring: deque, t0: float, nbytes: int) -> None:
        t1 = time.perf_counter()
        with self._lock:
            self.counters[ops] += 1
            self.counters[nb] += nbytes
            ring.append((t0, t1, nbytes))

    @staticmethod
    def _gbps(ring: deque[tuple[float, float, int]]) -> float:
        # Bytes of the last operations over the wall time they spanned: the aggregate
        # rate across I/O threads while the tier was busy, not a per-call average.
        if not ring:
            return 0.0
        span = max(t1 for _, t1, _ in ring) - min(t0 for t0, _, _ in ring)
        total = sum(n for _, _, n in ring)
        return round(total / span / 1e9, 3) if span > 0 else 0.0

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            out: dict[str, float] = dict(self.counters)
            out["read_gbps"] = self._gbps(self._read_ops)
            out["write_gbps"] = self._gbps(self._write_ops)
        return out


class TierStore(Protocol):
    name: str
    stats: TierStats

    def size_of(self, key: bytes) -> int | None:
        """Payload size when this node knows the tier holds ``key``; no I/O."""
        ...

    def may_probe(self, key: bytes) -> bool:
        """Whether an I/O probe for a key not known locally is worth it; no I/O."""
        ...

    def probe(self, key: bytes) -> int | None:
        """Ask the tier itself (I/O); the payload size, or None when absent."""
        ...

    def put(
        self,
        key: bytes,
        slot: SlotBuffers,
        checksum: int,
        fingerprint: bytes = NO_FINGERPRINT,
        meta: ChunkMeta | None = None,
    ) -> bool:
        """Store the slot's bytes. False: not stored by choice (present, too large).
        ``checksum`` is the committed one (0: unknown); a mismatch is not stored."""
        ...

    def read_into(self, key: bytes, slot: SlotBuffers) -> int | None:
        """Fill ``slot`` (and ``slot.meta``) and return the writer's checksum, checked
        against the bytes (0: the writer gave none, the chunk stays unverified); None
        when absent."""
        ...

    def delete(self, key: bytes) -> None: ...

    def healthy(self) -> bool:
        """False while the tier is failing (writes are dropped, probes skipped)."""
        ...

    def gauges(self) -> dict[str, int]:
        """entries, bytes, bytes_max."""
        ...

    def take_changes(self) -> tuple[list[tuple[bytes, ChunkMeta | None]], list[bytes]]:
        """Chunks found at start (with their metadata) and chunks the tier dropped on
        its own (eviction) since the last call: for KV events."""
        ...

    def startup_scan(self) -> Callable[[], None] | None:
        """Work to run once in an I/O thread at start (e.g. index the files already on
        disk), or None."""
        ...

    def take_listing(self) -> Listing | None:
        """For the shared lookup listing: None when the tier cannot list its keys (or
        not yet: a scan runs); else what changed since the last call, or every key
        when the listing must be rebuilt (at the first call, and after a gap)."""
        ...

    def set_capacity(self, bytes_max: int) -> int | None:
        """Runtime change of the tier's size (SIGHUP). Returns the previous size, or
        None when this tier has no size of its own (S3)."""
        ...

    def close(self) -> None: ...


@dataclass(slots=True)
class Listing:
    """A tier's keys for the shared lookup listing: ``full`` (every key: rebuild) or
    ``changes`` ((True, key) added, (False, key) removed, in order) since the last call."""

    full: list[bytes] | None
    changes: list[tuple[bool, bytes]]


class StatelessStore:
    """The parts of ``TierStore`` for a tier with no local state to recover or size:
    nothing found at start, nothing dropped but on request (S3, the in-memory store)."""

    def take_listing(self) -> Listing | None:
        return None  # nothing this node could list

    def take_changes(self) -> tuple[list[tuple[bytes, ChunkMeta | None]], list[bytes]]:
        return [], []

    def startup_scan(self) -> Callable[[], None] | None:
        return None

    def set_capacity(self, bytes_max: int) -> int | None:
        return None
