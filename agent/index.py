"""The index: key -> entry, the two-phase lifecycle and eviction.

    absent -> RESERVED (write lease of one client) -> COMMITTED (readable)
           -> EVICTING (leaving: invisible to readers, pages held) -> absent

An entry leaves through EVICTING whenever something still reads its pages: client pins
(a drop of a pinned entry) or agent holds (a lower tier copying it out). Its pages are
freed when the last pin and hold are gone, never earlier.

Invariants (checked by ``check()``, raised even under ``python -O``):
- live entries (any state) never share a page;
- a pinned, held or reserved entry is never freed;
- ``bytes_used`` equals the sum of live entries' sizes; pages used + free = total.
The index moves no bytes and calls nobody: eviction returns its victims as data, and
the caller hands them to whoever copies them out.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from kvnode.agent.allocator import AllocatorInvariantError, Extent, PageAllocator
from kvnode.agent.policy import EvictionPolicy, make_policy
from kvnode.agent.tenants import Tenants

if TYPE_CHECKING:
    from kvnode.agent.tiers.format import ChunkMeta

AGENT_OWNER = 0  # client id used for reservations the agent makes itself (promotions)
CLEAN_LOOKAHEAD = 8  # victims passed over for a clean one before one leaves unsaved


class Outcome(IntEnum):
    """The index's answers; the wire protocol maps them to its own status codes."""

    OK = 0
    EXISTS = 1  # reserve: already committed or being written
    NO_SPACE = 2  # reserve: committed, unpinned pages cannot cover it
    NOT_FOUND = 3
    TOO_LARGE = 4
    BAD_STATE = 5  # commit/abort of an entry this owner does not hold


# Kept for callers that still say Status: the values match the wire's.
Status = Outcome


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
    holds: int = 0  # agent-side readers (lower-tier copies in flight)
    group: bytes | None = None  # entries of one group are evicted and dropped together
    meta: ChunkMeta | None = None  # parent key and tokens, for KV events and tier headers
    ns: bytes | None = None  # the namespace (tenant) it was reserved under, if named
    saved: bool = False  # every write-back tier has a copy: eviction frees it at once
    _extents: list[tuple[int, int]] | None = None  # byte extents, computed once

    def page_count(self) -> int:
        return sum(c for _, c in self.pages)

    def extents(self, page_bytes: int) -> list[tuple[int, int]]:
        """Byte extents (offset, length) covering exactly ``size`` bytes. An entry's
        pages never change, so they are computed once (a fresh list each call)."""
        ext = self._extents
        if ext is None:
            ext = []
            left = self.size
            for start, count in self.pages:
                n = min(left, count * page_bytes)
                ext.append((start * page_bytes, n))
                left -= n
            self._extents = ext
        return list(ext)


@dataclass(slots=True)
class Evicted:
    """What one eviction pass did. ``leaving``: entries held (EVICTING) for the caller
    to offer to write-back tiers, each with one hold the caller must ``unhold``;
    ``removed``: keys gone from the arena (freed now or leaving)."""

    leaving: list[Entry]
    removed: list[bytes]


@dataclass(slots=True, eq=False)
class Holdings:
    """What one owner (a client, or the agent) holds: booked here and nowhere else."""

    leases: set[bytes] = field(default_factory=set)  # keys it has reserved
    pins: Counter[bytes] = field(default_factory=Counter)  # key -> pins it holds
    # key -> when its first pin still held was taken; insertion order is age order, so
    # expiry looks only at the oldest
    pinned_at: dict[bytes, float] = field(default_factory=dict)
    pins_held: int = 0  # sum of ``pins``: a key pinned twice counts twice

    def empty(self) -> bool:
        return not self.leases and not self.pins


@dataclass(slots=True)
class IndexCounters:
    evictions: int = 0
    evict_deferred: int = 0
    evict_unsaved: int = 0  # evicted without write-back: the lower tier still held pages
    orphan_evictions: int = 0  # evicted after their parent chunk had left
    orphan_bytes: int = 0  # ... and their bytes
    quota_refused: int = 0  # reserves refused: the namespace is at its share
    expired_leases: int = 0
    reserve_no_space: int = 0
    drops_deferred: int = 0  # drops that waited for pins or copies to end


