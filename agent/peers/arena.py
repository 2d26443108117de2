"""Views of the arena for peer transfers: an entry's pages as buffers, and a copy of
consecutive source buffers into them. Byte movers only: no index state here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvnode.agent.index import Entry
from kvnode.ipc.segment import Segment


def arena_view(arena: Any) -> memoryview:
    """Bytes of the arena: a ``Segment`` (its mapping) or any buffer (tests)."""
    return memoryview(arena.buffer if isinstance(arena, Segment) else arena).cast("B")


def split_extents(arena: memoryview, e: Entry, page_bytes: int) -> list[memoryview]:
    return [arena[off : off + n] for off, n in e.extents(page_bytes)]


def copy_into(dst: list[memoryview], src: Sequence[memoryview]) -> bool:
    """Copy consecutive source buffers into consecutive destination views. False (and
    nothing promised about ``dst``) when the total lengths differ."""
    if sum(len(s) for s in src) != sum(len(d) for d in dst):
        return False
    di, doff = 0, 0
    for s in src:
        soff = 0
        while soff < len(s):
            d = dst[di]
            n = min(len(s) - soff, len(d) - doff)
            d[doff : doff + n] = s[soff : soff + n]
            soff += n
            doff += n
            if doff == len(d):
                di, doff = di + 1, 0
    return True


__all__ = ["arena_view", "copy_into", "split_extents"]
