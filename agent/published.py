"""The arena's keys, published in shared memory for lookups without a round trip
(``kvnode.ipc.shmindex``). A cache listener: it follows the index's changes after
each loop tick, so readers lag the arena by at most one tick, which a pin absorbs."""

from __future__ import annotations

import logging

from kvnode.ipc.shmindex import ShmIndexWriter, capacity_for

log = logging.getLogger("kvnode.agent")


class PublishedIndex:
    def __init__(self, name: str, entries_max: int, group: str, generation: int) -> None:
        self.writer = ShmIndexWriter(name, capacity_for(entries_max), group or None, generation)
        self.name = name
        self.insert_refused = 0

    def stored(self, key: bytes, parent: bytes | None, tokens: list[int], medium: str) -> None:
        pass  # arena_changed covers it, promotions included

    def arena_changed(self, changes: list[tuple[bool, bytes]]) -> None:
        w = self.writer
        for added, key in changes:
            if added:
                if not w.insert(key):
                    # Readers then miss a key the arena has: a lost hit, never wrong KV.
                    self.insert_refused += 1
            else:
                w.remove(key)

    def set_lower_tiers(self, on: bool) -> None:
        self.writer.set_lower_tiers(on)

    def touch(self) -> None:
        self.writer.touch()

    def stats(self) -> dict[str, int]:
        w = self.writer
        return {
            "entries": w.count,
            "capacity": w.capacity,
            "tombstones": w.tombstones,
            "rebuilds": w.rebuilds,
            "insert_refused": self.insert_refused + w.full_refusals,
        }

    def close(self, unlink: bool) -> None:
        self.writer.close(unlink=unlink)
