"""Request handlers: one function per message type, each given the client the request
was authenticated as. They check what the schema cannot (lengths that must agree,
batch limits), go through the cache's two-phase calls, and answer with wire types.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvnode.agent.admin import LOG_EVERY_S, Admin
from kvnode.agent.cache import Cache
from kvnode.agent.clients import Client
from kvnode.agent.config import Config
from kvnode.agent.index import Entry, Outcome, State
from kvnode.agent.logs import Throttled
from kvnode.agent.replay import Bucket
from kvnode.agent.stats import Stats
from kvnode.ipc import protocol as P
from kvnode.ipc.checksum import checksum_extents

if TYPE_CHECKING:
    from kvnode.agent.fleet import Fleet

log = logging.getLogger("kvnode.agent")

HIT, PENDING = int(P.Lookup.HIT), int(P.Lookup.PENDING)
CORRUPT_CHECKS_MAX = 16  # entries one ordinary client's drop has checked, at most
# Bytes the loop hashes for ordinary clients' drops, all clients together: a budget
# refilled at this rate up to one second's worth (each check costs the loop about
# 0.1 ms a MiB). A drop arriving with the budget spent is refused unchecked, counted.
CORRUPT_CHECK_BYTES_PER_S = 256 << 20

# Index outcomes on the wire (the values agree, but the mapping is explicit).
_WIRE_STATUS = {
    Outcome.OK: P.Status.OK,
    Outcome.EXISTS: P.Status.EXISTS,
    Outcome.NO_SPACE: P.Status.NO_SPACE,
    Outcome.NOT_FOUND: P.Status.NOT_FOUND,
    Outcome.TOO_LARGE: P.Status.TOO_LARGE,
    Outcome.BAD_STATE: P.Status.BAD_STATE,
}


class ClientError(Exception):
    """A request the agent refuses: answered with an ``Error`` of ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


Handler = Callable[[Client, Any], Any]


