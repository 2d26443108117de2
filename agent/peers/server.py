"""The serving half of peers: answers other agents from this agent's index and arena.

``PeerServer`` runs on the agent's loop thread: a ROUTER socket on ``peers.listen``. It
answers ``HaveReq`` (which of these keys do you hold: committed arena entries, and keys
a promotion is already bringing in; a peer's question starts no disk or S3 I/O here)
and ``FetchReq`` (send me these keys). Sends go straight out of the arena, zero-copy: the entries stay pinned (``Index.pin``) until ZeroMQ lets
go of the bytes, which ``poll()`` notices (pins taken and given back through the cache,
the index's one writer). Checksums travel with them.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import zmq

from kvnode.agent.cache import Cache
from kvnode.agent.index import Entry, State
from kvnode.agent.peers.arena import arena_view
from kvnode.agent.peers.keys import Curve
from kvnode.agent.peers.lower import DiskRead, LowerReads
from kvnode.agent.peers.wire import (
    REQUEST_BYTES_MAX,
    ZAP_DOMAIN,
    ErrorRep,
    FetchRep,
    FetchReq,
    Have,
    HaveRep,
    HaveReq,
    InfoRep,
    InfoReq,
    decode_request,
    encode,
)
from kvnode.errors import PeerError, ProtocolError

log = logging.getLogger("kvnode.peers")

SERVE_BATCH_MAX = 64  # requests handled per handle() call before the loop goes on
SENDS_INFLIGHT_MAX = 1024  # replies whose arena bytes ZeroMQ still holds (pins kept)
SERVER_SNDHWM = 64  # replies queued per peer connection; beyond it ROUTER drops them
SERVER_RCVHWM = 256  # requests queued per peer connection; beyond it libzmq stops reading
# No ZMTP heartbeats on peer links: libzmq 4.3 aborts the process (stream_engine_base.cpp
# "!_io_error") when a heartbeat fires on a connection whose peer flooded requests until
# its input stopped and then closed. TCP keepalive finds dead hosts instead; what a live
# peer that stops reading can hold is bounded per connection (serve_peer_bytes_max).
TCP_KEEPALIVE_IDLE_S = 10
TCP_KEEPALIVE_INTVL_S = 3
TCP_KEEPALIVE_CNT = 3


def keepalive(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, TCP_KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, TCP_KEEPALIVE_INTVL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, TCP_KEEPALIVE_CNT)


@dataclass(slots=True, eq=False)
class Send:
    tracker: zmq.MessageTracker
    keys: list[bytes]
    nbytes: int
    peer: bytes  # the connection's routing id


# True: a promotion of the key into the arena is already under way (local demand
# started it). Answered from what is known: a peer's question never starts I/O here.
DISK_WAIT_S = 1.0  # a reply waits this long for its disk reads, then goes without them
Part = Union[tuple[list[memoryview], int, int, list[int]], "DiskRead", None]


@dataclass(slots=True, eq=False)
class Parked:
    """A fetch reply waiting for disk reads (``parts``: per key, arena views with size,
    checksum and tokens, a DiskRead, or None)."""

    ident: bytes
    m: FetchReq
    parts: list[Part]
    pinned: list[bytes]
    deadline: float


LowerHas = Callable[[bytes], bool]


class PeerServer:
    """Answers peers from the index and the arena. Loop thread only: register
    ``socket`` for POLLIN, call ``handle()`` when it is readable and ``poll()`` in
    housekeeping (it unpins entries whose bytes have left)."""

    def __init__(
        self,
        cache: Cache,
        arena: Any,
        listen: str,
        curve: Curve | None,
        node_id: bytes,
        lower_has: LowerHas | None = None,
        serve_bytes_max: int = 512 << 20,
        serve_peer_bytes_max: int = 128 << 20,
        events_ports: tuple[int, int] = (0, 0),
        disk: LowerReads | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.events_ports = events_ports  # (PUB, replay) on tcp, told to subscribers
        self.disk = disk  # this node's disk tier, read for peers off the loop
        self._clock = clock
        self._parked: deque[Parked] = deque()
        self.cache = cache
        self.index = cache.index  # read only
        self._arena = arena_view(arena)
        self.node_id = node_id
        self.lower_has = lower_has
        self.serve_bytes_max = serve_bytes_max
        self.serve_peer_bytes_max = serve_peer_bytes_max  # pinned for one connection
        self._by_peer: dict[bytes, int] = {}
        self.curve = curve
        self._sends: deque[Send] = deque()
        self.bytes_inflight = 0
        self.counters = dict.fromkeys(
            ("have_requests", "have_keys", "fetch_requests", "served_keys", "served_bytes",
             "served_from_disk", "busy", "peer_busy", "dropped", "bad_frames", "errors"), 0,
        )  # fmt: skip
        self.ctx = zmq.Context()
        self.auth: Any = None
        try:
            self.socket = self._bind(listen)
        except BaseException:
            self._teardown()
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def _bind(self, listen: str) -> zmq.Socket:
        if self.curve is not None:
            # The authenticator must run before bind: without a ZAP handler libzmq
            # admits any client that knows the server key.
            from zmq.auth.thread import ThreadAuthenticator

            self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("kvnode.peers.zap"))
            self.auth.start()
            self.auth.configure_curve_callback(ZAP_DOMAIN, self.curve.ring)
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # A reply the peer's queue has no room for (it does not read), or to a peer gone,
        # raises at once (NOBLOCK) and is counted ``dropped``: libzmq would drop it
        # silently, after it was counted served.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, REQUEST_BYTES_MAX)
        sock.setsockopt(zmq.SNDHWM, SERVER_SNDHWM)
        sock.setsockopt(zmq.RCVHWM, SERVER_RCVHWM)
        keepalive(sock)
        if self.curve is not None:
            sock.curve_secretkey = self.curve.secret
            sock.curve_publickey = self.curve.public
            sock.curve_server = True
            sock.zap_domain = ZAP_DOMAIN.encode()
        try:
            sock.bind(listen)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise PeerError(f"cannot listen on {listen}: {exc}") from exc
        return sock

    # -- requests ----------------------------------------------------------------------
    def handle(self) -> int:
        """Answer waiting requests (at most ``SERVE_BATCH_MAX``). Never blocks."""
        n = 0
        for n in range(SERVE_BATCH_MAX):  # noqa: B007 (n counts the handled requests)
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return n
            self._handle(frames)
        return n + 1

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.counters["bad_frames"] += 1
            return
        ident, body = frames
        try:
            msg = decode_request(body)
        except ProtocolError as exc:
            self.counters["bad_frames"] += 1
            try:
                self.socket.send_multipart(
                    [ident, encode(ErrorRep(0, str(exc)[:256]))], zmq.NOBLOCK
                )
            except zmq.ZMQError as err:
                self._not_sent(err)
            return
        try:
            if isinstance(msg, HaveReq):
                self._on_have(ident, msg)
            elif isinstance(msg, InfoReq):
                rep = InfoRep(msg.rid, self.node_id, *self.events_ports)
                self.socket.send_multipart([ident, encode(rep)], zmq.NOBLOCK)
            else:
                self._on_fetch(ident, msg)
        except zmq.ZMQError as exc:  # an operating error on one reply: counted, loop goes on
            self._not_sent(exc)

    def _not_sent(self, exc: zmq.ZMQError) -> None:
        """A reply that did not go: the peer's queue is full or the peer is gone
        (``dropped``), or another error (``errors``)."""
        if exc.errno in (zmq.EAGAIN, zmq.EHOSTUNREACH):
            self.counters["dropped"] += 1
        else:
            self.counters["errors"] += 1
        log.debug("peer reply not sent: %s", exc)

    def _committed(self, key: bytes) -> Entry | None:
        # No Index.lookup here: a peer's question must not move recency or hit counts.
        e = self.index.entries.get(key)
        return e if e is not None and e.state is State.COMMITTED else None

    def _on_have(self, ident: bytes, m: HaveReq) -> None:
        self.counters["have_requests"] += 1
        self.counters["have_keys"] += len(m.keys)
        states, sizes = [], []
        for key in m.keys:
            e = self._committed(key)
            if e is not None:
                states.append(Have.ARENA)
                sizes.append(e.size)
            elif self.disk is not None and (size := self.disk.size_of(key)):
                states.append(Have.STORED)  # fetchable now: read from disk when asked
                sizes.append(size)
            elif self.lower_has is not None and self._lower_has(key):
                states.append(Have.PENDING)
                sizes.append(0)
            else:
                states.append(Have.ABSENT)
                sizes.append(0)
        rep = HaveRep(m.rid, self.node_id, states, sizes)
        self.socket.send_multipart([ident, encode(rep)], zmq.NOBLOCK)

    def _lower_has(self, key: bytes) -> bool:
        try:
            return bool(self.lower_has(key))  # type: ignore[misc]
        except Exception:
            self.counters["errors"] += 1
            log.exception("peer server: lower-tier probe failed")
            return False

    def _on_fetch(self, ident: bytes, m: FetchReq) -> None:
        self.counters["fetch_requests"] += 1
        pinned: list[bytes] = []
        parts: list[Part] = []
        for key in m.keys:
            views = self._pin_for_send(key, pinned, ident)
            if views is not None:
                e = self.index.entries[key]
                tokens = e.meta.token_ids() if e.meta is not None else []
                # the writer's checksum, unchanged (0: unverified)
                parts.append((views, e.size, e.checksum, tokens))
            else:
                parts.append(self._read_from_disk(key, ident))
        reply = Parked(ident, m, parts, pinned, self._clock() + DISK_WAIT_S)
        if any(isinstance(p, DiskRead) for p in parts):
            self._parked.append(reply)  # sent by poll() once the disk reads are done
        else:
            self._reply(reply)

    def _read_from_disk(self, key: bytes, peer: bytes) -> Part:
        """A key a peer asked for that is on this node's disk: read it for the peer,
        within the serve budgets (in all and per connection). None: not held (or not
        now)."""
        if self.disk is None:
            return None
        size = self.disk.size_of(key)
        if not size:
            return None
        if self.bytes_inflight + size > self.serve_bytes_max:
            self.counters["busy"] += 1
            return None
        held = self._by_peer.get(peer, 0)
        if held + size > self.serve_peer_bytes_max:
            self.counters["peer_busy"] += 1
            return None
        r = self.disk.submit(key, size)
        if r is not None:
            self.bytes_inflight += size
            self._by_peer[peer] = held + size
        return r

    def _reply(self, p: Parked) -> None:
        """Send a fetch reply: arena bytes zero-copy (pinned), disk bytes from their
        buffers, each with its writer's checksum; an unread key as not held."""
        rep = FetchRep(p.m.rid, self.node_id, [], [], [], [])
        payload: list[Any] = []
        held = 0  # bytes of the serve budget this reply holds until its frames are gone
        for part in p.parts:
            sent: tuple[list[Any], int, int, list[int]] | None = None
            if isinstance(part, DiskRead):
                held += part.size
                if part.done and part.ok:
                    sent = ([memoryview(part.buf)], part.size, part.checksum, part.tokens)
                    self.counters["served_from_disk"] += 1
            elif part is not None:
                sent = part
                held += part[1]
            if sent is None:
                rep.sizes.append(0)
                rep.checksums.append(0)
                rep.frames.append(0)
                rep.tokens.append([])
                continue
            views, size, csum, tokens = sent
            rep.sizes.append(size)
            rep.checksums.append(csum)
            rep.frames.append(len(views))
            rep.tokens.append(tokens)
            payload.extend(views)
        self._send_pinned(p.ident, rep, payload, p.pinned, held)

    def _pin_for_send(
        self, key: bytes, pinned: list[bytes], peer: bytes
    ) -> list[memoryview] | None:
        e = self._committed(key)
        if e is None:
            return None
        if (
            self.bytes_inflight + e.size > self.serve_bytes_max
            or len(self._sends) >= SENDS_INFLIGHT_MAX
        ):
            self.counters["busy"] += 1
            return None
        held = self._by_peer.get(peer, 0)
        if held + e.size > self.serve_peer_bytes_max:
            self.counters["peer_busy"] += 1  # a peer that does not read holds no more
            return None
        if self.cache.pin(key) is None:
            return None
        pinned.append(key)
        self.bytes_inflight += e.size
        self._by_peer[peer] = held + e.size
        return [self._arena[off : off + n] for off, n in e.extents(self.index.page_bytes)]

    def _send_pinned(
        self,
        ident: bytes,
        rep: FetchRep,
        payload: list[memoryview],
        pinned: list[bytes],
        held: int,
    ) -> None:
        """Zero-copy out of the arena (and disk buffers). Every payload frame is
        tracked (not only the last, which is all ``send_multipart`` reports): the pins
        and the ``held`` budget go when libzmq has let go of every frame, whether it
        sent or dropped them."""
        frames = [zmq.Frame(v, copy=False, track=True) for v in payload]
        nbytes = sum(len(v) for v in payload)
        send = Send(zmq.MessageTracker(*frames), pinned, held, ident)
        try:
            # Refused whole or taken whole: ROUTER checks room at a message's first part.
            self.socket.send_multipart([ident, encode(rep), *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            self._unpin(send)  # libzmq holds none of the frames
            raise
        if frames:
            self._sends.append(send)
        else:
            self._unpin(send)
        self.counters["served_keys"] += len(pinned)
        self.counters["served_bytes"] += nbytes

    def _unpin(self, s: Send) -> None:
        for key in s.keys:
            self.cache.unpin(key)
        self.bytes_inflight -= s.nbytes
        left = self._by_peer.get(s.peer, 0) - s.nbytes
        if left > 0:
            self._by_peer[s.peer] = left
        else:
            self._by_peer.pop(s.peer, None)

    # -- housekeeping -----------------------------------------------------------------
    def _finish_parked(self) -> None:
        """Replies waiting for disk reads: sent once every read is done, or at their
        deadline with what was read (the rest answered as not held)."""
        if self.disk is not None:
            self.disk.take_done()  # DiskRead.done is set by the reader itself
        now = self._clock()
        keep: deque[Parked] = deque()
        for p in self._parked:
            reads = [x for x in p.parts if isinstance(x, DiskRead)]
            if all(r.done for r in reads) or now >= p.deadline:
                try:
                    self._reply(p)
                except zmq.ZMQError as exc:
                    self._not_sent(exc)
            else:
                keep.append(p)
        self._parked = keep

    def poll(self) -> int:
        """Unpin entries whose bytes ZeroMQ has released. Returns replies finished."""
        if self._parked:
            self._finish_parked()
        keep: deque[Send] = deque()
        done = 0
        for s in self._sends:  # one pass: a tracker read once is acted on once
            if s.tracker.done:
                self._unpin(s)
                done += 1
            else:
                keep.append(s)
        self._sends = keep
        return done

    def busy(self) -> bool:
        return bool(self._sends or self._parked)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        out["refused"] = self.curve.ring.refused if self.curve is not None else 0
        out["admitted"] = self.curve.ring.allowed if self.curve is not None else 0
        out["sends_inflight"] = len(self._sends)
        out["replies_waiting_for_disk"] = len(self._parked)
        if self.disk is not None:
            out.update(self.disk.stats())
        out["bytes_inflight"] = self.bytes_inflight
        return out

    def close(self) -> None:
        """Close the socket (ZeroMQ drops what it still holds), then give back pins."""
        if self.disk is not None:
            self.disk.stop()
        for p in self._parked:
            for key in p.pinned:
                self.cache.unpin(key)
        self._parked.clear()
        self._teardown()
        for s in self._sends:
            self._unpin(s)
        self._sends.clear()

    def _teardown(self) -> None:
        sock = getattr(self, "socket", None)
        if sock is not None:
            sock.close(0)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.term()


__all__ = ["LowerHas", "PeerServer", "keepalive"]
