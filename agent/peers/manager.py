"""The fetching half of peers, on the loop's side: ``PeerManager``.

``on_lookup_miss`` accepts keys at once (the agent answers PENDING); the network thread
asks every usable peer in one batched ``HaveReq`` each, in parallel, until all answered
or ``deadline_ms``; the loop then asks the peer holding the longest prefix for it
(within ``fetch_bytes_max`` in all and ``peer_bytes_inflight_max`` per peer), the thread
checks sizes and the writers' checksums on the bytes received, and ``poll()`` reserves
pages through the cache (only now may the arena evict: the bytes are here and good),
copies them in and lands them. A peer whose bytes fail their checksum, or that sends
more than it was asked for, is benched for ``bench_s``. The loop never waits on the
network; the thread never touches the index or the arena.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kvnode.agent.cache import Cache
from kvnode.agent.index import Outcome, State
from kvnode.agent.peers.arena import arena_view, copy_into, split_extents
from kvnode.agent.peers.directory import Directory
from kvnode.agent.peers.jobs import Fetch, Fetched, Job, Query
from kvnode.agent.peers.keys import Curve
from kvnode.agent.peers.network import Network
from kvnode.agent.peers.replicas import Replicas
from kvnode.agent.peers.seeds import Resolver
from kvnode.agent.peers.subscriber import Subscriber
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
        peer_bytes_max: int = 128 << 20,
        bench_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        directory: Directory | None = None,
        replicas: Replicas | None = None,
    ) -> None:
        self.directory = directory
        self.replicas = replicas if replicas is not None else Replicas("always")
        self.cache = cache
        self.index = cache.index  # read only: every change goes through the cache
        self._arena = arena_view(arena)
        self.wake = wake
        self.fetch_inflight_max = fetch_inflight_max
        self.fetch_bytes_max = fetch_bytes_max
        self.peer_bytes_max = peer_bytes_max  # bytes in flight from any one peer
        self._peer_bytes: dict[str, int] = {}
        self.negative_ttl_s = negative_ttl_s
        self.clock = clock
        self._curve = curve
        self._pending: dict[bytes, str] = {}  # key -> "asking" | "fetching"
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
                "peer_busy",
                "direct_fetches",
                "directory_routed",
                "directory_misses",
            ),
            0,
        )
        self._net = Network(curve, node_id, self._done, deadline_ms / 1000,
                            fetch_timeout_ms / 1000, queue_max, min(fetch_bytes_max,
                            peer_bytes_max), clock, bench_s)  # fmt: skip
        self._net.start()
        self._events: Subscriber | None = None
        if directory is not None:
            self._events = Subscriber(curve, wake, clock)
            self._events.start()
        self._resolver: Resolver | None = None
        self._has_seeds = bool(seeds)
        if any(s.startswith("dns:") for s in seeds):
            self._resolver = Resolver(seeds, resolve_interval_s, self._set_endpoints)
            self._resolver.start()
        else:
            self._set_endpoints(set(seeds))

    def _set_endpoints(self, endpoints: set[str]) -> None:
        """Any thread (the resolver's): the peers to fetch from and to follow."""
        self._net.set_endpoints(endpoints)
        if self._events is not None:
            self._events.set_endpoints(endpoints)

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
        self._set_endpoints(set(seeds))

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
        targets: list[str] = []
        holder = ""
        if fresh and self.directory is not None:
            route = self.directory.route(fresh, self._net.load)
            fresh, parents, targets = fresh[: route.n], parents[: route.n], route.ask
            if not route.fallback:
                self.counters["directory_routed" if targets else "directory_misses"] += 1
                holder = targets[0] if targets else ""
        if fresh and self._net.submit(Query(fresh, parents, targets=targets, holder=holder)):
            self.counters["queries"] += 1
            for k in fresh:
                self._pending[k] = "asking"
            out.update(fresh)
        elif fresh:
            self.counters["dropped"] += len(fresh)
        return out

    def fetch_from(
        self,
        peer: str,
        keys: Sequence[bytes],
        sizes: Sequence[int],
        parent: bytes | None = None,
    ) -> set[bytes]:
        """Fetch a chain of ``keys`` (of these ``sizes``) from ``peer``, one holder known
        to have them (e.g. from a directory of peers' KV events), without asking every
        peer first. The same bounds and checks as a lookup's fetch: nothing is reserved
        before the bytes arrive, a size the peer does not confirm is a failed fetch.
        Returns the keys under way (the agent answers PENDING). Never blocks."""
        if self._closing or not keys or len(sizes) != len(keys):
            return set()
        out: set[bytes] = set()
        fresh, parents = self._fresh(keys, parent, out)
        by_key = dict(zip(keys, sizes))
        q = Query(fresh, parents)
        q.best = peer
        for k in fresh:  # a prefix of sane sizes only
            size = by_key[k]
            if not 0 < size <= self.peer_bytes_max:
                break
            q.sizes.append(size)
        f = self._prefix(q) if q.sizes else None
        if f is None:
            return out
        if not self._net.submit(f):
            self._settle(f)
            self.counters["dropped"] += len(f.keys)
            return out
        self.counters["direct_fetches"] += 1
        for k in f.keys:
            self._pending[k] = "fetching"
        out.update(f.keys)
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
        plan a fetch from the best answer of each lookup, land the bytes of finished
        fetches. Returns the chunks landed."""
        landed: list[Fetched] = []
        if self._events is not None:
            self._apply_events()
        if len(self.replicas):
            self._return_borrowed()
        while self._outbox:
            job = self._outbox.popleft()
            if isinstance(job, Query):
                self._plan(job)
            else:
                landed.extend(self._land(job))
        return landed

    def _return_borrowed(self) -> None:
        """Borrowed copies whose time is up go, unless a reader holds them now."""
        for key in self.replicas.due():
            e = self.index.entries.get(key)
            if e is None or e.state is not State.COMMITTED:
                continue  # evicted or dropped already
            if e.pins:
                self.replicas.again(key)
            elif self.cache.drop(key):
                self.replicas.counters["returned"] += 1

    def _apply_events(self) -> None:
        """What the peers' event streams said since the last poll, into the directory."""
        assert self._events is not None and self.directory is not None
        d = self.directory
        for u in self._events.take():
            if u.kind == "stored":
                d.stored(u.endpoint, u.keys, u.tier)
            elif u.kind == "removed":
                d.removed(u.endpoint, u.keys, u.tier)
            elif u.kind == "reset":
                d.reset(u.endpoint)
            elif u.kind in ("synced", "unsynced"):
                d.set_synced(u.endpoint, u.kind == "synced")
            elif u.kind == "nostream":
                d.set_nostream(u.endpoint)
            elif u.kind == "add":
                d.add_peer(u.endpoint)
            elif u.kind == "remove":
                d.remove_peer(u.endpoint)
        for endpoint in d.take_resyncs():  # room again for what found none
            self._events.resync_whole(endpoint)

    def _plan(self, q: Query) -> None:
        for k in q.keys:
            self._pending.pop(k, None)
        answered = self.directory is not None and q.holder in q.answered
        if answered:
            # The holder the directory named answered: what it does not have is forgotten
            # (announced, then evicted before its removal reached us), and the directory,
            # not the negative TTL, says where to ask next (another holder, or nobody).
            run = len(q.sizes) if q.best == q.holder else 0
            if run < len(q.keys):
                self.directory.forget(q.holder, q.keys[run:])  # type: ignore[union-attr]
        f = self._prefix(q) if q.best and not self._closing else None
        if f is not None and not self._net.submit(f):
            self._settle(f)
            self.counters["dropped"] += len(f.keys)
            f = None
        if f is not None:
            for k in f.keys:
                self._pending[k] = "fetching"
        # A key a peer is promoting is asked again on the next lookup; the others wait
        # out the negative TTL, so a connector polling PENDING soon sees MISS.
        taken = set(f.keys) if f is not None else set()
        if not answered:
            self._remember_miss(k for k in q.keys if k not in taken and k not in q.promoting)

    def _prefix(self, q: Query) -> Fetch | None:
        """The part of the best peer's prefix that fits the bytes in flight, in all and
        to that peer. Nothing is reserved yet: the arena gives nothing up (no eviction)
        for bytes that have not arrived and been checked."""
        n = 0
        room = min(self.fetch_bytes_max - self.bytes_inflight,
                   self.peer_bytes_max - self._peer_bytes.get(q.best, 0))  # fmt: skip
        for size in q.sizes:
            if size > room:
                key = (
                    "peer_busy" if size <= self.fetch_bytes_max - self.bytes_inflight else "dropped"
                )
                self.counters[key] += 1
                break
            room -= size
            n += 1
        if not n:
            return None
        f = Fetch(q.best, q.keys[:n], q.parents[:n], q.sizes[:n], [[] for _ in range(n)])
        self.bytes_inflight += f.nbytes
        self._peer_bytes[f.peer] = self._peer_bytes.get(f.peer, 0) + f.nbytes
        return f

    def _settle(self, f: Fetch) -> None:
        """``f`` holds no more bytes in flight."""
        self.bytes_inflight -= f.nbytes
        left = self._peer_bytes.get(f.peer, 0) - f.nbytes
        if left > 0:
            self._peer_bytes[f.peer] = left
        else:
            self._peer_bytes.pop(f.peer, None)

    def _land(self, f: Fetch) -> list[Fetched]:
        """The bytes arrived and passed their checks: now pages are reserved (this may
        evict), the bytes copied in and the chunk landed with the writer's checksum."""
        self._settle(f)
        landed: list[Fetched] = []
        failed: list[bytes] = []
        for i, key in enumerate(f.keys):
            self._pending.pop(key, None)
            parts = f.payload[i]
            if parts is None or self._closing or not self._copy_in(key, f.sizes[i], parts):
                failed.append(key)
                continue
            meta = ChunkMeta.of(f.parents[i], f.tokens[i])
            if not self.cache.land(key, f.checksums[i], meta):
                self.cache.release(key)
                failed.append(key)
                continue
            self.replicas.landed(key)
            landed.append(Fetched(key, f.parents[i], f.tokens[i], f.sizes[i]))
            self.counters["fetched"] += 1
            self.counters["fetched_bytes"] += f.sizes[i]
        f.payload, f.frames = [], []  # the received frames go back to libzmq
        if failed:
            self.counters["failed"] += len(failed)
            self._remember_miss(failed)
        return landed

    def _copy_in(self, key: bytes, size: int, parts: list[memoryview]) -> bool:
        status, e = self.cache.reserve_agent(key, size)
        if e is None:
            if status is not Outcome.EXISTS:  # EXISTS: written locally meanwhile
                self.counters["no_space"] += 1
            return False
        if not copy_into(split_extents(self._arena, e, self.index.page_bytes), parts):
            self.cache.release(key)  # sizes were checked: a bug, but never a bad chunk
            return False
        return True

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
        out["peer_bytes_inflight_max"] = max(self._peer_bytes.values(), default=0)
        out["negative_keys"] = len(self._negative)
        out["peers"] = self._net.snapshot()
        out["replicas"] = {**self.replicas.counters, "borrowed_now": len(self.replicas)}
        if self.directory is not None and self._events is not None:
            out["directory"] = {**self.directory.stats(), **self._events.snapshot()}
        return out

    def close(self) -> None:
        """Stop the threads. The network thread holds no arena pages (fetches reserve
        only once their bytes are checked, on the loop), so nothing is left to undo."""
        self._closing = True
        if self._resolver is not None:
            self._resolver.stop()
            self._resolver.join(CLOSE_JOIN_S)
        if self._events is not None:
            self._events.stop()
            self._events.join(CLOSE_JOIN_S)
            if not self._events.is_alive():
                self._events.close_fds()
        self._net.stop()
        self._net.join(CLOSE_JOIN_S)
        if self._net.is_alive():
            log.error("peer network thread did not stop")
            return
        self._net.close_fds()
        self._outbox.clear()
        self._pending.clear()
        self._peer_bytes.clear()
        self.bytes_inflight = 0


__all__ = ["PeerManager"]
