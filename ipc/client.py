"""Client library for the agent: used by the vLLM connector, tools and benchmarks.

Control calls go over a ZeroMQ DEALER socket; bytes go through the mapped arena.
Every call has a timeout. An absent agent raises ``AgentUnavailable``; the next call
tries to connect again (rate-limited by ``retry_interval_s``), so a restarted agent is
picked up without restarting the caller.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import xxhash
import zmq

from kvnode.errors import AgentError, AgentUnavailable, ArenaError, ClientUnknown, ProtocolError
from kvnode.ipc import protocol as P
from kvnode.ipc.protocol import Lookup, Slot, Status
from kvnode.ipc.segment import Segment

log = logging.getLogger("kvnode.client")

__all__ = ["AgentClient", "Lookup", "Slot", "Status", "checksum", "default_runtime_dir"]


def checksum(buf: Any) -> int:
    """xxh3-64 of a bytes-like object (or a list of them); never 0 (0 means 'none')."""
    if isinstance(buf, (list, tuple)):
        h = xxhash.xxh3_64()
        for part in buf:
            h.update(part)
        value = h.intdigest()
    else:
        value = xxhash.xxh3_64_intdigest(buf)
    return value or 1


def default_runtime_dir() -> Path:
    """Where the agent listens: $KVNODE_AGENT_RUNTIME_DIR, else the agent's default."""
    env = os.environ.get("KVNODE_AGENT_RUNTIME_DIR")
    if env:
        return Path(env)
    from kvnode.agent.config import _default_runtime_dir

    return Path(_default_runtime_dir())


def _pid_ns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


