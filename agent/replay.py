"""The KV-event replay socket: answers "every batch from sequence N" off the agent's loop.

A requester (one ZeroMQ connection, bound to its routing id) sends ``[b"", start_seq]``
and gets every buffered batch from ``start_seq`` on, ``[b"", topic, seq, payload]`` each,
then ``[b"", b"", -1, b""]``, as vLLM's publisher answers. What a requester can cost the
agent is bounded, and every refusal is counted:

- ``requesters_max`` requesters hold state at once (a replay under way, bytes still
  queued to them, or a request budget not yet refilled); a request beyond that is not
  answered (``replay_refused``).
- ``requests_per_s`` per requester (a burst of twice that, at least one): more are not answered
  (``replay_rate_limited``). A new request replaces the requester's replay under way.
- ``requester_bytes_max`` bytes queued to one requester and not yet taken by the
  kernel: nothing more is sent to it until they are. Payloads are sent zero-copy from
  the ring with a tracker, so a requester that never reads pins batches the ring already
  holds instead of copies of them, and what it holds is known. A replay that makes no
  progress for ``stall_s`` is abandoned (``replay_stalled``); its requester keeps its
  slot until its queued bytes are gone (it read them or disconnected).
- ``requester_bytes_per_s`` per requester (a burst of one second's worth).

A request from a sequence number older than the ring (history that left it) is answered
with a snapshot: ``AllBlocksCleared`` and one ``BlockStored`` per key the publisher still
announces (no tokens), all numbered as the last batch they include, then the ring from
there (at most ``SNAPSHOTS_MAX`` at once).

Everything here runs on the replay thread, which owns the socket; the loop thread only
appends to the ring. Bytes held for requesters: at most ``requesters_max *
requester_bytes_max`` beyond the ring's own ``bytes_max``, and only while they hold it.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

log = logging.getLogger("kvnode.events")

END_SEQ = (-1).to_bytes(8, "big", signed=True)  # replay: no more batches
SEQ_BYTES = 8
REPLAY_SNDHWM = 4096  # messages queued per requester (the byte bound comes first)
SENDS_PER_TURN_MAX = 64  # batches sent to one requester before the next one's turn
POLL_MS_MAX = 100  # the thread notices stop() at least this often
REQUESTS_PER_POLL_MAX = 256  # requests read before serving the replays under way
TIDY_INTERVAL_S = 1.0  # idle requesters are forgotten this often
SNAPSHOTS_MAX = 4  # snapshots being sent at once (each holds a copy of the state)


def release_free_heap() -> None:
    """glibc keeps freed memory in its per-thread arenas; give it back to the system
    (a no-op where there is no ``malloc_trim``)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True, slots=True)
class ReplayLimits:
    requesters_max: int = 32
    requests_per_s: float = 2.0
    requester_bytes_max: int = 16 << 20
    requester_bytes_per_s: int = 64 << 20
    stall_s: float = 10.0

    def __post_init__(self) -> None:
        if self.requesters_max < 1 or self.requester_bytes_max < 1:
            raise ValueError("replay limits must be >= 1")
        if self.requests_per_s <= 0 or self.requester_bytes_per_s <= 0 or self.stall_s <= 0:
            raise ValueError("replay rates and stall_s must be > 0")


SNAP_ARENA = 1  # what the publisher has announced of a key (bits of ReplayRing.state)
SNAP_STORAGE = 2
Change = tuple[bytes, int, bool]  # key (b"": all), SNAP_* bit, set (True) or cleared


