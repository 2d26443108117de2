"""The composition root: the agent's parts, built once after the arena exists, in
dependency order, each given everything it uses at construction. Nothing is rewired
afterwards: no part is replaced, no attribute of another part is set.

    stores (disk, S3) -> events -> shared lookup index -> cache (the index's one
    writer; it builds the tier manager, handing it itself) -> peers (server, manager,
    both writing through the cache) -> fleet -> transfers (agent mode) -> handlers

``Parts.close`` takes them down in the reverse order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvnode.agent.cache import Cache
from kvnode.agent.config import Config
from kvnode.agent.handlers import Handlers
from kvnode.agent.index import Index
from kvnode.agent.movers.service import MoverOptions, Transfers
from kvnode.agent.published import PublishedIndex
from kvnode.agent.stats import Stats
from kvnode.ipc.segment import Segment

if TYPE_CHECKING:
    from kvnode.agent.events import EventPublisher
    from kvnode.agent.fleet import Fleet
    from kvnode.agent.tiers.base import TierStore
    from kvnode.agent.tiers.manager import TierManager

log = logging.getLogger("kvnode.agent")


@dataclass(slots=True, eq=False)
class Parts:
    index: Index
    cache: Cache
    handlers: Handlers
    published: PublishedIndex | None = None
    fleet: Fleet | None = None
    transfers: Transfers | None = None

    @property
    def tiers(self) -> TierManager | None:
        return self.cache.tiers

    def stop_publishing(self, unlink: bool) -> None:
        """First at shutdown: readers must stop answering hits from an agent that no
        longer serves (the flush that follows may take agent.shutdown_flush_s)."""
        published, self.published = self.published, None
        if published is not None:
            _safe("lookup index", lambda: published.close(unlink=unlink))

    def close(self, flush_s: float) -> None:
        """Peers and events first (no fetch may land in a closing arena), then the
        tiers: queued write-backs get ``flush_s``, running I/O finishes. Agent mode's
        copy threads stop first of all: they read and write the arena."""
        transfers, self.transfers = self.transfers, None
        if transfers is not None:
            _safe("transfers", transfers.close)
        fleet, self.fleet = self.fleet, None
        if fleet is not None:
            _safe("fleet", fleet.close)
        tiers = self.cache.tiers
        if tiers is not None:
            _safe("tier flush", lambda: tiers.flush(flush_s))
            _safe("tiers", tiers.close)


def assemble(
    cfg: Config,
    index: Index,
    arena: Segment,
    wake: Callable[[], None],
    generation: int,
    stats: Stats,
) -> Parts:
    """Build every part. On failure, what was built is closed again and the error
    raised: the caller is left with the arena alone."""
    closers: list[tuple[str, Callable[[], Any]]] = []
    try:
        return _build(cfg, index, arena, wake, generation, stats, closers)
    except BaseException:
        _close_all(closers)
        raise


def _build(
    cfg: Config,
    index: Index,
    arena: Segment,
    wake: Callable[[], None],
    generation: int,
    stats: Stats,
    closers: list[tuple[str, Callable[[], Any]]],
) -> Parts:
    stores = _stores(cfg)
    events = _events(cfg)
    if events is not None:
        closers.append(("events", events.close))
    published = _published(cfg, index, arena, generation, stores)
    if published is not None:
        closers.append(("lookup index", lambda: published.close(unlink=True)))
    make_tiers = None
    if stores:
        from kvnode.agent.tiers.manager import TierManager

        def make_tiers(cache: Cache) -> TierManager:
            return TierManager(cfg, arena, cache, wake, stores=stores)

    headroom = int(index.alloc.pages_total * cfg.arena.headroom_share) if stores else 0
    listeners = [published] if published is not None else []
    cache = Cache(index, make_tiers, headroom, listeners, events)
    if cache.tiers is not None:
        closers.append(("tiers", cache.tiers.close))
    fleet = _fleet(cfg, cache, arena, wake, events, closers)
    transfers = Transfers(
        cache,
        arena.view,
        wake,
        MoverOptions(
            cpu_threads=cfg.agent.cpu_copy_threads,
            cpu_cores=cfg.agent.cpu_copy_cores,
            client_leases_max=cfg.agent.client_leases_max,
            client_pins_max=cfg.agent.client_pins_max,
        ),
    )
    closers.append(("transfers", transfers.close))
    handlers = Handlers(cfg, cache, stats, fleet, transfers.table, arena.view)
    return Parts(index, cache, handlers, published, fleet, transfers)


def _stores(cfg: Config) -> dict[str, TierStore]:
    if not (cfg.disk.path or cfg.s3.bucket):
        return {}
    from kvnode.agent.tiers.manager import build_stores

    return build_stores(cfg)


def _events(cfg: Config) -> EventPublisher | None:
    if not cfg.events.endpoint:
        return None
    from kvnode.agent.events import EventPublisher

    events = EventPublisher.from_config(cfg)
    events.cleared()  # a fresh arena: routers forget what this node had
    return events


def _published(
    cfg: Config, index: Index, arena: Segment, generation: int, stores: dict[str, TierStore]
) -> PublishedIndex | None:
    if not cfg.arena.publish_index:
        return None
    published = PublishedIndex(
        arena.name + "-idx",
        index.alloc.pages_total,  # every entry holds at least one page
        cfg.agent.group,
        generation,
    )
    disk = stores.get("disk")
    unlisted = bool(cfg.peers.seeds) or any(name != "disk" for name in stores)
    published.set_lower(disk, unlisted, cfg.disk.bytes // cfg.arena.page_bytes)
    return published


def _fleet(
    cfg: Config,
    cache: Cache,
    arena: Segment,
    wake: Callable[[], None],
    events: EventPublisher | None,
    closers: list[tuple[str, Callable[[], Any]]],
) -> Fleet | None:
    if not (cfg.peers.listen or cfg.peers.seeds or events is not None):
        return None
    from kvnode.agent.fleet import Fleet
    from kvnode.agent.peers import build_peers

    tiers = cache.tiers
    server, peers = build_peers(
        cfg, cache, arena, wake,
        lower_has=tiers.promoting_now if tiers is not None else None,
        events_ports=events.tcp_ports() if events is not None else (0, 0),
        disk=_disk_store(tiers),
    )  # fmt: skip
    fleet = Fleet(server, peers, events)
    closers.append(("fleet", fleet.close_peers))
    return fleet


def _disk_store(tiers: TierManager | None) -> Any:
    """The disk tier's store, which the peer server reads for peers (None: no disk)."""
    disk = tiers.tier("disk") if tiers is not None else None
    return disk.store if disk is not None else None


def _close_all(closers: list[tuple[str, Callable[[], Any]]]) -> None:
    for name, close in reversed(closers):
        _safe(name, close)


def _safe(name: str, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        log.exception("closing %s failed", name)


__all__ = ["Parts", "assemble"]
