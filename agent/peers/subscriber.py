"""Follows every peer's KV-event stream for the directory: one thread, three sockets a
peer, all on the fleet's CURVE certificate.

Per peer: a DEALER to its peer endpoint asks where its stream is (``InfoReq``: event
ports and generation), a SUB takes the live batches, a DEALER asks its replay socket
for what was missed. A stream is *synced* once a replay from the next expected
sequence number has ended and the live batches follow on without a gap; a gap, a
disconnect, a batch that does not decode, or a sequence number going backwards (the
peer restarted) makes it resync: ask where the stream is again (a new generation
clears everything that peer announced), then replay. A peer whose history left its
ring answers with a snapshot of what it holds (``kvnode.agent.replay``).

The thread never touches the directory: it hands ``Update``s to the loop (a bounded
queue, then ``wake``), which applies them in order. A full queue makes the peer resync
rather than lose events silently.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec
import zmq

from kvnode.agent.events import (
    MEDIUM_CPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
)
from kvnode.agent.peers.directory import ARENA, STORAGE
from kvnode.agent.peers.keys import Curve
from kvnode.agent.peers.wire import InfoRep, InfoReq, decode_reply, encode
from kvnode.agent.replay import END_SEQ
from kvnode.errors import ProtocolError
from kvnode.ipc.process import drain_pipe

log = logging.getLogger("kvnode.peers.directory")

INFO_RETRY_S = 0.5  # a peer that did not say where its stream is is asked again
REPLAY_TIMEOUT_S = 5.0  # a replay silent this long is asked for again (refused, lost)
LIVE_BUFFER_MAX = 4096  # live batches held while a replay runs; more: start over
UPDATES_MAX = 65536  # updates waiting for the loop; more: the peer resyncs
BATCH_BYTES_MAX = 64 << 20  # a larger event message is refused by ZeroMQ
POLL_MS_MAX = 100
RECV_BATCH_MAX = 256
KEY_BYTES = 16


@dataclass(slots=True)
class Update:
    """One thing for the loop to apply to the directory, in order. ``kind``: "add",
    "remove", "reset" (forget what the peer announced), "synced", "unsynced", "nostream",
    "stored"/"removed" (``keys`` in ``tier``)."""

    kind: str
    endpoint: str
    keys: list[bytes] = field(default_factory=list)
    tier: int = 0


@dataclass(slots=True, eq=False)
class _Peer:
    endpoint: str
    host: str
    info: zmq.Socket | None = None
    sub: zmq.Socket | None = None
    monitor: zmq.Socket | None = None  # the SUB's connection events: a cut stream
    replay: zmq.Socket | None = None
    ports: tuple[int, int] = (0, 0)
    node: bytes = b""
    state: str = "discover"  # discover | replaying | synced | nostream
    next_seq: int = 0
    live: list[tuple[int, bytes]] = field(default_factory=list)
    snap_seq: int = -1  # the sequence number a snapshot being replayed is sent as
    asked_at: float = -1e9
    whole: bool = False  # the next replay asks for the whole state (a snapshot)
    rid: int = 0


class Subscriber(threading.Thread):
    def __init__(
        self,
        curve: Curve | None,
        wake: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name="kvnode-peers-events", daemon=True)
        self.curve = curve
        self.wake = wake
        self.clock = clock
        self._lock = threading.Lock()
        self._updates: deque[Update] = deque()
        self._wanted: set[str] | None = None
        self._stopping = False
        self._peers: dict[str, _Peer] = {}
        self._by_sock: dict[zmq.Socket, _Peer] = {}
        self._poller = zmq.Poller()
        self._ctx: zmq.Context | None = None
        self._decoder = msgspec.msgpack.Decoder(KVEventBatch)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.counters = dict.fromkeys(
            ("batches", "events", "resyncs", "whole_resyncs", "restarts", "gaps",
             "bad_batches", "replay_retries", "updates_overflow", "disconnects"), 0,
        )  # fmt: skip
        self._whole: set[str] = set()  # peers whose whole state the loop asked for again

    # -- any thread ---------------------------------------------------------------------
    def set_endpoints(self, endpoints: set[str]) -> None:
        with self._lock:
            self._wanted = set(endpoints)
        self._poke()

    def take(self) -> list[Update]:
        """Loop thread: the updates to apply, in order."""
        with self._lock:
            out = list(self._updates)
            self._updates.clear()
        return out

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def close_fds(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- the thread -----------------------------------------------------------------------
    def run(self) -> None:
        self._ctx = zmq.Context()
        self._poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stopping:
                self._step()
        except Exception:
            log.exception("event subscriber failed; the directory falls back to asking")
        finally:
            for p in list(self._peers.values()):
                self._drop(p)
            self._ctx.term()

    def resync_whole(self, endpoint: str) -> None:
        """From the loop: replay the peer's whole state again (a snapshot), not only
        what came since (the directory had no room for some of what it announced)."""
        with self._lock:
            self._whole.add(endpoint)
        self._poke()

    def _step(self) -> None:
        with self._lock:
            wanted, self._wanted = self._wanted, None
            whole, self._whole = self._whole, set()
        if wanted is not None:
            self._reconcile(wanted)
        for endpoint in whole:
            p = self._peers.get(endpoint)
            if p is not None and p.state != "nostream":
                p.whole = True
                self.counters["whole_resyncs"] += 1
                self._resync(p, "the directory had no room for all it announced")
        ready = dict(self._poller.poll(POLL_MS_MAX))
        if self._wake_r in ready:
            drain_pipe(self._wake_r)
        for sock in ready:
            p = self._by_sock.get(sock)  # type: ignore[call-overload]
            if p is not None:
                self._recv(p, sock)  # type: ignore[arg-type]
        now = self.clock()
        for p in list(self._peers.values()):
            self._tick(p, now)

    def _emit(self, u: Update) -> bool:
        with self._lock:
            if len(self._updates) >= UPDATES_MAX:
                self.counters["updates_overflow"] += 1
                return False
            self._updates.append(u)
        return True

    # -- peers ----------------------------------------------------------------------------
    def _reconcile(self, wanted: set[str]) -> None:
        for ep in list(self._peers):
            if ep not in wanted:
                self._drop(self._peers[ep])
                self._emit(Update("remove", ep))
        for ep in sorted(wanted - set(self._peers)):
            p = _Peer(ep, urlsplit(ep).hostname or "")
            p.info = self._socket(zmq.DEALER, ep, p)
            self._peers[ep] = p
            self._emit(Update("add", ep))

    def _socket(self, kind: int, endpoint: str, p: _Peer) -> zmq.Socket:
        assert self._ctx is not None
        s = self._ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, BATCH_BYTES_MAX)
        if kind == zmq.DEALER:
            s.setsockopt(zmq.IMMEDIATE, 1)
        if kind == zmq.SUB:
            s.setsockopt(zmq.SUBSCRIBE, b"")
            s.setsockopt(zmq.RCVHWM, LIVE_BUFFER_MAX)
        if "[" in endpoint:
            s.setsockopt(zmq.IPV6, 1)
        if self.curve is not None:
            s.curve_secretkey = self.curve.secret
            s.curve_publickey = self.curve.public
            s.curve_serverkey = self.curve.public
        s.connect(endpoint)
        self._poller.register(s, zmq.POLLIN)
        self._by_sock[s] = p
        return s

    def _close(self, p: _Peer, socks: tuple[zmq.Socket | None, ...]) -> None:
        if p.sub is not None and p.monitor is not None and p.sub in socks:
            p.sub.disable_monitor()
        for s in socks:
            if s is not None:
                self._poller.unregister(s)
                self._by_sock.pop(s, None)
                s.close(0)

    def _drop(self, p: _Peer) -> None:
        self._close(p, (p.monitor, p.info, p.sub, p.replay))
        p.sub = p.replay = p.monitor = None
        self._peers.pop(p.endpoint, None)

    def _streams(self, p: _Peer, ports: tuple[int, int]) -> None:
        """(Re)open the SUB and replay sockets on the ports the peer told us."""
        self._close(p, (p.monitor, p.sub, p.replay))
        host = f"[{p.host}]" if ":" in p.host else p.host
        p.sub = self._socket(zmq.SUB, f"tcp://{host}:{ports[0]}", p)
        p.monitor = p.sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller.register(p.monitor, zmq.POLLIN)
        self._by_sock[p.monitor] = p
        p.replay = self._socket(zmq.DEALER, f"tcp://{host}:{ports[1]}", p)
        p.ports = ports

    # -- state machine --------------------------------------------------------------------
    def _tick(self, p: _Peer, now: float) -> None:
        assert p.info is not None
        if p.state in ("discover", "nostream") and now - p.asked_at > (
            INFO_RETRY_S if p.state == "discover" else 10 * INFO_RETRY_S
        ):
            p.rid += 1
            p.asked_at = now
            try:
                p.info.send(encode(InfoReq(p.rid)), zmq.NOBLOCK)
            except zmq.Again:
                pass  # not connected yet: asked again later
        elif p.state == "replaying" and now - p.asked_at > REPLAY_TIMEOUT_S:
            self.counters["replay_retries"] += 1
            self._ask_replay(p, now)

    def _resync(self, p: _Peer, why: str) -> None:
        if p.state == "synced":
            self._emit(Update("unsynced", p.endpoint))
        self.counters["resyncs"] += 1
        log.debug("event stream of %s: resync (%s)", p.endpoint, why)
        p.state = "discover"
        p.asked_at = -1e9
        p.live.clear()

    def _ask_replay(self, p: _Peer, now: float) -> None:
        assert p.replay is not None
        p.state = "replaying"
        p.asked_at = now
        p.live.clear()
        p.snap_seq = -1
        start = -1 if p.whole else p.next_seq  # before 0: the state, as a snapshot
        try:
            p.replay.send_multipart([b"", start.to_bytes(8, "big", signed=True)], zmq.NOBLOCK)
        except zmq.Again:  # not connected yet: ask again soon
            p.asked_at = now - REPLAY_TIMEOUT_S + INFO_RETRY_S

    def _recv(self, p: _Peer, sock: zmq.Socket) -> None:
        for _ in range(RECV_BATCH_MAX):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if p.endpoint not in self._peers:
                return
            if sock is p.monitor:
                self.counters["disconnects"] += 1
                self._resync(p, "the stream's connection was cut")
            elif sock is p.info:
                self._on_info(p, frames)
            elif sock is p.sub:
                self._on_live(p, frames)
            elif sock is p.replay:
                self._on_replayed(p, frames)

    def _on_info(self, p: _Peer, frames: list[bytes]) -> None:
        try:
            rep = decode_reply(frames[0]) if len(frames) == 1 else None
        except ProtocolError:
            rep = None
        if (
            not isinstance(rep, InfoRep)
            or rep.rid != p.rid
            or p.state not in ("discover", "nostream")
        ):
            return
        if rep.node != p.node:
            if p.node:
                self.counters["restarts"] += 1
            p.node = rep.node
            p.next_seq = 0
            self._emit(Update("reset", p.endpoint, [rep.node]))
        if not (rep.events_port and rep.replay_port):
            if p.state != "nostream":
                self._emit(Update("nostream", p.endpoint))
            p.state = "nostream"  # asked again now and then: it may be restarted with one
            return
        if (rep.events_port, rep.replay_port) != p.ports or p.sub is None:
            self._streams(p, (rep.events_port, rep.replay_port))
        self._ask_replay(p, self.clock())

    def _on_live(self, p: _Peer, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.counters["bad_batches"] += 1
            return
        seq = int.from_bytes(frames[1], "big", signed=True)
        if p.state == "replaying":
            if len(p.live) >= LIVE_BUFFER_MAX:
                self._resync(p, "live batches piled up during the replay")
            else:
                p.live.append((seq, frames[2]))
            return
        if p.state != "synced":
            return
        if seq == p.next_seq:
            self._apply(p, seq, frames[2])
        elif seq > p.next_seq:
            self.counters["gaps"] += 1
            self._emit(Update("unsynced", p.endpoint))
            self._ask_replay(p, self.clock())
            p.live.append((seq, frames[2]))
        else:
            self._resync(p, "sequence went backwards")  # a restart: its generation is new

    def _on_replayed(self, p: _Peer, frames: list[bytes]) -> None:
        if p.state != "replaying" or len(frames) != 4 or len(frames[2]) != 8:
            return
        p.asked_at = self.clock()
        if frames[2] == END_SEQ:
            self._end_replay(p)
            return
        seq = int.from_bytes(frames[2], "big", signed=True)
        batch = self._decode(p, frames[3])
        if batch is None:
            return
        if batch.events and isinstance(batch.events[0], AllBlocksCleared):
            p.snap_seq = seq  # a start, or a snapshot: every batch of it has this number
        if seq >= p.next_seq or seq == p.snap_seq:
            self._apply(p, seq, batch)

    def _end_replay(self, p: _Peer) -> None:
        for seq, payload in sorted(p.live, key=lambda x: x[0]):
            if seq < p.next_seq:
                continue
            if seq > p.next_seq:
                self.counters["gaps"] += 1
                self._ask_replay(p, self.clock())
                return
            self._apply(p, seq, payload)
        p.live.clear()
        if p.state == "replaying":
            p.whole = False
            p.state = "synced"
            self._emit(Update("synced", p.endpoint))

    def _decode(self, p: _Peer, payload: bytes) -> KVEventBatch | None:
        try:
            return self._decoder.decode(payload)  # type: ignore[no-any-return]
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.counters["bad_batches"] += 1
            self._resync(p, "a batch did not decode")
            return None

    def _apply(self, p: _Peer, seq: int, payload: bytes | KVEventBatch) -> None:
        batch = self._decode(p, payload) if isinstance(payload, bytes) else payload
        if batch is None:
            return
        ups: list[Update] = []
        for ev in batch.events:
            if isinstance(ev, AllBlocksCleared):
                ups.append(Update("reset", p.endpoint))
                continue
            keys = [k for k in ev.block_hashes if isinstance(k, bytes) and len(k) == KEY_BYTES]
            tier = ARENA if ev.medium == MEDIUM_CPU else STORAGE
            if isinstance(ev, BlockStored):
                ups.append(Update("stored", p.endpoint, keys, tier))
            elif isinstance(ev, BlockRemoved):
                ups.append(Update("removed", p.endpoint, keys, tier))
        for u in ups:
            if not self._emit(u):
                self._resync(p, "the loop fell behind")
                return
        p.next_seq = seq + 1
        self.counters["batches"] += 1
        self.counters["events"] += len(batch.events)
        try:
            self.wake()
        except Exception:
            log.exception("event subscriber: wake() failed")

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        peers = list(self._peers.values())
        out["streams"] = {p.endpoint: p.state for p in peers}
        return out


__all__ = ["Subscriber", "Update"]
