"""The index: key -> entry, the two-phase lifecycle and eviction.

    absent -> RESERVED (write lease of one client) -> COMMITTED (readable)
           -> EVICTING (a lower tier is copying it out; invisible to readers) -> absent

Invariants (checked by ``check()``, raised even under ``python -O``):
- live entries (any state) never share a page;
- a pinned or reserved entry is never evicted;
- ``bytes_used`` equals the sum of live entries' sizes; pages used + free = total.
The index moves no bytes; it only decides which pages hold which key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum

from kvnode.agent.allocator import AllocatorInvariantError, Extent, PageAllocator
from kvnode.agent.policy import EvictionPolicy, make_policy
from kvnode.ipc.protocol import Status

AGENT_OWNER = 0  # client id used for reservations the agent makes itself (promotions)


class State(IntEnum):
    RESERVED = 1
    COMMITTED = 2
    EVICTING = 3


@dataclass(slots=True, eq=False)
class Entry:
    key: bytes
    size: int
    pages: list[Extent]
    state: State = State.RESERVED
    owner: int = AGENT_OWNER  # reserving client while RESERVED
    checksum: int = 0
    pins: int = 0
    lease_deadline: float = 0.0
    hits: int = 0

    def extents(self, page_bytes: int) -> list[tuple[int, int]]:
        """Byte extents (offset, length) covering exactly ``size`` bytes."""
        out = []
        left = self.size
        for start, count in self.pages:
            n = min(left, count * page_bytes)
            out.append((start * page_bytes, n))
            left -= n
        return out


# Called when a committed entry is chosen for eviction. Returns True when the callee
# keeps the entry's pages until it calls ``Index.finish_evict(key)`` (write-back).
EvictHook = Callable[[Entry], bool]


@dataclass(slots=True)
class IndexCounters:
    evictions: int = 0
    evict_deferred: int = 0
    evict_unsaved: int = 0  # evicted without write-back: the lower tier still held pages
    expired_leases: int = 0
    reserve_no_space: int = 0


class Index:
    def __init__(
        self,
        arena_bytes: int,
        page_bytes: int,
        policy: str | EvictionPolicy = "s3fifo",
        clock: Callable[[], float] = time.monotonic,
        reserve_ttl_s: float = 60.0,
    ) -> None:
        self.page_bytes = page_bytes
        self.alloc = PageAllocator(arena_bytes // page_bytes)
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.entries: dict[bytes, Entry] = {}
        self.bytes_used = 0
        self.reserved = 0
        self.pinned = 0
        self.evicting_pages = 0  # pages of EVICTING entries (freed when write-back ends)
        self.clock = clock
        self.reserve_ttl_s = reserve_ttl_s
        self.on_evict: EvictHook | None = None
        self.counters = IndexCounters()

    # -- reads ---------------------------------------------------------------
    def lookup(self, key: bytes) -> Entry | None:
        """A committed entry, or None. Side effect: recency only."""
        e = self.entries.get(key)
        if e is None or e.state is not State.COMMITTED:
            return None
        self.policy.touch(key)
        e.hits += 1
        return e

    def contains(self, key: bytes) -> bool:
        return key in self.entries

    def pin(self, key: bytes) -> Entry | None:
        e = self.lookup(key)
        if e is None:
            return None
        if e.pins == 0:
            self.pinned += 1
        e.pins += 1
        return e

    def unpin(self, key: bytes, count: int = 1) -> None:
        e = self.entries.get(key)
        if e is None or e.pins < count:
            raise AllocatorInvariantError(f"unpin of an entry not pinned {count}x")
        e.pins -= count
        if e.pins == 0:
            self.pinned -= 1

    # -- writes ----------------------------------------------------------------
    def reserve(self, key: bytes, size: int, owner: int) -> tuple[Status, Entry | None]:
        if key in self.entries:
            return Status.EXISTS, None
        if size <= 0:
            return Status.TOO_LARGE, None
        pages = -(-size // self.page_bytes)
        if pages > self.alloc.pages_total:
            return Status.TOO_LARGE, None
        got = self.alloc.alloc(pages)
        if got is None:
            self.evict_pages(pages)
            got = self.alloc.alloc(pages)
        if got is None:
            self.counters.reserve_no_space += 1
            return Status.NO_SPACE, None
        e = Entry(key, size, got, State.RESERVED, owner)
        e.lease_deadline = self.clock() + self.reserve_ttl_s
        self.entries[key] = e
        self.bytes_used += size
        self.reserved += 1
        return Status.OK, e

    def commit(self, key: bytes, owner: int, checksum: int = 0) -> Status:
        e = self.entries.get(key)
        if e is None:
            return Status.NOT_FOUND
        if e.state is not State.RESERVED or e.owner != owner:
            return Status.BAD_STATE
        e.state = State.COMMITTED
        e.checksum = checksum
        self.reserved -= 1
        self.policy.insert(key)
        return Status.OK

    def abort(self, key: bytes, owner: int) -> bool:
        e = self.entries.get(key)
        if e is None or e.state is not State.RESERVED or e.owner != owner:
            return False
        self.reserved -= 1
        self._free(e)
        return True

    def drop(self, key: bytes) -> bool:
        """Remove a committed, unpinned entry (e.g. it failed a checksum)."""
        e = self.entries.get(key)
        if e is None or e.state is not State.COMMITTED or e.pins:
            return False
        self.policy.remove(key)
        self._free(e)
        return True

    # -- eviction ----------------------------------------------------------------
    def evict_pages(self, pages_needed: int, must_free: bool = True) -> int:
        """Evict unpinned committed entries until ``pages_needed`` pages are free.

        Entries a lower tier takes for write-back keep their pages until the copy is
        done, so they count as "on the way out". Once free + on-the-way-out pages
        suffice, further victims are dropped without write-back (counted in
        ``evict_unsaved``) when ``must_free`` is set: a store must not fail because a
        slow tier holds pages. With ``must_free`` unset (background headroom) it stops
        there. Returns the number of entries evicted."""
        evicted = 0
        skipped: set[bytes] = set()
        while self.alloc.pages_free < pages_needed:
            defer = self.alloc.pages_free + self.evicting_pages < pages_needed
            if not defer and not must_free:
                break
            victim = None
            for key in self.policy.candidates():
                if key in skipped:
                    victim = None
                    break  # went all the way round
                e = self.entries[key]
                if e.pins == 0 and e.state is State.COMMITTED:
                    victim = e
                    break
                skipped.add(key)
            if victim is None:
                break
            self._evict(victim, defer)
            evicted += 1
        return evicted

    def _evict(self, e: Entry, defer: bool = True) -> None:
        self.policy.remove(e.key)
        self.counters.evictions += 1
        if defer and self.on_evict is not None and self.on_evict(e):
            e.state = State.EVICTING
            self.evicting_pages += sum(c for _, c in e.pages)
            self.counters.evict_deferred += 1
            return
        if not defer and self.on_evict is not None:
            self.counters.evict_unsaved += 1
        self._free(e)

    def finish_evict(self, key: bytes) -> None:
        e = self.entries.get(key)
        if e is None or e.state is not State.EVICTING:
            raise AllocatorInvariantError("finish_evict of an entry not evicting")
        self.evicting_pages -= sum(c for _, c in e.pages)
        self._free(e)

    def _free(self, e: Entry) -> None:
        del self.entries[e.key]
        self.bytes_used -= e.size
        self.alloc.free(e.pages)

    # -- lease housekeeping ------------------------------------------------------
    def expire_leases(self) -> list[Entry]:
        now = self.clock()
        dead = [
            e
            for e in self.entries.values()
            if e.state is State.RESERVED and e.owner != AGENT_OWNER and e.lease_deadline < now
        ]
        for e in dead:
            self.reserved -= 1
            self._free(e)
        self.counters.expired_leases += len(dead)
        return dead

    def release_owner(
        self, owner: int, leases: Iterable[bytes], pins: dict[bytes, int]
    ) -> tuple[int, int]:
        """Drop a client's reservations and pins. Returns (leases, pins) reclaimed."""
        n_leases = sum(1 for k in list(leases) if self.abort(k, owner))
        n_pins = 0
        for key, count in pins.items():
            if key in self.entries and count:
                self.unpin(key, count)
                n_pins += count
        return n_leases, n_pins

    # -- invariants ----------------------------------------------------------------
    def check(self) -> None:
        used: list[Extent] = []
        total = 0
        reserved = pinned = 0
        for key, e in self.entries.items():
            if e.key != key:
                raise AllocatorInvariantError("entry filed under another key")
            if sum(c for _, c in e.pages) != -(-e.size // self.page_bytes):
                raise AllocatorInvariantError("entry pages do not match its size")
            used.extend(e.pages)
            total += e.size
            reserved += e.state is State.RESERVED
            pinned += e.pins > 0
            in_policy = e.state is State.COMMITTED
            if e.pins < 0:
                raise AllocatorInvariantError("negative pin count")
            if not in_policy and e.pins:
                raise AllocatorInvariantError("pinned entry that is not committed")
        if total != self.bytes_used:
            raise AllocatorInvariantError(f"bytes_used {self.bytes_used} != {total}")
        evicting = sum(
            sum(c for _, c in e.pages) for e in self.entries.values() if e.state is State.EVICTING
        )
        if evicting != self.evicting_pages:
            raise AllocatorInvariantError("evicting_pages drifted")
        if reserved != self.reserved or pinned != self.pinned:
            raise AllocatorInvariantError("reserved/pinned gauges drifted")
        committed = sum(1 for e in self.entries.values() if e.state is State.COMMITTED)
        if committed != len(self.policy):
            raise AllocatorInvariantError("policy and index disagree on committed entries")
        self.alloc.check(used)


__all__ = ["AGENT_OWNER", "Entry", "Index", "State"]
