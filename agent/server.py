"""The agent's event loop: one thread receives requests on a ZeroMQ ROUTER socket,
authenticates them against the client registry and dispatches them to the handlers.
It moves no KV bytes on the local path: clients copy into and out of the arena.

Nothing a client sends can stop this loop: frames are decoded against a bounded
schema, every handler runs under a catch-all that answers ``INTERNAL`` and counts it,
and identity comes from the connection (see ``registry``), not from the request.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from kvnode.agent.cache import Cache
from kvnode.agent.clients import Client
from kvnode.agent.config import Config, format_size
from kvnode.agent.connections import Connections
from kvnode.agent.handlers import ClientError, Handlers
from kvnode.agent.index import AGENT_OWNER, Index
from kvnode.agent.logs import Throttled
from kvnode.agent.movers.service import Transfers
from kvnode.agent.published import PublishedIndex

if TYPE_CHECKING:
    from kvnode.agent.fleet import Fleet
    from kvnode.agent.tiers.manager import TierManager
from kvnode.agent import sdnotify
from kvnode.agent.assembly import Parts, assemble
from kvnode.agent.registry import ClientRegistry, Refused
from kvnode.agent.runtime import ArenaProgress, RuntimeDir, create_arena
from kvnode.agent.snapshot import snapshot
from kvnode.agent.stats import Stats
from kvnode.agent.tenants import Tenants, parse_shares
from kvnode.errors import ProtocolError
from kvnode.ipc import protocol as P
from kvnode.ipc.process import drain_pipe, pid_namespace
from kvnode.ipc.segment import Segment

log = logging.getLogger("kvnode.agent")

_RECV_BATCH_MAX = 256  # messages handled per wake-up before housekeeping runs
_POLL_MS_MAX = 100
_LEASE_CHECK_S = 1.0
_PUBLISH_STEP = 16  # index changes published between looks at the request queue
_TICK_S = 0.002  # housekeeping at least this far apart while requests keep coming
ERROR_LOG_EVERY_S = 10.0  # a request kind that hit a bug: its traceback at most this often


class StopRequested(Exception):
    """A stop signal arrived while the agent was still starting."""


class Agent:
    def __init__(self, cfg: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.runtime_dir = cfg.runtime_dir
        self.generation = int.from_bytes(os.urandom(6), "little") or 1
        self.stats = Stats()
        self._error_logs: dict[str, Throttled] = {}
        self.registry = ClientRegistry(self.generation, pid_namespace())
        self.runtime = RuntimeDir(cfg)
        self._running = False
        self._stop_requested = False
        self._draining = False
        self._started_at = time.time()
        self.segment: Segment | None = None
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self.connections: Connections | None = None  # the socket's connection accounting
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._next_lease_check = 0.0
        self.hooks_ready: list[Callable[[], Any]] = []  # called once serving
        self.hooks_stopping: list[Callable[[], Any]] = []
        self.hooks_reload: list[Callable[[Config], list[str]]] = []
        self._reload_requested = False
        self.parts: Parts | None = None  # built once by start(), after the arena
        self.index_segment = ""  # the shared lookup index's name, when published

    @property
    def clients(self) -> dict[int, Client]:
        return self.registry.by_id

    # The parts exist from start() on; the loop and the handlers run only after it.
    @property
    def index(self) -> Index:
        assert self.parts is not None
        return self.parts.index

    @property
    def cache(self) -> Cache:
        assert self.parts is not None
        return self.parts.cache

    @property
    def handlers(self) -> Handlers:
        assert self.parts is not None
        return self.parts.handlers

    @property
    def fleet(self) -> Fleet | None:
        return self.parts.fleet if self.parts is not None else None

    @property
    def published(self) -> PublishedIndex | None:
        return self.parts.published if self.parts is not None else None

    @property
    def transfers(self) -> Transfers | None:
        return self.parts.transfers if self.parts is not None else None

    @property
    def tiers(self) -> TierManager | None:
        return self.parts.tiers if self.parts is not None else None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Take the runtime directory, map the arena, bind the socket. After this
        returns the agent can serve. A stop signal meanwhile raises StopRequested
        (``close()`` then removes what was made)."""
        cfg = self.cfg
        self.runtime.take()
        _reseed_libc_rand()  # before any ROUTER of the agent's draws its first id (_bind)
        t0 = time.perf_counter()
        index = Index(
            cfg.arena.cpu_bytes,
            cfg.arena.page_bytes,
            cfg.arena.policy,
            clock=self.clock,
            reserve_ttl_s=cfg.arena.reserve_ttl_s,
            tenants=Tenants(
                cfg.arena.cpu_bytes,
                cfg.arena.namespace_share,
                parse_shares(cfg.arena.namespace_shares),
            ),
        )
        log.info(
            "arena: creating %s (%s in pages of %s)%s", cfg.segment_name,
            format_size(cfg.arena.cpu_bytes), format_size(cfg.arena.page_bytes),
            ", pre-faulting" if cfg.arena.prefault else "",
        )  # fmt: skip
        self.segment = create_arena(
            cfg, index.alloc.pages_total, lambda: self._stop_requested,
            ArenaProgress(sdnotify.status),
        )  # fmt: skip
        if self._stop_requested:
            raise StopRequested("stop requested while the arena was being mapped")
        log.info(
            "arena %s ready: %d bytes in %d pages of %d (%.2fs)",
            self.segment.name, self.segment.size, index.alloc.pages_total,
            cfg.arena.page_bytes, time.perf_counter() - t0,
        )  # fmt: skip
        self.parts = assemble(cfg, index, self.segment, self.wake, self.generation, self.stats)
        if self.parts.published is not None:
            self.index_segment = self.parts.published.name
        self._bind()
        self._running = not self._stop_requested
        log.info(
            "serving on %s (generation %d, hex %x)", cfg.endpoint, self.generation, self.generation
        )

    def _bind(self) -> None:
        cfg = self.cfg
        self.ctx = zmq.Context()
        # libzmq names a connection that brings no routing id "\0" + a counter that
        # starts at rand(): seeded from the clock (or never), any local process could
        # compute the ids to come and hold one, and the next ordinary connection
        # would abort the agent (a duplicate id is an assertion in libzmq). Reseeded
        # from the kernel's generator at start (for the fleet's sockets too) and again
        # just before this socket draws its start.
        _reseed_libc_rand()
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.agent.request_bytes_max)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 10000)
        try:
            self.connections = Connections(
                cfg, self.ctx, sock, self.stats, self.clock, self.registry.handles
            )
        except BaseException:
            sock.close(0)
            raise
        self._monitor = self.connections.monitor
        self.sock = sock

    def wake(self) -> None:
        """Wake the loop from another thread or a signal handler."""
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # pipe full: the loop is already due to wake

    def request_stop(self, *_: Any) -> None:
        self._stop_requested = True
        self._running = False
        self.wake()

    def request_reload(self, *_: Any) -> None:
        self._reload_requested = True
        self.wake()

    def install_signal_handlers(self) -> None:
        """Call before ``start()``: a signal during the arena pre-fault then ends the
        start cleanly instead of killing the process with the segment left behind."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    def close(self) -> None:
        """Stop: flush bounded write-back queues within the deadline, then unlink."""
        self._running = False
        self._draining = True
        parts = self.parts
        if parts is not None:
            parts.stop_publishing(unlink=self.runtime.held)
        for hook in self.hooks_stopping:
            _safe(hook)
        t0 = time.perf_counter()
        before = _tier_writes(parts)
        if parts is not None:
            parts.close(self.cfg.agent.shutdown_flush_s)  # before the arena goes
        if self.connections is not None:
            self.connections.close()
            self.connections = None
            self._monitor = None
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        if self.segment is not None:
            if self.runtime.held:  # only the lock holder owns the segment
                self.segment.unlink()
            self.segment.close()
            self.segment = None
        self.runtime.release()
        clients = len(self.registry)
        self.registry.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        log.info(
            "%s", _stop_summary(before, _tier_writes(parts), clients, time.perf_counter() - t0)
        )

    # ------------------------------------------------------------------ loop
    def serve_forever(self) -> None:
        assert self.sock is not None and self._monitor is not None
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(self.registry.fileno(), zmq.POLLIN)
        fleet_socks = self.fleet.sockets() if self.fleet is not None else []
        for s in fleet_socks:
            poller.register(s, zmq.POLLIN)
        for hook in self.hooks_ready:
            _safe(hook)
        next_tick = 0.0
        refusing = -1  # the listener the loop drains while libzmq's accepting is paused
        while self._running:
            refusing = self._watch_refusing(poller, refusing)
            try:
                events = dict(poller.poll(self._poll_timeout_ms()))
            except zmq.ZMQError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if refusing >= 0 and refusing in events:
                self._guard(self.connections.refuse_pending)  # type: ignore[union-attr]
            if self._monitor in events:
                self._drain_monitor()
            if self.sock in events:
                self._drain_socket()
            if self.index.changes:
                self._publish()  # readers of the shared index see commits at once
            # Housekeeping runs on a short timer, or at once when something other than
            # a request woke us: between back-to-back requests it would only add latency.
            other = len(events) - (self.sock in events)
            now = time.monotonic()
            if not other and now < next_tick:
                continue
            next_tick = now + _TICK_S
            if self._wake_r in events:
                self._drain_wake()
            if self.fleet is not None and any(s in events for s in fleet_socks):
                self._guard(self.fleet.on_readable)
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            self._housekeeping()

    def _watch_refusing(self, poller: zmq.Poller, watched: int) -> int:
        fd = self.connections.refusing_fd if self.connections is not None else -1
        if fd != watched:
            if watched >= 0:
                poller.unregister(watched)
            if fd >= 0:
                poller.register(fd, zmq.POLLIN)
        return fd

    def _publish(self) -> None:
        """Publish the index's changes in steps, answering any request that arrives
        meanwhile first: a pin that follows a commit does not wait for the commit's
        keys to reach the shared index."""
        sock = self.sock
        assert sock is not None
        drained = False  # once per call: a steady stream of requests must not starve
        while self.index.changes:  # the rest of the loop (housekeeping, reclaim)
            self.cache.publish(_PUBLISH_STEP)
            if not drained and self.index.changes and int(sock.getsockopt(_EVENTS)) & _POLLIN:
                drained = True
                self._drain_socket(first_ready=False)

    def _poll_timeout_ms(self) -> int:
        # Transfers need no short timer: a copy thread wakes the loop when it hands a
        # job back (a save in flight lasts a whole forward pass on the CPU).
        busy = self.cache.busy() or (self.fleet is not None and self.fleet.busy())
        return 5 if busy else _POLL_MS_MAX

    def _guard(self, fn: Callable[[], Any]) -> None:
        """Run a loop step; a bug in it is counted and logged, the loop goes on."""
        try:
            fn()
        except Exception:
            self.stats.inc("errors")
            log.exception("%s failed", getattr(fn, "__qualname__", "loop step"))

    def _drain_wake(self) -> None:
        drain_pipe(self._wake_r)

    def _drain_socket(self, first_ready: bool = True) -> None:
        sock = self.sock
        assert sock is not None
        for i in range(_RECV_BATCH_MAX):
            # When the poll said readable, the first message is there; after it EVENTS
            # is cheaper than a recv that raises Again once the queue is empty.
            if (i or not first_ready) and not int(sock.getsockopt(_EVENTS)) & _POLLIN:
                return
            try:
                frames = self._recv(sock)
            except zmq.Again:
                return
            try:
                self._handle(frames)
            except Exception:  # last line of defence: the loop never dies from input
                self.stats.inc("errors")
                log.exception("request handling failed")

    @staticmethod
    def _recv(sock: zmq.Socket) -> list[Any]:
        """One message: the routing id as bytes, then the frames (the first as a
        ``zmq.Frame``: a Hello's source fd is read from it)."""
        parts: list[Any] = [sock.recv(zmq.NOBLOCK)]
        while sock.getsockopt(_RCVMORE):
            parts.append(sock.recv(zmq.NOBLOCK, copy=len(parts) > 1))
        return parts

    def _drain_monitor(self) -> None:
        assert self.connections is not None
        self.connections.drain(self._closed)

    def _closed(self, fd: int) -> None:
        c = self.registry.disconnected(fd)
        if c is not None:
            self._reclaim(c, "connection closed")

    def _housekeeping(self) -> None:
        if self.transfers is not None:
            self._guard(self.transfers.poll)
        self.cache.housekeeping()
        if self.fleet is not None:
            self._guard(self.fleet.poll)
        for c in self.registry.exited():
            self._reclaim(c, "process exited")
        now = self.clock()
        timeout = self.cfg.agent.heartbeat_timeout_s
        for c in self.registry.silent(now, timeout):
            self._reclaim(c, f"no request or heartbeat for {now - c.last_seen:.1f}s")
        connections = self.connections
        if now >= self._next_lease_check:
            self._next_lease_check = now + _LEASE_CHECK_S
            self._expire_leases()
            if connections is not None:
                connections.tick(self.registry.on_fd)
        elif connections is not None and not connections.listening:
            connections.check()  # resume as soon as the bounds allow
        if self.published is not None:
            self._guard(self.published.sync_lower)  # before the arena's changes go out
        self.cache.publish()
        if self.published is not None:
            self.published.touch()
        if self.fleet is not None:
            self._guard(self.fleet.flush)

    def _expire_leases(self) -> None:
        expired = [(e.owner, e.key) for e in self.cache.expire_leases()]
        self.stats.inc("expired_leases", len(expired))
        _log_expired("reservation", expired)
        self._expire_pins()

    def _expire_pins(self) -> None:
        """Pins held past ``agent.pin_ttl_s`` go, like reservations past their TTL: a
        live client that lost track of a pin (a bug, a call it gave up on) must not
        keep an entry from eviction for as long as it lives. A reader still copying
        after that long is protected by its checksum of the copy, not by the pin."""
        before = self.clock() - self.cfg.agent.pin_ttl_s
        expired = self.cache.expire_pins(before)
        self.stats.inc("expired_pins", sum(n for _, _, n in expired))
        _log_expired("pin", [(owner, key) for owner, key, _ in expired])

    def _reclaim(self, c: Client, why: str) -> None:
        if self.transfers is not None:
            self.transfers.client_gone(c.client_id)
        leases, pins = self.cache.release_owner(c.client_id)
        self.registry.remove(c)
        self.stats.inc("reclaimed_clients")
        self.stats.inc("reclaimed_leases", leases)
        self.stats.inc("reclaimed_pins", pins)
        log.info(
            "client %x (%s, pid %d) gone: %s; reclaimed %d reservations, %d pins",
            c.client_id, _printable(c.name), c.pid, why, leases, pins,
        )  # fmt: skip

    # ------------------------------------------------------------------ messages
    def _handle(self, frames: list[Any]) -> None:
        if len(frames) != 2:
            self.stats.inc("bad_frames")
            if len(frames) > 2:
                self._send(frames[0], P.Error(0, P.ErrCode.BAD_FRAME, "expected one frame"))
            return
        identity: bytes = frames[0]
        payload: zmq.Frame = frames[1]
        try:
            msg = P.decode_request(payload.buffer)
        except ProtocolError as exc:
            self.stats.inc("bad_frames")
            code = P.ErrCode.BAD_VERSION if "version" in str(exc) else P.ErrCode.BAD_FRAME
            self._send(identity, P.Error(P.request_rid(payload.bytes), code, str(exc)[:200]))
            return
        kind = type(msg)
        if kind is P.Hello:
            reply = self._hello(identity, payload, msg)
        elif kind is P.StatsReq:
            reply = P.StatsRep(msg.rid, self.snapshot())
            if self.connections is not None:  # a tool's connection: alive without Hello
                self.connections.seen(_source_fd(payload))
        else:
            reply = self._dispatch(identity, msg)
        if reply is not None:
            self._send(identity, reply)

    def _dispatch(self, identity: bytes, msg: Any) -> Any:
        try:
            c = self.registry.authenticate(identity, msg.client_id, msg.generation, self.clock())
        except Refused as r:
            code = P.ErrCode.STALE_GENERATION if r.stale else P.ErrCode.UNKNOWN_CLIENT
            return P.Error(msg.rid, code, r.message)
        if type(msg) is P.Bye:
            self._reclaim(c, "said goodbye")
            return P.Ok(msg.rid)
        try:
            return self.handlers.table[type(msg)](c, msg)
        except ClientError as exc:
            return P.Error(msg.rid, exc.code, exc.message)
        except Exception as exc:  # a bug: count it, answer, keep serving
            self.stats.inc("errors")
            name = type(msg).__name__
            throttle = self._error_logs.setdefault(name, Throttled(ERROR_LOG_EVERY_S))
            held = throttle.due()
            if held is not None:  # a client that found a bug cannot fill the log with it
                log.exception("handling %s failed%s", name, Throttled.note(held))
            return P.Error(msg.rid, P.ErrCode.INTERNAL, f"internal error: {exc}"[:200])

    def _hello(self, identity: bytes, payload: zmq.Frame, m: P.Hello) -> Any:
        if m.version != P.PROTOCOL_VERSION:
            self.stats.inc("bad_frames")
            return P.Error(m.rid, P.ErrCode.BAD_VERSION, f"protocol {m.version} not supported")
        if self._draining:
            return P.Error(m.rid, P.ErrCode.SHUTTING_DOWN, "agent is stopping")
        # See every close reported so far first: a reused fd must not carry an old
        # connection's close over to this client.
        self._drain_monitor()
        old = self.registry.on_connection(identity)
        if old is not None:
            self._reclaim(old, "registered again on its connection")
        if len(self.registry) >= self.cfg.agent.clients_max:
            return P.Error(m.rid, P.ErrCode.TOO_MANY_CLIENTS, "clients_max reached")
        fd = _source_fd(payload)
        peer = self.connections.peer(fd) if self.connections is not None else None
        if peer is not None:  # the kernel's word over the client's: pid in our namespace
            c = self.registry.register(
                identity, fd, m.name, peer.pid, self.registry.pid_ns, self.clock(), peer.seen_at
            )
        else:
            c = self.registry.register(identity, fd, m.name, m.pid, m.pid_ns, self.clock())
        log.info("client %x registered: %s pid %d", c.client_id, _printable(m.name), m.pid)
        assert self.segment is not None
        return P.Welcome(
            m.rid, c.client_id, self.segment.name, self.segment.size, self.cfg.arena.page_bytes,
            self.generation, self.cfg.agent.heartbeat_interval_s, self.index_segment,
            os.getpid(), self.registry.pid_ns,
        )  # fmt: skip

    def _send(self, identity: bytes, reply: Any) -> None:
        assert self.sock is not None
        try:
            self.sock.send(identity, _SNDMORE_NOBLOCK)
            self.sock.send(P.encode(reply), zmq.NOBLOCK)
        except zmq.ZMQError:
            self.stats.inc("errors")  # peer gone or its queue full: it will time out

    # ------------------------------------------------------------------ stats
    def snapshot(self) -> dict[str, Any]:
        if self.transfers is not None:  # jobs the copy threads handed back count now
            self.transfers.poll()
        out = snapshot(
            self.cache, self.registry, self.stats, str(self.runtime_dir), self._started_at
        )
        if self.published is not None:
            out["lookup_index"] = self.published.stats()
        if self.transfers is not None:
            out["transfers"] = self.transfers.stats(out["counters"])
        if self.connections is not None:
            out["connections"] = self.connections.stats_view()
        if self.fleet is not None:
            try:
                out.update(self.fleet.stats())
            except Exception:
                log.exception("fleet stats failed")
        return out

    # ------------------------------------------------------------------ reload
    def _reload(self) -> None:
        if self.fleet is not None:
            self._guard(self.fleet.reload)
        for hook in self.hooks_reload:
            try:
                for note in hook(self.cfg) or []:
                    log.warning("reload: %s", note)
            except Exception:
                log.exception("reload hook failed")

    # ------------------------------------------------------------------ tests
    def check_invariants(self) -> None:
        self.index.check()  # the lease and pin books included
        clients = set(self.registry.by_id) | {AGENT_OWNER}
        holders = set(self.index.holdings)
        if not holders <= clients:
            raise AssertionError("leases or pins held by a client that is gone")


_EVENTS, _POLLIN, _RCVMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.RCVMORE)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE) | int(zmq.NOBLOCK)


