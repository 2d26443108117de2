"""The shared lookup index: which keys the arena holds, readable without a round trip.

The agent's loop thread is the one writer; any number of processes read it without a
lock and without ever making the writer wait. A reader's hit is a hint: the pin that
follows confirms it, so a stale hit costs one failed pin, never wrong KV. A reader's
miss is definitive while ``lower_mode`` is ``LOWER_NONE`` (no disk, S3 or peers could
have the chunk). With ``LOWER_LISTED`` the disk tier is the only lower tier and its
keys are published the same way in a second segment (``listing_name``): a key in
neither is a definitive miss too. ``LOWER_ASK``: ask the agent about misses.

Layout of the POSIX shm segment (little-endian uint64 words)::

    header (one 4 KiB page): magic, version, capacity, generation, hseq, active,
                             lower_tiers, closed, heartbeat_ns, probe_max
    table 0: capacity seqs, then capacity fps (a slot is seq[i] with fp[i])
    table 1: the same                        (rebuilt into, then made active)

- A slot is a seqlock: ``seq`` is odd while the writer changes ``fp``; a reader takes
  a slot only if it read the same even ``seq`` before and after ``fp``. ``fp`` is a
  64-bit fingerprint of the 16-byte key; 0 marks an empty slot, 1 a tombstone.
- Open addressing with linear probing. Deletion leaves a tombstone (an empty slot would
  cut the probe chains of later keys) unless the next slot is empty. Invariant: for a
  key in slot ``s`` with home ``h``, no slot in ``[h, s)`` is empty, at every instant,
  so a reader never stops before a key that is present for the whole read.
- Too many tombstones: the writer rebuilds into the inactive table and flips
  ``active`` under the header seqlock ``hseq``; a reader whose read spanned a flip
  reads again. Readers never wait on the writer and the writer never waits on readers.
- The writer stamps ``heartbeat_ns`` (CLOCK_MONOTONIC, shared by the host's processes)
  from its loop; a reader treats an index not stamped for ``stale_s`` as gone (the agent
  died), as it does a ``closed`` one. A new writer marks the segment it replaces closed
  before unlinking it, so readers of a crashed agent's index notice the new one.

Memory order: the seqlocks need the writer's three stores and the reader's three
gathers seen in program order. x86-64 keeps that (total store order) but Arm and POWER
do not, so both sides put an explicit full fence between them (``fence()``); see there.

Every word read from the segment is bounded before use: any process of the agent's
user (or group) can write it. A header out of range (capacity, probe length, pid) makes
the reader raise ``ArenaError`` ("ask the agent"), never size an allocation. The bytes
of a hit are never trusted from here either: the pin that follows confirms it.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import posix_ipc

from kvnode.errors import ArenaError
from kvnode.ipc.process import pid_namespace
from kvnode.ipc.segment import create_mapping

MAGIC = int.from_bytes(b"KVNIDX01", "little")
VERSION = 2
KEY_BYTES = 16
HEADER_BYTES = 4096
LOAD_FACTOR_MAX = 0.5  # live entries per slot that capacity_for() sizes for
FILL_MAX = 0.75  # live + tombstones per slot before a rebuild
CAPACITY_MIN = 64
STALE_S = 2.0  # a writer that has not stamped the header for this long is gone
WINDOW_SLOTS = 32  # slots gathered per key at once: at load 0.5 nearly every probe chain
READ_RETRIES_MAX = 16  # torn or flipped reads retried before giving up
REOPEN_INTERVAL_S = 0.5
# Longest probe chain the writer lays out and a reader follows. Keys are chosen by
# clients, so a client could make chains long on purpose: a key that would sit farther
# from its home is not published (readers miss it, a lost hit). At load <= 0.75 random
# keys never come near it.
PROBE_LIMIT = 1024
CAPACITY_MAX = 1 << 32  # slots a reader accepts (64 GiB of tables)
PID_MAX = 1 << 22  # Linux's PID_MAX_LIMIT
GATHER_SLOTS_MAX = 1 << 20  # slots one far-probe gather reads at once (8 MiB per array)

EMPTY, TOMB = 0, 1
GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads sequential fingerprints
_M64 = (1 << 64) - 1

# header word indices
_MAGIC, _VERSION, _CAPACITY, _GENERATION, _HSEQ, _ACTIVE = 0, 1, 2, 3, 4, 5
_LOWER, _CLOSED, _HEARTBEAT, _PROBE_MAX, _PID, _PID_NS = 6, 7, 8, 9, 10, 11
_HEADER_WORDS = HEADER_BYTES // 8

# lower_mode (header word _LOWER): what a miss in this index means. Readers that only
# know "nonzero: ask" stay correct with every value.
LOWER_NONE = 0  # nothing below the arena: a miss is definitive
LOWER_ASK = 1  # S3, peers, or a disk listing not (yet) complete: ask the agent
LOWER_LISTED = 2  # only the disk, whose keys are all in listing_name(): check there


def listing_name(index_name: str) -> str:
    """The segment that lists the disk tier's keys, next to the arena's index."""
    return index_name + "-disk"


def capacity_for(entries_max: int) -> int:
    """Slots for at most ``entries_max`` live keys at load factor <= 0.5 (power of two).
    The arena's most entries is its page count: every entry holds at least one page."""
    need = max(CAPACITY_MIN, int(entries_max / LOAD_FACTOR_MAX))
    return 1 << (need - 1).bit_length()


