"""The stats snapshot the agent answers ``StatsReq`` with (and ``kvnode stats``,
Prometheus and health checks read)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from kvnode import __version__
from kvnode.agent.cache import Cache
from kvnode.agent.registry import ClientRegistry
from kvnode.agent.stats import Stats

log = logging.getLogger("kvnode.agent")


def snapshot(
    cache: Cache, registry: ClientRegistry, stats: Stats, runtime_dir: str, started_at: float
) -> dict[str, Any]:
    idx = cache.index
    c = stats.counters
    c["evictions"] = idx.counters.evictions
    c["evict_unsaved"] = idx.counters.evict_unsaved
    c["orphan_evictions"] = idx.counters.orphan_evictions
    c["orphan_bytes"] = idx.counters.orphan_bytes
    c["quota_refused"] = idx.counters.quota_refused
    c["drops_deferred"] = idx.counters.drops_deferred
    c["refused_identity"] = registry.counters.refused_identity
    c["refused_stale"] = registry.counters.refused_stale
    pb = idx.page_bytes
    arena = {
        "bytes_total": idx.alloc.pages_total * pb,
        "bytes_used": idx.bytes_used,
        "bytes_allocated": (idx.alloc.pages_total - idx.alloc.pages_free) * pb,
        "page_bytes": pb,
        "entries": len(idx.entries),
        "reserved": idx.reserved,
        "pinned": idx.pinned,
        "evicting_bytes": idx.evicting_pages * pb,
        "policy": idx.policy.name,
    }
    counters = dict(c)
    tiers: dict[str, Any] = {
        "arena": {
            "entries": len(idx.entries),
            "bytes": idx.bytes_used,
            "bytes_max": arena["bytes_total"],
            "hits": counters["hits"],
            "misses": counters["misses"],
            "reads": counters["pins"],
            "writes": counters["commits"],
            "read_bytes": counters["bytes_out"],
            "write_bytes": counters["bytes_in"],
            "evictions": idx.counters.evictions,
            "errors": 0,
            "queue_depth": 0,
            "dropped": counters["reserve_failed"],
        }
    }
    if cache.tiers is not None:
        try:
            tiers.update(cache.tiers.stats())
        except Exception:
            log.exception("tier stats failed")
    return {
        "version": __version__,
        "pid": os.getpid(),
        "generation": registry.generation,
        "uptime_s": round(time.time() - started_at, 3),
        "runtime_dir": runtime_dir,
        "clients": len(registry),
        "arena": arena,
        "counters": counters,
        "latency_us": stats.latency_summary(),
        "tiers": tiers,
        "namespaces": idx.tenants.snapshot(),
    }