class Handlers:
    def __init__(
        self,
        cfg: Config,
        cache: Cache,
        stats: Stats,
        fleet: Fleet | None = None,
        more: dict[type, Handler] | None = None,  # other modules' messages (agent mode)
        arena: memoryview | None = None,  # the arena's bytes (checksums of drops)
    ) -> None:
        self.arena = arena
        rate = float(CORRUPT_CHECK_BYTES_PER_S)
        self._check_budget = Bucket(rate, rate, rate, time.monotonic())
        self._corrupt_log = Throttled(LOG_EVERY_S)
        self.cfg = cfg
        self.cache = cache
        self.stats = stats
        self.page_bytes = cfg.arena.page_bytes
        self.fleet = fleet  # peers, when configured
        self.admin = Admin(cfg, cache, stats)  # operators' requests (kvnode cache)
        self.table: dict[type, Handler] = {
            P.Heartbeat: self.heartbeat,
            P.LookupReq: self.lookup,
            P.ReserveReq: self.reserve,
            P.CommitReq: self.commit,
            P.AbortReq: self.abort,
            P.PinReq: self.pin,
            P.ReleaseReq: self.release,
            P.DropReq: self.drop,
            P.AdminReq: self.admin.handle,
            **(more or {}),
        }

    def _limit(self, nkeys: int) -> None:
        if nkeys > self.cfg.agent.batch_keys_max:
            raise ClientError(P.ErrCode.TOO_MANY_KEYS, f"{nkeys} keys > batch_keys_max")

    def slot(self, e: Entry) -> P.Slot:
        return P.Slot(e.size, e.extents(self.page_bytes), e.checksum)

    # -- handlers ------------------------------------------------------------------------
    def heartbeat(self, c: Client, m: P.Heartbeat) -> Any:
        return P.Ok(m.rid)

    def lookup(self, c: Client, m: P.LookupReq) -> Any:
        t0 = time.perf_counter()
        self._limit(len(m.keys))
        cache = self.cache
        # The common answers (committed or absent) in one pass without calls; the rest
        # (recency of hits, lower tiers) only for the keys that need it.
        keys = m.keys
        states = cache.index.states(keys)
        hits = states.count(HIT)
        pending = 0
        if hits:
            for k, s in zip(keys, states):
                if s == HIT:
                    cache.lookup(k)  # recency
        if m.promote and cache.tiers is not None and hits < len(keys):
            for i, s in enumerate(states):
                if s != HIT and cache.promote(keys[i]):
                    states[i] = PENDING
                    pending += 1
        if self.fleet is not None and m.promote:
            pending += self._ask_peers(keys, states)
        n = len(keys)
        ctr = self.stats.counters
        ctr["lookups"] += 1
        ctr["lookup_keys"] += n
        ctr["hits"] += hits
        ctr["pending"] += pending
        ctr["misses"] += n - hits - pending
        self.stats.observe("lookup", time.perf_counter() - t0)
        return P.LookupRep(m.rid, states)

    def _ask_peers(self, keys: list[bytes], states: list[int]) -> int:
        """Keys from the first miss on go to the peers; those a peer will send are
        PENDING, like a promotion from disk. Returns how many."""
        assert self.fleet is not None
        try:
            first = states.index(P.Lookup.MISS)
        except ValueError:
            return 0
        parent = keys[first - 1] if first else None
        wanted = self.fleet.on_lookup_miss(keys[first:], parent)
        n = 0
        for i in range(first, len(keys)):
            if states[i] == P.Lookup.MISS and keys[i] in wanted:
                states[i] = P.Lookup.PENDING
                n += 1
        return n

    def reserve(self, c: Client, m: P.ReserveReq) -> Any:
        t0 = time.perf_counter()
        self._limit(len(m.keys))
        if len(m.sizes) != len(m.keys) or (m.groups and len(m.groups) != len(m.keys)):
            raise ClientError(P.ErrCode.BAD_FRAME, "keys, sizes and groups differ in length")
        if len(m.namespace) not in (0, 16):
            raise ClientError(P.ErrCode.BAD_FRAME, "a namespace is 16 bytes")
        ns = m.namespace or None
        status: list[int] = []
        slots: list[P.Slot | None] = []
        answers = None
        keys, sizes, groups = m.keys, m.sizes, m.groups
        held = len(self.cache.held_by(c.client_id).leases)
        over = len(keys) - (self.cfg.agent.client_leases_max - held)
        if over > 0:  # past the client's share: the last keys are refused, counted
            keep = max(0, len(keys) - over)
            keys, sizes, groups = keys[:keep], sizes[:keep], groups[:keep]
            self.stats.counters["refused_leases"] += len(m.keys) - keep
        if len(sizes) > 1 and sizes.count(sizes[0]) == len(sizes):
            # A step's chunks are one size: carve them from one free run at once.
            answers = self.cache.reserve_many(keys, sizes[0], c.client_id, groups or None, ns)
        if answers is None:
            answers = [
                self.cache.reserve(key, size, c.client_id, groups[i] if groups else None, ns)
                for i, (key, size) in enumerate(zip(keys, sizes))
            ]
        failed = 0
        pb = self.page_bytes
        for out, e in answers:
            status.append(_WIRE_STATUS[out])
            if e is None:
                slots.append(None)
                if out is not Outcome.EXISTS:
                    failed += 1
            else:
                slots.append(P.Slot(e.size, e.extents(pb)))
        for _ in range(len(m.keys) - len(keys)):
            status.append(P.Status.NO_SPACE)
            slots.append(None)
        ctr = self.stats.counters
        ctr["reserve_failed"] += failed
        ctr["reserves"] += 1
        ctr["reserve_keys"] += len(m.keys)
        self.stats.observe("reserve", time.perf_counter() - t0)
        return P.SlotsRep(m.rid, status, slots)

    def commit(self, c: Client, m: P.CommitReq) -> Any:
        t0 = time.perf_counter()
        n = len(m.keys)
        self._limit(n)
        if len(m.checksums) != n:
            raise ClientError(P.ErrCode.BAD_FRAME, "keys and checksums differ in length")
        if (m.parents and len(m.parents) != n) or (m.tokens and len(m.tokens) != n):
            raise ClientError(P.ErrCode.BAD_FRAME, "parents/tokens must match keys in length")
        # The index refuses a key this client does not hold reserved (BAD_STATE, or
        # NOT_FOUND when absent): leases are booked there, once.
        outs = self.cache.commit_many(m.keys, c.client_id, m.checksums, m.parents, m.tokens)
        entries = self.cache.index.entries
        out: list[int] = []
        commits = nbytes = ntokens = refused = 0
        for i, (key, st) in enumerate(zip(m.keys, outs, strict=True)):
            out.append(_WIRE_STATUS[st])
            if st is Outcome.OK:
                commits += 1
                nbytes += entries[key].size
                ntokens += len(m.tokens[i]) if m.tokens else 0
            else:
                refused += 1
        ctr = self.stats.counters
        ctr["refused_commits"] += refused
        ctr["commits"] += commits
        ctr["bytes_in"] += nbytes
        ctr["tokens_in"] += ntokens
        self.stats.observe("commit", time.perf_counter() - t0)
        return P.StatusRep(m.rid, out)

    def abort(self, c: Client, m: P.AbortReq) -> Any:
        self._limit(len(m.keys))
        for key in m.keys:
            if self.cache.abort(key, c.client_id):  # only this client's reservations
                self.stats.inc("aborts")
        return P.Ok(m.rid)

    def pin(self, c: Client, m: P.PinReq) -> Any:
        t0 = time.perf_counter()
        self._limit(len(m.keys))
        status: list[int] = []
        slots: list[P.Slot | None] = []
        ok, not_found = P.Status.OK, P.Status.NOT_FOUND
        misses = nbytes = ntokens = 0
        keys = m.keys
        room = self.cfg.agent.client_pins_max - self.cache.held_by(c.client_id).pins_held
        if len(keys) > room:  # past the client's share: the last keys are refused, counted
            keys = keys[: max(0, room)]
        now = c.last_seen  # the request's time (set when it was authenticated)
        for e in self.cache.pin_many(keys, c.client_id, now):
            if e is None:
                status.append(not_found)
                slots.append(None)
                misses += 1
                continue
            status.append(ok)
            slots.append(self.slot(e))
            nbytes += e.size
            if e.meta is not None:
                ntokens += len(e.meta.tokens) >> 2  # uint32 token ids
        ctr = self.stats.counters
        if len(keys) < len(m.keys):
            ctr["refused_pins"] += len(m.keys) - len(keys)
            status.extend([P.Status.NO_SPACE] * (len(m.keys) - len(keys)))
            slots.extend([None] * (len(m.keys) - len(keys)))
        ctr["pin_misses"] += misses
        ctr["bytes_out"] += nbytes
        ctr["tokens_out"] += ntokens
        ctr["pins"] += 1
        self.stats.observe("pin", time.perf_counter() - t0)
        return P.SlotsRep(m.rid, status, slots)

    def release(self, c: Client, m: P.ReleaseReq) -> Any:
        t0 = time.perf_counter()
        self._limit(len(m.keys))
        self.cache.unpin_many(m.keys, c.client_id)  # only pins this client holds
        self.stats.inc("releases")
        self.stats.observe("release", time.perf_counter() - t0)
        return P.Ok(m.rid)

    def drop(self, c: Client, m: P.DropReq) -> Any:
        """An operator's request (kvnode cache drop). An ordinary client (a worker whose
        copy failed its checksum) drops only arena copies the agent finds corrupt
        itself, never on its word alone; with none among its keys it is refused."""
        self._limit(len(m.keys))
        if not self.admin.operators.allowed(c) and self._drop_corrupt(m.keys) > 0:
            return P.Ok(m.rid)
        self.admin.refuse_unless_operator(c)
        self.admin.drop(m.keys)
        return P.Ok(m.rid)

    def _drop_corrupt(self, keys: list[bytes]) -> int:
        """Drop the arena copy (lower tiers checked theirs when written) of each of the
        first ``CORRUPT_CHECKS_MAX`` keys whose bytes no longer match its committed
        checksum. Returns how many."""
        if self.arena is None:
            return 0
        budget = self._check_budget
        budget.refill(time.monotonic())
        n = 0
        for key in keys[:CORRUPT_CHECKS_MAX]:
            e = self.cache.index.entries.get(key)
            if e is None or e.state is not State.COMMITTED or not e.checksum:
                continue
            if budget.level <= 0:  # an entry larger than what is left is checked once
                self.stats.inc("corrupt_checks_skipped")
                continue
            budget.level -= e.size
            self.stats.inc("corrupt_check_bytes", e.size)
            if checksum_extents(self.arena, e.extents(self.page_bytes)) == e.checksum:
                continue
            self.cache.drop(key, lower_tiers=False)
            self.stats.inc("corrupt_dropped")
            held = self._corrupt_log.due()
            if held is not None:
                log.warning("entry %s failed its checksum in the arena: its arena copy is "
                            "dropped (a client's copy found it)%s", key.hex(),
                            Throttled.note(held))  # fmt: skip
            n += 1
        return n