def segment_bytes(capacity: int) -> int:
    return HEADER_BYTES + 2 * capacity * 16


def fingerprint(key: bytes) -> int:
    """The 64-bit fingerprint of one key (the same as ``fingerprints`` computes)."""
    # The low 64 bits of a 128-bit content hash are already uniform. (Folding in the high
    # half by XOR made every key with equal halves collide.)
    return max(int.from_bytes(key[:8], "little"), 2)  # 0 and 1: empty slot, tombstone


def fingerprints(keys: Sequence[bytes]) -> np.ndarray:
    """Fingerprints of many 16-byte keys, vectorised (keys are already hashes)."""
    raw = np.frombuffer(b"".join(keys), dtype="<u8")
    if raw.size != 2 * len(keys):
        raise ValueError(f"keys must be {KEY_BYTES} bytes each")
    fp = raw[0::2].copy()
    np.maximum(fp, np.uint64(2), out=fp)
    return fp


_fence_locks = threading.local()


def fence() -> None:
    """A full memory fence between the loads and stores before and after the call.

    Python has no fence of its own; a lock's release followed by its acquire is one on
    every CPU CPython runs on: the release is a store-release (every earlier load and
    store is visible first), the acquire that follows it a load-acquire (no later access
    moves above it), and a load-acquire after a store-release in program order is
    ordered (RCsc: Arm's STLR/LDAR, POWER's lwsync pairs, x86's locked instructions).
    One lock per thread, held between calls, so threads never release each other's."""
    lock = getattr(_fence_locks, "lock", None)
    if lock is None:
        lock = _fence_locks.lock = threading.Lock()
        lock.acquire()
    lock.release()
    lock.acquire()


def _home_shift(capacity: int) -> int:
    return 64 - (capacity.bit_length() - 1)


def _home(fp: int, shift: int) -> int:
    return ((fp * GOLDEN) & _M64) >> shift


