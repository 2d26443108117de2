"""Eviction policies. Mechanism (the index) asks a policy for candidates; the policy
knows nothing about pins or reservations: the index skips entries it may not evict.

- ``PrefixPolicy`` (default): ARC told each chunk's parent; orphans leave first.
- ``LRUPolicy``: least recently used first.
- ``S3FIFOPolicy``: scan-resistant (small probationary FIFO, main FIFO with a
  reinsertion bit, ghost FIFO of recently evicted keys). One-hit wonders, such as a
  stream of unique prompts, leave through the small queue without flushing the hot set.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

GHOST_FACTOR = 16  # ghost keys remembered per cached entry and list (ARC keeps 1)
GHOST_MAX = 1 << 17  # ... and at most this many per list (both: about 40 MiB)
T2_SHARE_STEP = 0.03  # see PrefixPolicy._admit
KIDS_COMPACT = 64  # a parent's child list is compacted at each power of two past this


class EvictionPolicy(Protocol):
    name: str

    def insert(self, key: bytes, parent: bytes | None = None) -> None: ...
    def insert_many(self, keys: list[bytes], parents: list[bytes | None]) -> None:
        """One commit batch, in the client's order; ``parents[i]`` is the chunk before
        ``keys[i]`` in its prompt (None for a prompt's first chunk or when unknown)."""
        ...

    def touch(self, key: bytes) -> None: ...
    def remove(self, key: bytes) -> None: ...
    def candidates(self) -> Iterator[bytes]:
        """Keys in eviction order. The caller removes the one it evicts, then stops."""
        ...

    def __len__(self) -> int: ...


class LRUPolicy:
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes, parent: bytes | None = None) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def insert_many(self, keys: list[bytes], parents: list[bytes | None]) -> None:
        for key in keys:
            self.insert(key)

    def touch(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def candidates(self) -> Iterator[bytes]:
        # No copy: the caller stops iterating once it mutates the policy.
        yield from self._order

    def __len__(self) -> int:
        return len(self._order)


class S3FIFOPolicy:
    """S3-FIFO by entry count: small queue ~10%, main ~90%, ghost as large as main."""

    name = "s3fifo"
    _freq_max = 3

    def __init__(self, small_share: float = 0.1, ghost_max: int = 65536) -> None:
        self._small: OrderedDict[bytes, None] = OrderedDict()
        self._main: OrderedDict[bytes, None] = OrderedDict()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._freq: dict[bytes, int] = {}
        self._small_share = small_share
        self._ghost_max = ghost_max

    def insert_many(self, keys: list[bytes], parents: list[bytes | None]) -> None:
        for key in keys:
            self.insert(key)

    def insert(self, key: bytes, parent: bytes | None = None) -> None:
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def touch(self, key: bytes) -> None:
        f = self._freq.get(key)
        if f is not None and f < self._freq_max:
            self._freq[key] = f + 1

    def remove(self, key: bytes) -> None:
        if self._freq.pop(key, None) is None:
            return
        if self._small.pop(key, 0) is None:
            # left from probation without a second hit: remember it as a ghost
            self._ghost[key] = None
            while len(self._ghost) > self._ghost_max:
                self._ghost.popitem(last=False)
        else:
            self._main.pop(key, None)

    def candidates(self) -> Iterator[bytes]:
        # Promote small-queue entries that were hit to main, and give main entries with
        # a frequency bit another round, before offering victims.
        total = len(self._freq)
        rounds = 0
        while self._freq and rounds <= 2 * total + 2:
            rounds += 1
            use_small = len(self._small) > self._small_share * total or not self._main
            if use_small and self._small:
                key = next(iter(self._small))
                if self._freq[key] > 0:
                    del self._small[key]
                    self._freq[key] = 0
                    self._main[key] = None
                    continue
                self._small.move_to_end(key)  # offered; stays last if not taken
                yield key
            elif self._main:
                key = next(iter(self._main))
                if self._freq[key] > 0:
                    self._freq[key] -= 1
                    self._main.move_to_end(key)
                    continue
                self._main.move_to_end(key)
                yield key
            else:
                return

    def __len__(self) -> int:
        return len(self._freq)


class PrefixPolicy:
    """ARC over chunks, told each chunk's parent (the default).

    - Recency and frequency as ARC: ``t1`` holds chunks not hit since they were
      committed, ``t2`` chunks hit since; ghosts of both (keys only) move the target
      size of ``t1`` towards whichever list would have kept the chunk that just came
      back. Ghosts reach back ``GHOST_FACTOR`` times the cache:
      in conversations a chunk comes back a turn later, far beyond what the cache
      holds, and only a long memory sees it come back. A one-time scan stays in
      ``t1`` and leaves through it; the hot set in ``t2`` keeps its share.
    - Structure: a chunk is reachable only through its ancestors (lookups walk the
      chain from its start), so when a chunk leaves, every cached descendant is an
      orphan and goes first. A commit batch enters ``t1`` deepest chunk first, so a
      chain that ages out loses its tail before its head and never strands a suffix.
    """

    name = "prefix"

    def __init__(self, ghost_max: int = GHOST_MAX) -> None:
        self._t1: OrderedDict[bytes, None] = OrderedDict()
        self._t2: OrderedDict[bytes, None] = OrderedDict()
        self._b1: OrderedDict[bytes, None] = OrderedDict()
        self._b2: OrderedDict[bytes, None] = OrderedDict()
        self._orphans: OrderedDict[bytes, None] = OrderedDict()
        self._parent: dict[bytes, bytes] = {}  # cached chunk -> its cached parent
        # cached parent -> children linked to it: the one child itself (most chunks
        # have one; no container to allocate), else a list, appended only. A child
        # that left stays listed (its _parent link is gone) until the list is
        # compacted or the parent leaves, so a link and a departure cost O(1).
        self._kids: dict[bytes, bytes | list[bytes]] = {}
        self._p = 0.0  # ARC's target size of t1
        self._c = 0  # entries cached at most so far: ARC's capacity, learned
        self._ghost_max = ghost_max

    # -- the index's calls -------------------------------------------------------------
    def insert(self, key: bytes, parent: bytes | None = None) -> None:
        self.insert_many([key], [parent])

    def insert_many(self, keys: list[bytes], parents: list[bytes | None]) -> None:
        t1, t2, b1, b2 = self._t1, self._t2, self._b1, self._b2
        for key in reversed(keys):  # deepest first: the cold end gets the tail
            if key in b1 or key in b2:
                self._admit(key)
            elif key not in t2:
                t1[key] = None  # the common case, inline: never seen (or seen long ago)
        kids, link = self._kids, self._parent
        for key, parent in zip(keys, parents):
            if parent and (parent in t1 or parent in t2):
                link[key] = parent
                sib = kids.get(parent)
                if sib is None:
                    kids[parent] = key
                elif isinstance(sib, bytes):
                    kids[parent] = [sib, key]
                else:
                    sib.append(key)
                    if len(sib) > KIDS_COMPACT and len(sib) & (len(sib) - 1) == 0:
                        sib[:] = [k for k in sib if link.get(k) == parent]
        n = len(t1) + len(t2)
        if n > self._c:
            self._c = n

    def touch(self, key: bytes) -> None:
        if key in self._t2:
            self._t2.move_to_end(key)
        elif key in self._t1:
            del self._t1[key]
            self._t2[key] = None

    def remove(self, key: bytes) -> None:
        if key in self._t1:
            del self._t1[key]
            self._ghost(self._b1, key)
        elif key in self._t2:
            del self._t2[key]
            self._ghost(self._b2, key)
        else:
            return
        if self._orphans:
            self._orphans.pop(key, None)
        self._parent.pop(key, None)
        if key in self._kids:
            self._orphan_kids(key)

    def candidates(self) -> Iterator[bytes]:
        yield from self._orphans
        t1, t2 = self._t1, self._t2
        first, second = (t1, t2) if t1 and (len(t1) > self._p or not t2) else (t2, t1)
        yield from first
        yield from second

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    # -- internals ---------------------------------------------------------------------
    def _in(self, key: bytes) -> bool:
        return key in self._t1 or key in self._t2

    def _admit(self, key: bytes) -> None:
        if self._in(key):
            return
        c = max(self._c, 1)
        if key in self._b1:  # t1 was too small to keep it: grow t1's target
            b1, b2 = len(self._b1), len(self._b2)
            # ARC's step; while t2 has never had to give anything up (no ghost of
            # its own), nothing says its coldest entries earn their place, so t1 grows
            # faster (ARC's +1 takes longer than a trace lasts to move a large cache).
            step = b2 / b1 if b2 else len(self._t2) * T2_SHARE_STEP
            self._p = min(c, self._p + max(step, 1.0))
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:  # t2 was too small: shrink t1's target
            self._p = max(0.0, self._p - max(len(self._b1) / max(len(self._b2), 1), 1.0))
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None

    def _ghost(self, ghosts: OrderedDict[bytes, None], key: bytes) -> None:
        ghosts[key] = None
        if len(ghosts) > self._c * GHOST_FACTOR or len(ghosts) > self._ghost_max:
            limit = min(max(self._c, 1) * GHOST_FACTOR, self._ghost_max)
            while len(ghosts) > limit:
                ghosts.popitem(last=False)

    def _orphan_kids(self, key: bytes) -> None:
        """``key`` left: its cached descendants can no longer be reached."""
        kids, orphans, link = self._kids, self._orphans, self._parent
        stack = [key]
        while stack:
            parent = stack.pop()
            children = kids.pop(parent, None)
            if children is None:
                continue
            for kid in [children] if isinstance(children, bytes) else children:
                if link.get(kid) != parent:
                    continue  # left already
                del link[kid]
                orphans[kid] = None
                stack.append(kid)


POLICIES = ("prefix", "s3fifo", "lru")


def make_policy(name: str) -> EvictionPolicy:
    if name == "prefix":
        return PrefixPolicy()
    if name == "lru":
        return LRUPolicy()
    if name == "s3fifo":
        return S3FIFOPolicy()
    raise ValueError(f"unknown eviction policy {name!r}")
