"""The cache state's one owner: the index (allocator, policy, entry lifecycle) and the
lower tiers' bookkeeping, behind two-phase calls (reserve -> commit/abort, pin ->
unpin). Handlers and housekeeping go through here, never around it.

Eviction comes back from the index as data (``Evicted``); this object hands the
victims to the tiers. Keys that enter or leave the arena are told to listeners (the
shared lookup index, KV events) after the change is complete, never during it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from kvnode.agent.index import Entry, Index, Outcome
from kvnode.agent.tiers.format import ChunkMeta

if TYPE_CHECKING:
    from kvnode.agent.tiers.manager import TierManager

log = logging.getLogger("kvnode.agent")

MEDIUM_ARENA = "CPU"


class CacheListener(Protocol):
    def arena_changed(self, changes: list[tuple[bool, bytes]]) -> None:
        """Keys that became readable (True) or left the arena (False), in order."""


class StoreListener(Protocol):
    def stored(self, key: bytes, parent: bytes | None, tokens: list[int], medium: str) -> None:
        """A client committed ``key`` (with its chunk's tokens, when it sent them)."""


class Cache:
    def __init__(
        self,
        index: Index,
        tiers: TierManager | None = None,
        headroom_pages: int = 0,
        listeners: Sequence[CacheListener] = (),
        store_listeners: Sequence[StoreListener] = (),
    ) -> None:
        self.index = index
        self.tiers = tiers
        self.headroom_pages = headroom_pages
        self.listeners = tuple(listeners)  # what entered and left, per tick
        self.store_listeners = tuple(store_listeners)  # each client commit, as it happens
        self.tier_errors = 0
        index.write_back = tiers is not None

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

    def pin_many(self, keys: list[bytes]) -> list[Entry | None]:
        return self.index.pin_many(keys)

    def unpin(self, key: bytes, count: int = 1) -> None:
        self.index.unpin(key, count)

    # -- writes ------------------------------------------------------------------------
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
        parents: list[bytes],
        tokens: list[list[int]],
    ) -> list[Outcome]:
        """Commit ``owner``'s reservations; ``parents``/``tokens`` per key or empty (a
        parent b"" is none). Committed chunks keep them (KV events, tier headers), go
        to a write-through tier, and are told to the store listeners."""
        outs = self.index.commit_many(keys, owner, checksums, parents)
        entries, tiers, listeners = self.index.entries, self.tiers, self.store_listeners
        for i, (key, st) in enumerate(zip(keys, outs)):
            if st is not Outcome.OK:
                continue
            parent = (parents[i] or None) if parents else None
            toks = tokens[i] if tokens else []
            if parent or toks:
                entries[key].meta = ChunkMeta.of(parent, toks)
            if tiers is not None:
                try:
                    tiers.on_commit(key)
                except Exception:
                    self.tier_errors += 1
                    log.exception("write-through hook failed")
            for li in listeners:
                _call(li.stored, key, parent, toks, MEDIUM_ARENA)
        return outs

    def abort(self, key: bytes, owner: int) -> bool:
        return self.index.abort(key, owner)

    def drop(self, key: bytes) -> bool:
        """Gone for readers now (all tiers); pages freed once nobody reads them."""
        dropped = self.index.drop(key)
        if self.tiers is not None:
            try:
                self.tiers.drop(key)
            except Exception:
                self.tier_errors += 1
                log.exception("dropping %s from lower tiers failed", key.hex())
        return dropped

    def release_owner(
        self, owner: int, leases: set[bytes], pins: dict[bytes, int]
    ) -> tuple[int, int]:
        return self.index.release_owner(owner, leases, pins)

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
            out = self.index.evict_pages(self.headroom_pages, must_free=False)
            self._hand_over(out.leaving)

    def expire_leases(self) -> list[Entry]:
        return self.index.expire_leases()

    def publish(self, limit: int | None = None) -> None:
        """Tell listeners what entered and left the arena since the last call (at
        most ``limit`` changes, the oldest; the rest at the next call)."""
        changes = self.index.take_changes(limit)
        if changes:
            for li in self.listeners:
                _call(li.arena_changed, changes)

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