class AgentClient:
    def __init__(
        self,
        runtime_dir: str | Path | None = None,
        name: str = "client",
        timeout_s: float = 1.0,
        retry_interval_s: float = 0.5,
        heartbeat: bool = True,
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
        self._next_retry = 0.0
        self._closed = False
        self._hb_thread: threading.Thread | None = None
        self._hb_stop = threading.Event()

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
        self._ensure()
        assert self._segment is not None
        return self._segment.buffer

    @property
    def page_bytes(self) -> int:
        self._ensure()
        return self._page_bytes

    def connect(self) -> None:
        """Register with the agent now; AgentUnavailable if none answers in time."""
        with self._lock:
            self._next_retry = 0.0
            self._ensure()

    def _new_socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(self.endpoint)
        return sock

    def _reset_socket(self) -> None:
        self._rcvtimeo = -2  # unknown: set before the next receive
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
        hello = P.Hello(rid, self.name, os.getpid(), _pid_ns())
        rep = self._roundtrip(hello, rid)
        if isinstance(rep, P.Error):
            raise AgentError(rep.code, rep.message)
        if not isinstance(rep, P.Welcome):
            raise ProtocolError(f"unexpected reply to hello: {type(rep).__name__}")
        if rep.generation != self._generation or self._segment is None:
            self._map(rep)
        self._client_id = rep.client_id
        self._generation = rep.generation
        self._page_bytes = rep.page_bytes
        self._heartbeat_interval_s = rep.heartbeat_interval_s
        self._start_heartbeat()

    def _map(self, w: P.Welcome) -> None:
        old = self._segment
        try:
            self._segment = Segment.open(w.segment, w.arena_bytes)
        except ArenaError as exc:
            raise AgentUnavailable(f"agent's arena cannot be mapped: {exc}") from exc
        if old is not None:
            old.close()

    def _lost(self) -> None:
        """The agent is gone or forgot us: the next call registers again."""
        self._client_id = 0
        self._reset_socket()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._hb_stop.set()
            if self._client_id and self._sock is not None:
                rid = next(self._rid)
                try:
                    self._sock.send(P.encode(P.Bye(rid, self._client_id)), zmq.NOBLOCK)
                    self._sock.poll(100)
                except zmq.ZMQError:
                    pass
            self._closed = True
            self._client_id = 0
            self._reset_socket()
            if self._segment is not None:
                self._segment.close()
                self._segment = None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ transport
    def _roundtrip(self, msg: Any, rid: int, timeout_s: float | None = None) -> Any:
        sock = self._sock
        assert sock is not None
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        data = P.encode(msg)
        try:
            try:
                sock.send(data, zmq.NOBLOCK)
            except zmq.Again:
                # IMMEDIATE: nothing is queued while no agent is connected; wait for the
                # connection (bounded by the deadline) instead of failing at once.
                if not sock.poll(max(1, int(timeout_s * 1000)), zmq.POLLOUT):
                    raise
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
            if left_ms != self._rcvtimeo:
                sock.setsockopt(zmq.RCVTIMEO, left_ms)
                self._rcvtimeo = left_ms
            try:
                frame = sock.recv()
            except zmq.ZMQError as exc:
                self._lost()
                raise AgentUnavailable(f"agent at {self.endpoint} did not answer in time") from exc
            rep = P.decode_reply(frame)
            if rep.rid == rid:
                return rep
            # a late reply to a call that already timed out: drop it, wait out the rest
            left_ms = int((deadline - time.monotonic()) * 1000)

    def _call(self, make: Any, timeout_s: float | None = None) -> Any:
        """Send ``make(rid, client_id)``; re-register once if the agent forgot us."""
        with self._lock:
            for attempt in (0, 1):
                self._ensure()
                rid = next(self._rid)
                rep = self._roundtrip(make(rid, self._client_id), rid, timeout_s)
                if isinstance(rep, P.Error):
                    if rep.code == P.ErrCode.UNKNOWN_CLIENT and attempt == 0:
                        self._lost()
                        self._next_retry = 0.0
                        continue
                    if rep.code == P.ErrCode.UNKNOWN_CLIENT:
                        raise ClientUnknown(rep.code, rep.message)
                    raise AgentError(rep.code, rep.message)
                return rep
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ heartbeat
    def _start_heartbeat(self) -> None:
        if not self._heartbeat_enabled or (self._hb_thread and self._hb_thread.is_alive()):
            return
        self._hb_thread = threading.Thread(
            target=self._heartbeat_loop, name="kvnode-hb", daemon=True
        )
        self._hb_thread.start()

    def _heartbeat_loop(self) -> None:
        # Its own socket: ZeroMQ sockets are not thread-safe. The agent keys clients by
        # client id, so heartbeats need not come from the request socket.
        sock: zmq.Socket | None = None
        rid = itertools.count(1)
        try:
            while not self._hb_stop.wait(self._heartbeat_interval_s):
                cid = self._client_id
                if not cid:
                    continue
                if sock is None:
                    sock = self._new_socket()
                try:
                    sock.send(P.encode(P.Heartbeat(next(rid), cid)), zmq.NOBLOCK)
                    while sock.poll(0):
                        sock.recv()
                except zmq.ZMQError:
                    sock.close(0)
                    sock = None
        finally:
            if sock is not None:
                sock.close(0)

    # ------------------------------------------------------------------ API
    def lookup(
        self, keys: Sequence[bytes], promote: bool = True, timeout_s: float | None = None
    ) -> list[Lookup]:
        keys = list(keys)
        rep = self._call(lambda r, c: P.LookupReq(r, c, keys, promote), timeout_s)
        return rep.states  # ints that compare equal to Lookup members; no per-key conversion

    def reserve(
        self, keys: Sequence[bytes], sizes: Sequence[int]
    ) -> list[tuple[Status, Slot | None]]:
        keys, sizes = list(keys), list(sizes)
        rep = self._call(lambda r, c: P.ReserveReq(r, c, keys, sizes))
        return [(Status(s), slot) for s, slot in zip(rep.status, rep.slots)]

    def commit(self, keys: Sequence[bytes], checksums: Sequence[int] | None = None) -> list[Status]:
        keys = list(keys)
        sums = list(checksums) if checksums is not None else [0] * len(keys)
        rep = self._call(lambda r, c: P.CommitReq(r, c, keys, sums))
        return [Status(s) for s in rep.status]

    def abort(self, keys: Sequence[bytes]) -> None:
        keys = list(keys)
        self._call(lambda r, c: P.AbortReq(r, c, keys))

    def pin(self, keys: Sequence[bytes]) -> list[tuple[Status, Slot | None]]:
        keys = list(keys)
        rep = self._call(lambda r, c: P.PinReq(r, c, keys))
        return [(Status(s), slot) for s, slot in zip(rep.status, rep.slots)]

    def release(self, keys: Sequence[bytes]) -> None:
        keys = list(keys)
        self._call(lambda r, c: P.ReleaseReq(r, c, keys))

    def drop(self, keys: Sequence[bytes]) -> None:
        keys = list(keys)
        self._call(lambda r, c: P.DropReq(r, c, keys))

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
        """Reserve, copy, commit one entry. Returns OK, EXISTS, NO_SPACE or TOO_LARGE."""
        size = memoryview(data).nbytes
        ((st, slot),) = self.reserve([key], [size])
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
        """Pin, copy, release one entry; None when absent. Verifies the checksum."""
        ((st, slot),) = self.pin([key])
        if st != Status.OK or slot is None:
            return None
        try:
            data = bytes(self.read(slot))
        finally:
            self.release([key])
        if verify and slot.checksum and checksum(data) != slot.checksum:
            from kvnode.errors import ChecksumError

            raise ChecksumError(f"entry {key.hex()} failed its checksum")
        return data
