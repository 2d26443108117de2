"""The network thread of the fetching half: owns every outgoing socket.

One DEALER per candidate server key of each peer endpoint (our own public key, plus the
other keys of ``curve_authorized_dir`` during a rotation); with ``ZMQ_IMMEDIATE`` only
the one whose handshake succeeded takes messages. A peer is the connection, never what
it says: replies are matched to the socket they came in on and to a request id we
chose; a reply to a request that already timed out is dropped before it can touch a
slot. The thread never touches the index: it writes only into pages the loop reserved
for fetches it has not finished yet.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvnode.agent.peers.jobs import Fetch, Job, Query
from kvnode.agent.peers.keys import Curve
from kvnode.agent.peers.links import Link, PeerStats
from kvnode.agent.peers.server import keepalive
from kvnode.agent.peers.wire import (
    ErrorRep,
    FetchRep,
    FetchReq,
    Have,
    HaveRep,
    HaveReq,
    PeerMsg,
    decode_reply,
    encode,
)
from kvnode.errors import ProtocolError
from kvnode.ipc.checksum import checksum
from kvnode.ipc.process import drain_pipe

log = logging.getLogger("kvnode.peers")

# Connection events that say how a link is doing, in the words of Link.transport.
_EVENT_WORDS: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "ok",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "refused",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "refused",
    zmq.EVENT_CONNECTED: "connected",
    zmq.EVENT_CONNECT_RETRIED: "retried",
    zmq.EVENT_DISCONNECTED: "closed",
}
_MONITORED = 0
for _event in _EVENT_WORDS:
    _MONITORED |= int(_event)

INBOX_MAX = 1024  # jobs waiting for the network thread
RECV_BATCH_MAX = 64  # replies read from one socket per wake-up
NET_POLL_MS_MAX = 100  # the network thread looks at its inbox and stop flag this often
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 5000


class Network(threading.Thread):
    """Owns every outgoing socket. Takes jobs from the loop, answers through
    ``on_done`` (then the loop's ``poll()``); writes only into slots of fetches it has
    not finished yet, so a late or hostile reply can never reach a freed page."""

    def __init__(
        self,
        curve: Curve | None,
        node_id: bytes,
        on_done: Callable[[Job], None],
        deadline_s: float,
        fetch_timeout_s: float,
        queue_max: int,
        recv_bytes_max: int,
        clock: Callable[[], float],
        bench_s: float = 60.0,
    ) -> None:
        super().__init__(name="kvnode-peers-net", daemon=True)
        self.curve = curve
        self.node_id = node_id
        self.on_done = on_done
        self.deadline_s = deadline_s
        self.fetch_timeout_s = fetch_timeout_s
        self.queue_max = queue_max
        self.recv_bytes_max = recv_bytes_max
        self.clock = clock
        self.bench_s = bench_s
        self._lock = threading.Lock()
        self._inbox: deque[Job] = deque()
        self._wanted: set[str] | None = None  # new endpoint set from the resolver
        self._rebuild = False  # certificates changed: re-create every link
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.links: dict[str, Link] = {}
        self.peer_stats: dict[str, PeerStats] = {}  # read by the loop under _lock
        self._by_socket: dict[zmq.Socket, Link] = {}
        self._monitors: dict[zmq.Socket, tuple[Link, int]] = {}  # monitor -> link, socket
        self._ctx: zmq.Context | None = None
        self._poller = zmq.Poller()

    # -- any thread -------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # pipe full: a wake-up is already due

    def submit(self, job: Job) -> bool:
        with self._lock:
            if self._stopping or len(self._inbox) >= INBOX_MAX:
                return False
            self._inbox.append(job)
        self._wake()
        return True

    def set_endpoints(self, endpoints: set[str]) -> None:
        with self._lock:
            self._wanted = set(endpoints)
        self._wake()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake()

    def rebuild(self) -> None:
        with self._lock:
            self._rebuild = True
        self._wake()

    def load(self, endpoint: str) -> int:
        """Requests outstanding to a peer (any thread: a racy read is fine here)."""
        link = self.links.get(endpoint)
        return len(link.outstanding) if link is not None else 0

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            stats = list(self.peer_stats.items())
        return {ep: s.snapshot() for ep, s in stats}

    # -- the thread ---------------------------------------------------------------------
    def run(self) -> None:
        self._ctx = zmq.Context()
        self._poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stopping:
                self._step()
        except Exception:  # programmer error: say so, then fail every job cleanly
            log.exception("peer network thread failed")
        finally:
            self._shutdown()

    def _step(self) -> None:
        with self._lock:
            wanted, self._wanted = self._wanted, None
            rebuild, self._rebuild = self._rebuild, False
            jobs = list(self._inbox)
            self._inbox.clear()
        if rebuild:  # new server-key candidates apply to new sockets only
            current = set(self.links)
            for old in list(self.links.values()):
                self._drop_link(old)
            wanted = current if wanted is None else wanted
        if wanted is not None:
            self._reconcile(wanted)
        now = self.clock()
        for job in jobs:
            self._start(job, now)
        events = dict(self._poller.poll(self._timeout_ms()))
        if self._wake_r in events:
            drain_pipe(self._wake_r)
        for sock in events:
            link = self._by_socket.get(sock)  # type: ignore[call-overload]
            if link is not None:
                self._recv(link, sock)  # type: ignore[arg-type]
            elif sock in self._monitors:
                self._transport(sock)  # type: ignore[arg-type]
        self._expire(self.clock())

    def _timeout_ms(self) -> int:
        deadlines = [j.deadline for lk in self.links.values() for j in lk.outstanding.values()]
        if not deadlines:
            return NET_POLL_MS_MAX
        left = min(deadlines) - self.clock()
        return max(0, min(NET_POLL_MS_MAX, int(left * 1000) + 1))

    # -- links --------------------------------------------------------------------------
    def _reconcile(self, wanted: set[str]) -> None:
        for ep in list(self.links):
            if ep not in wanted:
                self._drop_link(self.links[ep])
        for ep in sorted(wanted - set(self.links)):
            self._add_link(ep)

    def _add_link(self, endpoint: str) -> None:
        assert self._ctx is not None
        keys: list[bytes | None] = list(self.curve.server_keys()) if self.curve else [None]
        sockets = [self._dealer(endpoint, k) for k in keys]
        stats = self.peer_stats.get(endpoint) or PeerStats()
        link = Link(endpoint, sockets, stats)
        self.links[endpoint] = link
        with self._lock:
            self.peer_stats[endpoint] = stats
        for i, s in enumerate(sockets):
            self._by_socket[s] = link
            self._poller.register(s, zmq.POLLIN)
            mon = s.get_monitor_socket(_MONITORED)
            self._monitors[mon] = (link, i)
            self._poller.register(mon, zmq.POLLIN)

    def _dealer(self, endpoint: str, server_key: bytes | None) -> zmq.Socket:
        assert self._ctx is not None
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)  # no queueing toward a peer not connected (yet)
        s.setsockopt(zmq.MAXMSGSIZE, self.recv_bytes_max)
        s.setsockopt(zmq.SNDHWM, self.queue_max)
        s.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        s.setsockopt(zmq.RCVHWM, self.queue_max)  # replies: at most one per request
        keepalive(s)  # no ZMTP heartbeats (see server.py); requests have deadlines
        if "[" in endpoint:
            s.setsockopt(zmq.IPV6, 1)
        if self.curve is not None and server_key is not None:
            s.curve_secretkey = self.curve.secret
            s.curve_publickey = self.curve.public
            s.curve_serverkey = server_key
        s.connect(endpoint)
        return s

    def _transport(self, mon: zmq.Socket) -> None:
        """Connection events of one link socket: the link's state says whether the peer
        accepts our key, refuses it, or cannot be reached (a reply alone cannot tell a
        refused handshake from a peer that is down)."""
        link, index = self._monitors[mon]
        while True:
            try:
                event = int(recv_monitor_message(mon, zmq.NOBLOCK)["event"])
            except zmq.Again:
                return
            changed = link.transport(index, _EVENT_WORDS.get(event, "closed"))
            if changed == "refused":
                log.warning(
                    "peer %s refused the handshake: our key is not in its authorized "
                    "directory, or it is not a kvnode peer (peers.curve_secret_key)",
                    link.endpoint,
                )
            elif changed == "unreachable":
                log.info("peer %s unreachable (connection refused or no route)", link.endpoint)
            elif changed == "up":
                log.info("peer %s connected", link.endpoint)

    def _drop_link(self, link: Link) -> None:
        now = self.clock()
        for job in list(link.outstanding.values()):
            self._forget(link, job, now)
        link.outstanding.clear()
        for mon, (owner, _) in list(self._monitors.items()):
            if owner is link:
                self._poller.unregister(mon)
                del self._monitors[mon]
                mon.close(0)
        for s in link.sockets:
            self._poller.unregister(s)
            self._by_socket.pop(s, None)
            s.close(0)
        del self.links[link.endpoint]
        with self._lock:
            self.peer_stats.pop(link.endpoint, None)

    def _send(self, link: Link, make: Callable[[int], PeerMsg]) -> int | None:
        """Send to whichever socket of ``link`` has a completed connection; the rid,
        or None when none has (peer down or still handshaking: costs nothing)."""
        link.rid += 1
        frame = encode(make(link.rid))
        for s in link.sockets:
            try:
                s.send(frame, zmq.NOBLOCK)
                return link.rid
            except zmq.Again:
                continue
        link.stats.inc("unreachable")
        if link.stats.state == "up":
            link.stats.state = "connecting"
        return None

    # -- jobs -----------------------------------------------------------------------------
    def _start(self, job: Job, now: float) -> None:
        job.started = now
        if isinstance(job, Query):
            self._start_query(job, now)
        else:
            self._start_fetch(job, now)

    def _start_query(self, q: Query, now: float) -> None:
        q.deadline = now + self.deadline_s
        keys = q.keys
        links = list(self.links.values())
        if q.targets:  # the directory named who holds them: ask only those
            links = [lk for ep in q.targets if (lk := self.links.get(ep)) is not None]
        for link in links:
            if not link.usable(now):
                continue
            if len(link.outstanding) >= self.queue_max:
                link.stats.inc("busy")
                continue
            rid = self._send(link, lambda rid: HaveReq(rid, keys))
            if rid is not None:
                link.outstanding[rid] = q
                q.waiting.add(link.endpoint)
                link.stats.inc("lookups")
        if not q.waiting:
            self._finish(q)

    def _start_fetch(self, f: Fetch, now: float) -> None:
        f.deadline = now + self.fetch_timeout_s
        link = self.links.get(f.peer)
        if link is None or not link.usable(now):
            self._finish(f)
            return
        if len(link.outstanding) >= self.queue_max:
            link.stats.inc("busy")
            self._finish(f)
            return
        keys = f.keys
        rid = self._send(link, lambda rid: FetchReq(rid, keys))
        if rid is None:
            self._finish(f)
            return
        link.outstanding[rid] = f
        link.stats.inc("fetches")

    def _finish(self, job: Job) -> None:
        if job.done:
            raise RuntimeError("peer job finished twice")  # programmer error
        job.done = True
        self.on_done(job)

    def _forget(self, link: Link, job: Job, now: float) -> None:
        """``link`` will not answer ``job`` (timeout, link gone, bad reply)."""
        if isinstance(job, Query):
            job.waiting.discard(link.endpoint)
            if not job.waiting and not job.done:
                self._finish(job)
        elif not job.done:
            self._finish(job)

    def _expire(self, now: float) -> None:
        for link in list(self.links.values()):
            late = [rid for rid, job in link.outstanding.items() if job.deadline <= now]
            for rid in late:
                job = link.outstanding.pop(rid)
                link.fail(now, "timeouts", fetch=isinstance(job, Fetch))
                self._forget(link, job, now)

    # -- replies --------------------------------------------------------------------------
    def _recv(self, link: Link, sock: zmq.Socket) -> None:
        for _ in range(RECV_BATCH_MAX):
            if sock not in link.sockets:
                return  # its connection was cut while reading (a reply too large)
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_reply(link, frames)

    def _on_reply(self, link: Link, frames: list[zmq.Frame]) -> None:
        now = self.clock()
        try:
            rep = decode_reply(frames[0].buffer)
        except ProtocolError as exc:
            log.debug("peer %s: %s", link.endpoint, exc)
            link.fail(now, "errors")
            return
        if len(frames) > 1 and not isinstance(rep, FetchRep):
            self._oversized(link, now)  # only a fetch's reply carries payload frames
            return
        job = link.outstanding.pop(rep.rid, None)
        if job is None:
            link.stats.inc("late")  # its request already timed out: never touches a slot
            return
        if isinstance(rep, ErrorRep):
            log.debug("peer %s: error reply: %s", link.endpoint, rep.message)
            link.fail(now, "errors", fetch=isinstance(job, Fetch))
        elif rep.node == self.node_id:
            link.stats.state = "self"  # a seed that resolved to this very agent
        elif isinstance(job, Query) and isinstance(rep, HaveRep):
            self._on_have(link, job, rep, now)
        elif isinstance(job, Fetch) and isinstance(rep, FetchRep):
            self._on_fetched(link, job, rep, frames[1:], now)
        else:
            link.fail(now, "errors")
        self._forget(link, job, now)

    def _on_have(self, link: Link, q: Query, rep: HaveRep, now: float) -> None:
        if len(rep.states) != len(q.keys) or len(rep.sizes) != len(q.keys):
            link.fail(now, "errors")
            return
        link.ok(now - q.started)
        q.answered.add(link.endpoint)
        run = 0
        for state, size in zip(rep.states, rep.sizes):
            if state not in (Have.ARENA, Have.STORED) or not 0 < size <= self.recv_bytes_max:
                break
            run += 1
        link.stats.inc("hits", run)
        for key, state in zip(q.keys, rep.states):
            if state == Have.PENDING:
                q.promoting.add(key)
        link.stats.inc("pending", sum(1 for s in rep.states if s == Have.PENDING))
        if run > len(q.sizes):  # ties go to the first answer: the quicker peer
            q.best, q.sizes = link.endpoint, list(rep.sizes[:run])

    def _on_fetched(
        self, link: Link, f: Fetch, rep: FetchRep, frames: list[zmq.Frame], now: float
    ) -> None:
        """Check a fetch's reply on the received bytes; the loop lands what passed.
        A reply larger than what was asked for, or bytes that fail the writer's
        checksum, bench the peer and cut its connection (libzmq then lets go of
        whatever else it had queued from it)."""
        n = len(f.keys)
        payload = [fr.buffer for fr in frames]
        got = sum(len(p) for p in payload)
        if not (len(rep.sizes) == len(rep.checksums) == len(rep.frames) == n) or sum(
            rep.frames
        ) != len(payload):
            self._oversized(link, now) if got > f.nbytes else link.fail(now, "errors", fetch=True)
            return
        if got > f.nbytes or any(s not in (0, w) for s, w in zip(rep.sizes, f.sizes)):
            self._oversized(link, now)
            return
        tokens_ok = len(rep.tokens) == n
        bad = at = 0
        for i in range(n):
            parts = payload[at : at + rep.frames[i]]
            at += rep.frames[i]
            if rep.sizes[i] == 0:
                continue  # the peer let it go since it answered: a miss, not a lie
            csum = rep.checksums[i]
            if sum(len(p) for p in parts) != rep.sizes[i] or (csum and checksum(parts) != csum):
                bad += 1
                continue
            f.payload[i], f.checksums[i] = parts, csum  # 0: unverified, and stays so
            f.tokens[i] = list(rep.tokens[i]) if tokens_ok else []
            link.stats.inc("fetched_keys")
            link.stats.inc("bytes", f.sizes[i])
        f.frames = list(frames)
        if bad:
            link.stats.inc("corrupt", bad - 1)
            link.bench(now, self.bench_s, "corrupt")
            log.warning("peer %s sent %d chunks that fail their checksum: benched for %.0fs",
                        link.endpoint, bad, self.bench_s)  # fmt: skip
        else:
            link.ok(now - f.started, fetched=True)

    def _oversized(self, link: Link, now: float) -> None:
        link.bench(now, self.bench_s, "oversized")
        log.warning("peer %s sent more than it was asked for: benched for %.0fs",
                    link.endpoint, self.bench_s)  # fmt: skip
        self._reset_sockets(link)

    def _reset_sockets(self, link: Link) -> None:
        """New connections to ``link``'s endpoint: what libzmq still buffers from the
        old ones goes with them. Its outstanding requests are forgotten (timed out)."""
        for s in link.sockets:
            self._poller.unregister(s)
            self._by_socket.pop(s, None)
            s.close(0)
        keys: list[bytes | None] = list(self.curve.server_keys()) if self.curve else [None]
        link.sockets = [self._dealer(link.endpoint, k) for k in keys]
        for s in link.sockets:
            self._by_socket[s] = link
            self._poller.register(s, zmq.POLLIN)

    def _shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            jobs = list(self._inbox)
            self._inbox.clear()
        for link in list(self.links.values()):
            self._drop_link(link)
        for job in jobs:
            self._finish(job)
        if self._ctx is not None:
            self._ctx.term()

    def close_fds(self) -> None:
        """After join: the wake pipe (closed here, not by the thread, so no other
        thread can write into a descriptor number the kernel has reused)."""
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


__all__ = ["Network"]
