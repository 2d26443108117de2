"""The agent's event loop: one thread owns the index and answers clients over a
ZeroMQ ROUTER socket. It moves no KV bytes on the local path: clients copy into and out
of the shared-memory arena; the agent only grants and tracks slots.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.utils.monitor

from kvnode import __version__
from kvnode.agent.clients import Client, own_pid_namespace, process_start_time
from kvnode.agent.config import Config
from kvnode.agent.index import AGENT_OWNER, Entry, Index, State
from kvnode.agent.stats import Stats
from kvnode.errors import ArenaError, ProtocolError
from kvnode.ipc import protocol as P
from kvnode.ipc.segment import Segment

log = logging.getLogger("kvnode.agent")

_RECV_BATCH_MAX = 256  # messages handled per wake-up before housekeeping runs
_POLL_MS_MAX = 100


class Agent:
    def __init__(self, cfg: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.runtime_dir = cfg.runtime_dir
        self.generation = int.from_bytes(os.urandom(6), "little") or 1
        self.stats = Stats()
        self.index = Index(
            cfg.arena.cpu_bytes,
            cfg.arena.page_bytes,
            cfg.arena.policy,
            clock=clock,
            reserve_ttl_s=cfg.arena.reserve_ttl_s,
        )
        self.clients: dict[int, Client] = {}
        self._next_client_id = 1
        self._pid_ns = own_pid_namespace()
        self._running = False
        self._draining = False
        self._started_at = time.time()
        self._lock_fd: int | None = None
        self.segment: Segment | None = None
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._next_client_check = 0.0
        self._next_lease_check = 0.0
        self._check_clients_now = False
        self.tiers: Any = None  # TierManager when a disk or S3 tier is configured
        self.hooks_ready: list[Callable[[], Any]] = []  # called once serving
        self.hooks_stopping: list[Callable[[], Any]] = []
        self.hooks_reload: list[Callable[[Config], list[str]]] = []
        self._reload_requested = False
        self._dispatch: dict[type, Callable[[bytes, Any], Any]] = {
            P.Hello: self._on_hello,
            P.Heartbeat: self._on_heartbeat,
            P.LookupReq: self._on_lookup,
            P.ReserveReq: self._on_reserve,
            P.CommitReq: self._on_commit,
            P.AbortReq: self._on_abort,
            P.PinReq: self._on_pin,
            P.ReleaseReq: self._on_release,
            P.DropReq: self._on_drop,
            P.StatsReq: self._on_stats,
            P.Bye: self._on_bye,
        }

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Take the runtime directory, clean what a crashed agent left, map the arena,
        bind the socket. After this returns the agent can serve."""
        cfg = self.cfg
        self._prepare_runtime_dir()
        t0 = time.perf_counter()
        self.segment = Segment.create(
            cfg.segment_name,
            self.index.alloc.pages_total * cfg.arena.page_bytes,
            group=cfg.agent.group,
            prefault=cfg.arena.prefault,
            hugepages=cfg.arena.hugepages,
        )
        log.info(
            "arena %s mapped: %d bytes in %d pages of %d (%.2fs)",
            self.segment.name,
            self.segment.size,
            self.index.alloc.pages_total,
            cfg.arena.page_bytes,
            time.perf_counter() - t0,
        )
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.agent.request_bytes_max)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 10000)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        old_umask = os.umask(0o117 if cfg.agent.group else 0o177)
        try:
            sock.bind(cfg.endpoint)
        except zmq.ZMQError as exc:
            raise ArenaError(f"cannot bind {cfg.endpoint}: {exc}") from exc
        finally:
            os.umask(old_umask)
        if cfg.agent.group:
            self._chgrp(cfg.socket_path)
        self.sock = sock
        if cfg.disk.path or cfg.s3.bucket:
            self._start_tiers()
        self._running = True
        log.info("serving on %s (generation %x)", cfg.endpoint, self.generation)

    def _start_tiers(self) -> None:
        from kvnode.agent.tiers.manager import TierManager

        self.tiers = TierManager(self.cfg, arena=self.segment, index=self.index, wake=self.wake)
        self._headroom_pages = int(self.index.alloc.pages_total * self.cfg.arena.headroom_share)
        self.index.on_evict = self.tiers.on_evict

    def _prepare_runtime_dir(self) -> None:
        d = self.runtime_dir
        try:
            d.mkdir(mode=0o750 if self.cfg.agent.group else 0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ArenaError(f"cannot create runtime directory {d}: {exc}") from exc
        if self.cfg.agent.group:
            self._chgrp(d)
        lock_path = d / "agent.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise ArenaError(f"another agent is serving {d} (lock {lock_path} held)") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        # We hold the lock, so whatever is left here belongs to a dead agent.
        if self.cfg.socket_path.exists():
            log.warning("removing stale socket %s left by a previous agent", self.cfg.socket_path)
            self.cfg.socket_path.unlink()

    def _chgrp(self, path: Path) -> None:
        from kvnode.ipc.segment import group_id

        try:
            os.chown(path, -1, group_id(self.cfg.agent.group))
        except (KeyError, OSError) as exc:
            raise ArenaError(
                f"cannot grant group {self.cfg.agent.group!r} access to {path}: {exc}"
            ) from exc

    def wake(self) -> None:
        """Wake the loop from another thread or a signal handler."""
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # pipe full: the loop is already due to wake

    def request_stop(self, *_: Any) -> None:
        self._running = False
        self.wake()

    def request_reload(self, *_: Any) -> None:
        self._reload_requested = True
        self.wake()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    def close(self) -> None:
        """Stop: flush bounded write-back queues within the deadline, then unlink."""
        self._running = False
        self._draining = True
        for hook in self.hooks_stopping:
            _safe(hook)
        if self.tiers is not None:
            try:
                self.tiers.flush(self.cfg.agent.shutdown_flush_s)
            except Exception:
                log.exception("flushing lower tiers failed")
            _safe(self.tiers.close)
        if self.sock is not None:
            self.sock.disable_monitor()
            self.sock.close(0)
            self.sock = None
        if self._monitor is not None:
            self._monitor.close(0)
            self._monitor = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        if self._lock_fd is not None:  # only the agent holding the lock owns these
            try:
                self.cfg.socket_path.unlink()
            except FileNotFoundError:
                pass
        if self.segment is not None:
            self.segment.unlink()
            self.segment.close()
            self.segment = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        log.info("stopped")

    # ------------------------------------------------------------------ loop
    def serve_forever(self) -> None:
        assert self.sock is not None and self._monitor is not None
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        for hook in self.hooks_ready:
            _safe(hook)
        while self._running:
            try:
                events = dict(poller.poll(self._poll_timeout_ms()))
            except zmq.ZMQError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if self.sock in events:
                self._drain_socket()
            if self._monitor in events:
                self._drain_monitor()
            if self._wake_r in events:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            self._housekeeping()

    def _poll_timeout_ms(self) -> int:
        if self.tiers is not None and self.tiers_busy():
            return 5
        return _POLL_MS_MAX

    def tiers_busy(self) -> bool:
        busy = getattr(self.tiers, "busy", None)
        return bool(busy()) if callable(busy) else False

    def _drain_socket(self) -> None:
        sock = self.sock
        assert sock is not None
        for _ in range(_RECV_BATCH_MAX):
            # EVENTS is cheaper than a recv that raises Again once the queue is empty.
            if not int(sock.get(zmq.EVENTS)) & zmq.POLLIN:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._handle(frames)

    def _drain_monitor(self) -> None:
        assert self._monitor is not None
        while True:
            try:
                zmq.utils.monitor.recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            except Exception:  # a monitor frame we cannot parse: still check clients
                break
            self._check_clients_now = True

    def _housekeeping(self) -> None:
        now = self.clock()
        if self.tiers is not None:
            try:
                self.tiers.poll()
            except Exception:
                self.stats.inc("errors")
                log.exception("tier manager poll failed")
            # Keep headroom free ahead of stores, so write-back has time to copy victims
            # out instead of the store path dropping them unsaved.
            self.index.evict_pages(self._headroom_pages, must_free=False)
        if self._check_clients_now or now >= self._next_client_check:
            self._check_clients_now = False
            self._next_client_check = now + self.cfg.agent.client_check_interval_s
            self._check_clients(now)
        if now >= self._next_lease_check:
            self._next_lease_check = now + 1.0
            for e in self.index.expire_leases():
                owner = self.clients.get(e.owner)
                if owner is not None:
                    owner.leases.discard(e.key)
                self.stats.inc("expired_leases")
                log.warning("reservation of %s by client %d expired", e.key.hex(), e.owner)

    def _check_clients(self, now: float) -> None:
        timeout = self.cfg.agent.heartbeat_timeout_s
        for c in list(self.clients.values()):
            alive = c.process_alive(self._pid_ns)
            if alive is False:
                self._reclaim(c, "process exited")
            elif now - c.last_seen > timeout:
                self._reclaim(c, f"no heartbeat for {now - c.last_seen:.1f}s")

    def _reclaim(self, c: Client, why: str) -> None:
        leases, pins = self.index.release_owner(c.client_id, c.leases, c.pins)
        self.clients.pop(c.client_id, None)
        self.stats.inc("reclaimed_clients")
        self.stats.inc("reclaimed_leases", leases)
        self.stats.inc("reclaimed_pins", pins)
        log.info(
            "client %d (%s, pid %d) gone: %s; reclaimed %d reservations, %d pins",
            c.client_id, c.name, c.pid, why, leases, pins,
        )  # fmt: skip

    # ------------------------------------------------------------------ messages
    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.stats.inc("bad_frames")
            if frames and len(frames) > 2:
                self._send(frames[0], P.Error(0, P.ErrCode.BAD_FRAME, "expected one frame"))
            return
        identity, payload = frames
        try:
            msg = P.decode_request(payload)
        except ProtocolError as exc:
            self.stats.inc("bad_frames")
            code = P.ErrCode.BAD_VERSION if "version" in str(exc) else P.ErrCode.BAD_FRAME
            self._send(identity, P.Error(P.request_rid(payload), code, str(exc)[:200]))
            return
        handler = self._dispatch[type(msg)]
        try:
            reply = handler(identity, msg)
        except _ClientError as exc:
            reply = P.Error(msg.rid, exc.code, exc.message)
        except Exception as exc:  # a bug: count it, answer, keep serving
            self.stats.inc("errors")
            log.exception("handling %s failed", type(msg).__name__)
            reply = P.Error(msg.rid, P.ErrCode.INTERNAL, f"internal error: {exc}"[:200])
        if reply is not None:
            self._send(identity, reply)

    def _send(self, identity: bytes, reply: Any) -> None:
        assert self.sock is not None
        try:
            self.sock.send_multipart([identity, P.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.stats.inc("errors")  # peer gone or its queue full: it will time out

    def _client(self, client_id: int, nkeys: int = 0) -> Client:
        c = self.clients.get(client_id)
        if c is None:
            raise _ClientError(P.ErrCode.UNKNOWN_CLIENT, f"unknown client {client_id}")
        if nkeys > self.cfg.agent.batch_keys_max:
            raise _ClientError(P.ErrCode.TOO_MANY_KEYS, f"{nkeys} keys > batch_keys_max")
        c.last_seen = self.clock()
        return c

    def _on_hello(self, identity: bytes, m: P.Hello) -> Any:
        if m.version != P.PROTOCOL_VERSION:
            self.stats.inc("bad_frames")
            return P.Error(m.rid, P.ErrCode.BAD_VERSION, f"protocol {m.version} not supported")
        if self._draining:
            return P.Error(m.rid, P.ErrCode.SHUTTING_DOWN, "agent is stopping")
        if len(self.clients) >= self.cfg.agent.clients_max:
            return P.Error(m.rid, P.ErrCode.TOO_MANY_CLIENTS, "clients_max reached")
        cid = self._next_client_id
        self._next_client_id += 1
        self.clients[cid] = Client(
            cid, m.name[:64], m.pid, m.pid_ns, identity, self.clock(), process_start_time(m.pid)
        )
        log.info("client %d registered: %s pid %d", cid, m.name[:64], m.pid)
        assert self.segment is not None
        return P.Welcome(
            m.rid, cid, self.segment.name, self.segment.size, self.cfg.arena.page_bytes,
            self.generation, self.cfg.agent.heartbeat_interval_s,
        )  # fmt: skip

    def _on_heartbeat(self, identity: bytes, m: P.Heartbeat) -> Any:
        self._client(m.client_id)
        return P.Ok(m.rid)

    def _on_bye(self, identity: bytes, m: P.Bye) -> Any:
        c = self.clients.get(m.client_id)
        if c is not None:
            self._reclaim(c, "said goodbye")
        return P.Ok(m.rid)

    def _on_lookup(self, identity: bytes, m: P.LookupReq) -> Any:
        t0 = time.perf_counter()
        self._client(m.client_id, len(m.keys))
        states: list[int] = []
        hits = pending = 0
        for key in m.keys:
            if self.index.lookup(key) is not None:
                states.append(P.Lookup.HIT)
                hits += 1
            elif self.tiers is not None and m.promote and self._lower_tier_has(key):
                states.append(P.Lookup.PENDING)
                pending += 1
            else:
                states.append(P.Lookup.MISS)
        st = self.stats
        st.inc("lookups")
        st.inc("lookup_keys", len(m.keys))
        st.inc("hits", hits)
        st.inc("pending", pending)
        st.inc("misses", len(m.keys) - hits - pending)
        st.observe("lookup", time.perf_counter() - t0)
        return P.LookupRep(m.rid, states)

    def _lower_tier_has(self, key: bytes) -> bool:
        try:
            return bool(self.tiers.on_lookup_miss(key))
        except Exception:
            self.stats.inc("errors")
            log.exception("lower-tier lookup failed")
            return False

    def _on_reserve(self, identity: bytes, m: P.ReserveReq) -> Any:
        t0 = time.perf_counter()
        c = self._client(m.client_id, len(m.keys))
        if len(m.sizes) != len(m.keys):
            raise _ClientError(P.ErrCode.BAD_FRAME, "keys and sizes differ in length")
        status: list[int] = []
        slots: list[P.Slot | None] = []
        pb = self.cfg.arena.page_bytes
        for key, size in zip(m.keys, m.sizes):
            st, e = self.index.reserve(key, size, c.client_id)
            status.append(st)
            if e is None:
                slots.append(None)
                if st != P.Status.EXISTS:
                    self.stats.inc("reserve_failed")
            else:
                c.leases.add(key)
                slots.append(P.Slot(e.size, e.extents(pb)))
        self.stats.inc("reserves")
        self.stats.inc("reserve_keys", len(m.keys))
        self.stats.counters["evictions"] = self.index.counters.evictions
        self.stats.observe("reserve", time.perf_counter() - t0)
        return P.SlotsRep(m.rid, status, slots)

    def _on_commit(self, identity: bytes, m: P.CommitReq) -> Any:
        t0 = time.perf_counter()
        c = self._client(m.client_id, len(m.keys))
        sums = m.checksums if len(m.checksums) == len(m.keys) else [0] * len(m.keys)
        out: list[int] = []
        for key, csum in zip(m.keys, sums):
            st = self.index.commit(key, c.client_id, csum)
            out.append(st)
            if st == P.Status.OK:
                c.leases.discard(key)
                e = self.index.entries[key]
                self.stats.inc("commits")
                self.stats.inc("bytes_in", e.size)
                if self.tiers is not None:
                    self._tier_commit_hook(e)
        self.stats.observe("commit", time.perf_counter() - t0)
        return P.StatusRep(m.rid, out)

    def _tier_commit_hook(self, e: Entry) -> None:
        try:
            self.tiers.on_commit(e.key, self._slot(e))
        except Exception:
            self.stats.inc("errors")
            log.exception("write-through hook failed")

    def _slot(self, e: Entry) -> P.Slot:
        return P.Slot(e.size, e.extents(self.cfg.arena.page_bytes), e.checksum)

    def _on_abort(self, identity: bytes, m: P.AbortReq) -> Any:
        c = self._client(m.client_id, len(m.keys))
        for key in m.keys:
            if self.index.abort(key, c.client_id):
                c.leases.discard(key)
                self.stats.inc("aborts")
        return P.Ok(m.rid)

    def _on_pin(self, identity: bytes, m: P.PinReq) -> Any:
        t0 = time.perf_counter()
        c = self._client(m.client_id, len(m.keys))
        status: list[int] = []
        slots: list[P.Slot | None] = []
        for key in m.keys:
            e = self.index.pin(key)
            if e is None:
                status.append(P.Status.NOT_FOUND)
                slots.append(None)
                self.stats.inc("pin_misses")
                continue
            c.pins[key] += 1
            status.append(P.Status.OK)
            slots.append(self._slot(e))
            self.stats.inc("bytes_out", e.size)
        self.stats.inc("pins")
        self.stats.observe("pin", time.perf_counter() - t0)
        return P.SlotsRep(m.rid, status, slots)

    def _on_release(self, identity: bytes, m: P.ReleaseReq) -> Any:
        t0 = time.perf_counter()
        c = self._client(m.client_id, len(m.keys))
        for key in m.keys:
            if c.pins.get(key, 0) > 0:
                c.pins[key] -= 1
                if not c.pins[key]:
                    del c.pins[key]
                self.index.unpin(key)
        self.stats.inc("releases")
        self.stats.observe("release", time.perf_counter() - t0)
        return P.Ok(m.rid)

    def _on_drop(self, identity: bytes, m: P.DropReq) -> Any:
        self._client(m.client_id, len(m.keys))
        for key in m.keys:
            if self.index.drop(key):
                self.stats.inc("drops")
            if self.tiers is not None:
                try:
                    self.tiers.drop(key)
                except Exception:
                    self.stats.inc("errors")
                    log.exception("dropping %s from lower tiers failed", key.hex())
        return P.Ok(m.rid)

    def _on_stats(self, identity: bytes, m: P.StatsReq) -> Any:
        return P.StatsRep(m.rid, self.snapshot())

    # ------------------------------------------------------------------ stats
    def snapshot(self) -> dict[str, Any]:
        idx = self.index
        self.stats.counters["evictions"] = idx.counters.evictions
        self.stats.counters["evict_unsaved"] = idx.counters.evict_unsaved
        pb = self.cfg.arena.page_bytes
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
        counters = dict(self.stats.counters)
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
        if self.tiers is not None:
            try:
                tiers.update(self.tiers.stats())
            except Exception:
                log.exception("tier stats failed")
        return {
            "version": __version__,
            "pid": os.getpid(),
            "generation": self.generation,
            "uptime_s": round(time.time() - self._started_at, 3),
            "runtime_dir": str(self.runtime_dir),
            "clients": len(self.clients),
            "arena": arena,
            "counters": counters,
            "latency_us": self.stats.latency_summary(),
            "tiers": tiers,
        }

    # ------------------------------------------------------------------ reload
    def _reload(self) -> None:
        for hook in self.hooks_reload:
            try:
                for note in hook(self.cfg) or []:
                    log.warning("reload: %s", note)
            except Exception:
                log.exception("reload hook failed")

    # ------------------------------------------------------------------ tests
    def check_invariants(self) -> None:
        self.index.check()
        leased = {k for c in self.clients.values() for k in c.leases}
        reserved = {
            k
            for k, e in self.index.entries.items()
            if e.state is State.RESERVED and e.owner != AGENT_OWNER
        }
        if leased != reserved:
            raise AssertionError("client leases and reserved entries disagree")


class _ClientError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _safe(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        log.exception("hook %s failed", getattr(fn, "__name__", fn))
