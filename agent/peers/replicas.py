"""Which chunks fetched from peers this node keeps.

A fetched chunk is a copy of something the fleet already holds. Keeping every copy
fills each node with the others' chunks and shrinks what the fleet holds in all (on the
Mooncake conversation trace, 10 nodes of 6,000 blocks: 0.27 hit ratio keeping every
copy, 0.34 keeping a copy only when it is fetched a second time, against 0.36 for one
pooled cache of the same size). So, with ``mode = "second"``: the first time a chunk is
fetched it is *borrowed*: readable for ``borrow_s`` (the connector loads it at once),
then dropped unless a reader holds it; its key is remembered (``ghosts_max`` keys), and
a chunk fetched again while remembered is kept like any other. ``mode = "always"``
keeps every fetched chunk. Loop thread only.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

MODES = ("second", "always")


class Replicas:
    def __init__(
        self,
        mode: str = "second",
        borrow_s: float = 5.0,
        ghosts_max: int = 65536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"replica mode {mode!r}")
        self.mode = mode
        self.borrow_s = borrow_s
        self.ghosts_max = ghosts_max
        self._clock = clock
        self._ghosts: OrderedDict[bytes, None] = OrderedDict()
        self._borrowed: deque[tuple[float, bytes]] = deque()
        self.counters = dict.fromkeys(("borrowed", "kept", "returned"), 0)

    def landed(self, key: bytes) -> None:
        """A fetched chunk was committed here."""
        if self.mode == "always":
            return
        if self._ghosts.pop(key, 0) is None:
            self.counters["kept"] += 1  # fetched twice lately: worth a copy here
            return
        self._ghosts[key] = None
        while len(self._ghosts) > self.ghosts_max:
            self._ghosts.popitem(last=False)
        self._borrowed.append((self._clock() + self.borrow_s, key))
        self.counters["borrowed"] += 1

    def due(self) -> list[bytes]:
        """Borrowed chunks whose time is up (the caller drops those nobody reads)."""
        now = self._clock()
        out = []
        while self._borrowed and self._borrowed[0][0] <= now:
            out.append(self._borrowed.popleft()[1])
        return out

    def again(self, key: bytes) -> None:
        """A due chunk was still being read: look at it again later."""
        self._borrowed.append((self._clock() + self.borrow_s, key))

    def __len__(self) -> int:
        return len(self._borrowed)


__all__ = ["MODES", "Replicas"]
