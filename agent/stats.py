"""Agent statistics: monotonic counters and latency samples.

Counters only grow (exported as Prometheus ``_total``). Latencies keep the last
``samples_max`` observations per operation in a ring, enough for stable p99s.
"""

from __future__ import annotations

from collections import defaultdict

COUNTERS = (
    "lookups", "lookup_keys", "hits", "misses", "pending", "reserves", "reserve_keys",
    "reserve_failed", "commits", "aborts", "pins", "pin_misses", "releases", "drops",
    "bytes_in", "bytes_out", "evictions", "reclaimed_clients", "reclaimed_leases",
    "reclaimed_pins", "bad_frames", "errors", "expired_leases", "evict_unsaved",
    "refused_identity", "refused_stale", "refused_commits", "drops_deferred",
    "orphan_evictions", "orphan_bytes", "quota_refused",
    "refused_pins", "refused_leases", "expired_pins",
    "refused_admin", "tokens_in", "tokens_out", "refused_connections", "listener_pauses",
    "corrupt_dropped", "corrupt_check_bytes", "corrupt_checks_skipped",
)  # fmt: skip
LATENCY_OPS = ("lookup", "reserve", "commit", "pin", "release")


class LatencyRing:
    __slots__ = ("_buf", "_pos", "count")

    def __init__(self, samples_max: int = 4096) -> None:
        self._buf: list[float] = [0.0] * samples_max
        self._pos = 0
        self.count = 0

    def add(self, value_us: float) -> None:
        self._buf[self._pos] = value_us
        self._pos = (self._pos + 1) % len(self._buf)
        self.count += 1

    def summary(self) -> dict[str, float | None]:
        """Quantiles in µs of the recent samples; None (JSON null) with no samples,
        never a 0.0 that reads as an instant answer."""
        n = min(self.count, len(self._buf))
        if n == 0:
            return {"p50": None, "p90": None, "p99": None, "count": 0}
        data = sorted(self._buf[:n])

        def q(p: float) -> float:
            return round(data[min(n - 1, int(p * n))], 1)

        return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "count": self.count}


class Stats:
    def __init__(self) -> None:
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.latency: dict[str, LatencyRing] = defaultdict(LatencyRing)
        for op in LATENCY_OPS:
            self.latency[op] = LatencyRing()

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def observe(self, op: str, seconds: float) -> None:
        self.latency[op].add(seconds * 1e6)

    def latency_summary(self) -> dict[str, dict[str, float | None]]:
        return {op: ring.summary() for op, ring in self.latency.items()}
