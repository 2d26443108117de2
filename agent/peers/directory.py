"""The cluster directory: which peer holds which chunk, in which tier, built from the
peers' own KV events (``subscriber``) and consulted on a local miss instead of asking
every peer.

Loop thread only. Each peer has a slot (0..``peers_max``-1); the directory keeps one
``dict`` key -> holder mask, two bits per slot (arena, storage), and per peer the set of
keys it announced, so a peer that restarts or resyncs is forgotten in O(its keys). A
stream is *synced* while the directory has seen every batch of the peer's current
generation in order; only then is "not in the directory" taken as "that peer does not
have it". For peers not synced a miss falls back to asking them, within a rate bound.

Memory per entry (CPython 3.11, measured by ``benchmarks/peer_bench.py``): the 16-byte
key object, one slot in the global dict, one in the peer's set, and the mask integer;
``entries_max`` bounds the entries, beyond which announcements are dropped (counted)
and the peer that sent them is treated as not synced; once there is room again its
stream replays its whole state (a snapshot) and it is synced again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

ARENA = 1  # tier bits of a holder (shifted by 2 * slot)
# Measured with tracemalloc (CPython 3.11, 200,000 keys): a key with one holder costs
# about 210 bytes (its 16-byte key object, a slot in the key dict, its mask, a slot in
# the holder's set); each further holder about 70 (a set slot, a wider mask).
ENTRY_BYTES = 140
HOLDING_BYTES = 70
STORAGE = 2
TIER_BITS = 2


@dataclass(slots=True, eq=False)
class PeerStream:
    """What the directory knows of one peer's stream."""

    endpoint: str
    slot: int
    synced: bool = False
    nostream: bool = False  # it publishes no stream we can follow: always asked
    keys: set[bytes] = field(default_factory=set)
    generation: bytes = b""


@dataclass(frozen=True, slots=True)
class Route:
    """Where a local miss goes: ``ask`` peers (one holder, or the unsynced ones as the
    fallback) about the first ``n`` keys; ``ask == []``: nobody has them (a miss, no
    message sent)."""

    ask: list[str]
    n: int
    fallback: bool = False


RESYNC_ROOM = 0.9  # a peer that overflowed is replayed once entries are below this share
RESYNC_MIN_S = 5.0  # and at most this often