def _tier_writes(parts: Parts | None) -> dict[str, tuple[int, int]]:
    """Entries and bytes written so far, per lower tier (for the shutdown summary)."""
    tiers = parts.tiers if parts is not None else None
    if tiers is None:
        return {}
    try:
        return {n: (int(t.get("writes", 0)), int(t.get("write_bytes", 0)))
                for n, t in tiers.stats().items()}  # fmt: skip
    except Exception:
        return {}


def _stop_summary(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], clients: int,
    seconds: float,
) -> str:  # fmt: skip
    flushed = [
        f"{after[n][0] - before[n][0]} chunks ({format_size(after[n][1] - before[n][1])}) to {n}"
        for n in before
        if n in after
    ]
    what = "flushed " + ", ".join(flushed) if flushed else "no lower tier to flush"
    return f"stopped in {seconds:.2f}s: {what}; {clients} clients were registered"


def _source_fd(payload: zmq.Frame) -> int:
    """The agent's descriptor of the connection a message came on (-1: unknown)."""
    try:
        return int(payload.get(zmq.SRCFD))
    except (zmq.ZMQError, AttributeError, TypeError, ValueError):
        return -1


def _reseed_libc_rand() -> None:
    """Seed the C library's rand() from the kernel's generator (see ``_bind``)."""
    libc = ctypes.CDLL(None)
    libc.srand(ctypes.c_uint(int.from_bytes(os.urandom(4), "little")))


def _printable(name: str) -> str:
    """A client-chosen name, safe for one log line."""
    return "".join(ch if ch.isprintable() else "?" for ch in name)


def _safe(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        log.exception("hook %s failed", getattr(fn, "__name__", fn))


EXPIRED_LOG_CLIENTS_MAX = 8  # clients named per housekeeping pass for expired holds


def _log_expired(what: str, expired: list[tuple[int, bytes]]) -> None:
    """One line per client whose reservations (or pins) expired in this pass, naming
    the first key, and at most ``EXPIRED_LOG_CLIENTS_MAX`` such lines: a client holding
    thousands of keys it never commits is a few lines, not thousands."""
    by_owner: dict[int, list[bytes]] = {}
    for owner, key in expired:
        by_owner.setdefault(owner, []).append(key)
    for owner, keys in list(by_owner.items())[:EXPIRED_LOG_CLIENTS_MAX]:
        more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
        log.warning("%s of %s%s by client %x expired", what, keys[0].hex(), more, owner)
    if len(by_owner) > EXPIRED_LOG_CLIENTS_MAX:
        log.warning("%ss of %d more clients expired", what, len(by_owner) - EXPIRED_LOG_CLIENTS_MAX)
