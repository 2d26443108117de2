"""Eviction policies. Mechanism (the index) asks a policy for candidates; the policy
knows nothing about pins or reservations: the index skips entries it may not evict.

- ``LRUPolicy``: least recently used first.
- ``S3FIFOPolicy``: scan-resistant (small probationary FIFO, main FIFO with a
  reinsertion bit, ghost FIFO of recently evicted keys). One-hit wonders, such as a
  stream of unique prompts, leave through the small queue without flushing the hot set.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol


class EvictionPolicy(Protocol):
    name: str

    def insert(self, key: bytes) -> None: ...
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

    def insert(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

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

    def insert(self, key: bytes) -> None:
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


def make_policy(name: str) -> EvictionPolicy:
    if name == "lru":
        return LRUPolicy()
    if name == "s3fifo":
        return S3FIFOPolicy()
    raise ValueError(f"unknown eviction policy {name!r}")
