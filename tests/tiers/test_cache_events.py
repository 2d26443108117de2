"""KV events come from one place, the cache, at its index transitions: every chunk
that becomes readable in the arena (a client's commit, a promotion from a lower tier,
a peer's fetch) is a CPU BlockStored with its tokens before any CPU BlockRemoved of it.
A real Index, tier manager and in-memory store; the event sink records what it is told."""

from __future__ import annotations

import time
from typing import Any

from kvnode.agent.cache import Cache
from kvnode.agent.config import load_config
from kvnode.agent.index import Index
from kvnode.agent.tiers.format import checksum
from kvnode.agent.tiers.manager import TierManager
from kvnode.agent.tiers.memory import MemoryStore

PAGE = 64 * 1024
CLIENT = 7


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def stored(self, key: bytes, parent: Any, tokens: Any, medium: str = "", tier: Any = None):
        self.events.append(("stored", key, parent, list(tokens), medium, tier))

    def removed(self, key: bytes, medium: str = "", tier: Any = None) -> None:
        self.events.append(("removed", key, medium, tier))


def _settle(cache: Cache) -> None:
    assert cache.tiers is not None
    end = time.monotonic() + 10
    while cache.tiers.busy() and time.monotonic() < end:
        cache.tiers.poll()
        time.sleep(0.002)
    cache.tiers.poll()
    cache.publish()


def test_a_promoted_chunk_is_stored_on_the_cpu_before_it_is_removed(arena) -> None:
    rec = Recorder()
    store = MemoryStore(64 << 20, name="disk")
    cfg = load_config(env={}, overrides={})
    index = Index(len(arena.buffer), PAGE, "lru")
    cache = Cache(index, lambda c: TierManager(cfg, arena, c, lambda: None, {"disk": store}),
                  events=rec)  # fmt: skip
    key, parent, tokens = b"k" * 16, b"p" * 16, list(range(256))
    data = bytes(range(256)) * 400
    _, e = cache.reserve(key, len(data), CLIENT)
    assert e is not None
    off, n = e.extents(PAGE)[0]
    arena.buffer[off : off + n] = data
    cache.commit_many([key], CLIENT, [checksum(data)], [parent], [tokens])
    cache.evict(index.alloc.pages_total)  # leaves through the disk
    _settle(cache)
    assert store.size_of(key) == len(data) and not index.contains(key)
    assert cache.promote(key)  # a local lookup's miss: promoted from the disk
    _settle(cache)
    assert index.lookup(key) is not None and index.entries[key].checksum == checksum(data)
    cache.evict(index.alloc.pages_total)
    _settle(cache)
    cpu = [ev for ev in rec.events if ev[1] == key and "CPU" in ev]
    assert [ev[0] for ev in cpu] == ["stored", "removed", "stored", "removed"]
    for ev in cpu[::2]:  # both stores carry the chunk's parent and tokens
        assert ev[2] == parent and ev[3] == tokens
    storage = [ev for ev in rec.events if ev[1] == key and "STORAGE" in ev]
    assert storage and storage[0][0] == "stored" and storage[0][3] == tokens