class ReplayRing:
    """The batches kept for replay, bounded in count and bytes, and what the batches
    so far add up to (``state``: key -> SNAP_* bits, as announced), so a requester whose
    history left the ring gets a snapshot instead. Appended by the loop thread, read by
    the replay thread: every access holds the lock (short: no I/O)."""

    def __init__(self, batches_max: int, bytes_max: int) -> None:
        self.batches_max = batches_max
        self.bytes_max = bytes_max
        self._lock = threading.Lock()
        self._items: deque[bytes] = deque()
        self._first_seq = 0  # seq of _items[0]
        self.nbytes = 0
        self.evicted = 0
        self.state: dict[bytes, int] = {}

    def snapshot(self) -> tuple[int, list[tuple[bytes, int]]]:
        """(the last sequence number the state includes, the state's items)."""
        with self._lock:
            return self._first_seq + len(self._items) - 1, list(self.state.items())

    def first(self) -> int:
        with self._lock:
            return self._first_seq

    def append(self, seq: int, payload: bytes, changes: Sequence[Change] = ()) -> None:
        """``changes``: what the batch does to the state, in order (key ``b""``: every
        key cleared)."""
        with self._lock:
            st = self.state
            for key, bit, on in changes:
                if not key:
                    st.clear()
                    continue
                m = st.get(key, 0)
                m = (m | bit) if on else (m & ~bit)
                if m:
                    st[key] = m
                else:
                    st.pop(key, None)
            if not self._items:
                self._first_seq = seq
            assert seq == self._first_seq + len(self._items), "batches are appended in order"
            self._items.append(payload)
            self.nbytes += len(payload)
            while self._items and (
                len(self._items) > self.batches_max or self.nbytes > self.bytes_max
            ):
                self.nbytes -= len(self._items.popleft())
                self._first_seq += 1
                self.evicted += 1

    def get(self, seq: int) -> tuple[int, bytes] | None:
        """The batch at ``seq``, or the oldest one after it; None past the newest."""
        with self._lock:
            i = max(seq - self._first_seq, 0)
            if i >= len(self._items):
                return None
            return self._first_seq + i, self._items[i]

    def end(self) -> int:
        """One past the newest sequence number kept."""
        with self._lock:
            return self._first_seq + len(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(slots=True)
class Bucket:
    """Token bucket: ``rate`` per second, at most ``burst`` saved."""

    rate: float
    burst: float
    level: float
    at: float

    def refill(self, now: float) -> None:
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now

    def take(self, n: float, now: float) -> bool:
        self.refill(now)
        if self.level < n:
            return False
        self.level -= n
        return True

    def full(self, now: float) -> bool:
        self.refill(now)
        return self.level >= self.burst


@dataclass(slots=True, eq=False)
class _Requester:
    ident: bytes
    requests: Bucket
    bytes_: Bucket
    cursor: int = -1  # next seq to send; -1: no replay under way
    snapshot: Iterator[bytes] | None = None  # payloads sent (as seq cursor - 1) first
    end: int = 0  # the replay ends before this seq
    progress_at: float = 0.0  # last time a byte of ours left or was sent
    sent: deque[tuple[zmq.MessageTracker, int]] = field(default_factory=deque)
    queued_bytes: int = 0

    def reap(self, now: float) -> None:
        """Forget sends ZeroMQ has let go of (delivered in order: stop at the first
        still held)."""
        while self.sent and self.sent[0][0].done:
            self.queued_bytes -= self.sent.popleft()[1]
            self.progress_at = now


COUNTERS = (
    "replays", "replays_done", "replay_batches", "replay_bytes", "bad_replays",
    "replay_refused", "replay_rate_limited", "replay_superseded", "replay_stalled",
    "replay_gone", "replay_snapshots",
)  # fmt: skip


class ReplayServer(threading.Thread):
    """Owns the replay ROUTER socket once started (bound by the caller's thread)."""

    def __init__(
        self,
        sock: zmq.Socket,
        ring: ReplayRing,
        topic: bytes,
        limits: ReplayLimits,
        clock: Callable[[], float] = time.monotonic,
        snapshots: Callable[[list[tuple[bytes, int]]], Iterator[bytes]] | None = None,
    ) -> None:
        super().__init__(name="kvnode-replay", daemon=True)
        self.snapshots = snapshots  # the ring's state as encoded batches
        self._sock = sock
        self.ring = ring
        self.topic = topic
        self.limits = limits
        self._clock = clock
        self._stop_flag = threading.Event()
        self._requesters: dict[bytes, _Requester] = {}
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._gauges: dict[str, int] = {}
        self._tidied_at = 0.0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full or gone requester raises
        sock.setsockopt(zmq.SNDHWM, REPLAY_SNDHWM)

    # -- thread ---------------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self._stop_flag.is_set():
                if self._sock.poll(self._timeout_ms(), zmq.POLLIN):
                    self._read_requests()
                now = self._clock()
                self._serve(now)
                self._tidy(now)
                self._gauges = self._measure()
        except Exception:  # a bug here must not take the agent down with it
            log.exception("replay thread failed; replays are off until restart")
        finally:
            self._sock.close(0)
            self._requesters.clear()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop_flag.set()
        if self.is_alive():
            self.join(timeout_s)

    def _timeout_ms(self) -> int:
        for r in self._requesters.values():
            if r.cursor >= 0 or r.sent:
                return 5  # replays under way: send more as budgets refill
        return POLL_MS_MAX

    # -- requests -------------------------------------------------------------------
    def _read_requests(self) -> None:
        for _ in range(REQUESTS_PER_POLL_MAX):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._request(frames, self._clock())

    def _request(self, frames: list[bytes], now: float) -> None:
        if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != SEQ_BYTES:
            self.counters["bad_replays"] += 1
            return
        r = self._requester(frames[0], now)
        if r is None:
            self.counters["replay_refused"] += 1
            return
        if not r.requests.take(1, now):
            self.counters["replay_rate_limited"] += 1
            return
        if r.cursor >= 0:
            self.counters["replay_superseded"] += 1
        asked = int.from_bytes(frames[2], "big", signed=True)
        start = max(asked, 0)
        r.snapshot = None
        first = self.ring.first()
        if (start < first or asked < 0) and self.snapshots is not None:
            # History that left the ring, or a start before 0 (a subscriber that lost
            # some of what was announced and wants the state, not the history): the
            # state it added up to instead.
            if sum(1 for q in self._requesters.values() if q.snapshot) >= SNAPSHOTS_MAX:
                self.counters["replay_refused"] += 1
                r.cursor = -1
                return
            last, items = self.ring.snapshot()
            r.snapshot = self.snapshots(items)
            start = last + 1
            self.counters["replay_snapshots"] += 1
        self.counters["replays"] += 1
        r.cursor = start
        r.end = self.ring.end()
        r.progress_at = now

    def _requester(self, ident: bytes, now: float) -> _Requester | None:
        r = self._requesters.get(ident)
        if r is not None:
            return r
        if len(self._requesters) >= self.limits.requesters_max:
            self._prune(now)
            if len(self._requesters) >= self.limits.requesters_max:
                return None
        lim = self.limits
        burst = max(1.0, 2 * lim.requests_per_s)
        reqs = Bucket(lim.requests_per_s, burst, burst, now)
        rate = float(lim.requester_bytes_per_s)
        r = _Requester(ident, reqs, Bucket(rate, rate, rate, now), progress_at=now)
        self._requesters[ident] = r
        return r

    def _prune(self, now: float) -> None:
        """Drop requesters that hold nothing: no replay, no queued bytes, and budgets
        back to full (forgetting them loses no rate limiting)."""
        for ident, r in list(self._requesters.items()):
            r.reap(now)
            idle = r.cursor < 0 and not r.sent
            if idle and r.requests.full(now) and r.bytes_.full(now):
                del self._requesters[ident]

    # -- serving --------------------------------------------------------------------
    def _serve(self, now: float) -> None:
        for r in list(self._requesters.values()):
            r.reap(now)
            if r.cursor >= 0:
                self._serve_one(r, now)

    def _tidy(self, now: float) -> None:
        """Once a second: forget idle requesters; when the last one is gone, hand the
        heap's free memory back (what their sends made ZeroMQ's I/O thread allocate)."""
        if now - self._tidied_at < TIDY_INTERVAL_S:
            return
        self._tidied_at = now
        had = len(self._requesters)
        self._prune(now)
        if had and not self._requesters:
            release_free_heap()

    def _serve_one(self, r: _Requester, now: float) -> None:
        lim = self.limits
        if now - r.progress_at > lim.stall_s:
            self.counters["replay_stalled"] += 1
            log.info("replay to a requester abandoned: nothing read for %.0fs", lim.stall_s)
            r.cursor = -1
            return
        for _ in range(SENDS_PER_TURN_MAX):
            if r.snapshot is not None:
                if not self._send_snapshot(r, now):
                    return
                continue
            if r.cursor >= r.end:
                if self._send(r, [b"", b"", END_SEQ, b""], 0, now):
                    r.cursor = -1
                    self.counters["replays_done"] += 1
                return
            item = self.ring.get(r.cursor)
            if item is None or item[0] >= r.end:
                r.cursor = r.end
                continue
            seq, payload = item
            n = len(payload)
            if r.queued_bytes + n > lim.requester_bytes_max and r.sent:
                break  # wait for it to read (the first batch always goes)
            if not r.bytes_.take(min(n, r.bytes_.burst), now):
                return
            if not self._send(r, [b"", self.topic, seq.to_bytes(8, "big"), payload], n, now):
                return
            r.cursor = seq + 1
            self.counters["replay_batches"] += 1
            self.counters["replay_bytes"] += n

    def _send_snapshot(self, r: _Requester, now: float) -> bool:
        """The snapshot's next batch, numbered as the last batch it includes. False:
        wait (budget) or stop (sent all: the ring follows)."""
        assert r.snapshot is not None
        if r.sent and r.queued_bytes >= self.limits.requester_bytes_max:
            return False
        payload = next(r.snapshot, None)
        if payload is None:
            r.snapshot = None
            return True
        r.bytes_.take(min(len(payload), r.bytes_.burst), now)  # snapshots are rare
        seq = (r.cursor - 1).to_bytes(8, "big", signed=True)
        if not self._send(r, [b"", self.topic, seq, payload], len(payload), now):
            r.snapshot = None  # the requester is gone or stuck: it asks again
            r.cursor = -1
            return False
        self.counters["replay_batches"] += 1
        self.counters["replay_bytes"] += len(payload)
        return True

    def _send(self, r: _Requester, frames: list[bytes], n: int, now: float) -> bool:
        """Send one message to ``r``; the last frame zero-copy with a tracker when it
        carries a payload. False when it cannot take more now (or is gone)."""
        sock = self._sock
        try:
            sock.send(r.ident, zmq.SNDMORE | zmq.NOBLOCK)
            for f in frames[:-1]:
                sock.send(f, zmq.SNDMORE | zmq.NOBLOCK)
            if n:
                tracker = sock.send(frames[-1], zmq.NOBLOCK, copy=False, track=True)
                r.sent.append((tracker, n))
                r.queued_bytes += n
            else:
                sock.send(frames[-1], zmq.NOBLOCK)
        except zmq.Again:  # its queue is full: it is not reading
            return False
        except zmq.ZMQError as exc:  # EHOSTUNREACH: it went away
            self.counters["replay_gone"] += 1
            log.debug("replay requester gone: %s", exc)
            r.cursor = -1
            return False
        r.progress_at = now
        return True

    def _measure(self) -> dict[str, int]:
        """Gauges for stats(), taken on this thread (the requesters are its own)."""
        reqs = self._requesters.values()
        return {
            "replay_requesters": len(reqs),
            "replay_queued_bytes": sum(r.queued_bytes for r in reqs),
        }

    def stats(self) -> dict[str, Any]:
        """Any thread: counters, the last gauges the replay thread took, the ring."""
        out: dict[str, Any] = dict(self.counters)
        out.update(self._gauges)
        out["replay_ring_batches"] = len(self.ring)
        out["replay_ring_bytes"] = self.ring.nbytes
        out["replay_ring_evicted"] = self.ring.evicted
        return out


__all__ = ["END_SEQ", "ReplayLimits", "ReplayRing", "ReplayServer"]
