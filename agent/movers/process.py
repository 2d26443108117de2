"""The exporting worker process as the agent holds it, beyond its pid.

``pidfd``: a descriptor of that very process. A pid names whichever process has it
now: once the worker exits, the kernel may give its pid to another process, and a
copy addressed by pid would reach that one. A pidfd turns readable when its process
exits, before the pid can be reaped and given again, so a copy checked against it
never reaches another process: writes are checked before (the worker lives, so its
pid is its own), reads after (the bytes came from the worker if it was still alive
once they had landed).

``wake``: the worker's eventfd, taken from it with ``pidfd_getfd`` (the same ptrace
rights as cross-memory attach). The copy thread adds one to it after each progress
write the worker may be waiting for (a loaded layer, a job's end), so the worker
sleeps in ``poll`` instead of waking on a timer to look at its progress page: on a
small machine those wake-ups take the very cores the copies run on, and a timer
wakes late by up to its last interval.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import threading

log = logging.getLogger("kvnode.agent")

SYS_PIDFD_GETFD = 438  # the same number on every architecture (one table from 424 on)
_EVENTFD_LINK = "anon_inode:[eventfd]"
_ONE = (1).to_bytes(8, "little")

_libc = ctypes.CDLL(None, use_errno=True)


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A descriptor of ``fd`` of the process ``pidfd`` names (close-on-exec); raises
    ``OSError`` (EPERM without ptrace rights, EBADF for no such descriptor, ENOSYS
    before Linux 5.6)."""
    got = _libc.syscall(SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(fd), ctypes.c_uint(0))
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(got)


class WorkerProcess:
    """A pidfd and a wake eventfd of one exporting worker (either may be missing:
    -1). Shared by the loop (which closes it when the export is dropped) and the copy
    threads (which ask ``exited`` and call ``wake``): a closed one reads as exited, and
    a descriptor is never used after it is closed (its number may be reused)."""

    def __init__(self, pid: int, pidfd: int = -1, wake_fd: int = -1) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.wake_fd = wake_fd
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, pid: int, wake_fd: int = -1, pidfd: int = -1) -> WorkerProcess:
        """Hold process ``pid``: a dup of ``pidfd`` when given (the client registry's,
        checked against pid reuse at ``Hello``), else a new one; and the worker's
        descriptor ``wake_fd`` when it names an eventfd. Raises ``ProcessLookupError``
        when the process is gone. Without pidfds (old kernels, descriptors exhausted)
        the process is held by pid alone; without a usable wake descriptor the worker
        polls its page (it is told which)."""
        own = -1
        try:
            own = os.dup(pidfd) if pidfd >= 0 else os.pidfd_open(pid)
        except ProcessLookupError:
            raise
        except (OSError, AttributeError) as exc:
            log.debug("no pidfd for pid %d (%s): copies are addressed by pid alone", pid, exc)
        proc = cls(pid, own)
        if wake_fd >= 0 and own >= 0:
            proc.wake_fd = _eventfd_of(own, wake_fd)
        return proc

    def exited(self) -> bool:
        """Whether the process has exited (its pid may name another one by now)."""
        with self._lock:
            if self._closed:
                return True
            if self.pidfd < 0:
                return False
            return bool(select.select([self.pidfd], [], [], 0)[0])

    def wake(self) -> None:
        """Tell the worker to look at its progress page (best effort)."""
        with self._lock:
            if self._closed or self.wake_fd < 0:
                return
            try:
                os.write(self.wake_fd, _ONE)
            except OSError:  # a full counter (never in practice): the worker's poll times out
                pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self.pidfd, self.wake_fd):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self.pidfd = self.wake_fd = -1


def _eventfd_of(pidfd: int, fd: int) -> int:
    """Our descriptor of the worker's ``fd`` when it is an eventfd, else -1 (a client
    may name any of its descriptors: the agent writes only into an eventfd, never
    blocks on it, and keeps nothing else)."""
    try:
        got = pidfd_getfd(pidfd, fd)
    except OSError as exc:
        log.debug("the worker's wake descriptor %d is out of reach (%s): it polls", fd, exc)
        return -1
    try:
        if os.readlink(f"/proc/self/fd/{got}") == _EVENTFD_LINK:
            os.set_blocking(got, False)
            return got
    except OSError:
        pass
    os.close(got)
    return -1
