"""The one payload checksum every part of kvnode uses: xxh3-64, never 0.

0 on the wire and in headers means "no checksum"; a reader that gets 0 treats the bytes
as unverified, never as good.
"""

from __future__ import annotations

from typing import Any

import xxhash

NO_CHECKSUM = 0


def checksum(parts: Any) -> int:
    """xxh3-64 of a bytes-like object, or of the concatenation of a list/tuple of them
    (numpy arrays included: anything with the buffer protocol); never 0."""
    if isinstance(parts, (list, tuple)):
        h = xxhash.xxh3_64()
        for p in parts:
            h.update(p)
        return h.intdigest() or 1
    return xxhash.xxh3_64_intdigest(parts) or 1


def checksum_extents(view: Any, extents: Any) -> int:
    """The checksum of the bytes ``view[off : off + n]`` for each ``(off, n)`` of
    ``extents``, in order (an arena entry's pages)."""
    return checksum([view[off : off + n] for off, n in extents])


__all__ = ["NO_CHECKSUM", "checksum", "checksum_extents"]
