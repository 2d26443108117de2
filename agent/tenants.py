"""Namespaces as tenants: per-namespace arena bytes, hits and quotas.

A reserve may name the namespace its chunks belong to (16 bytes: the seed of the chunk
key chain, which already separates model, LoRA adapter and ``cache_salt``). A namespace
holds at most its share of the arena (``arena.namespace_share``, overridden per
namespace by ``arena.namespace_shares``); a reserve that would take it past its share
evicts that namespace's own entries first, never another's, and is refused (counted)
when its own entries cannot make room. So one tenant's scan cannot push another
tenant's hot prefixes out. Chunks reserved without a namespace are not limited.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvnode.errors import ConfigError

NAMESPACE_BYTES = 16
NAMESPACES_MAX = 4096  # namespaces with their own figures; the rest share one record
OTHER = b"\xff" * NAMESPACE_BYTES  # the record of namespaces past NAMESPACES_MAX
METRICS_NAMESPACES_MAX = 64  # namespaces exported (largest first): bounded label sets


@dataclass(slots=True)
class NamespaceFigures:
    bytes: int = 0
    entries: int = 0
    hits: int = 0
    evictions: int = 0
    quota_evictions: int = 0  # evicted to make room under this namespace's own share
    quota_refused: int = 0  # reserves refused: over the share, own entries all in use


def parse_shares(items: list[str]) -> dict[bytes, float]:
    """``["<32 hex digits>=0.25", ...]`` -> {namespace: share}."""
    out: dict[bytes, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            ns = bytes.fromhex(name.strip())
            share = float(value)
        except ValueError:
            ns, share = b"", -1.0
        if not sep or len(ns) != NAMESPACE_BYTES or not 0.0 < share <= 1.0:
            raise ConfigError(
                "arena.namespace_shares",
                f"{item!r}: expected <32 hex digits>=<share in (0, 1]>",
            )
        out[ns] = share
    return out


class Tenants:
    """Bytes and hits per namespace, and the byte limit each may hold."""

    def __init__(
        self, arena_bytes: int, share: float = 1.0, shares: dict[bytes, float] | None = None
    ) -> None:
        self.arena_bytes = arena_bytes
        self.share = share
        self.shares = dict(shares or {})
        self.figures: dict[bytes, NamespaceFigures] = {}

    def limit(self, ns: bytes) -> int | None:
        """Bytes ``ns`` may hold, or None when it may take the whole arena."""
        share = self.shares.get(ns, self.share)
        return None if share >= 1.0 else int(self.arena_bytes * share)

    def of(self, ns: bytes) -> NamespaceFigures:
        f = self.figures.get(ns)
        if f is None:
            if len(self.figures) >= NAMESPACES_MAX and ns not in self.shares:
                ns = OTHER  # bounded: a client inventing namespaces fills one record
                f = self.figures.get(ns)
            if f is None:
                f = self.figures[ns] = NamespaceFigures()
        return f

    def over(self, ns: bytes, size: int) -> int:
        """Bytes ``ns`` must free before it may hold ``size`` more (0: none)."""
        limit = self.limit(ns)
        if limit is None:
            return 0
        return max(0, self.of(ns).bytes + size - limit)

    def added(self, ns: bytes, size: int) -> None:
        f = self.of(ns)
        f.bytes += size
        f.entries += 1

    def removed(self, ns: bytes, size: int) -> None:
        f = self.of(ns)
        f.bytes -= size
        f.entries -= 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        """The largest namespaces' figures, keyed by hex (metrics labels stay bounded)."""
        top = sorted(self.figures.items(), key=lambda kv: -kv[1].bytes)
        out: dict[str, dict[str, int]] = {}
        for ns, f in top[:METRICS_NAMESPACES_MAX]:
            limit = self.limit(ns)
            out["other" if ns == OTHER else ns.hex()] = {
                "bytes": f.bytes,
                "bytes_max": self.arena_bytes if limit is None else limit,
                "entries": f.entries,
                "hits": f.hits,
                "evictions": f.evictions,
                "quota_evictions": f.quota_evictions,
                "quota_refused": f.quota_refused,
            }
        return out
