"""The local socket's connections: how many, how fast, how long without a ``Hello``.

libzmq accepts every connection on its own I/O thread and aborts the process when an
``accept`` fails for want of file descriptors (``ipc_listener.cpp``), so a process that
opens connections and never says anything could stop the agent. This module keeps the
agent's descriptors in budget instead:

- it listens on a Unix socket it creates itself and hands libzmq (``ZMQ_USE_FD``), so
  it can stop libzmq accepting and let it start again (``_pause``) without closing
  the connections libzmq has, and refuse connections itself meanwhile;
- it closes a process's connections past ``agent.connections_per_process_max`` at
  once (the process as the kernel names it, ``SO_PEERCRED``);
- it counts open connections from the socket monitor (accepted, disconnected) and
  stops listening while they reach ``agent.connections_max``, while accepts in the
  current second pass ``agent.connections_per_s_max``, or while the descriptors in use
  come within a reserve of the soft ``RLIMIT_NOFILE`` (half of it, at least 256: the
  I/O thread accepts on its own until the loop stops it);
- a connection with no registered client that has sent nothing for
  ``agent.hello_timeout_s`` is shut down (only such idle ones: libzmq tears those down
  cleanly), and libzmq itself drops connections that have not finished the ZeroMQ
  handshake after ``HANDSHAKE_IVL_MS``.
Connections closed this way count in ``refused_connections``, each stop of the
listener in ``listener_pauses``. Clients of a paused listener see the agent as
unavailable (their connect is refused) and vLLM recomputes; the listener resumes once
every number is below ``RESUME_SHARE`` of its bound.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.utils.monitor

from kvnode.agent.config import Config
from kvnode.agent.runtime import chgrp
from kvnode.agent.stats import Stats
from kvnode.errors import ArenaError
from kvnode.ipc.process import boot_clock_s

log = logging.getLogger("kvnode.agent")

HANDSHAKE_IVL_MS = 2000  # a connection that has not finished the ZMTP greeting by then
FD_RESERVE_MIN = 256  # descriptors kept free below the soft limit, at least
FD_RESERVE_SHARE = 2  # ... and half of it: libzmq accepts on its own thread until the
# loop has read the monitor, so a burst of connections overshoots the budget
LISTEN_BACKLOG = 128
RESUME_SHARE = 0.9  # a paused listener resumes below this share of every bound
FD_COUNT_INTERVAL_S = 1.0  # how often the descriptors in use are counted afresh
_MONITOR_ADDR = "inproc://kvnode-agent-monitor"


def fd_budget(soft: int) -> int:
    """Descriptors the agent lets connections and process handles use at most."""
    return soft - max(FD_RESERVE_MIN, soft // FD_RESERVE_SHARE)


def _soft_fd_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


def _fds_open() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int  # the connecting process, in the agent's pid namespace
    seen_at: float  # when the agent learnt of the connection (``boot_clock_s``)


class Connections:
    """Owns the ROUTER's listening socket and its monitor; the loop calls ``drain``
    when the monitor is readable, ``seen`` for requests from unregistered connections
    and ``tick`` from housekeeping."""

    def __init__(
        self,
        cfg: Config,
        ctx: zmq.Context,
        sock: zmq.Socket,
        stats: Stats,
        clock: Callable[[], float],
        handles: Callable[[], int],
    ) -> None:
        self.cfg = cfg
        self.sock = sock
        self.stats = stats
        self.clock = clock
        self._handles = handles  # descriptors the agent holds per client (pidfds)
        self.open: dict[int, float] = {}  # fd -> last sign of life, unregistered or not
        self.peers: dict[int, Peer] = {}  # fd -> who connected, when the kernel knew
        self._per_pid: dict[int, int] = {}  # connections open per connecting process
        self.listening = False
        self.refusing_fd = -1  # while paused: the real listener, which the loop drains
        self._real: socket.socket | None = None
        self._listen_fd = -1
        self._window_s = 0.0  # start of the current one-second window
        self._window_accepts = 0
        self._others = _fds_open()  # descriptors that are neither connections nor handles
        self._next_count_s = 0.0
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
        sock.monitor(_MONITOR_ADDR, events)
        mon = ctx.socket(zmq.PAIR)
        mon.setsockopt(zmq.RCVHWM, 0)  # no monitor event may be dropped: counts rely on them
        mon.setsockopt(zmq.LINGER, 0)
        mon.connect(_MONITOR_ADDR)
        self.monitor = mon
        self._listen()

    # ------------------------------------------------------------------ listening
    def _listen(self) -> None:
        """Bind a fresh Unix socket at the endpoint's path and hand it to libzmq."""
        cfg = self.cfg
        path = Path(cfg.socket_path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o117 if cfg.agent.group else 0o177)
        try:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            s.bind(str(path))
            s.listen(LISTEN_BACKLOG)
        except OSError as exc:
            s.close()
            raise ArenaError(f"cannot bind {cfg.endpoint}: {exc}") from exc
        finally:
            os.umask(old_umask)
        if cfg.agent.group:
            chgrp(path, cfg.agent.group)
        self._listen_fd = s.detach()
        self.sock.setsockopt(zmq.USE_FD, self._listen_fd)  # libzmq closes it at the end
        try:
            self.sock.bind(cfg.endpoint)
        except zmq.ZMQError as exc:
            os.close(self._listen_fd)
            raise ArenaError(f"cannot bind {cfg.endpoint}: {exc}") from exc
        self.listening = True

    def _pause(self, why: str) -> None:
        """Stop libzmq accepting without touching the connections it has (unbinding
        would close them all): the listener's descriptor number is pointed at an empty
        listening socket, where libzmq's accept finds nothing (EAGAIN, which it takes
        in its stride), and the loop takes the real one's connections and closes them
        (``refusing_fd``, ``refuse_pending``)."""
        if not self.listening:
            return
        dummy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            dummy.setblocking(False)
            dummy.bind("")  # an autobound abstract name, unknown to anyone
            dummy.listen(1)
            real = socket.socket(fileno=os.dup(self._listen_fd))  # keeps the real one open
        except OSError as exc:
            dummy.close()
            log.error("cannot stop accepting on %s: %s", self.cfg.endpoint, exc)
            return
        try:
            real.setblocking(False)
            os.dup2(dummy.fileno(), self._listen_fd)
        except OSError as exc:
            real.close()
            log.error("cannot stop accepting on %s: %s", self.cfg.endpoint, exc)
            return
        finally:
            dummy.close()
        self._real = real
        self.refusing_fd = real.fileno()
        self.listening = False
        self.stats.inc("listener_pauses")
        log.warning("not accepting connections for now: %s", why)

    def _resume(self) -> None:
        real, self._real = self._real, None
        assert real is not None
        os.dup2(real.fileno(), self._listen_fd)  # libzmq's descriptor is the real one again
        real.close()
        self.refusing_fd = -1
        self.listening = True
        log.info("accepting connections again (%d open)", len(self.open))

    def refuse_pending(self) -> None:
        """While paused: take the connections waiting on the real listener and close
        them (counted), so libzmq's poll of it goes quiet."""
        real = self._real
        if real is None:
            return
        for _ in range(LISTEN_BACKLOG * 2):
            try:
                conn, _ = real.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("cannot refuse a connection: %s", exc)
                return
            conn.close()
            self.stats.inc("refused_connections")

    # ------------------------------------------------------------------ accounting
    def drain(self, on_closed: Callable[[int], None]) -> None:
        """Read the monitor; ``on_closed(fd)`` for each connection that closed."""
        while True:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                ev = zmq.utils.monitor.parse_monitor_message(frames)
                fd = int(ev["value"])
            except Exception:
                continue
            if ev["event"] == zmq.EVENT_ACCEPTED:
                self._accepted(fd)
                if self.listening and self._over():
                    self.check()  # at once: the I/O thread accepts while this drains
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                self._closed(fd)
                on_closed(fd)
        self.check()

    def _accepted(self, fd: int) -> None:
        now = self.clock()
        self.open[fd] = now
        if now - self._window_s >= 1.0:
            self._window_s, self._window_accepts = now, 0
        self._window_accepts += 1
        pid = self._peer_pid(fd)
        if pid <= 0:
            return
        self.peers[fd] = Peer(pid, boot_clock_s())
        n = self._per_pid[pid] = self._per_pid.get(pid, 0) + 1
        if n > self.cfg.agent.connections_per_process_max and self._shut(fd):
            self.stats.inc("refused_connections")  # its close comes from the monitor

    def _closed(self, fd: int) -> None:
        self.open.pop(fd, None)
        peer = self.peers.pop(fd, None)
        if peer is not None:
            n = self._per_pid[peer.pid] - 1
            if n:
                self._per_pid[peer.pid] = n
            else:
                del self._per_pid[peer.pid]

    def peer(self, fd: int) -> Peer | None:
        """Who connected on ``fd``, as the kernel says (``SO_PEERCRED``): the pid in the
        agent's pid namespace, and when the agent saw the connection."""
        return self.peers.get(fd)

    def _peer_pid(self, fd: int) -> int:
        s = self._ours(fd)
        if s is None:
            return 0
        try:
            pid, _uid, _gid = struct.unpack(
                "3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            )
            return int(pid)
        except OSError:
            return 0
        finally:
            s.close()

    def _ours(self, fd: int) -> socket.socket | None:
        """A duplicate of ``fd`` if it is a connection to our socket (not a descriptor
        reused meanwhile for something else); the caller closes it."""
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            return None
        try:
            if s.family == socket.AF_UNIX and s.getsockname() == str(self.cfg.socket_path):
                return s
        except OSError:
            pass
        s.close()
        return None

    def seen(self, fd: int) -> None:
        """A request came on ``fd`` from a connection with no registered client."""
        if fd in self.open:
            self.open[fd] = self.clock()

    def in_use(self) -> int:
        """Descriptors in use, estimated: others + connections + per-client handles."""
        return self._others + len(self.open) + self._handles()

    def _over(self, share: float = 1.0) -> str:
        """Why the listener must not accept now ("" when it may), against ``share`` of
        each bound (below 1 to resume: the bounds then have room for a burst)."""
        a = self.cfg.agent
        if len(self.open) >= a.connections_max * share:
            return f"{len(self.open)} connections open (agent.connections_max)"
        if self._window_accepts >= a.connections_per_s_max and self.clock() - self._window_s < 1:
            return f"{self._window_accepts} connections this second (agent.connections_per_s_max)"
        budget = fd_budget(_soft_fd_limit())  # one system call: it may change from outside
        if self.in_use() >= budget * share:
            return f"{self.in_use()} descriptors in use, {budget} allowed (open-file limit)"
        return ""

    def check(self) -> None:
        """Pause or resume the listener as the bounds say."""
        if self.listening:
            why = self._over()
            if why:
                self._pause(why)
        elif not self._over(RESUME_SHARE):
            self._resume()

    def tick(self, registered: Callable[[int], bool]) -> None:
        """Housekeeping: recount descriptors now and then, close connections silent
        for ``agent.hello_timeout_s`` without a registered client, pause or resume."""
        now = self.clock()
        if now >= self._next_count_s:
            self._next_count_s = now + FD_COUNT_INTERVAL_S
            self._others = max(0, _fds_open() - len(self.open) - self._handles())
        limit = now - self.cfg.agent.hello_timeout_s
        idle = [fd for fd, t in self.open.items() if t < limit and not registered(fd)]
        for fd in idle:
            if self._shut(fd):
                self.stats.inc("refused_connections")
            self.open[fd] = now  # once: its close is reported by the monitor
        self.check()

    def _shut(self, fd: int) -> bool:
        """Shut the connection on ``fd`` down (libzmq then closes it and the monitor
        reports it), if ``fd`` still is a connection to our socket."""
        s = self._ours(fd)
        if s is None:
            return False
        try:
            s.shutdown(socket.SHUT_RDWR)
            return True
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                log.warning("cannot close connection %d: %s", fd, exc)
            return False
        finally:
            s.close()

    def stats_view(self) -> dict[str, int]:
        budget = fd_budget(_soft_fd_limit())
        return {
            "open": len(self.open),
            "listening": int(self.listening),
            "fds_in_use": self.in_use(),
            "fds_budget": budget,
        }

    def close(self) -> None:
        if not self.listening:
            self._resume()  # libzmq closes its listener, the real one
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
