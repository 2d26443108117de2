"""Client library for the agent: used by the vLLM connector, tools and benchmarks.

Control calls go over a ZeroMQ DEALER socket; bytes go through the mapped arena.
Every call has a timeout. An absent agent raises ``AgentUnavailable``; the next call
tries to connect again (rate-limited by ``retry_interval_s``), so a restarted agent is
picked up without restarting the caller.

The client is the one owner of the arena mapping: it maps the segment a ``Welcome``
names, and on a generation change it calls ``on_unmap(old_buffer)`` before it unmaps
the old segment and ``on_map(new_buffer)`` after it maps the new one, before any call
of the new generation returns. Whoever registers the arena (e.g. ``cudaHostRegister``)
does it in those hooks and nowhere else. Heartbeats go over the request socket (the
agent binds a client to its connection), without waiting for the reply; an idle client
that hears "stale generation" registers again at once.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq

from kvnode.errors import (
    AgentError,
    AgentUnavailable,
    ArenaError,
    ChecksumError,
    ClientUnknown,
    ProtocolError,
)
from kvnode.ipc import protocol as P
from kvnode.ipc.checksum import checksum
from kvnode.ipc.process import lock_owner, pid_namespace
from kvnode.ipc.protocol import Lookup, Slot, Status
from kvnode.ipc.segment import Segment

log = logging.getLogger("kvnode.client")

# Error replies after which the client registers again (and remaps) before retrying.
_REREGISTER = (P.ErrCode.UNKNOWN_CLIENT, P.ErrCode.STALE_GENERATION)
_ROUTING_ID_PREFIX = b"k"  # any first byte but 0, which libzmq keeps for its own ids
_POSTED_MAX = 1024  # calls sent without waiting whose reply is still to be read
_STATUS = tuple(Status)  # wire value -> Status without an enum call per key
# A receive waits this long at a time, then asks whether the agent it registered
# with has exited (its pidfd): a call that agent took and never answered (it was
# killed) fails at once instead of at its timeout. Never felt by a call answered in time.
_EXIT_CHECK_MS = 100

__all__ = ["AgentClient", "Lookup", "Slot", "Status", "checksum", "default_runtime_dir"]


def default_runtime_dir() -> Path:
    """Where the agent listens: $KVNODE_AGENT_RUNTIME_DIR, else the agent's default."""
    env = os.environ.get("KVNODE_AGENT_RUNTIME_DIR")
    if env:
        return Path(env)
    from kvnode.agent.config import _default_runtime_dir

    return Path(_default_runtime_dir())