class ShmIndexWriter:
    """The agent's side: create the segment, keep it in step with the arena's committed
    entries. Not thread-safe: one thread (the agent's loop) makes every call."""

    def __init__(
        self, name: str, capacity: int, group: str | None = None, generation: int = 0
    ) -> None:
        if capacity < CAPACITY_MIN or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two >= {CAPACITY_MIN}")
        self.name = name
        self.capacity = capacity
        self.generation = generation or int.from_bytes(os.urandom(6), "little") or 1
        self._mask = capacity - 1
        self._shift = _home_shift(capacity)
        self._buf = _create(name, segment_bytes(capacity), group or "")
        self._w = memoryview(self._buf).cast("Q")
        # [table][0: seqs, 1: fps][slot]
        self._tables = np.frombuffer(self._buf, "<u8", offset=HEADER_BYTES).reshape(2, 2, capacity)
        self._active = 0
        self._where: dict[int, int] = {}  # fingerprint -> slot in the active table
        self._refs: dict[int, int] = {}  # fingerprint -> live keys (collisions share a slot)
        self.tombstones = 0
        self.probe_max = 0
        self.rebuilds = 0
        self.full_refusals = 0
        self.probe_refusals = 0  # keys not published: their chain would pass PROBE_LIMIT
        self._closed = False
        self._init_header()

    def _init_header(self) -> None:
        w = self._w
        w[_VERSION], w[_CAPACITY], w[_GENERATION] = VERSION, self.capacity, self.generation
        w[_HEARTBEAT] = time.monotonic_ns()
        w[_PID], w[_PID_NS] = os.getpid(), pid_namespace()
        fence()
        w[_MAGIC] = MAGIC  # last: a reader that sees the magic sees a whole header

    # ------------------------------------------------------------------ state
    @property
    def count(self) -> int:
        return len(self._where)

    def __contains__(self, key: bytes) -> bool:
        return fingerprint(key) in self._refs

    def set_lower_tiers(self, on: bool) -> None:
        """On while disk, S3 or peers could hold a key the arena lacks."""
        self.set_lower_mode(LOWER_ASK if on else LOWER_NONE)

    def set_lower_mode(self, mode: int) -> None:
        """``LOWER_NONE``, ``LOWER_ASK`` or ``LOWER_LISTED`` (see the module text)."""
        if mode not in (LOWER_NONE, LOWER_ASK, LOWER_LISTED):
            raise ValueError(f"unknown lower mode {mode}")
        if not self._closed:
            self._w[_LOWER] = mode

    @property
    def lower_mode(self) -> int:
        return int(self._w[_LOWER])

    def touch(self) -> None:
        """Stamp the heartbeat; call at least every second from the writer's loop."""
        if not self._closed:
            self._w[_HEARTBEAT] = time.monotonic_ns()

    # ------------------------------------------------------------------ mutations
    def insert(self, key: bytes) -> bool:
        """Publish a committed key. False when the table is full (readers miss it)."""
        if self._closed:
            return False
        fp = fingerprint(key)
        refs = self._refs.get(fp, 0)
        if refs:
            self._refs[fp] = refs + 1
            return True
        if self.count + 1 > self.capacity * FILL_MAX:
            self.full_refusals += 1
            return False
        if self.count + self.tombstones + 1 > self.capacity * FILL_MAX:
            self._rebuild()
        slot, dist = self._free_slot(fp)
        if dist > PROBE_LIMIT:
            self.probe_refusals += 1  # readers miss it: a lost hit, never a wrong one
            return False
        if dist > self.probe_max:
            self.probe_max = dist
            self._w[_PROBE_MAX] = dist  # before the slot: a reader must probe that far
            fence()
        if self._fp_at(slot) == TOMB:
            self.tombstones -= 1
        self._store(slot, fp)
        self._where[fp] = slot
        self._refs[fp] = 1
        return True

    def remove(self, key: bytes) -> bool:
        """Withdraw a key the arena no longer holds committed (evicted, dropped)."""
        if self._closed:
            return False
        fp = fingerprint(key)
        refs = self._refs.get(fp, 0)
        if refs == 0:
            return False
        if refs > 1:
            self._refs[fp] = refs - 1
            return True
        del self._refs[fp]
        slot = self._where.pop(fp)
        if self._fp_at((slot + 1) & self._mask) == EMPTY:
            self._store(slot, EMPTY)
            self._empty_tombstones_before(slot)
        else:
            self._store(slot, TOMB)
            self.tombstones += 1
        return True

    def _empty_tombstones_before(self, slot: int) -> None:
        """Tombstones right before an empty slot end no chain: make them empty too.
        (Bounded: the table is shared memory another process could have filled.)"""
        prev = (slot - 1) & self._mask
        for _ in range(self.capacity):
            if self._fp_at(prev) != TOMB:
                return
            self._store(prev, EMPTY)
            self.tombstones -= 1
            prev = (prev - 1) & self._mask

    def _free_slot(self, fp: int) -> tuple[int, int]:
        """The first free slot of ``fp``'s chain and its distance from home; a distance
        past ``PROBE_LIMIT`` means none within reach."""
        slot = _home(fp, self._shift)
        for dist in range(PROBE_LIMIT + 1):
            if self._fp_at(slot) <= TOMB:
                return slot, dist
            slot = (slot + 1) & self._mask
        return slot, PROBE_LIMIT + 1

    def _base(self) -> int:
        """Word index of the active table's first seq; its fps follow ``capacity`` on."""
        return HEADER_BYTES // 8 + self._active * self.capacity * 2

    def _fp_at(self, slot: int) -> int:
        return int(self._w[self._base() + self.capacity + slot])

    def _store(self, slot: int, fp: int) -> None:
        """Seqlocked store: odd seq, fingerprint, even seq, in that order."""
        i = self._base() + slot
        w = self._w
        busy, done = _seqlock_steps(w[i])
        w[i] = busy
        fence()
        w[i + self.capacity] = fp
        fence()
        w[i] = done

    # ------------------------------------------------------------------ rebuild
    def _rebuild(self) -> None:
        """Lay the live keys out afresh in the inactive table, then flip to it. Readers
        of the old table notice the flip (hseq) and read again."""
        target = 1 - self._active
        table = self._tables[target]
        fps = np.fromiter(self._where.keys(), dtype=np.uint64, count=len(self._where))
        slots, probe_max = _layout(fps, self.capacity, self._shift)
        while probe_max > PROBE_LIMIT:
            # Keys chosen to share a home: leave out those past the limit (the rest
            # only move closer to home when they go).
            far = ((slots - _homes(fps, self._shift)) % self.capacity) > PROBE_LIMIT
            for fp in fps[far].tolist():
                del self._refs[fp]
            self.probe_refusals += int(far.sum())
            fps = fps[~far]
            slots, probe_max = _layout(fps, self.capacity, self._shift)
        new_fp = np.zeros(self.capacity, np.uint64)
        new_fp[slots] = fps
        table[0] += np.uint64(2)  # seqs only grow: a slot never repeats a version
        table[1] = new_fp
        w = self._w
        busy, done = _seqlock_steps(w[_HSEQ])
        fence()  # the new table before the flip
        w[_HSEQ] = busy
        fence()
        w[_ACTIVE] = target
        w[_PROBE_MAX] = probe_max
        fence()
        w[_HSEQ] = done
        self._active = target
        self._where = dict(zip(fps.tolist(), slots.tolist(), strict=True))
        self.tombstones = 0
        self.probe_max = probe_max
        self.rebuilds += 1

    def replace_all(self, keys: Sequence[bytes]) -> bool:
        """Publish exactly ``keys`` (a full listing, e.g. after a scan), laid out afresh
        and flipped to at once. False (nothing changed) when they do not fit."""
        if self._closed:
            return False
        if keys:
            fps, counts = np.unique(fingerprints(keys), return_counts=True)
        else:
            fps, counts = np.zeros(0, np.uint64), np.zeros(0, np.int64)
        if len(fps) > self.capacity * FILL_MAX:
            self.full_refusals += 1
            return False
        self._refs = dict(zip(fps.tolist(), counts.tolist(), strict=True))
        self._where = dict.fromkeys(self._refs, 0)  # laid out by _rebuild
        self._rebuild()
        return True

    # ------------------------------------------------------------------ teardown
    def close(self, unlink: bool = True) -> None:
        """Mark the index closed (readers stop trusting it at once), then unlink and
        unmap. Later mutations are no-ops: the loop may still evict while it drains."""
        if self._closed:
            return
        _mark_closed(self._w)
        self._closed = True
        if unlink:
            _unlink(self.name)
        self._tables = np.zeros((2, 2, 0), np.uint64)
        self._w.release()
        self._buf.close()


