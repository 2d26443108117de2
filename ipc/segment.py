"""The shared-memory arena segment: one POSIX shm object mapped by the agent and
every client. The agent creates, pre-faults and unlinks it; clients open and map it.
"""

from __future__ import annotations

import grp
import mmap
import os
import time
from collections.abc import Callable

import posix_ipc

from kvnode.errors import ArenaError

_PREFAULT_STEP = 64 * 1024 * 1024


def create_mapping(name: str, size: int, group: str, what: str, reserve: bool = False) -> mmap.mmap:
    """A new POSIX shared-memory object (``O_CREX``: never one someone else made),
    owner-only or shared with ``group``, mapped read-write; with ``reserve`` its
    memory is backed now (a full /dev/shm is an error here, not a SIGBUS at first
    touch). On any failure it is unlinked again and ``ArenaError`` names ``what``."""
    mode = 0o660 if group else 0o600
    try:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=size)
    except (posix_ipc.Error, OSError, ValueError) as exc:
        raise ArenaError(f"cannot create {what} {name} ({size} bytes): {exc}") from exc
    try:
        if group:
            os.fchown(shm.fd, -1, group_id(group))
        os.fchmod(shm.fd, mode)  # the umask may have narrowed it
        if reserve:
            os.posix_fallocate(shm.fd, 0, size)
        return mmap.mmap(shm.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except (KeyError, OSError) as exc:
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.Error:
            pass
        extra = f" for group {group!r}" if group else ""
        raise ArenaError(f"cannot set up {what} {name}{extra}: {exc}") from exc
    finally:
        shm.close_fd()


class Segment:
    """A mapped POSIX shared-memory object."""

    def __init__(self, name: str, size: int, buffer: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.size = size
        self.buffer = buffer
        self.owner = owner
        self.view = memoryview(buffer)

    # -- agent side ---------------------------------------------------------------
    @classmethod
    def create(
        cls,
        name: str,
        size: int,
        group: str = "",
        prefault: bool = True,
        hugepages: bool = True,
        stop: Callable[[], bool] | None = None,
    ) -> Segment:
        """Create a fresh segment (a stale one of the same name is unlinked first).
        ``stop`` is asked between pre-fault steps: a stop request during a multi-GiB
        pre-fault ends it early (the caller then unlinks the segment)."""
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass
        buf = create_mapping(name, size, group, "shared memory")
        seg = cls(name, size, buf, owner=True)
        if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                buf.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass  # shmem THP may be disabled: only an optimisation
        if prefault:
            seg.prefault(stop)
        return seg

    def prefault(self, stop: Callable[[], bool] | None = None) -> float:
        """Touch every page now so the first real copy runs at memory speed
        (first touch of fresh shm pages costs ~35x a warm copy). Works in steps so
        signal handlers run and ``stop()`` can end it. Returns seconds."""
        t0 = time.perf_counter()
        populate = getattr(mmap, "MADV_POPULATE_WRITE", None)
        zeros = b""
        for off in range(0, self.size, _PREFAULT_STEP):
            if stop is not None and stop():
                break
            n = min(_PREFAULT_STEP, self.size - off)
            if populate is not None:
                try:
                    self.buffer.madvise(populate, off, n)
                    continue
                except OSError:
                    populate = None  # an older kernel: touch the pages instead
            if len(zeros) < n:
                zeros = bytes(n)
            self.view[off : off + n] = zeros[:n]
        return time.perf_counter() - t0

    def unlink(self) -> None:
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    # -- client side ---------------------------------------------------------------
    @classmethod
    def open(cls, name: str, size: int) -> Segment:
        try:
            shm = posix_ipc.SharedMemory(name, 0)
        except (posix_ipc.Error, OSError) as exc:
            raise ArenaError(f"cannot open shared memory {name}: {exc}") from exc
        try:
            if shm.size < size:
                raise ArenaError(f"shared memory {name} is {shm.size} bytes, expected {size}")
            buf = mmap.mmap(shm.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise ArenaError(f"cannot map shared memory {name}: {exc}") from exc
        finally:
            shm.close_fd()
        return cls(name, size, buf, owner=False)

    def close(self) -> None:
        try:
            self.view.release()
        except BufferError:
            return  # views still exported (e.g. torch tensors); the mapping lives on
        try:
            self.buffer.close()
        except BufferError:
            pass


def group_id(group: str) -> int:
    """A group name or a numeric gid (containers often have no name for it)."""
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def segment_exists(name: str) -> bool:
    try:
        posix_ipc.SharedMemory(name, 0).close_fd()
        return True
    except posix_ipc.ExistentialError:
        return False
