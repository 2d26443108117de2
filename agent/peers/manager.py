"""The fetching half of peers, on the loop's side: ``PeerManager``.

``on_lookup_miss`` accepts keys at once (the agent answers PENDING); the network thread
asks every usable peer in one batched ``HaveReq`` each, in parallel, until all answered
or ``deadline_ms``; the loop then reserves arena pages as the agent (``AGENT_OWNER``) for
the longest prefix one peer holds, the thread fetches into them and verifies sizes and
checksums on the bytes as they lie in the arena, and ``poll()`` commits or aborts. The
loop never waits on the network; the thread never touches the index.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kvnode.agent.cache import Cache
from kvnode.agent.index import Entry
from kvnode.agent.peers.arena import arena_view, split_extents
from kvnode.agent.peers.jobs import Fetch, Fetched, Job, Query
from kvnode.agent.peers.keys import Curve
from kvnode.agent.peers.network import Network
from kvnode.agent.peers.seeds import Resolver
from kvnode.agent.peers.wire import PEER_KEYS_MAX
from kvnode.agent.tiers.format import ChunkMeta

log = logging.getLogger("kvnode.peers")

NEGATIVE_KEYS_MAX = 65536  # keys remembered as "no peer has it"
CLOSE_JOIN_S = 5.0


class PeerManager:
    """Fetches local misses from peers. Loop thread only, except the network thread it
    owns. Shaped like the tier manager: ``on_lookup_miss`` -> PENDING, ``poll()``
    commits, ``stats()``, ``close()``."""

    def __init__(
        self,
        cache: Cache,
        arena: Any,
        curve: Curve | None,
        node_id: bytes,
        wake: Callable[[], None],
        seeds: Sequence[str] = (),
        deadline_ms: int = 5,
        fetch_timeout_ms: int = 2000,
        fetch_inflight_max: int = 256,
        fetch_bytes_max: int = 512 << 20,
        queue_max: int = 64,
        negative_ttl_s: float = 2.0,
        resolve_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.index = cache.index  # read only: every change goes through the cache
        self._arena = arena_view(arena)
        self.wake = wake
        self.fetch_inflight_max = fetch_inflight_max
        self.fetch_bytes_max = fetch_bytes_max
        self.negative_ttl_s = negative_ttl_s
        self.clock = clock
        self._curve = curve
        self._pending: dict[bytes, str] = {}  # key -> "asking" | "fetching"
        self._reserved: set[bytes] = set()  # AGENT_OWNER reservations for fetches
        self._negative: OrderedDict[bytes, float] = OrderedDict()
        self._outbox: deque[Job] = deque()
        self.bytes_inflight = 0
        self._closing = False
        self.counters = dict.fromkeys(
            (
                "queries",
                "dropped",
                "no_space",
                "fetched",
                "fetched_bytes",
                "failed",
                "negative_hits",
            ),
            0,
        )
        self._net = Network(curve, node_id, self._done, deadline_ms / 1000,
                             fetch_timeout_ms / 1000, queue_max, fetch_bytes_max, clock)  # fmt: skip
        self._net.start()
        self._resolver: Resolver | None = None
        self._has_seeds = bool(seeds)
        if any(s.startswith("dns:") for s in seeds):
            self._resolver = Resolver(seeds, resolve_interval_s, self._net.set_endpoints)
            self._resolver.start()
        else:
            self._net.set_endpoints(set(seeds))

    # -- network thread side ----------------------------------------------------------------
    def _done(self, job: Job) -> None:
        self._outbox.append(job)
        try:
            self.wake()
        except Exception:  # a wake that fails only delays the next poll
            log.exception("peer manager: wake() failed")

    def reload_keys(self) -> int:
        """SIGHUP after a certificate change: read the authorized directory again (the
        server sharing this ``Curve`` admits by it at once) and re-create every link
        with the new server-key candidates. Returns the number of authorized keys."""
        if self._curve is None:
            return 0
        n = self._curve.ring.reload()
        self._net.rebuild()
        return n

    def set_seeds(self, seeds: Sequence[str]) -> None:
        """Replace ``tcp://`` endpoints at runtime (tests, SIGHUP without dns: seeds)."""
        self._has_seeds = bool(seeds)
        self._net.set_endpoints(set(seeds))

    # -- lookups -----------------------------------------------------------------------------
    def on_lookup_miss(self, keys: Sequence[bytes], parent: bytes | None = None) -> set[bytes]:
        """``keys``: a request's chunk keys from its first local miss on, in order;
        ``parent``: the key before them (None for a prompt's first chunk). Returns the
        keys a fetch is under way for (the agent answers PENDING). Never blocks."""
        if self._closing or not self._has_seeds or not keys:
            return set()
        out: set[bytes] = set()
        fresh, parents = self._fresh(keys, parent, out)
        # One batched request per peer: never more keys than a peer accepts in one.
        room = min(self.fetch_inflight_max - len(self._pending), PEER_KEYS_MAX)
        if len(fresh) > room:
            self.counters["dropped"] += len(fresh) - max(room, 0)
            fresh, parents = fresh[: max(room, 0)], parents[: max(room, 0)]
        if fresh and self._net.submit(Query(fresh, parents)):
            self.counters["queries"] += 1
            for k in fresh:
                self._pending[k] = "asking"
            out.update(fresh)
        elif fresh:
            self.counters["dropped"] += len(fresh)
        return out

    def _fresh(
        self, keys: Sequence[bytes], parent: bytes | None, out: set[bytes]
    ) -> tuple[list[bytes], list[bytes | None]]:
        """The keys worth asking about: up to the first one no peer had lately (a chain
        is only useful as a prefix), skipping keys already under way."""
        now = self.clock()
        fresh: list[bytes] = []
        parents: list[bytes | None] = []
        prev = parent
        for k in keys:
            if k in self._pending:
                out.add(k)
            elif self._negative.get(k, 0.0) > now:
                self.counters["negative_hits"] += 1
                break
            elif self.index.contains(k):
                break  # being written or read locally: nothing to fetch
            else:
                fresh.append(k)
                parents.append(prev)
            prev = k
        return fresh, parents

    def _remember_miss(self, keys: Iterable[bytes]) -> None:
        until = self.clock() + self.negative_ttl_s
        for k in keys:
            self._negative[k] = until
            self._negative.move_to_end(k)
        while len(self._negative) > NEGATIVE_KEYS_MAX:
            self._negative.popitem(last=False)

    # -- the loop's side ------------------------------------------------------------------
    def poll(self) -> list[Fetched]:
        """Finish what the network thread is done with (loop thread only; never blocks):
        reserve pages for the best answer of each lookup, commit verified fetches. The
        chunks committed are returned for events and write-through tiers."""
        landed: list[Fetched] = []
        while self._outbox:
            job = self._outbox.popleft()
            if isinstance(job, Query):
                self._plan(job)
            else:
                landed.extend(self._commit(job))
        return landed

    def _plan(self, q: Query) -> None:
        for k in q.keys:
            self._pending.pop(k, None)
        f = self._reserve_prefix(q) if q.best and not self._closing else None
        if f is not None and not self._net.submit(f):
            self._abort(f.keys)
            self.counters["dropped"] += len(f.keys)
            f = None
        if f is not None:
            for k in f.keys:
                self._pending[k] = "fetching"
        # A key a peer is promoting is asked again on the next lookup; the others wait
        # out the negative TTL, so a connector polling PENDING soon sees MISS.
        taken = set(f.keys) if f is not None else set()
        self._remember_miss(k for k in q.keys if k not in taken and k not in q.promoting)

    def _reserve_prefix(self, q: Query) -> Fetch | None:
        keys: list[bytes] = []
        slots: list[list[memoryview]] = []
        for k, size in zip(q.keys, q.sizes):
            if self.bytes_inflight + size > self.fetch_bytes_max:
                self.counters["dropped"] += 1
                break
            e = self._reserve(k, size)
            if e is None:
                break
            keys.append(k)
            slots.append(split_extents(self._arena, e, self.index.page_bytes))
            self.bytes_inflight += size
        if not keys:
            return None
        n = len(keys)
        return Fetch(q.best, keys, q.parents[:n], q.sizes[:n], slots, [0] * n, [[] for _ in keys])

    def _reserve(self, key: bytes, size: int) -> Entry | None:
        status, e = self.cache.reserve_agent(key, size)
        if e is None:
            if int(status) != 1:  # EXISTS: someone else is writing it; not a failure
                self.counters["no_space"] += 1
            return None
        self._reserved.add(key)
        return e

    def _commit(self, f: Fetch) -> list[Fetched]:
        landed: list[Fetched] = []
        failed: list[bytes] = []
        for i, key in enumerate(f.keys):
            self._pending.pop(key, None)
            self.bytes_inflight -= f.sizes[i]
            csum = f.checksums[i]
            meta = ChunkMeta.of(f.parents[i], f.tokens[i])
            if csum and self.cache.land(key, csum, meta):
                self._reserved.discard(key)
                landed.append(Fetched(key, f.parents[i], f.tokens[i], f.sizes[i]))
                self.counters["fetched"] += 1
                self.counters["fetched_bytes"] += f.sizes[i]
            else:
                failed.append(key)
        if failed:
            self._abort(failed)
            self.counters["failed"] += len(failed)
            self._remember_miss(failed)
        return landed

    def _abort(self, keys: Iterable[bytes]) -> None:
        for k in keys:
            if k in self._reserved:
                self._reserved.discard(k)
                self.cache.release(k)

    # -- state ---------------------------------------------------------------------------------
    def pending(self, key: bytes) -> bool:
        return key in self._pending

    def busy(self) -> bool:
        """Work in flight: the loop may poll sooner (completions also call wake())."""
        return bool(self._pending or self._outbox)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        out["pending"] = len(self._pending)
        out["bytes_inflight"] = self.bytes_inflight
        out["negative_keys"] = len(self._negative)
        out["peers"] = self._net.snapshot()
        return out

    def close(self) -> None:
        """Stop the threads, then abort every reservation a fetch still holds. If the
        network thread does not stop in time its reservations are left alone: pages a
        thread may still write are never handed back."""
        self._closing = True
        if self._resolver is not None:
            self._resolver.stop()
            self._resolver.join(CLOSE_JOIN_S)
        self._net.stop()
        self._net.join(CLOSE_JOIN_S)
        if self._net.is_alive():
            log.error(
                "peer network thread did not stop; %d fetch reservations kept", len(self._reserved)
            )
            return
        self._net.close_fds()
        self._outbox.clear()
        self._abort(list(self._reserved))
        self._pending.clear()
        self.bytes_inflight = 0


__all__ = ["PeerManager"]