class AgentClient:
    def __init__(
        self,
        runtime_dir: str | Path | None = None,
        name: str = "client",
        timeout_s: float = 1.0,
        retry_interval_s: float = 0.5,
        heartbeat: bool = True,
        on_map: Callable[[Any], None] | None = None,
        on_unmap: Callable[[Any], None] | None = None,
    ) -> None:
        self.runtime_dir = Path(runtime_dir) if runtime_dir else default_runtime_dir()
        self.endpoint = f"ipc://{self.runtime_dir / 'agent.sock'}"
        self.name = name
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self._heartbeat_enabled = heartbeat
        self._lock = threading.RLock()
        self._ctx: zmq.Context = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._rcvtimeo = -2
        self._rid = itertools.count(1)
        self._client_id = 0
        self._generation = 0
        self._segment: Segment | None = None
        self._heartbeat_interval_s = 1.0
        self._index_segment = ""
        self._agent_pid = 0
        self._agent_pid_ns = 0
        self._agent_pidfd = -1  # the registered agent's, where it is in our pid namespace
        self._watched_pid = 0  # the pid that pidfd is of
        self._exit_poll: Any = None  # a poll object on that pidfd (made once per watch)
        self._next_retry = 0.0
        self._closed = False
        self._hb_thread: threading.Thread | None = None
        self._hb_stop = threading.Event()
        # rid -> what was sent, for calls whose reply is read later (heartbeats, and
        # release/abort/drop with wait=False): any later receive absorbs those replies.
        self._posted: dict[int, tuple[str, Callable[[Any], None] | None]] = {}
        self._stale_seen = False  # a posted call was answered "register again"
        self.posted_errors = 0  # posted calls the agent answered with an error
        self._on_map = on_map
        self._on_unmap = on_unmap
        self.remaps = 0  # arena mappings after the first (agent restarts seen)

    # ------------------------------------------------------------------ connection
    @property
    def connected(self) -> bool:
        return self._client_id != 0

    @property
    def client_id(self) -> int:
        return self._client_id

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def buffer(self) -> Any:
        """The mapped arena (an mmap): wrap with numpy/torch ``frombuffer``."""
        with self._lock:
            self._ensure()
            assert self._segment is not None
            return self._segment.buffer

    @property
    def index_segment(self) -> str:
        """The agent's shared lookup index ("" when it publishes none)."""
        self._ensure()
        return self._index_segment

    @property
    def agent_pid(self) -> tuple[int, int]:
        """The agent's (pid, pid namespace inode) as it said in its Welcome."""
        self._ensure()
        return self._agent_pid, self._agent_pid_ns

    @property
    def page_bytes(self) -> int:
        self._ensure()
        return self._page_bytes

    def connect(self) -> None:
        """Register with the agent now; AgentUnavailable if none answers in time.
        Registered already with an agent that has exited since (a restart no call has
        run into yet), it registers with the next: what the dead one's Welcome said
        (its pid, its generation) is of no use to a caller that asks for it now."""
        with self._lock:
            self._next_retry = 0.0
            if self._client_id and self._agent_exited():
                self._lost()
            self._ensure()

    def _new_socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        # Our own routing id, unguessable and never of the "\0" + counter form the
        # agent's socket generates: a process holding generated-looking ids cannot
        # make this connection collide with one (which would abort the agent).
        sock.setsockopt(zmq.ROUTING_ID, _ROUTING_ID_PREFIX + os.urandom(15))
        sock.connect(self.endpoint)
        return sock

    def _reset_socket(self) -> None:
        self._rcvtimeo = -2  # unknown: set before the next receive
        posted, self._posted = self._posted, {}  # their replies went with the socket
        for _kind, on_reply in posted.values():
            if on_reply is not None:
                _notify(on_reply, None)  # no answer will come
        self._stale_seen = False
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def _ensure(self) -> None:
        if self._closed:
            raise AgentUnavailable("client is closed")
        if self._client_id:
            return
        now = time.monotonic()
        if now < self._next_retry:
            raise AgentUnavailable(f"no agent at {self.endpoint} (retrying later)")
        self._next_retry = now + self.retry_interval_s
        if not (self.runtime_dir / "agent.sock").exists():
            raise AgentUnavailable(f"no agent at {self.endpoint}")
        self._reset_socket()
        self._sock = self._new_socket()
        rid = next(self._rid)
        hello = P.Hello(rid, self.name, os.getpid(), pid_namespace())
        self._watch_agent(*self._lock_holder())  # its death ends the wait for a Welcome
        rep = self._roundtrip(hello, rid)
        if isinstance(rep, P.Error):
            raise AgentError(rep.code, rep.message)
        if not isinstance(rep, P.Welcome):
            raise ProtocolError(f"unexpected reply to hello: {type(rep).__name__}")
        if rep.generation != self._generation or self._segment is None:
            try:
                self._map(rep)
            except BaseException:
                self._reset_socket()  # the agent reclaims the registration on disconnect
                raise
        self._client_id = rep.client_id
        self._generation = rep.generation
        self._page_bytes = rep.page_bytes
        self._heartbeat_interval_s = rep.heartbeat_interval_s
        self._index_segment = rep.index_segment
        self._agent_pid = rep.agent_pid
        self._agent_pid_ns = rep.agent_pid_ns
        if rep.agent_pid != self._watched_pid or self._agent_pidfd < 0:
            self._watch_agent(rep.agent_pid, rep.agent_pid_ns)
        self._start_heartbeat()

    def _lock_holder(self) -> tuple[int, int]:
        """(pid, pid namespace) the agent wrote in its lock file, (0, 0) when it cannot
        be read (another uid's agent: the file is its own) or is not of that form."""
        try:
            pid, ns = lock_owner((self.runtime_dir / "agent.lock").read_text())
        except (OSError, UnicodeDecodeError):
            return 0, 0
        return (pid, ns) if pid and ns else (0, 0)

    def _watch_agent(self, pid: int, pid_ns: int) -> None:
        """Hold agent ``pid``'s pidfd (where it is in our pid namespace and the kernel
        has pidfds): its exit ends a wait for its reply."""
        self._unwatch_agent()
        if not pid or pid_ns != pid_namespace():
            return
        try:
            self._agent_pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            return  # no pidfds here, or that agent is gone already: calls wait their timeout
        self._watched_pid = pid
        self._exit_poll = select.poll()
        self._exit_poll.register(self._agent_pidfd, select.POLLIN)

    def _unwatch_agent(self) -> None:
        fd, self._agent_pidfd = self._agent_pidfd, -1
        self._watched_pid = 0
        self._exit_poll = None
        if fd >= 0:
            os.close(fd)

    def _agent_exited(self) -> bool:
        """One poll(0) on the watched pidfd (asked before every send: no set-up here)."""
        p = self._exit_poll
        return p is not None and bool(p.poll(0))

    def _rewatch(self) -> bool:
        """The watched agent has exited: watch the one that holds the runtime directory
        now, if another does (a restarted agent, which a message sent from now on
        reaches). True when a live agent is watched again; else nothing is watched."""
        dead = self._watched_pid
        pid, ns = self._lock_holder()
        if pid and pid != dead:
            self._watch_agent(pid, ns)
            if self._agent_pidfd >= 0 and not self._agent_exited():
                return True
        self._unwatch_agent()
        return False

    def _map(self, w: P.Welcome) -> None:
        """Replace the mapping: unregister -> unmap the old one, map -> register the
        new one. A hook that fails leaves the client unmapped and unregistered."""
        self._unmap()
        try:
            seg = Segment.open(w.segment, w.arena_bytes)
        except ArenaError as exc:
            raise AgentUnavailable(f"agent's arena cannot be mapped: {exc}") from exc
        if self._on_map is not None:
            try:
                self._on_map(seg.buffer)
            except Exception as exc:
                seg.close()
                raise AgentUnavailable(f"arena mapped but not made ready: {exc}") from exc
        if self._generation:
            self.remaps += 1
            log.info("agent generation %d -> %d: arena remapped", self._generation, w.generation)
        self._segment = seg

    def _unmap(self) -> None:
        seg, self._segment = self._segment, None
        if seg is None:
            return
        if self._on_unmap is not None:
            try:
                self._on_unmap(seg.buffer)
            except Exception:
                log.exception("on_unmap hook failed; unmapping anyway")
        seg.close()

    def _lost(self) -> None:
        """The agent is gone or forgot us: the next call registers again."""
        self._client_id = 0
        self._unwatch_agent()
        self._reset_socket()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._hb_stop.set()
            if any(cb is not None for _kind, cb in self._posted.values()):
                self.flush(min(self.timeout_s, 0.5))  # answers someone waits to hear
            if self._client_id and self._sock is not None:
                rid = next(self._rid)
                try:
                    bye = P.Bye(rid, self._client_id, self._generation)
                    self._sock.send(P.encode(bye), zmq.NOBLOCK)
                    self._sock.poll(100)
                except zmq.ZMQError:
                    pass
            self._closed = True
            self._client_id = 0
            self._unwatch_agent()
            self._reset_socket()
            self._unmap()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ transport
    def _wait_sendable(self, sock: zmq.Socket, deadline: float) -> None:
        """Wait until ``sock`` takes a message (connected), in steps that ask whether
        the watched agent has exited: ``zmq.Again`` at the deadline, AgentUnavailable
        at its exit unless another agent holds the directory by then (the connection
        is to it)."""
        while True:
            left_ms = max(1, int((deadline - time.monotonic()) * 1000))
            step = min(left_ms, _EXIT_CHECK_MS) if self._agent_pidfd >= 0 else left_ms
            if sock.poll(step, zmq.POLLOUT):
                return
            if time.monotonic() >= deadline:
                raise zmq.Again()
            if self._agent_exited():
                pid = self._watched_pid
                if self._rewatch():
                    continue  # restarted: the connection goes to the new agent
                self._lost()
                raise AgentUnavailable(f"agent at {self.endpoint} (pid {pid}) exited")

    def _roundtrip(self, msg: Any, rid: int, timeout_s: float | None = None) -> Any:
        sock = self._sock
        assert sock is not None
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        data = P.encode(msg)
        if self._agent_exited():
            # Sent from now on, the message reaches the agent that replaced it, if any:
            # watch that one (a dead agent's exit must not fail a call to its successor).
            self._rewatch()
        try:
            try:
                sock.send(data, zmq.NOBLOCK)
            except zmq.Again:
                # IMMEDIATE: nothing is queued while no agent is connected; wait for the
                # connection (bounded by the deadline) instead of failing at once.
                self._wait_sendable(sock, deadline)
                sock.send(data, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self._lost()
            raise AgentUnavailable(f"cannot reach agent at {self.endpoint}: {exc}") from exc
        # Blocking receive with RCVTIMEO: a poll() per call costs more than the agent's work.
        left_ms = max(1, int(timeout_s * 1000))
        while True:
            if left_ms <= 0:
                self._lost()
                raise AgentUnavailable(f"agent at {self.endpoint} did not answer in time")
            wait_ms = min(left_ms, _EXIT_CHECK_MS) if self._agent_pidfd >= 0 else left_ms
            if wait_ms != self._rcvtimeo:
                sock.setsockopt(zmq.RCVTIMEO, wait_ms)
                self._rcvtimeo = wait_ms
            try:
                frame = sock.recv()
            except zmq.Again as exc:
                if self._agent_exited():
                    pid = self._watched_pid
                    self._lost()
                    raise AgentUnavailable(
                        f"agent at {self.endpoint} (pid {pid}) exited before it answered"
                    ) from exc
                left_ms = int((deadline - time.monotonic()) * 1000)
                continue
            except zmq.ZMQError as exc:
                self._lost()
                raise AgentUnavailable(f"agent at {self.endpoint} did not answer in time") from exc
            rep = P.decode_reply(frame)
            if rep.rid == rid:
                return rep
            # a posted call's reply, or a late one to a call that already timed out
            self._absorb(rep)
            left_ms = int((deadline - time.monotonic()) * 1000)

    def _call(self, make: Any, timeout_s: float | None = None, retry: bool = True) -> Any:
        """Send ``make(rid, client_id, generation)``; register again (and remap) if
        the agent restarted or forgot us, and resend once when ``retry``. Calls that
        grant or act on state of one registration (reserve and pin, whose slots belong
        to the mapping the caller read before the call; commit, abort, release, drop)
        are not resent into a new one: they raise ``ClientUnknown``, so a caller never
        holds pins or leases of a generation it did not see."""
        with self._lock:
            for attempt in (0, 1):
                self._ensure()
                rid = next(self._rid)
                rep = self._roundtrip(make(rid, self._client_id, self._generation), rid, timeout_s)
                if isinstance(rep, P.Error):
                    if rep.code in _REREGISTER and attempt == 0:
                        self._lost()
                        self._next_retry = 0.0
                        if not retry:
                            self._reregister_quietly()
                            raise ClientUnknown(rep.code, rep.message)
                        continue
                    if rep.code in _REREGISTER:
                        raise ClientUnknown(rep.code, rep.message)
                    raise AgentError(rep.code, rep.message)
                return rep
        raise AssertionError("unreachable")

    def _absorb(self, rep: Any) -> None:
        """Take the reply to a call sent without waiting; others are late replies to
        timed-out calls, dropped."""
        item = self._posted.pop(rep.rid, None)
        if item is None:
            return
        kind, on_reply = item
        if on_reply is not None:
            _notify(on_reply, rep)
        if not isinstance(rep, P.Error):
            return
        if rep.code in _REREGISTER:
            self._stale_seen = True  # the next call or heartbeat registers again
        elif kind != "heartbeat":
            self.posted_errors += 1
            log.warning("%s refused by the agent: %s", kind, rep.message)

    def _post(self, kind: str, make: Any, on_reply: Callable[[Any], None] | None = None) -> None:
        """Send ``make(rid, client_id, generation)`` and return without waiting: its
        reply is read (errors counted in ``posted_errors`` and logged) by the next call,
        heartbeat or ``flush``, which hands it to ``on_reply`` (``None`` when the
        connection went before an answer came). ``on_reply`` runs on the thread that
        reads the reply, under the client's lock: it must be quick and not call the
        client. Never resent: like their waiting forms, posted calls belong to the
        registration they were sent in."""
        with self._lock:
            self._ensure()
            sock = self._sock
            assert sock is not None
            rid = next(self._rid)
            data = P.encode(make(rid, self._client_id, self._generation))
            try:
                try:
                    sock.send(data, zmq.NOBLOCK)
                except zmq.Again:
                    # queue full or connection not up yet: wait for room, bounded
                    if not sock.poll(max(1, int(self.timeout_s * 1000)), zmq.POLLOUT):
                        raise
                    sock.send(data, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                self._lost()
                raise AgentUnavailable(f"cannot reach agent at {self.endpoint}: {exc}") from exc
            self._book(rid, kind, on_reply)
            if len(self._posted) > 64:
                self._read_replies(0.0)  # a caller that only posts still reads its replies

    def _book(self, rid: int, kind: str, on_reply: Callable[[Any], None] | None) -> None:
        posted = self._posted
        posted[rid] = (kind, on_reply)
        if len(posted) > _POSTED_MAX:
            # the oldest reply never came (it went with an earlier agent): bound the books
            _kind, lost = posted.pop(next(iter(posted)))
            if lost is not None:
                _notify(lost, None)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait (at most ``timeout_s``) until every posted call's reply has been read.
        True when none is outstanding."""
        with self._lock:
            return self._read_replies(self.timeout_s if timeout_s is None else timeout_s)

    def _read_replies(self, timeout_s: float) -> bool:
        """Read posted calls' replies until none is outstanding or ``timeout_s`` has
        passed (0: only those already here). Under the lock. True when none is left."""
        deadline = time.monotonic() + timeout_s
        sock = self._sock
        while self._posted and sock is not None:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not sock.poll(left_ms):
                return False
            try:
                self._absorb(P.decode_reply(sock.recv(zmq.NOBLOCK)))
            except (zmq.ZMQError, ProtocolError):
                return False
        return not self._posted

    def _reregister_quietly(self) -> None:
        try:
            self._ensure()
        except (AgentUnavailable, AgentError, ProtocolError):
            pass  # the next call tries again

    # ------------------------------------------------------------------ heartbeat
    def _start_heartbeat(self) -> None:
        if not self._heartbeat_enabled or (self._hb_thread and self._hb_thread.is_alive()):
            return
        self._hb_thread = threading.Thread(
            target=self._heartbeat_loop, name="kvnode-hb", daemon=True
        )
        self._hb_thread.start()

    def _heartbeat_loop(self) -> None:
        while not self._hb_stop.wait(self._heartbeat_interval_s):
            # A call in progress is itself a sign of life: skip rather than wait for it.
            if not self._lock.acquire(blocking=False):
                continue
            try:
                self._heartbeat_once()
            except Exception:  # never let the thread die: the next tick tries again
                log.debug("heartbeat failed", exc_info=True)
            finally:
                self._lock.release()

    def _heartbeat_once(self) -> None:
        """Read replies to earlier heartbeats, send the next one. Runs under the lock."""
        if self._closed:
            return
        sock = self._sock
        if sock is not None:
            while sock.poll(0):
                self._absorb(P.decode_reply(sock.recv()))
        stale, self._stale_seen = self._stale_seen, False
        if stale or (not self._client_id and self._segment is not None):
            # The agent restarted (or forgot us): register and remap now, not at the
            # next call, so an idle client never sits on a dead arena.
            self._lost()
            self._next_retry = 0.0
            try:
                self._ensure()
            except AgentUnavailable:
                return
        if not self._client_id or self._sock is None:
            return
        rid = next(self._rid)
        self._book(rid, "heartbeat", None)
        try:
            self._sock.send(
                P.encode(P.Heartbeat(rid, self._client_id, self._generation)), zmq.NOBLOCK
            )
        except zmq.ZMQError:
            pass  # nothing connected: the next call or tick reconnects

    # ------------------------------------------------------------------ API
    def lookup(
        self, keys: Sequence[bytes], promote: bool = True, timeout_s: float | None = None
    ) -> list[Lookup]:
        keys = list(keys)
        rep = self._call(lambda r, c, g: P.LookupReq(r, c, g, keys, promote), timeout_s)
        return rep.states  # ints that compare equal to Lookup members; no per-key conversion

    def reserve(
        self,
        keys: Sequence[bytes],
        sizes: Sequence[int],
        groups: Sequence[bytes] | None = None,
        namespace: bytes = b"",
    ) -> list[tuple[Status, Slot | None]]:
        """Reserve arena slots. ``groups`` (optional, per key, 16 bytes each): entries
        of one group live and die together (a chunk's entries of every TP rank).
        ``namespace`` (16 bytes): the tenant the keys belong to (quotas, figures)."""
        keys, sizes = list(keys), list(sizes)
        grp = list(groups) if groups is not None else []
        rep = self._call(
            lambda r, c, g: P.ReserveReq(r, c, g, keys, sizes, grp, namespace), retry=False
        )
        return [(_STATUS[s], slot) for s, slot in zip(rep.status, rep.slots)]

    def commit(
        self,
        keys: Sequence[bytes],
        checksums: Sequence[int] | None = None,
        parents: Sequence[bytes] | None = None,
        tokens: Sequence[Sequence[int]] | None = None,
    ) -> list[Status]:
        """Make reserved entries readable. ``parents``/``tokens`` (optional, per key)
        feed the agent's KV events: the previous chunk's key and the chunk's tokens."""
        rep = self._call(_commit_req(keys, checksums, parents, tokens), retry=False)
        return [_STATUS[s] for s in rep.status]

    def commit_async(
        self,
        keys: Sequence[bytes],
        checksums: Sequence[int] | None = None,
        parents: Sequence[bytes] | None = None,
        tokens: Sequence[Sequence[int]] | None = None,
        on_done: Callable[[list[Status] | None], None] | None = None,
    ) -> None:
        """``commit`` without waiting for the answer: a store's last call ends one
        round trip sooner. ``on_done`` gets the per-key statuses, or None when the agent
        refused the call or the connection went first, on the thread that reads the
        reply (the next call, a heartbeat or ``flush``; see ``_post``)."""
        n = len(keys)

        def answered(rep: Any) -> None:
            if on_done is not None:
                ok = isinstance(rep, P.StatusRep) and len(rep.status) == n
                on_done([_STATUS[s] for s in rep.status] if ok else None)

        self._post("commit", _commit_req(keys, checksums, parents, tokens), answered)

    def abort(self, keys: Sequence[bytes], wait: bool = True) -> None:
        """Give up reservations. ``wait=False``: do not wait for the reply (see ``_post``)."""
        keys = list(keys)
        self._call_or_post("abort", lambda r, c, g: P.AbortReq(r, c, g, keys), wait)

    def pin(self, keys: Sequence[bytes]) -> list[tuple[Status, Slot | None]]:
        keys = list(keys)
        rep = self._call(lambda r, c, g: P.PinReq(r, c, g, keys), retry=False)
        return [(_STATUS[s], slot) for s, slot in zip(rep.status, rep.slots)]

    def release(self, keys: Sequence[bytes], wait: bool = True) -> None:
        """Unpin. ``wait=False``: do not wait for the reply (a load's last call: nothing
        in it changes what the caller does next)."""
        keys = list(keys)
        self._call_or_post("release", lambda r, c, g: P.ReleaseReq(r, c, g, keys), wait)

    def drop(self, keys: Sequence[bytes], wait: bool = True) -> None:
        keys = list(keys)
        self._call_or_post("drop", lambda r, c, g: P.DropReq(r, c, g, keys), wait)

    def admin(
        self, op: int, keys: Sequence[bytes] = (), tier: str = "", limit: int = 0,
        sort: str = "hits", timeout_s: float | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """An operator's request (``kvnode cache``); ``AgentError`` NOT_PERMITTED when
        this process is not an operator."""
        keys = list(keys)
        make = lambda r, c, g: P.AdminReq(r, c, g, op, keys, tier, limit, sort)  # noqa: E731
        rep = self._call(make, timeout_s)
        return dict(rep.result)

    def _call_or_post(self, kind: str, make: Any, wait: bool) -> None:
        """A call about this registration's state: never resent into a newer one."""
        if wait:
            self._call(make, retry=False)
        else:
            self._post(kind, make)

    # ------------------------------------------------------------------ agent mode
    def export(self, make: Callable[[int, int, int], P.ExportReq]) -> tuple[int, int, str, bool]:
        """Export a KV cache (``make(rid, client_id, generation)`` builds the request).
        Returns (export id, the generation it belongs to, why refused, whether the
        agent wakes the worker through its socket): id 0 = refused."""
        with self._lock:
            rep = self._call(make, retry=False)
            if not isinstance(rep, P.ExportRep):
                raise ProtocolError(f"unexpected reply to export: {type(rep).__name__}")
            return rep.export_id, self._generation, rep.reason, rep.wakes

    def job(
        self,
        make: Callable[[int, int, int], P.JobReq],
        on_reply: Callable[[Any], None] | None = None,
    ) -> None:
        """Hand a save or load job to the agent without waiting: its progress comes
        through the worker's progress page; ``on_reply`` gets the agent's answer (a
        ``StatusRep``, an ``Error``, or None when the connection went first)."""
        self._post("job", make, on_reply)

    def poll_replies(self) -> None:
        """Read the replies that have arrived, without waiting."""
        if self._lock.acquire(blocking=False):
            try:
                self._read_replies(0.0)
            finally:
                self._lock.release()

    def stats(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Agent statistics. Needs no registration (tools use it for health checks)."""
        with self._lock:
            if self._sock is None:
                if self._closed:
                    raise AgentUnavailable("client is closed")
                if not (self.runtime_dir / "agent.sock").exists():
                    raise AgentUnavailable(f"no agent at {self.endpoint}")
                self._sock = self._new_socket()
            rid = next(self._rid)
            rep = self._roundtrip(P.StatsReq(rid), rid, timeout_s)
            if isinstance(rep, P.Error):
                raise AgentError(rep.code, rep.message)
            return rep.stats

    # ------------------------------------------------------------------ bytes
    def views(self, slot: Slot) -> list[memoryview]:
        """Writable views of the slot's extents in the mapped arena."""
        with self._lock:
            self._ensure()
            assert self._segment is not None
            v = self._segment.view
        return [v[off : off + n] for off, n in slot.extents]

    def write(self, slot: Slot, data: Any) -> None:
        src = memoryview(data).cast("B")
        if src.nbytes != slot.size:
            raise ValueError(f"data is {src.nbytes} bytes, slot holds {slot.size}")
        pos = 0
        for view in self.views(slot):
            n = view.nbytes
            view[:] = src[pos : pos + n]
            pos += n

    def read(self, slot: Slot, out: Any = None) -> Any:
        dst = bytearray(slot.size) if out is None else out
        mv = memoryview(dst).cast("B")
        if mv.nbytes < slot.size:
            raise ValueError("output buffer too small")
        pos = 0
        for view in self.views(slot):
            n = view.nbytes
            mv[pos : pos + n] = view
            pos += n
        return dst

    def put(self, key: bytes, data: Any, with_checksum: bool = True) -> Status:
        """Reserve, copy, commit one entry. Returns OK, EXISTS, NO_SPACE or TOO_LARGE.
        Under the client's lock from reserve to commit: no remap can come between the
        slot and the copy. A reserve refused because the agent restarted is made again
        in the new generation (the whole put happens there)."""
        size = memoryview(data).nbytes
        with self._lock:
            ((st, slot),) = self._again_if_unknown(lambda: self.reserve([key], [size]))
            if st != Status.OK or slot is None:
                return st
            try:
                self.write(slot, data)
            except BaseException:
                self.abort([key])
                raise
            csum = checksum(data) if with_checksum else 0
            return self.commit([key], [csum])[0]

    def get(self, key: bytes, verify: bool = True) -> bytes | None:
        """Pin, copy, release one entry; None when absent. With ``verify`` the copy is
        checked against the committed checksum, and an entry committed without one is
        refused as unverified (``ChecksumError``): bytes are never returned as good
        unless they were checked. ``verify=False`` returns whatever the entry holds.
        Under the client's lock from pin to release, like ``put``."""
        with self._lock:
            ((st, slot),) = self._again_if_unknown(lambda: self.pin([key]))
            if st != Status.OK or slot is None:
                return None
            try:
                data = bytes(self.read(slot))
            finally:
                self.release([key])
        if verify:
            if not slot.checksum:
                raise ChecksumError(f"entry {key.hex()} has no checksum: bytes unverified")
            if checksum(data) != slot.checksum:
                raise ChecksumError(f"entry {key.hex()} failed its checksum")
        return data

    def _again_if_unknown(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, once more if the agent no longer knew this client: the refusal
        registered it again, and the caller has used nothing of the earlier one yet."""
        try:
            return fn()
        except ClientUnknown:
            return fn()


def _commit_req(
    keys: Sequence[bytes],
    checksums: Sequence[int] | None,
    parents: Sequence[bytes] | None,
    tokens: Sequence[Sequence[int]] | None,
) -> Callable[[int, int, int], P.CommitReq]:
    keys = list(keys)
    sums = list(checksums) if checksums is not None else [0] * len(keys)
    par = list(parents) if parents is not None else []
    toks = [list(t) for t in tokens] if tokens is not None else []
    return lambda r, c, g: P.CommitReq(r, c, g, keys, sums, par, toks)


def _notify(on_reply: Callable[[Any], None], rep: Any) -> None:
    try:
        on_reply(rep)
    except Exception:
        log.exception("reply callback failed")