class Directory:
    def __init__(
        self,
        peers_max: int = 256,
        entries_max: int = 4_000_000,
        fallback_per_s: float = 50.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.peers_max = peers_max
        self.entries_max = entries_max
        self.fallback_per_s = fallback_per_s
        self._clock = clock
        self._holders: dict[bytes, int] = {}
        self._peers: dict[str, PeerStream] = {}
        self._by_slot: dict[int, PeerStream] = {}
        self._fallback_level = fallback_per_s
        self._fallback_at = clock()
        self._rr = 0
        # Peers some of whose announcements found no room: their whole state is asked
        # for again once there is room (``take_resyncs``), at most every RESYNC_MIN_S.
        self._overflowed: set[str] = set()
        self._resynced_at: dict[str, float] = {}
        self.counters = dict.fromkeys(
            ("routed", "routed_arena", "no_holder", "fallback", "fallback_limited",
             "fallback_missed",
             "entries_dropped", "peers_refused", "forgotten", "resets", "resyncs_asked"), 0,
        )  # fmt: skip

    # -- peers ---------------------------------------------------------------------------
    def add_peer(self, endpoint: str) -> PeerStream | None:
        p = self._peers.get(endpoint)
        if p is not None:
            return p
        free = next((s for s in range(self.peers_max) if s not in self._by_slot), None)
        if free is None:
            self.counters["peers_refused"] += 1
            return None
        p = PeerStream(endpoint, free)
        self._peers[endpoint] = p
        self._by_slot[free] = p
        return p

    def remove_peer(self, endpoint: str) -> None:
        p = self._peers.pop(endpoint, None)
        self._overflowed.discard(endpoint)
        self._resynced_at.pop(endpoint, None)
        if p is not None:
            self._clear(p)
            del self._by_slot[p.slot]

    def take_resyncs(self) -> list[str]:
        """Peers whose whole state to ask for again (their stream replays it): some of
        what they announced found no room, and there is room now (the entries below
        ``RESYNC_ROOM`` of the bound). Until then they stay unsynced (a miss may ask
        them, within the fallback's rate); each at most every ``RESYNC_MIN_S``."""
        if not self._overflowed or len(self._holders) > RESYNC_ROOM * self.entries_max:
            return []
        now = self._clock()
        out = [
            ep
            for ep in self._overflowed
            if now - self._resynced_at.get(ep, float("-inf")) >= RESYNC_MIN_S
        ]
        for ep in out:
            self._overflowed.discard(ep)
            self._resynced_at[ep] = now
        self.counters["resyncs_asked"] += len(out)
        return out

    def set_synced(self, endpoint: str, synced: bool) -> None:
        p = self._peers.get(endpoint)
        if p is not None:
            p.synced = synced
            p.nostream = False

    def set_nostream(self, endpoint: str) -> None:
        """The peer has no event stream on tcp: ask it on every miss, as without a
        directory (its operator chose that)."""
        p = self._peers.get(endpoint)
        if p is not None:
            p.synced = False
            p.nostream = True

    def reset(self, endpoint: str, generation: bytes = b"") -> None:
        """Everything the peer announced is gone (it restarted, or its history is
        about to be replayed from the start)."""
        p = self._peers.get(endpoint)
        if p is not None:
            self._clear(p)
            p.generation = generation
            self.counters["resets"] += 1

    def _clear(self, p: PeerStream) -> None:
        keep = ~((ARENA | STORAGE) << (TIER_BITS * p.slot))
        holders = self._holders
        for k in p.keys:
            m = holders.get(k, 0) & keep
            if m:
                holders[k] = m
            else:
                holders.pop(k, None)
        p.keys = set()

    # -- what the peers' events say ---------------------------------------------------------
    def stored(self, endpoint: str, keys: Iterable[bytes], tier: int) -> None:
        p = self._peers.get(endpoint)
        if p is None:
            return
        bit = tier << (TIER_BITS * p.slot)
        holders = self._holders
        for k in keys:
            m = holders.get(k)
            if m is None:
                if len(holders) >= self.entries_max:
                    self.counters["entries_dropped"] += 1
                    p.synced = False  # "not here" no longer means absent for it
                    self._overflowed.add(endpoint)
                    continue
                holders[k] = bit
            else:
                holders[k] = m | bit
            p.keys.add(k)

    def removed(self, endpoint: str, keys: Iterable[bytes], tier: int) -> None:
        p = self._peers.get(endpoint)
        if p is None:
            return
        shift = TIER_BITS * p.slot
        both = (ARENA | STORAGE) << shift
        holders = self._holders
        for k in keys:
            m = holders.get(k)
            if m is None:
                continue
            m &= ~(tier << shift)
            if not m & both:
                p.keys.discard(k)
            if m:
                holders[k] = m
            else:
                del holders[k]

    def forget(self, endpoint: str, keys: Iterable[bytes]) -> None:
        """The peer said it does not hold these after all (announced, then evicted
        before its removal reached us): do not route to it for them again."""
        p = self._peers.get(endpoint)
        if p is not None:
            n = len(p.keys)
            self.removed(endpoint, keys, ARENA | STORAGE)
            self.counters["forgotten"] += n - len(p.keys)

    # -- a local miss ---------------------------------------------------------------------
    def route(self, keys: Sequence[bytes], load: Callable[[str], int] | None = None) -> Route:
        """Where to ask about ``keys`` (a request's chain from its first local miss).
        One holder of the longest leading run, in memory before on disk, least loaded
        first (``load``: requests outstanding to a peer); else the peers whose streams
        are not synced, if the fallback budget allows; else nobody."""
        run_mask = 0
        n = 0
        for k in keys:
            m = self._holders.get(k, 0)
            m = (m | (m >> 1)) & _LOW_BITS  # any tier -> the slot's low bit
            nxt = (run_mask & m) if n else m
            if not nxt:
                break
            run_mask, n = nxt, n + 1
        if n:
            return self._holder(keys[:n], run_mask, load)
        always = [p.endpoint for p in self._peers.values() if p.nostream]
        resyncing = [p.endpoint for p in self._peers.values() if not (p.synced or p.nostream)]
        limited = bool(resyncing) and not self._take_fallback()
        if limited:
            self.counters["fallback_limited"] += 1
            resyncing = []
        ask = always + resyncing
        if not ask:
            self.counters["no_holder" if not limited else "fallback_missed"] += 1
            return Route([], 0)
        self.counters["fallback"] += 1
        return Route(ask, len(keys), fallback=True)

    def _holder(self, keys: Sequence[bytes], run_mask: int, load: Any) -> Route:
        slots = [s for s in _bits(run_mask)]
        in_arena = [
            s for s in slots if all(self._holders[k] >> (TIER_BITS * s) & ARENA for k in keys)
        ]
        pool = in_arena or slots
        peers = [self._by_slot[s].endpoint for s in pool if s in self._by_slot]
        if not peers:
            self.counters["no_holder"] += 1
            return Route([], 0)
        if load is not None:
            # Each peer's load read once: the network thread changes it meanwhile, and
            # two reads could leave no peer at the least.
            loads = {ep: load(ep) for ep in peers}
            least = min(loads.values())
            peers = [ep for ep in peers if loads[ep] == least]
        self._rr += 1
        self.counters["routed"] += 1
        if in_arena:
            self.counters["routed_arena"] += 1
        return Route([peers[self._rr % len(peers)]], len(keys))

    def _take_fallback(self) -> bool:
        now = self._clock()
        burst = max(1.0, self.fallback_per_s)
        self._fallback_level = min(
            burst, self._fallback_level + (now - self._fallback_at) * self.fallback_per_s
        )
        self._fallback_at = now
        if self._fallback_level < 1:
            return False
        self._fallback_level -= 1
        return True

    # -- state ----------------------------------------------------------------------------
    def holders(self, key: bytes) -> dict[str, int]:
        """endpoint -> tier bits, for tests and tools."""
        m = self._holders.get(key, 0)
        out = {}
        for s in _bits((m | (m >> 1)) & _LOW_BITS):
            p = self._by_slot.get(s)
            if p is not None:
                out[p.endpoint] = (m >> (TIER_BITS * s)) & (ARENA | STORAGE)
        return out

    def synced(self, endpoint: str) -> bool:
        p = self._peers.get(endpoint)
        return p is not None and p.synced

    def __len__(self) -> int:
        return len(self._holders)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        out["entries"] = len(self._holders)
        holdings = sum(len(p.keys) for p in self._peers.values())
        out["bytes_estimate"] = len(self._holders) * ENTRY_BYTES + holdings * HOLDING_BYTES
        out["peers"] = len(self._peers)
        out["peers_synced"] = sum(1 for p in self._peers.values() if p.synced)
        return out


def _bits(mask: int) -> Iterable[int]:
    """Slots whose low tier bit is set in ``mask``."""
    while mask:
        low = mask & -mask
        yield (low.bit_length() - 1) // TIER_BITS
        mask ^= low


_LOW_BITS = int("01" * 512, 2)  # the low bit of every slot (up to 512 slots)


__all__ = ["ARENA", "STORAGE", "Directory", "PeerStream", "Route"]
