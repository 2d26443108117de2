"""Serving peers from this node's disk: a chunk a peer asks for that lies on the local
disk tier is read from there (one thread, off the loop) into a buffer of its own and
sent as is, with the checksum its writer stored in the file header; it never passes
through the arena, so serving a peer neither promotes nor evicts anything here.

Bounded: ``bytes_max`` bytes of buffers being read or sent at once (the server shares
its ``serve_bytes_max`` budget with it), ``QUEUE_MAX`` reads waiting. A read that fails
(file gone, corrupt, I/O error) answers that key as not held.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvnode.agent.tiers.base import SlotBuffers

log = logging.getLogger("kvnode.peers")

QUEUE_MAX = 256  # disk reads waiting for the reader thread


class ChunkStore(Protocol):
    """What the disk tier offers (``kvnode.agent.tiers.disk.DiskStore``)."""

    def size_of(self, key: bytes) -> int | None: ...
    def read_into(self, key: bytes, slot: SlotBuffers) -> int | None: ...


@dataclass(slots=True, eq=False)
class DiskRead:
    key: bytes
    size: int
    buf: bytearray
    checksum: int = 0  # the writer's, read back from the file (0: it gave none)
    ok: bool = False  # read and checked
    tokens: list[int] = field(default_factory=list)  # from the file's header
    done: bool = False


class LowerReads(threading.Thread):
    def __init__(self, store: ChunkStore, wake: Callable[[], None]) -> None:
        super().__init__(name="kvnode-peers-disk", daemon=True)
        self.store = store
        self.wake = wake
        self._cv = threading.Condition()
        self._queue: deque[DiskRead] = deque()
        self._done: deque[DiskRead] = deque()
        self._stopping = False
        self.counters = dict.fromkeys(("disk_reads", "disk_read_bytes", "disk_read_failed",
                                       "disk_busy"), 0)  # fmt: skip

    def size_of(self, key: bytes) -> int | None:
        try:
            return self.store.size_of(key)
        except Exception:  # a store that cannot say: not held
            log.exception("disk tier: size_of failed")
            return None

    def submit(self, key: bytes, size: int) -> DiskRead | None:
        """Loop thread: read ``key`` (``size`` bytes, as the disk index says)."""
        with self._cv:
            if self._stopping or len(self._queue) >= QUEUE_MAX:
                self.counters["disk_busy"] += 1
                return None
            r = DiskRead(key, size, bytearray(size))
            self._queue.append(r)
            self._cv.notify()
        return r

    def take_done(self) -> list[DiskRead]:
        with self._cv:
            out = list(self._done)
            self._done.clear()
        return out

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()

    def run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                r = self._queue.popleft()
            self._read(r)
            with self._cv:
                self._done.append(r)
            try:
                self.wake()
            except Exception:
                log.exception("disk reads for peers: wake() failed")

    def _read(self, r: DiskRead) -> None:
        slot = SlotBuffers.of(r.buf, r.size)
        try:
            got = self.store.read_into(r.key, slot)
        except Exception as exc:  # gone, corrupt, I/O: a miss for the peer
            log.debug("disk read for a peer failed: %s", exc)
            got = None
        if got is not None:  # 0: its writer gave no checksum; it travels unverified
            r.checksum, r.ok = got, True
            meta = getattr(slot, "meta", None)
            r.tokens = meta.token_ids() if meta is not None else []
            self.counters["disk_reads"] += 1
            self.counters["disk_read_bytes"] += r.size
        else:
            self.counters["disk_read_failed"] += 1
        r.done = True

    def stats(self) -> dict[str, Any]:
        return dict(self.counters)


__all__ = ["ChunkStore", "DiskRead", "LowerReads"]
