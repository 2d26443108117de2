"""Operator actions: who is an operator, and what ``kvnode cache`` may see and do.

An operator is a connection whose peer (``SO_PEERCRED`` of the client's socket, taken
by the kernel, not said by the client) runs as the agent's own user, as root, or with
``agent.admin_group`` among its groups. Only operators drop keys or clear a tier; an
ordinary client (a vLLM process) is refused and counted, so no local process can empty
the node's cache. S3 objects are never deleted here: the bucket is shared by the
fleet, and its own lifecycle rules expire objects.

Listing and clearing are bounded: a list answers at most ``ADMIN_LIST_MAX`` entries;
clearing the disk runs on the disk tier's I/O thread, never on the loop.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import socket
import struct
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from kvnode.agent.config import Config
from kvnode.agent.index import Entry, State
from kvnode.agent.logs import Throttled
from kvnode.ipc import protocol as P

if TYPE_CHECKING:
    from kvnode.agent.cache import Cache
    from kvnode.agent.clients import Client
    from kvnode.agent.stats import Stats

log = logging.getLogger("kvnode.agent")
LOG_EVERY_S = 10.0  # refusals of operators' requests: at most one line this often

_UCRED = struct.Struct("3i")  # pid, uid, gid
_NO_LOCK = contextlib.nullcontext()
SORTS = ("hits", "age", "size")


def peer_credentials(fd: int) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of the Unix socket ``fd``, as
    the kernel recorded them at connect; None when the fd is not such a socket."""
    if fd < 0:
        return None
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
    except OSError:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    finally:
        sock.detach()  # the fd is the agent's ZeroMQ connection: never close it here
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _groups_of(pid: int) -> set[int]:
    """Supplementary groups of a process (its /proc status), empty if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


class Operators:
    """Decides whether a client's connection is an operator's."""

    def __init__(self, cfg: Config, creds: Callable[[int], tuple[int, int, int] | None]) -> None:
        self.admin_gid: int | None = None
        if cfg.agent.admin_group:
            from kvnode.ipc.segment import group_id

            self.admin_gid = group_id(cfg.agent.admin_group)
        self.creds = creds

    def allowed(self, c: Client) -> bool:
        got = self.creds(c.fd)
        if got is None:
            return False
        pid, uid, gid = got
        if uid in (0, os.geteuid()):
            return True
        if self.admin_gid is None:
            return False
        return gid == self.admin_gid or self.admin_gid in _groups_of(pid)


class Admin:
    """The operator's requests: list, show, drop, clear."""

    def __init__(self, cfg: Config, cache: Cache, stats: Stats) -> None:
        self.cfg = cfg
        self.cache = cache
        self.stats = stats
        self.operators = Operators(cfg, peer_credentials)
        self._refusals_log = Throttled(LOG_EVERY_S)

    def refuse_unless_operator(self, c: Client) -> None:
        from kvnode.agent.handlers import ClientError

        if not self.operators.allowed(c):
            self.stats.inc("refused_admin")
            held = self._refusals_log.due()
            if held is not None:
                log.warning(
                    "refused an operator's request from client %x (pid %d): not the agent's "
                    "user, root or agent.admin_group%s", c.client_id, c.pid, Throttled.note(held),
                )  # fmt: skip
            raise ClientError(P.ErrCode.NOT_PERMITTED, "operators only (agent.admin_group)")

    # -- requests ---------------------------------------------------------------------
    def handle(self, c: Client, m: P.AdminReq) -> Any:
        self.refuse_unless_operator(c)
        op = P.AdminOp(m.op)
        if op is P.AdminOp.LIST:
            result = self.listing(m.tier, m.sort, m.limit)
        elif op is P.AdminOp.SHOW:
            result = {"keys": [self.show(k) for k in m.keys]}
        elif op is P.AdminOp.DROP:
            result = {"dropped": self.drop(m.keys)}
        elif op is P.AdminOp.DROP_NAMESPACE:
            result = {"dropped": self.drop_namespace(m.keys[0] if m.keys else b"")}
        else:
            result = self.clear(m.tier)
        return P.AdminRep(m.rid, result)

    def drop(self, keys: list[bytes]) -> int:
        """Out of the arena and the disk; S3 keeps its copy (the fleet's)."""
        n = 0
        for key in keys:
            if self.cache.drop(key):
                n += 1
        self.stats.inc("drops", n)
        return n

    def drop_namespace(self, ns: bytes) -> int:
        """Every arena entry reserved under ``ns`` (and its disk copy). Entries whose
        client named no namespace are not in any."""
        keys = [k for k, e in self.cache.index.entries.items()
                if e.ns == ns and e.state is State.COMMITTED]  # fmt: skip
        n = self.drop(keys)
        log.warning("operator dropped namespace %s: %d entries", ns.hex(), n)
        return n

    def listing(self, tier: str, sort: str, limit: int) -> dict[str, Any]:
        if sort not in SORTS:
            from kvnode.agent.handlers import ClientError

            raise ClientError(P.ErrCode.BAD_FRAME, f"sort by one of {', '.join(SORTS)}")
        out: dict[str, Any] = {"tiers": self._totals(), "namespaces": self._namespaces()}
        if tier in ("", "arena"):
            out["arena"] = self._arena_entries(sort, limit)
        if tier in ("", "disk"):
            out["disk"] = self._disk_entries(limit)
        return out

    def show(self, key: bytes) -> dict[str, Any]:
        out: dict[str, Any] = {"key": key.hex()}
        e = self.cache.index.entries.get(key)
        if e is not None:
            out["arena"] = self._entry(e)
        tiers = self.cache.tiers
        for t in tiers.tiers if tiers is not None else []:
            size = t.store.size_of(key)  # what this node knows: no I/O on the loop
            if size is not None:
                out[t.name] = {"size": size}
        return out

    def clear(self, tier: str) -> dict[str, Any]:
        from kvnode.agent.handlers import ClientError

        if tier == "arena":
            keys = [k for k, e in self.cache.index.entries.items() if e.state is State.COMMITTED]
            for k in keys:
                self.cache.drop(k, lower_tiers=False)
            log.warning("operator cleared the arena: %d entries", len(keys))
            return {"tier": "arena", "dropped": len(keys)}
        t = self.cache.tiers.tier(tier) if self.cache.tiers is not None else None
        if tier != "disk" or t is None:
            raise ClientError(P.ErrCode.BAD_FRAME, f"no tier {tier!r} to clear here "
                                                   "(arena or disk; S3 has its lifecycle rules)")  # fmt: skip
        from kvnode.agent.tiers.pool import Job

        with getattr(t.store, "_lock", _NO_LOCK):
            entries = list(getattr(t.store, "entries", {}))
        t.depth += 1
        t.pool.submit(Job("clear", t.name, b"", partial(_delete_all, t.store, entries)), high=True)
        log.warning("operator cleared the disk tier: %d entries", len(entries))
        return {"tier": "disk", "dropped": len(entries), "background": True}

    # -- views -------------------------------------------------------------------------
    def _totals(self) -> dict[str, Any]:
        idx = self.cache.index
        states = {"reserved": 0, "committed": 0, "evicting": 0}
        for e in idx.entries.values():
            states[e.state.name.lower()] += 1
        out: dict[str, Any] = {"arena": {"entries": len(idx.entries), **states,
                                         "bytes": idx.bytes_used}}  # fmt: skip
        tiers = self.cache.tiers
        if tiers is not None:
            for name, s in tiers.stats().items():
                out[name] = {"entries": s.get("entries", 0), "bytes": s.get("bytes", 0),
                             "healthy": bool(s.get("healthy", True))}  # fmt: skip
        return out

    def _namespaces(self) -> dict[str, dict[str, int]]:
        """Arena entries, bytes and hits per namespace ("" for entries without one)."""
        out: dict[str, dict[str, int]] = {}
        for e in self.cache.index.entries.values():
            t = out.setdefault(e.ns.hex() if e.ns else "", {"entries": 0, "bytes": 0, "hits": 0})
            t["entries"] += 1
            t["bytes"] += e.size
            t["hits"] += e.hits
        return out

    def _entry(self, e: Entry) -> dict[str, Any]:
        idx = self.cache.index
        # Reserved at lease_deadline - reserve_ttl_s, committed within that lease.
        born = e.lease_deadline - idx.reserve_ttl_s
        meta = e.meta
        return {
            "key": e.key.hex(), "state": e.state.name.lower(), "size": e.size, "hits": e.hits,
            "pins": e.pins, "age_s": round(max(0.0, idx.clock() - born), 3),
            "verified": bool(e.checksum),
            "parent": meta.parent.hex() if meta is not None and meta.parent else None,
            "group": e.group.hex() if e.group else None,
            "namespace": e.ns.hex() if e.ns else None,
        }  # fmt: skip

    def _arena_entries(self, sort: str, limit: int) -> list[dict[str, Any]]:
        entries = self.cache.index.entries.values()
        if sort == "hits":
            top = heapq.nlargest(limit, entries, key=lambda e: e.hits)
        elif sort == "size":
            top = heapq.nlargest(limit, entries, key=lambda e: e.size)
        else:  # oldest first
            top = heapq.nsmallest(limit, entries, key=lambda e: e.lease_deadline)
        return [self._entry(e) for e in top]

    def _disk_entries(self, limit: int) -> list[dict[str, Any]]:
        tiers = self.cache.tiers
        t = tiers.tier("disk") if tiers is not None else None
        if t is None or not limit:
            return []
        entries = getattr(t.store, "entries", None)
        if not entries:
            return []
        # The disk's I/O threads change its index: read it under the store's lock.
        with getattr(t.store, "_lock", _NO_LOCK):
            # Most recently used last in the store's order: the newest ``limit``.
            newest = [(k, entries[k].size) for k in list(entries)[-limit:]]
        return [{"key": k.hex(), "size": size} for k, size in reversed(newest)]


def _delete_all(store: Any, keys: list[bytes]) -> int:
    """On the tier's I/O thread: delete each key (already gone ones are skipped)."""
    n = 0
    for key in keys:
        try:
            store.delete(key)
            n += 1
        except OSError:
            log.warning("clearing the disk: %s could not be removed", key.hex())
    return n