def _homes(fps: np.ndarray, shift: int) -> np.ndarray:
    return ((fps * np.uint64(GOLDEN)) >> np.uint64(shift)).astype(np.int64)


def _layout(fps: np.ndarray, capacity: int, shift: int) -> tuple[np.ndarray, int]:
    """Linear-probing slots for distinct fingerprints, vectorised: sorted by home, a
    key lands at max(home, previous slot + 1). Runs past the end wrap to the first
    free slots from 0 (few). Returns (slots in the order of ``fps``, longest probe)."""
    n = fps.size
    if n == 0:
        return np.zeros(0, np.int64), 0
    home = _homes(fps, shift)
    order = np.argsort(home, kind="stable")
    h = home[order]
    ramp = np.arange(n, dtype=np.int64)
    pos = ramp + np.maximum.accumulate(h - ramp)
    wrapped = pos >= capacity
    if wrapped.any():
        used = np.zeros(capacity, bool)
        used[pos[~wrapped]] = True
        free = iter(np.flatnonzero(~used).tolist())
        for i in np.flatnonzero(wrapped).tolist():
            pos[i] = next(free)  # lowest free slots: after the run, in order
    slots = np.empty(n, np.int64)
    slots[order] = pos
    dist = (slots - home) % capacity
    return slots, int(dist.max())


