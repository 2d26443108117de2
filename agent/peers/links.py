"""One peer endpoint as the network thread sees it: its sockets, the requests it has
not answered yet, its health (a peer that keeps failing is skipped for a while) and its
counters."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import zmq

from kvnode.agent.peers.jobs import Job

LATENCY_SAMPLES_MAX = 256  # per peer, for the latency percentiles in stats
DOWN_AFTER_FAILURES = 3  # consecutive timeouts or bad replies before a peer is skipped
DOWN_BACKOFF_S_MIN = 1.0  # first pause of a peer marked down; doubles up to the max
DOWN_BACKOFF_S_MAX = 30.0


class PeerStats:
    """One peer's counters (network thread writes, loop reads)."""

    COUNTERS = ("lookups", "hits", "pending", "fetches", "fetched_keys", "bytes", "errors",
                "timeouts", "corrupt", "busy", "unreachable", "late")  # fmt: skip

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self._latency_us: deque[float] = deque(maxlen=LATENCY_SAMPLES_MAX)
        self.state = "connecting"

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def latency(self, seconds: float) -> None:
        with self._lock:
            self._latency_us.append(seconds * 1e6)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self.counters)
            lat = sorted(self._latency_us)
        out["state"] = self.state
        out["latency_us_p50"] = round(lat[len(lat) // 2], 1) if lat else 0.0
        out["latency_us_p99"] = (
            round(lat[min(len(lat) - 1, len(lat) * 99 // 100)], 1) if lat else 0.0
        )
        return out


class Link:
    """One peer endpoint: a DEALER per candidate server key (see the network module)."""

    def __init__(self, endpoint: str, sockets: list[zmq.Socket], stats: PeerStats) -> None:
        self.endpoint = endpoint
        self.sockets = sockets
        self.stats = stats
        self.rid = 0
        self.outstanding: dict[int, Job] = {}
        self.failures = 0
        self.down_until = 0.0
        self.backoff_s = DOWN_BACKOFF_S_MIN

    def usable(self, now: float) -> bool:
        return self.stats.state != "self" and now >= self.down_until

    def ok(self, seconds: float) -> None:
        self.failures = 0
        self.backoff_s = DOWN_BACKOFF_S_MIN
        self.stats.state = "up"
        self.stats.latency(seconds)

    def fail(self, now: float, counter: str) -> None:
        self.stats.inc(counter)
        self.failures += 1
        if self.failures >= DOWN_AFTER_FAILURES:
            self.down_until = now + self.backoff_s
            self.backoff_s = min(2 * self.backoff_s, DOWN_BACKOFF_S_MAX)
            self.stats.state = "down"


__all__ = ["Link", "PeerStats"]
