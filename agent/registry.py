"""Registered clients: who they are, what they hold, and how the agent notices they
are gone.

Identity is bound to the connection (DESIGN.md "Identity"): a client is what said
``Hello`` on one ZeroMQ connection (its routing id) in one agent generation. Its id is
a random 63-bit number, valid only together with that routing id and generation; a
request that carries another generation is stale, any other mismatch is refused and
counted.

Liveness costs the loop O(1) per event, never O(clients) per tick:
- socket closed: the ROUTER's monitor reports the connection's fd, and the fd a client
  said ``Hello`` on (``zmq.SRCFD``) maps it back to the client;
- process exited (same pid namespace): a pidfd per client in one epoll set, which the
  loop polls with its sockets;
- silence: clients kept in last-seen order, so only the expired ones are looked at.
"""

from __future__ import annotations

import logging
import os
import secrets
import select
from collections import OrderedDict
from dataclasses import dataclass

from kvnode.agent.clients import Client
from kvnode.ipc.process import start_time_s

log = logging.getLogger("kvnode.agent")


class Refused(Exception):
    """A request whose identity does not check out. ``stale``: from an earlier
    generation (the client must register again); otherwise a forgery or a client
    the agent already dropped."""

    def __init__(self, message: str, stale: bool) -> None:
        super().__init__(message)
        self.message = message
        self.stale = stale


@dataclass(slots=True)
class RegistryCounters:
    refused_identity: int = 0  # valid id from another connection, or unknown id
    refused_stale: int = 0  # a generation other than ours
    pidfd_unavailable: int = 0  # liveness by socket and heartbeat only


class ClientRegistry:
    def __init__(self, generation: int, pid_ns: int) -> None:
        self.generation = generation
        self.pid_ns = pid_ns
        self.by_id: dict[int, Client] = {}
        self._by_identity: dict[bytes, Client] = {}
        self._by_fd: dict[int, Client] = {}
        self._by_pidfd: dict[int, Client] = {}
        self._last_seen: OrderedDict[int, None] = OrderedDict()
        self._epoll = select.epoll()
        self._dead_at_hello: list[Client] = []
        self.counters = RegistryCounters()

    def __len__(self) -> int:
        return len(self.by_id)

    def values(self) -> list[Client]:
        return list(self.by_id.values())

    def fileno(self) -> int:
        """Readable when a registered client's process has exited."""
        return self._epoll.fileno()

    # -- registration ------------------------------------------------------------------
    def register(
        self,
        identity: bytes,
        fd: int,
        name: str,
        pid: int,
        pid_ns: int,
        now: float,
        connected_at: float = 0.0,
    ) -> Client:
        """``connected_at``: a time (``boot_clock_s``) by which the process ``pid`` had
        made the connection (0: unknown). A process at ``pid`` that started later is another
        one (the pid was reused): the client counts as gone at once."""
        if identity in self._by_identity:
            raise RuntimeError("reclaim the connection's earlier client before registering")
        cid = self._new_id()
        c = Client(cid, name, pid, pid_ns, identity, now, connected_at)
        c.fd = fd
        self.by_id[cid] = c
        self._by_identity[identity] = c
        if fd >= 0:
            stale = self._by_fd.pop(fd, None)
            if stale is not None:
                # The fd was reused without us seeing the close (the monitor is drained
                # before every Hello, so only if its event was lost): that one's gone.
                self._dead_at_hello.append(stale)
            self._by_fd[fd] = c
        self._last_seen[cid] = None
        self._watch_process(c)
        return c

    def _new_id(self) -> int:
        while True:
            cid = secrets.randbits(63)
            if cid and cid not in self.by_id:
                return cid

    def _watch_process(self, c: Client) -> None:
        if not c.pid or not c.pid_ns or c.pid_ns != self.pid_ns:
            return  # another pid namespace: its socket and heartbeats tell
        try:
            pidfd = os.pidfd_open(c.pid)
        except (OSError, AttributeError) as exc:
            self.counters.pidfd_unavailable += 1
            if isinstance(exc, ProcessLookupError):
                self._dead_at_hello.append(c)  # no such process: reclaimed by exited()
            return  # otherwise (no descriptors left, no pidfds): socket and heartbeat

        # The pidfd names the process at that pid now. The one that connected had
        # started before the connection was seen; one started after is a reuse of the
        # pid, and the client's process is gone. (Read after pidfd_open: if this one
        # exits meanwhile, the pidfd reports it.)
        if c.connected_at and start_time_s(c.pid) > c.connected_at:
            os.close(pidfd)
            self._dead_at_hello.append(c)
            return
        c.pidfd = pidfd
        self._by_pidfd[pidfd] = c
        self._epoll.register(pidfd, select.EPOLLIN)

    # -- every request -------------------------------------------------------------------
    def authenticate(self, identity: bytes, client_id: int, generation: int, now: float) -> Client:
        c = self._by_identity.get(identity)
        if c is None or c.client_id != client_id:
            if generation != self.generation:
                self.counters.refused_stale += 1
                raise Refused(
                    f"stale generation {generation} (agent is {self.generation}): register again",
                    stale=True,
                )
            self.counters.refused_identity += 1
            raise Refused(f"client {client_id} is not registered on this connection", stale=False)
        if generation != self.generation:  # cannot happen for a client we issued
            self.counters.refused_stale += 1
            raise Refused("generation does not match this client's", stale=True)
        c.last_seen = now
        self._last_seen.move_to_end(client_id)
        return c

    # -- removal -------------------------------------------------------------------------
    def remove(self, c: Client) -> None:
        if self.by_id.pop(c.client_id, None) is None:
            return
        self._last_seen.pop(c.client_id, None)
        cid = c.client_id
        on_conn = self._by_identity.get(c.identity)
        if on_conn is not None and on_conn.client_id == cid:
            del self._by_identity[c.identity]
        on_fd = self._by_fd.get(c.fd)
        if on_fd is not None and on_fd.client_id == cid:
            del self._by_fd[c.fd]
        if c.pidfd >= 0:
            self._by_pidfd.pop(c.pidfd, None)
            try:
                self._epoll.unregister(c.pidfd)
            except OSError:
                pass
            os.close(c.pidfd)
            c.pidfd = -1

    def on_connection(self, identity: bytes) -> Client | None:
        return self._by_identity.get(identity)

    def disconnected(self, fd: int) -> Client | None:
        """The client whose connection was on ``fd``, now closed."""
        return self._by_fd.get(fd)

    def on_fd(self, fd: int) -> bool:
        """Whether a registered client's connection is on ``fd``."""
        return fd in self._by_fd

    def handles(self) -> int:
        """Descriptors the registry holds (one pidfd per watched client)."""
        return len(self._by_pidfd)

    def exited(self) -> list[Client]:
        """Clients whose process has exited: pidfd readable (a zombie counts: it has
        exited), or found dead when it registered."""
        out = [c for c in self._dead_at_hello if c.client_id in self.by_id]
        self._dead_at_hello.clear()
        try:
            events = self._epoll.poll(0)
        except InterruptedError:
            events = []
        for fd, _ in events:
            c = self._by_pidfd.get(fd)
            if c is not None and c not in out:
                out.append(c)
        return out

    def silent(self, now: float, timeout_s: float) -> list[Client]:
        """Clients not heard from for ``timeout_s``: only those are looked at."""
        out = []
        for cid in self._last_seen:
            c = self.by_id[cid]
            if now - c.last_seen <= timeout_s:
                break
            out.append(c)
        return out

    def close(self) -> None:
        for c in self.values():
            self.remove(c)
        self._epoll.close()
