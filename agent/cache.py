"""The one writer of the cache's state: every index transition goes through here.

Clients (through the handlers), the lower tiers and the peers change the index only
by these calls; they read it freely. Two-phase for everyone:

- clients: ``reserve`` -> ``commit_many`` | ``abort``; ``pin_many`` -> ``unpin_many``;
  ``release_owner`` when a client is gone. Leases and pins are booked once, in the
  index, per owner.
- the agent itself (promotions from a lower tier, fetches from a peer):
  ``reserve_agent`` -> ``land`` | ``release``; ``hold``/``unhold`` around a copy out of
  the arena; ``pin``/``unpin`` around a send to a peer.
- eviction (``evict``, and inside every reserve) comes back from the index as data;
  the victims go to the tiers here and nowhere else.

What follows a change is written once, here. A commit (a client's, a promotion's or a
peer's) puts the chunk's parent and tokens on its entry and offers it to write-through
tiers. KV events come from the index's journal of transitions (``publish``): a chunk
that became readable in the arena is a CPU ``BlockStored``, one that left it a CPU
``BlockRemoved``, in the order they happened, so a router never sees a removal of a
chunk it was not told about. What the lower tiers store and delete is told here too
(``tier_stored``/``tier_removed``) and leaves as STORAGE events.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from kvnode.agent.events import MEDIUM_CPU, MEDIUM_STORAGE
from kvnode.agent.index import AGENT_OWNER, Entry, Holdings, Index, Outcome
from kvnode.agent.tiers.format import ChunkMeta

if TYPE_CHECKING:
    from kvnode.agent.tiers.manager import TierManager

log = logging.getLogger("kvnode.agent")


class CacheListener(Protocol):
    def arena_changed(self, changes: list[tuple[bool, bytes]]) -> None:
        """Keys that became readable (True) or left the arena (False), in order."""


class EventSink(Protocol):
    """Where KV events go (``events.EventPublisher``)."""

    def stored(
        self,
        key: bytes,
        parent: bytes | None,
        tokens: Sequence[int],
        medium: str = ...,
        tier: str | None = ...,
    ) -> None: ...

    def removed(self, key: bytes, medium: str = ..., tier: str | None = ...) -> None: ...


class Cache:
    def __init__(
        self,
        index: Index,
        tiers: Callable[[Cache], TierManager] | None = None,
        headroom_pages: int = 0,
        listeners: Sequence[CacheListener] = (),
        events: EventSink | None = None,
    ) -> None:
        """``tiers`` builds the tier manager, which is handed this cache (the tiers
        change the index through it)."""
        self.index = index
        self.headroom_pages = headroom_pages
        self.listeners = tuple(listeners)  # what entered and left, per tick
        self.events = events
        # Metadata of chunks committed since the last publish: their BlockStored is
        # written then, even if the chunk has left the arena again meanwhile.
        self._fresh: dict[bytes, ChunkMeta | None] = {}
        self.tier_errors = 0
        self.tiers: TierManager | None = tiers(self) if tiers is not None else None
        index.write_back = self.tiers is not None

    # -- reads -------------------------------------------------------------------------
    def lookup(self, key: bytes) -> bool:
        return self.index.lookup(key) is not None

    def promote(self, key: bytes) -> bool:
        """True when a lower tier has ``key`` and its promotion is under way."""
        if self.tiers is None:
            return False
        try:
            return self.tiers.on_lookup_miss(key)
        except Exception:
            self.tier_errors += 1
            log.exception("lower-tier lookup failed")
            return False

    # -- clients -----------------------------------------------------------------------
    def reserve(
        self, key: bytes, size: int, owner: int, group: bytes | None = None, ns: bytes | None = None
    ) -> tuple[Outcome, Entry | None]:
        leaving: list[Entry] = []
        out = self.index.reserve(key, size, owner, leaving, group, ns)
        self._hand_over(leaving)
        return out

    def reserve_many(
        self,
        keys: list[bytes],
        size: int,
        owner: int,
        groups: list[bytes] | None = None,
        ns: bytes | None = None,
    ) -> list[tuple[Outcome, Entry | None]] | None:
        """Same-size keys side by side without eviction, or None (see Index)."""
        return self.index.reserve_many(keys, size, owner, groups, ns)

    def commit_many(
        self,
        keys: list[bytes],
        owner: int,
        checksums: list[int],
        parents: Sequence[bytes] = (),
        tokens: Sequence[list[int]] = (),
    ) -> list[Outcome]:
        """Commit ``owner``'s reservations (BAD_STATE for a key it does not hold);
        ``parents``/``tokens`` per key or empty (a parent b"" is none)."""
        outs = self.index.commit_many(keys, owner, checksums, list(parents) or None)
        entries = self.index.entries
        for i, (key, st) in enumerate(zip(keys, outs)):
            if st is Outcome.OK:
                meta = ChunkMeta.of(parents[i] or None if parents else None,
                                    tokens[i] if tokens else [])  # fmt: skip
                self._committed(entries[key], meta)
        return outs

    def abort(self, key: bytes, owner: int) -> bool:
        return self.index.abort(key, owner)

    def pin_many(
        self, keys: list[bytes], owner: int, now: float | None = None
    ) -> list[Entry | None]:
        return self.index.pin_many(keys, owner, now)

    def unpin_many(self, keys: list[bytes], owner: int) -> int:
        """Give back one of ``owner``'s pins per key; keys it holds no pin on are
        skipped. Returns how many were given back."""
        index, n = self.index, 0
        pins = index.held_by(owner).pins
        for key in keys:
            if pins.get(key):
                index.unpin(key, 1, owner)
                n += 1
        return n

    def held_by(self, owner: int) -> Holdings:
        """What ``owner`` holds (read only): its leases and pins, booked in the index."""
        return self.index.held_by(owner)

    def expire_pins(self, taken_before: float) -> list[tuple[int, bytes, int]]:
        """Client pins older than ``taken_before`` given back: (owner, key, count)."""
        return self.index.expire_pins(taken_before)

    def drop(self, key: bytes, lower_tiers: bool = True) -> bool:
        """Gone for readers now (from every tier unless ``lower_tiers`` is False);
        pages freed once nobody reads them."""
        dropped = self.index.drop(key)
        if self.tiers is not None and lower_tiers:
            try:
                self.tiers.drop(key)
            except Exception:
                self.tier_errors += 1
                log.exception("dropping %s from lower tiers failed", key.hex())
        return dropped

    def release_owner(self, owner: int) -> tuple[int, int]:
        """A client is gone: its reservations and pins. Returns (leases, pins)."""
        return self.index.release_owner(owner)

    def expire_leases(self) -> list[Entry]:
        return self.index.expire_leases()

    # -- the agent's own writes (tiers, peers) ----------------------------------------
    def reserve_agent(self, key: bytes, size: int) -> tuple[Outcome, Entry | None]:
        """Pages for bytes the agent will write itself (a promotion, a peer fetch):
        call only once those bytes exist and have been checked, since this may evict."""
        return self.reserve(key, size, AGENT_OWNER)

    def land(self, key: bytes, checksum: int, meta: ChunkMeta | None = None) -> bool:
        """Commit the agent's reservation of ``key``: readable now, with the writer's
        ``checksum`` (0: unverified, and it stays so) and its chunk metadata."""
        parents = [meta.parent] if meta is not None else None
        if self.index.commit_many([key], AGENT_OWNER, [checksum], parents)[0] is not Outcome.OK:
            return False
        self._committed(self.index.entries[key], meta)
        return True

    def release(self, key: bytes) -> bool:
        """Abort the agent's reservation of ``key`` (its bytes never arrived)."""
        return self.index.abort(key, AGENT_OWNER)

    def hold(self, key: bytes) -> Entry | None:
        return self.index.hold(key)

    def unhold(self, key: bytes) -> None:
        self.index.unhold(key)

    def pin(self, key: bytes) -> Entry | None:
        return self.index.pin(key, AGENT_OWNER)

    def unpin(self, key: bytes) -> None:
        self.index.unpin(key, 1, AGENT_OWNER)

    def set_saved(self, e: Entry, saved: bool) -> None:
        """Whether every write-back tier holds ``e`` (eviction then frees it at once)."""
        e.saved = saved

    def evict(self, pages: int, must_free: bool = True) -> list[bytes]:
        """Free ``pages`` (victims that a write-back tier may copy go to it first).
        Returns the keys that left the arena."""
        out = self.index.evict_pages(pages, must_free=must_free)
        self._hand_over(out.leaving)
        return out.removed

    # -- what follows a commit, once ---------------------------------------------------
    def _committed(self, e: Entry, meta: ChunkMeta | None) -> None:
        if meta is not None:
            e.meta = meta
        if self.events is not None:
            self._fresh[e.key] = e.meta
        if self.tiers is not None:
            try:
                self.tiers.on_commit(e.key)
            except Exception:
                self.tier_errors += 1
                log.exception("write-through hook failed")

    # -- events ------------------------------------------------------------------------
    def publish(self, limit: int | None = None) -> None:
        """Tell listeners and the event stream what entered and left the arena since
        the last call (at most ``limit`` changes, the oldest; the rest next time)."""
        changes = self.index.take_changes(limit)
        if not changes:
            return
        for li in self.listeners:
            _call(li.arena_changed, changes)
        if self.events is not None:
            self._emit(changes)

    def _emit(self, changes: list[tuple[bool, bytes]]) -> None:
        events, entries = self.events, self.index.entries
        assert events is not None
        for readable, key in changes:
            if readable:
                e = entries.get(key)
                meta = self._fresh.pop(key, None) or (e.meta if e is not None else None)
                self._stored(key, meta, MEDIUM_CPU, None)
            else:
                _call(events.removed, key, MEDIUM_CPU, None)

    def tier_stored(self, key: bytes, tier: str, meta: ChunkMeta | None) -> None:
        """A lower tier holds ``key`` now (written, or found at start)."""
        if self.events is not None:
            self._stored(key, meta, MEDIUM_STORAGE, tier)

    def tier_removed(self, key: bytes, tier: str) -> None:
        if self.events is not None:
            _call(self.events.removed, key, MEDIUM_STORAGE, tier)

    def _stored(self, key: bytes, meta: ChunkMeta | None, medium: str, tier: str | None) -> None:
        assert self.events is not None
        parent = (meta.parent or None) if meta is not None else None
        tokens = meta.token_ids() if meta is not None else []
        _call(self.events.stored, key, parent, tokens, medium, tier)

    # -- housekeeping ------------------------------------------------------------------
    def housekeeping(self) -> None:
        if self.tiers is not None:
            try:
                self.tiers.poll()
            except Exception:
                self.tier_errors += 1
                log.exception("tier manager poll failed")
            # Keep headroom free ahead of stores, so write-back has time to copy
            # victims out instead of the store path dropping them unsaved.
            self.evict(self.headroom_pages, must_free=False)

    def busy(self) -> bool:
        return self.tiers is not None and self.tiers.busy()

    def _hand_over(self, leaving: list[Entry]) -> None:
        if not leaving:
            return
        if self.tiers is None:  # nobody copies them out: give the holds back
            for e in leaving:
                self.index.unhold(e.key)
            return
        try:
            self.tiers.on_evicted(leaving)
        except Exception:
            self.tier_errors += 1
            # A bug: the victims' pages stay held (visible in evicting_bytes) rather
            # than risk freeing pages a copy may still read.
            log.exception("handing victims to the tiers failed")


def _call(fn: object, *args: object) -> None:
    try:
        fn(*args)  # type: ignore[operator]
    except Exception:
        log.exception("cache listener failed")
