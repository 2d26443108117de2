"""The arena's keys, published in shared memory for lookups without a round trip
(``kvnode.ipc.shmindex``). A cache listener: it follows the index's changes after
each loop tick, so readers lag the arena by at most one tick, which a pin absorbs.

When the disk tier is the only tier below the arena, its keys are published too, in
a second segment (the listing): a scheduler then knows a miss in both for certain and
does not ask the agent. The listing follows the disk tier's own books; until it holds
all of them (the start-up scan, a full table) the index says "ask the agent"."""

from __future__ import annotations

import logging

from kvnode.agent.tiers.base import TierStore
from kvnode.errors import ArenaError
from kvnode.ipc.shmindex import (
    LOWER_ASK,
    LOWER_LISTED,
    LOWER_NONE,
    ShmIndexWriter,
    capacity_for,
    listing_name,
)

log = logging.getLogger("kvnode.agent")

LISTING_ENTRIES_MAX = 1 << 20  # disk keys listed at most (64 MiB of shared memory)


class PublishedIndex:
    def __init__(self, name: str, entries_max: int, group: str, generation: int) -> None:
        self.writer = ShmIndexWriter(name, capacity_for(entries_max), group or None, generation)
        self.name = name
        self.group = group
        self.insert_refused = 0
        self.listing: ShmIndexWriter | None = None
        self.listing_complete = False
        self._lower: TierStore | None = None

    def arena_changed(self, changes: list[tuple[bool, bytes]]) -> None:
        w = self.writer
        for added, key in changes:
            if added:
                if not w.insert(key):
                    # Readers then miss a key the arena has: a lost hit, never wrong KV.
                    self.insert_refused += 1
            else:
                w.remove(key)

    # ------------------------------------------------------------------ lower tiers
    def set_lower(self, listable: TierStore | None, unlisted: bool, entries_max: int) -> None:
        """What lies below the arena: ``listable``, a tier that can list its keys (the
        disk), and ``unlisted``, whether S3 or peers could also have a key. Only a
        listable tier alone gets a listing; anything unlisted means "ask the agent"."""
        if listable is None or unlisted:
            self.writer.set_lower_mode(LOWER_ASK if listable or unlisted else LOWER_NONE)
            return
        self.writer.set_lower_mode(LOWER_ASK)  # until the listing holds every key
        cap = capacity_for(max(1024, min(entries_max, LISTING_ENTRIES_MAX)))
        try:
            self.listing = ShmIndexWriter(
                listing_name(self.name), cap, self.group or None, self.writer.generation
            )
        except (ArenaError, OSError) as exc:
            log.warning("no lookup listing of the disk tier (%s): schedulers ask the agent", exc)
            return
        self._lower = listable

    def sync_lower(self) -> None:
        """Bring the listing up to date with the tier's books; call from the loop
        before the arena's own changes are published, so a chunk written back to disk
        is listed there before it leaves the arena's index."""
        w, store = self.listing, self._lower
        if w is None or store is None:
            return
        got = store.take_listing()
        if got is None:
            return  # not listable yet (the start-up scan runs)
        complete = self.listing_complete
        if got.full is not None:
            complete = w.replace_all(got.full)
        for added, key in got.changes:
            if not added:
                w.remove(key)
            elif not w.insert(key):
                complete = False
        if complete != self.listing_complete:
            if complete:
                log.info("lookup listing of the disk tier complete: %d keys", w.count)
            else:
                log.warning(
                    "lookup listing of the disk tier is full (%d slots): schedulers ask "
                    "the agent about misses until it is rebuilt", w.capacity,
                )  # fmt: skip
        self.listing_complete = complete
        self.writer.set_lower_mode(LOWER_LISTED if complete else LOWER_ASK)

    # ------------------------------------------------------------------ upkeep
    def touch(self) -> None:
        self.writer.touch()
        if self.listing is not None:
            self.listing.touch()

    def stats(self) -> dict[str, int]:
        w = self.writer
        out = {
            "entries": w.count,
            "capacity": w.capacity,
            "tombstones": w.tombstones,
            "rebuilds": w.rebuilds,
            "insert_refused": self.insert_refused + w.full_refusals,
            "lower_mode": w.lower_mode,
        }
        if self.listing is not None:
            out["listing_entries"] = self.listing.count
            out["listing_capacity"] = self.listing.capacity
            out["listing_complete"] = int(self.listing_complete)
        return out

    def close(self, unlink: bool) -> None:
        if self.listing is not None:
            self.listing.close(unlink=unlink)
        self.writer.close(unlink=unlink)