class Index:
    def __init__(
        self,
        arena_bytes: int,
        page_bytes: int,
        policy: str | EvictionPolicy = "prefix",
        clock: Callable[[], float] = time.monotonic,
        reserve_ttl_s: float = 60.0,
        tenants: Tenants | None = None,
    ) -> None:
        self.page_bytes = page_bytes
        self.tenants = tenants or Tenants(arena_bytes)
        self.alloc = PageAllocator(arena_bytes // page_bytes)
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.entries: dict[bytes, Entry] = {}
        self.bytes_used = 0
        self.reserved = 0
        self.pinned = 0
        self.evicting_pages = 0  # pages of EVICTING entries (freed when write-back ends)
        self.clock = clock
        self.reserve_ttl_s = reserve_ttl_s
        # True when a write-back tier may take victims: eviction then holds them
        # (EVICTING) instead of freeing, while free + leaving pages fall short.
        self.write_back = False
        self.counters = IndexCounters()
        self.groups: dict[bytes, set[bytes]] = {}  # group -> member keys (any state)
        # (True, key) committed, (False, key) left the arena, in order, since take_changes()
        self.changes: list[tuple[bool, bytes]] = []
        # Who holds what, booked here only (an entry's ``pins`` is the sum over owners).
        self.holdings: dict[int, Holdings] = {}

    # -- reads ---------------------------------------------------------------
    def lookup(self, key: bytes) -> Entry | None:
        """A committed entry, or None. Side effect: recency only."""
        e = self.entries.get(key)
        if e is None or e.state is not State.COMMITTED:
            return None
        self.policy.touch(key)
        e.hits += 1
        return e

    def states(self, keys: list[bytes]) -> list[int]:
        """1 for each committed key, 0 otherwise; no side effects."""
        entries = self.entries
        if entries.keys().isdisjoint(keys):
            return [0] * len(keys)  # the no-hit case (unique prompts) in one C-level pass
        get, committed = entries.get, State.COMMITTED
        return [int(e is not None and e.state is committed) for e in map(get, keys)]

    def contains(self, key: bytes) -> bool:
        return key in self.entries

    def held_by(self, owner: int) -> Holdings:
        """``owner``'s holdings (an empty record when it holds nothing; not stored)."""
        return self.holdings.get(owner) or Holdings()

    def _holdings(self, owner: int) -> Holdings:
        h = self.holdings.get(owner)
        if h is None:
            h = self.holdings[owner] = Holdings()
        return h

    def _settle(self, owner: int, h: Holdings) -> None:
        if h.empty():
            self.holdings.pop(owner, None)

    def pin(self, key: bytes, owner: int = AGENT_OWNER) -> Entry | None:
        return self.pin_many([key], owner)[0]

    def pin_many(
        self, keys: list[bytes], owner: int = AGENT_OWNER, now: float | None = None
    ) -> list[Entry | None]:
        """Pin each committed key for ``owner`` (recency too); None for the others.
        ``now``: when (for the pin TTL; the index's clock when not given)."""
        entries, touch, committed = self.entries, self.policy.touch, State.COMMITTED
        h = self._holdings(owner)
        book, since = h.pins, h.pinned_at
        when = self.clock() if now is None else now
        out: list[Entry | None] = []
        for key in keys:
            e = entries.get(key)
            if e is None or e.state is not committed:
                out.append(None)
                continue
            touch(key)
            e.hits += 1
            if e.ns is not None:
                self.tenants.of(e.ns).hits += 1
            if e.pins == 0:
                self.pinned += 1
            e.pins += 1
            n = book[key]
            if not n:
                since[key] = when
            book[key] = n + 1
            h.pins_held += 1
            out.append(e)
        self._settle(owner, h)
        return out

    def unpin(self, key: bytes, count: int = 1, owner: int = AGENT_OWNER) -> None:
        """Give back ``count`` of ``owner``'s pins on ``key`` (all of them must be held:
        callers check ``held_by(owner).pins`` first where the count comes from outside)."""
        h = self.holdings.get(owner)
        e = self.entries.get(key)
        if h is None or h.pins.get(key, 0) < count or e is None or e.pins < count:
            raise AllocatorInvariantError(f"unpin of an entry not pinned {count}x by {owner}")
        h.pins[key] -= count
        h.pins_held -= count
        if not h.pins[key]:
            del h.pins[key]
            del h.pinned_at[key]
            self._settle(owner, h)
        e.pins -= count
        if e.pins == 0:
            self.pinned -= 1
            self._free_if_left(e)

    def hold(self, key: bytes) -> Entry | None:
        """An agent-side reader (a lower-tier copy) starts: the pages stay until
        ``unhold``, even if the entry is dropped or evicted meanwhile."""
        e = self.entries.get(key)
        if e is None or e.state is State.RESERVED:
            return None
        e.holds += 1
        return e

    def unhold(self, key: bytes) -> None:
        e = self.entries.get(key)
        if e is None or e.holds <= 0:
            raise AllocatorInvariantError("unhold of an entry not held")
        e.holds -= 1
        self._free_if_left(e)

    def _free_if_left(self, e: Entry) -> None:
        if e.state is State.EVICTING and e.pins == 0 and e.holds == 0:
            self.evicting_pages -= e.page_count()
            self._free(e)

    def _leave(self, e: Entry) -> None:
        """Committed -> EVICTING: invisible now, freed when the last reader is done."""
        self.policy.remove(e.key)
        if e.ns is not None:  # a namespace's share counts what readers can still see
            self.tenants.removed(e.ns, e.size)
        e.state = State.EVICTING
        self.evicting_pages += e.page_count()
        self.changes.append((False, e.key))
        self._free_if_left(e)

    def take_changes(self, limit: int | None = None) -> list[tuple[bool, bytes]]:
        """Keys that became readable (True) or left (False) since the last call, in
        order (for the shared lookup index and KV events); at most ``limit``, the
        oldest first, the rest kept for the next call."""
        changes = self.changes
        if limit is None or len(changes) <= limit:
            self.changes = []
            return changes
        out = changes[:limit]
        del changes[:limit]
        return out

    # -- writes ----------------------------------------------------------------
    def reserve(
        self,
        key: bytes,
        size: int,
        owner: int,
        evicted: list[Entry] | None = None,
        group: bytes | None = None,
        ns: bytes | None = None,
    ) -> tuple[Outcome, Entry | None]:
        """Reserve pages for ``key``, evicting unpinned committed entries if needed.
        Victims that a write-back tier may copy out are appended to ``evicted`` (each
        holding one ``hold`` the caller releases); without that list, none are kept.
        A namespace ``ns`` at its share makes room from its own entries only."""
        if key in self.entries:
            return Outcome.EXISTS, None
        if size <= 0:
            return Outcome.TOO_LARGE, None
        pages = -(-size // self.page_bytes)
        if pages > self.alloc.pages_total:
            return Outcome.TOO_LARGE, None
        if ns is not None and not self._within_share(ns, size, evicted):
            return Outcome.NO_SPACE, None
        got = self.alloc.alloc(pages)
        if got is None:
            out = self.evict_pages(pages, keep=evicted is not None)
            if evicted is not None:
                evicted.extend(out.leaving)
            got = self.alloc.alloc(pages)
        if got is None:
            self.counters.reserve_no_space += 1
            return Outcome.NO_SPACE, None
        return Outcome.OK, self._new_entry(key, size, got, owner, group, self.clock(), ns)

    def _within_share(self, ns: bytes, size: int, evicted: list[Entry] | None) -> bool:
        """Make ``ns`` fit its share with ``size`` more bytes, evicting only its own
        entries (policy order); False (counted) when they cannot make the room."""
        tenants = self.tenants
        if not tenants.over(ns, size):
            return True
        out = Evicted([], [])
        keep = evicted is not None and self.write_back
        for key in self._victims():
            e = self.entries[key]
            if e.ns != ns:
                continue
            fig = tenants.of(ns)
            fig.quota_evictions += 1
            self._take(e, out, keep)
            if not tenants.over(ns, size):
                break
        if evicted is not None:
            evicted.extend(out.leaving)
        else:
            for e in out.leaving:
                self.unhold(e.key)
        if tenants.over(ns, size):
            tenants.of(ns).quota_refused += 1
            self.counters.quota_refused += 1
            return False
        return True

    def _new_entry(
        self,
        key: bytes,
        size: int,
        got: list[Extent],
        owner: int,
        group: bytes | None,
        now: float,
        ns: bytes | None = None,
    ) -> Entry:
        e = Entry(key, size, got, State.RESERVED, owner, group=group, ns=ns)
        if ns is not None:
            self.tenants.added(ns, size)
        if group is not None:
            self.groups.setdefault(group, set()).add(key)
        e.lease_deadline = now + self.reserve_ttl_s
        self.entries[key] = e
        self._holdings(owner).leases.add(key)
        self.bytes_used += size
        self.reserved += 1
        return e

    def reserve_many(
        self,
        keys: list[bytes],
        size: int,
        owner: int,
        groups: list[bytes] | None = None,
        ns: bytes | None = None,
    ) -> list[tuple[Outcome, Entry | None]] | None:
        """Reserve ``keys`` of one ``size`` side by side in one free run, without
        eviction: the common store (a step's chunks). None when that cannot be done as
        one piece (duplicate keys, no run large enough): reserve them one by one then.
        Keys already present answer EXISTS, as ``reserve`` does."""
        if size <= 0 or len(set(keys)) != len(keys):
            return None
        entries = self.entries
        fresh = [i for i, k in enumerate(keys) if k not in entries]
        if not fresh:
            return [(Outcome.EXISTS, None)] * len(keys)
        if ns is not None and self.tenants.over(ns, size * len(fresh)):
            return None  # one by one: the namespace makes room from its own entries
        pages = -(-size // self.page_bytes)
        runs = self.alloc.alloc_run(pages, len(fresh))
        if runs is None:
            return None
        out: list[tuple[Outcome, Entry | None]] = [(Outcome.EXISTS, None)] * len(keys)
        now = self.clock()
        for i, run in zip(fresh, runs):
            group = groups[i] if groups else None
            out[i] = (Outcome.OK, self._new_entry(keys[i], size, [run], owner, group, now, ns))
        return out

    def commit(self, key: bytes, owner: int, checksum: int = 0) -> Outcome:
        return self.commit_many([key], owner, [checksum])[0]

    def commit_many(
        self,
        keys: list[bytes],
        owner: int,
        checksums: list[int],
        parents: list[bytes] | None = None,
    ) -> list[Outcome]:
        """Make ``owner``'s reservations readable, per key: OK, NOT_FOUND, or
        BAD_STATE (not reserved, or by someone else). ``parents`` (per key, b"" for
        none) tell the policy the prefix structure."""
        entries, changes = self.entries, self.changes
        reserved, committed = State.RESERVED, State.COMMITTED
        out: list[Outcome] = []
        done: list[bytes] = []
        done_parents: list[bytes | None] = []
        for i, (key, checksum) in enumerate(zip(keys, checksums, strict=True)):
            e = entries.get(key)
            if e is None:
                out.append(Outcome.NOT_FOUND)
            elif e.state is not reserved or e.owner != owner:
                out.append(Outcome.BAD_STATE)
            else:
                e.state = committed
                e.checksum = checksum
                self._unlease(e)
                done.append(key)
                done_parents.append(parents[i] or None if parents else None)
                changes.append((True, key))
                out.append(Outcome.OK)
        if done:
            self.policy.insert_many(done, done_parents)
        return out

    def abort(self, key: bytes, owner: int) -> bool:
        e = self.entries.get(key)
        if e is None or e.state is not State.RESERVED or e.owner != owner:
            return False
        self._unlease(e)
        self._free(e)
        return True

    def _unlease(self, e: Entry) -> None:
        """``e`` leaves RESERVED (committed, aborted or expired)."""
        self.reserved -= 1
        h = self.holdings.get(e.owner)
        if h is not None:
            h.leases.discard(e.key)
            self._settle(e.owner, h)

    def drop(self, key: bytes) -> bool:
        """Remove a committed entry (e.g. it failed a checksum) and the committed
        members of its group. They disappear for readers at once; pages are freed
        when their pins and copies are done."""
        e = self.entries.get(key)
        if e is None or e.state is not State.COMMITTED:
            return False
        for m in self._members(e):
            if m.state is State.COMMITTED:
                if m.pins or m.holds:
                    self.counters.drops_deferred += 1
                self._leave(m)
        return True

    def _members(self, e: Entry) -> list[Entry]:
        """``e`` and the other entries of its group."""
        if e.group is None:
            return [e]
        return [self.entries[k] for k in self.groups.get(e.group, ()) if k in self.entries]

    # -- eviction ----------------------------------------------------------------
    def evict_pages(self, pages_needed: int, must_free: bool = True, keep: bool = True) -> Evicted:
        """Evict unpinned committed entries until ``pages_needed`` pages are free.

        With ``keep`` and ``write_back`` set, victims are held (EVICTING, one hold each,
        returned in ``leaving``) while free + leaving pages fall short of the need, so a
        write-back tier can copy them out; once they suffice, further victims are freed
        unsaved (``evict_unsaved``) when ``must_free`` is set: a store must not fail
        because a slow tier holds pages. Without ``must_free`` (background headroom)
        it stops there. A reserve fails only when committed, unpinned pages cannot
        cover it (or copies in flight still hold them): every pinned or reserved
        entry is skipped, never a stop. Before freeing a victim unsaved, up to
        ``CLEAN_LOOKAHEAD`` such victims are passed over for a clean one (already on
        every write-back tier) further down the policy's order."""
        out = Evicted([], [])
        keep = keep and self.write_back
        dirty: list[Entry] = []  # would leave unsaved: taken only if no clean one is near
        for key in self._victims():
            if self.alloc.pages_free >= pages_needed:
                break
            victim = self.entries[key]
            clean = victim.saved  # already below: leaving costs nothing
            defer = (
                keep and not clean and self.alloc.pages_free + self.evicting_pages < pages_needed
            )
            if not defer and not clean:
                if not must_free:
                    break
                if self.write_back and len(dirty) < CLEAN_LOOKAHEAD:
                    dirty.append(victim)
                    continue
            self._take(victim, out, defer)
        for victim in dirty:
            if self.alloc.pages_free >= pages_needed:
                break
            self._take(victim, out, False)
        return out

    def _take(self, victim: Entry, out: Evicted, defer: bool) -> None:
        """Evict ``victim`` and its group: held for write-back (``defer``) or gone."""
        for e in self._members(victim):
            if e.state is not State.COMMITTED:
                continue
            self.counters.evictions += 1
            if self._orphaned(e):
                self.counters.orphan_evictions += 1
                self.counters.orphan_bytes += e.size
            if e.ns is not None:
                self.tenants.of(e.ns).evictions += 1
            out.removed.append(e.key)
            if e.saved:
                pass  # on every write-back tier already: freed now, nothing to copy
            elif defer:
                e.holds += 1
                out.leaving.append(e)
                self.counters.evict_deferred += 1
            elif self.write_back:
                self.counters.evict_unsaved += 1
            self._leave(e)

    def _orphaned(self, e: Entry) -> bool:
        """``e``'s parent chunk has left the arena: no lookup can reach ``e`` here."""
        parent = e.meta.parent if e.meta is not None else b""
        if not parent:
            return False
        p = self.entries.get(parent)
        return p is None or p.state is not State.COMMITTED

    def _victims(self) -> Iterable[bytes]:
        """Evictable keys in policy order, each offered once. The policy's iterator is
        restarted after every eviction (it may not survive the removal)."""
        offered: set[bytes] = set()
        # Groups found with a member pinned or being written, judged once a pass: none
        # of that changes while the loop evicts, and judging a group at each of its
        # members cost the square of its size (a client that grew one group over the
        # whole arena, one member kept reserved, stalled every reserve for seconds).
        blocked: set[bytes] = set()
        while True:
            victim = None
            for key in self.policy.candidates():
                if key in offered:
                    continue
                offered.add(key)
                e = self.entries[key]
                # A held entry (a copy in flight) may leave: its pages follow the copy.
                # A group leaves whole, so no member may be pinned or being written.
                if e.state is State.COMMITTED and e.group not in blocked:
                    if all(m.pins == 0 and m.state is not State.RESERVED for m in self._members(e)):
                        victim = key
                        break
                    if e.group is not None:
                        blocked.add(e.group)
                if len(offered) > len(self.policy):
                    break  # every candidate seen: none evictable
            if victim is None:
                return
            yield victim

    def _free(self, e: Entry) -> None:
        if e.pins or e.holds:
            raise AllocatorInvariantError("freeing an entry that is still read")
        del self.entries[e.key]
        if e.group is not None:
            members = self.groups.get(e.group)
            if members is not None:
                members.discard(e.key)
                if not members:
                    del self.groups[e.group]
        self.bytes_used -= e.size
        if e.ns is not None and e.state is not State.EVICTING:  # else counted at _leave
            self.tenants.removed(e.ns, e.size)
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
            self._unlease(e)
            self._free(e)
        self.counters.expired_leases += len(dead)
        return dead

    def release_owner(self, owner: int) -> tuple[int, int]:
        """Drop everything ``owner`` holds: its reservations and pins, as booked here.
        Returns (leases, pins) reclaimed."""
        h = self.held_by(owner)
        n_leases = sum(1 for k in list(h.leases) if self.abort(k, owner))
        n_pins = 0
        for key, count in list(h.pins.items()):
            self.unpin(key, count, owner)
            n_pins += count
        return n_leases, n_pins

    def expire_pins(self, taken_before: float) -> list[tuple[int, bytes, int]]:
        """Give back every client pin of a key first pinned before ``taken_before``:
        (owner, key, count) for each. Looks at the expired ones only (age order). The
        agent's own pins (sends to peers) end with their sends, not here."""
        out: list[tuple[int, bytes, int]] = []
        for owner, h in list(self.holdings.items()):
            if owner == AGENT_OWNER:
                continue
            old: list[bytes] = []
            for key, at in h.pinned_at.items():
                if at >= taken_before:
                    break
                old.append(key)
            for key in old:
                n = h.pins[key]
                self.unpin(key, n, owner)
                out.append((owner, key, n))
        return out

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
            if e.pins < 0 or e.holds < 0:
                raise AllocatorInvariantError("negative pin or hold count")
            if e.state is State.RESERVED and (e.pins or e.holds):
                raise AllocatorInvariantError("pinned or held entry that is reserved")
            if e.state is State.EVICTING and not (e.pins or e.holds):
                raise AllocatorInvariantError("leaving entry that nobody reads")
        if total != self.bytes_used:
            raise AllocatorInvariantError(f"bytes_used {self.bytes_used} != {total}")
        evicting = sum(e.page_count() for e in self.entries.values() if e.state is State.EVICTING)
        if evicting != self.evicting_pages:
            raise AllocatorInvariantError("evicting_pages drifted")
        if reserved != self.reserved or pinned != self.pinned:
            raise AllocatorInvariantError("reserved/pinned gauges drifted")
        self._check_books()
        held: dict[bytes, int] = {}  # a namespace's share counts what readers can see
        for e in self.entries.values():
            if e.ns is not None and e.state is not State.EVICTING:
                held[e.ns] = held.get(e.ns, 0) + e.size
        for ns, fig in self.tenants.figures.items():
            if fig.bytes != held.get(ns, 0):
                raise AllocatorInvariantError(f"namespace {ns.hex()} bytes drifted")
        committed = sum(1 for e in self.entries.values() if e.state is State.COMMITTED)
        if committed != len(self.policy):
            raise AllocatorInvariantError("policy and index disagree on committed entries")
        self.alloc.check(used)

    def _check_books(self) -> None:
        pins: Counter[bytes] = Counter()
        for h in self.holdings.values():
            pins.update(h.pins)
            if h.pins_held != sum(h.pins.values()) or h.pinned_at.keys() != h.pins.keys():
                raise AllocatorInvariantError("an owner's pin book drifted")
        if any(pins[k] != e.pins for k, e in self.entries.items()) or any(
            k not in self.entries for k in pins
        ):
            raise AllocatorInvariantError("pin books and entries disagree")
        leased = {(o, k) for o, h in self.holdings.items() for k in h.leases}
        reserved = {(e.owner, k) for k, e in self.entries.items() if e.state is State.RESERVED}
        if leased != reserved:
            raise AllocatorInvariantError("lease books and reserved entries disagree")


__all__ = ["AGENT_OWNER", "Entry", "Evicted", "Index", "Outcome", "State", "Status"]