class ShmIndexReader:
    """A process's read-only view of the index. ``contains_many`` raises ``ArenaError``
    when the index is closed, stale or unreadable: ask the agent instead."""

    def __init__(self, name: str, stale_s: float = STALE_S) -> None:
        self.name = name
        self.stale_ns = int(stale_s * 1e9)
        self._pid_ns = pid_namespace()
        self.reopens = 0
        self.retries = 0
        self._next_reopen_s = 0.0
        self._map()

    def _map(self) -> None:
        buf = _open(self.name)
        h = memoryview(buf).cast("Q")
        cap = int(h[_CAPACITY])
        fits = CAPACITY_MIN <= cap <= CAPACITY_MAX and not cap & (cap - 1)
        if (
            h[_MAGIC] != MAGIC
            or h[_VERSION] != VERSION
            or not fits
            or len(buf) < segment_bytes(cap)
        ):
            h.release()
            buf.close()
            raise ArenaError(f"index segment {self.name} has an unknown layout")
        self._buf, self._h = buf, h
        self.capacity = cap
        self._shift = np.uint64(_home_shift(cap))
        tables = np.frombuffer(buf, "<u8", offset=HEADER_BYTES, count=4 * cap).reshape(2, 2, cap)
        self._cols = [(tables[t, 0], tables[t, 1]) for t in (0, 1)]
        self._offsets = np.arange(WINDOW_SLOTS, dtype=np.int64)

    @property
    def generation(self) -> int:
        return int(self._h[_GENERATION])

    @property
    def lower_tiers(self) -> bool:
        return bool(self._h[_LOWER])

    @property
    def lower_mode(self) -> int:
        """``LOWER_NONE``/``LOWER_ASK``/``LOWER_LISTED``; an unknown value reads as ask."""
        mode = int(self._h[_LOWER])
        return mode if mode in (LOWER_NONE, LOWER_LISTED) else LOWER_ASK

    def usable(self) -> bool:
        """Not closed, stamped lately, and (when the reader can see it: the same pid
        namespace) its writer process still exists, so a killed agent's index stops
        answering at once, not ``stale_s`` later."""
        h = self._h
        if h[_CLOSED] or time.monotonic_ns() - h[_HEARTBEAT] >= self.stale_ns:
            return False
        pid = int(h[_PID])
        if pid > PID_MAX:
            return False  # not a pid: the header was written by someone else
        return self._pid_ns != h[_PID_NS] or _alive(pid)

    def reopen(self) -> bool:
        """Map the segment now under this name (the agent may have restarted). False
        when there is none, or it was tried less than REOPEN_INTERVAL_S ago."""
        now = time.monotonic()
        if now < self._next_reopen_s:
            return False
        self._next_reopen_s = now + REOPEN_INTERVAL_S
        old = (self._buf, self._h, self._cols)
        try:
            self._map()
        except ArenaError:
            return False
        self.reopens += 1
        _release(*old)
        return True

    def close(self) -> None:
        _release(self._buf, self._h, self._cols)
        self._cols = []

    # ------------------------------------------------------------------ lookups
    def contains_many(self, keys: Sequence[bytes]) -> np.ndarray:
        """Per key, whether the index holds it: a bool array. A key present for the
        whole call is always found; True for a key removed meanwhile is possible."""
        if not self.usable() and not (self.reopen() and self.usable()):
            raise ArenaError(f"index {self.name} is closed or its writer is gone")
        if not keys:
            return np.zeros(0, bool)
        fp = fingerprints(keys)
        home = ((fp * np.uint64(GOLDEN)) >> self._shift).view(np.int64)  # < 2**63
        h = self._h
        for _ in range(READ_RETRIES_MAX):
            hseq = h[_HSEQ]
            fence()
            if not hseq & 1:
                seqs, fps = self._cols[h[_ACTIVE] & 1]
                probe_max = int(h[_PROBE_MAX])
                if probe_max > min(PROBE_LIMIT, self.capacity - 1):
                    raise ArenaError(f"index {self.name}: probe length {probe_max} out of range")
                hit = self._probe(fp, home, seqs, fps, probe_max)
                fence()
                if hit is not None and h[_HSEQ] == hseq:
                    return hit
            self.retries += 1
        raise ArenaError(f"index {self.name} changed under {READ_RETRIES_MAX} reads")

    def read_slots(self, slots: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
        """Diagnostics: (active table, seqs, fingerprints) of ``slots`` as one consistent
        read, or None when a slot was mid-write or the table flipped meanwhile."""
        hseq = self._h[_HSEQ]
        fence()
        active = int(self._h[_ACTIVE] & 1)
        got = self._read(*self._cols[active], np.asarray(slots, np.int64))
        fence()
        if got is None or hseq & 1 or self._h[_HSEQ] != hseq:
            return None
        return active, got[0], got[1]

    @staticmethod
    def _read(
        seqs: np.ndarray, fps: np.ndarray, idx: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Seqlocked gather: seqs, fingerprints, seqs again, as three separate loads in
        that order; None if any slot changed meanwhile or was being written. Indices
        past the end wrap (probe chains do)."""
        s1 = seqs.take(idx, mode="wrap")
        fence()
        f = fps.take(idx, mode="wrap")
        fence()
        s2 = seqs.take(idx, mode="wrap")
        if not (s1 == s2).all() or np.bitwise_or.reduce(s1, axis=None) & 1:
            return None
        return s1, f

    def _probe(
        self, fp: np.ndarray, home: np.ndarray, seqs: np.ndarray, fps: np.ndarray, probe_max: int
    ) -> np.ndarray | None:
        """One read of every key's probe chain; None if any slot read was torn. A match
        anywhere in the window means the key was in the table at that instant."""
        width = min(WINDOW_SLOTS, probe_max + 1)
        got = self._read(seqs, fps, home[:, None] + self._offsets[:width])
        if got is None:
            return None
        f = got[1]
        hit = (f == fp[:, None]).any(1)
        if width > probe_max or hit.all():
            return hit
        open_ = ~hit & ~(f == EMPTY).any(1)
        if open_.any():
            more = self._probe_far(fp[open_], home[open_], seqs, fps, probe_max)
            if more is None:
                return None
            hit[open_] = more
        return hit

    def _probe_far(
        self, fp: np.ndarray, home: np.ndarray, seqs: np.ndarray, fps: np.ndarray, probe_max: int
    ) -> np.ndarray | None:
        """The rare keys whose chain runs past the first window: the rest of it, up
        to ``probe_max``, in gathers of at most ``GATHER_SLOTS_MAX`` slots."""
        offsets = np.arange(WINDOW_SLOTS, probe_max + 1, dtype=np.int64)
        rows = max(1, GATHER_SLOTS_MAX // max(1, offsets.size))
        out = np.zeros(fp.size, bool)
        for lo in range(0, fp.size, rows):
            got = self._read(seqs, fps, home[lo : lo + rows, None] + offsets)
            if got is None:
                return None
            match = got[1] == fp[lo : lo + rows, None]
            # Only a match before the chain's first empty slot counts.
            empty = got[1] == EMPTY
            first_empty = np.where(empty.any(1), empty.argmax(1), offsets.size)
            first_match = np.where(match.any(1), match.argmax(1), offsets.size)
            out[lo : lo + rows] = first_match < first_empty
        return out


# ---------------------------------------------------------------- segment handling
def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # unknown: the heartbeat decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def _create(name: str, size: int, group: str) -> mmap.mmap:
    """A fresh owner-only (or group) segment; one left by another writer is marked
    closed first so its readers stop trusting it."""
    _retire(name)
    return create_mapping(name, size, group, "index segment", reserve=True)


def _retire(name: str) -> None:
    try:
        shm = posix_ipc.SharedMemory(name, 0)
    except posix_ipc.ExistentialError:
        return
    except (posix_ipc.Error, OSError) as exc:
        raise ArenaError(f"cannot open old index segment {name}: {exc}") from exc
    try:
        if shm.size >= HEADER_BYTES:
            buf = mmap.mmap(shm.fd, HEADER_BYTES, mmap.MAP_SHARED)
            words = memoryview(buf).cast("Q")
            if words[_MAGIC] == MAGIC:
                _mark_closed(words)
            words.release()
            buf.close()
    finally:
        shm.close_fd()
    _unlink(name)


def _mark_closed(words: Any) -> None:
    busy, done = _seqlock_steps(words[_HSEQ])
    words[_HSEQ] = busy
    fence()
    words[_CLOSED] = 1
    fence()
    words[_HSEQ] = done


def _seqlock_steps(seq: int) -> tuple[int, int]:
    """The odd (writing) and next even (written) values after ``seq``, modulo 2**64.
    The segment is shared memory: whatever word is found there (another writer of
    the agent's group may have scribbled on it) gives two storable values."""
    base = int(seq) & ~1 & _M64
    return (base + 1) & _M64, (base + 2) & _M64


def _open(name: str) -> mmap.mmap:
    try:
        shm = posix_ipc.SharedMemory(name, 0, read_only=True)
    except (posix_ipc.Error, OSError) as exc:
        raise ArenaError(f"cannot open index segment {name}: {exc}") from exc
    try:
        if shm.size < HEADER_BYTES:
            raise ArenaError(f"index segment {name} is too small")
        return mmap.mmap(shm.fd, shm.size, mmap.MAP_SHARED, mmap.PROT_READ)
    except OSError as exc:
        raise ArenaError(f"cannot map index segment {name}: {exc}") from exc
    finally:
        shm.close_fd()


def _release(buf: mmap.mmap, header: memoryview, cols: list[Any]) -> None:
    cols.clear()
    header.release()
    try:
        buf.close()
    except BufferError:
        pass  # a caller still holds an array over it: the mapping lives until then


def _unlink(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


__all__ = [
    "ShmIndexReader",
    "ShmIndexWriter",
    "capacity_for",
    "fingerprint",
    "fingerprints",
    "segment_bytes",
]
