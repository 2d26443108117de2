"""Peers: agents of a fleet serve each other's misses over authenticated ZeroMQ.

Two halves, each with one owner: ``PeerServer`` (``server``) answers other agents from
this agent's loop thread; ``PeerManager`` (``manager``) fetches local misses, with one
network thread (``network``) that owns every outgoing socket. The wire format is in
``wire``, the fleet's CURVE credentials in ``keys``, seed resolution in ``seeds``.

Security: CURVE on every link. A ZAP handler, started before the server socket binds,
admits only client keys found in ``curve_authorized_dir`` and counts refusals. Messages
are msgspec structs with a version byte; nothing is pickled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kvnode.agent.cache import Cache
from kvnode.agent.peers.directory import Directory
from kvnode.agent.peers.jobs import Fetched
from kvnode.agent.peers.keys import Curve, KeyRing
from kvnode.agent.peers.lower import ChunkStore, LowerReads
from kvnode.agent.peers.manager import PeerManager
from kvnode.agent.peers.replicas import Replicas
from kvnode.agent.peers.seeds import resolve_seeds
from kvnode.agent.peers.server import LowerHas, PeerServer
from kvnode.agent.peers.wire import ZAP_DOMAIN, new_node_id

log = logging.getLogger("kvnode.peers")


def build_peers(
    cfg: Any,
    cache: Cache,
    arena: Any,
    wake: Callable[[], None],
    lower_has: LowerHas | None = None,
    events_ports: tuple[int, int] = (0, 0),
    disk: ChunkStore | None = None,
) -> tuple[PeerServer | None, PeerManager | None]:
    """What ``cfg.peers`` turns on: a server when ``listen`` is set, a manager when
    there are seeds. Raises ConfigError for unreadable keys, PeerError for a bind."""
    p = cfg.peers
    if not p.listen and not p.seeds:
        return None, None
    curve = None if p.insecure else Curve.load(p.curve_secret_key, p.curve_authorized_dir)
    if curve is None:
        log.warning("peers: insecure mode, links are neither authenticated nor encrypted")
    node_id = new_node_id()
    server = None
    if p.listen:
        reads = LowerReads(disk, wake) if disk is not None else None
        server = PeerServer(cache, arena, p.listen, curve, node_id, lower_has,
                            p.serve_bytes_max, p.serve_peer_bytes_max, events_ports,
                            reads)  # fmt: skip
        if reads is not None:
            reads.start()
    manager = None
    if p.seeds:
        manager = PeerManager(
            cache, arena, curve, node_id, wake, p.seeds, p.deadline_ms, p.fetch_timeout_ms,
            p.fetch_inflight_max, p.fetch_bytes_max, p.queue_max, p.negative_ttl_s,
            p.resolve_interval_s, p.peer_bytes_inflight_max, p.bench_s, directory=_directory(p),
            replicas=Replicas(p.keep_fetched, p.borrow_s),
        )  # fmt: skip
    return server, manager


def _directory(p: Any) -> Directory | None:
    if not p.directory:
        return None
    return Directory(p.directory_peers_max, p.directory_entries_max, p.fallback_asks_per_s)


__all__ = [
    "Curve",
    "Directory",
    "Fetched",
    "KeyRing",
    "PeerManager",
    "PeerServer",
    "build_peers",
    "new_node_id",
    "resolve_seeds",
    "ZAP_DOMAIN",
]
