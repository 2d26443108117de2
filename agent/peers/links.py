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
                "timeouts", "corrupt", "oversized", "benched", "busy", "unreachable",
                "late")  # fmt: skip

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
        # Fetches failed in a row: only a fetch that lands resets it, not an answer to
        # "do you have" (a peer that answers those and never sends the bytes would
        # otherwise never be skipped).
        self.fetch_failures = 0
        self.down_until = 0.0
        self.backoff_s = DOWN_BACKOFF_S_MIN
        self.handshakes: dict[int, str | None] = dict.fromkeys(range(len(sockets)))
        self._tcp: dict[int, bool] = {}  # a TCP connection made since the last retry

    def transport(self, index: int, event: str) -> str | None:
        """A connection event of socket ``index`` (``connected``, ``ok``, ``refused``,
        ``retried`` or ``closed``): the link's state from all its sockets (one per candidate server
        key). Returns the new state when it changed, for the log."""
        self._note(index, event)
        seen = {v for v in self.handshakes.values() if v is not None}
        if "ok" in seen:
            new = "up"  # the handshake with our key succeeded
        elif "refused" in seen:  # no candidate key accepted, one at least refused
            new = "refused"
        elif "unreachable" in seen:
            new = "unreachable"
        elif self.stats.state == "up":
            new = "connecting"
        else:
            new = self.stats.state
        if new == self.stats.state or self.stats.state == "self":
            return None
        self.stats.state = new
        return new

    def _note(self, index: int, event: str) -> None:
        """Per socket: ``ok`` and ``refused`` hold until the next handshake; a connect
        retry means unreachable only when no TCP connection was made since the last
        retry (a refused handshake also ends in a retry, after a connection)."""
        h = self.handshakes
        if event in ("ok", "refused"):
            h[index] = event
        elif event == "connected":
            self._tcp[index] = True
            if h[index] == "unreachable":
                h[index] = None
        elif event == "retried":
            if not self._tcp.get(index):
                h[index] = "unreachable"
            self._tcp[index] = False
        elif event == "closed" and h[index] == "ok":
            h[index] = None

    def usable(self, now: float) -> bool:
        return self.stats.state != "self" and now >= self.down_until

    def ok(self, seconds: float, fetched: bool = False) -> None:
        """An answer came (``fetched``: a fetch's bytes landed)."""
        self.failures = 0
        if fetched:
            self.fetch_failures = 0
        if not self.fetch_failures:
            self.backoff_s = DOWN_BACKOFF_S_MIN
        self.stats.state = "up"
        self.stats.latency(seconds)

    def bench(self, now: float, bench_s: float, counter: str) -> None:
        """The peer sent bytes that fail their checksum, or more than it was asked for:
        it is not asked again for ``bench_s`` (members are trusted for content; one
        that breaks that trust is set aside, counted, and logged)."""
        self.stats.inc(counter)
        self.stats.inc("benched")
        self.down_until = max(self.down_until, now + bench_s)
        self.stats.state = "benched"

    def fail(self, now: float, counter: str, fetch: bool = False) -> None:
        """A request timed out or got a bad reply (``fetch``: a fetch did)."""
        self.stats.inc(counter)
        self.failures += 1
        self.fetch_failures += fetch
        if max(self.failures, self.fetch_failures) >= DOWN_AFTER_FAILURES:
            self.down_until = now + self.backoff_s
            self.backoff_s = min(2 * self.backoff_s, DOWN_BACKOFF_S_MAX)
            self.stats.state = "down"


__all__ = ["Link", "PeerStats"]
