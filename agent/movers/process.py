"""The exporting worker process as the agent holds it, beyond its pid.

``pidfd``: a descriptor of that very process. A pid names whichever process has it
now: once the worker exits, the kernel may give its pid to another process, and a
copy addressed by pid would reach that one. A pidfd turns readable when its process
exits, before the pid can be reaped and given again, so a copy checked against it
never reaches another process: writes are checked before (the worker lives, so its
pid is its own), reads after (the bytes came from the worker if it was still alive
once they had landed).

``waker``: one end of a datagram socket pair the worker made, taken from it with
``pidfd_getfd`` (the same ptrace rights as cross-memory attach). The copy thread
sends one byte on it after each progress write the worker may be waiting for (a
loaded layer, a job's end), so the worker sleeps in ``poll`` on the other end instead
of waking on a timer to look at its progress page: on a small machine those
wake-ups take the very cores the copies run on, and a timer wakes late by up to its
last interval. A socket, because ``send(MSG_DONTWAIT)`` never blocks whatever the
worker does to the descriptor: an eventfd's or a pipe's ``O_NONBLOCK`` belongs to
the open file, which the worker shares and may make blocking again, then fill, and
a copy thread blocked in ``write`` would hold up every worker's jobs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import socket
import struct
import threading

log = logging.getLogger("kvnode.agent")

SYS_PIDFD_GETFD = 438  # the same number on every architecture (one table from 424 on)
_CRED = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid

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
    """A pidfd and a wake socket of one exporting worker (either may be missing).
    Shared by the loop (which closes it when the export is dropped) and the copy
    threads (which ask ``exited`` and call ``wake``): a closed one reads as exited, and
    a descriptor is never used after it is closed (its number may be reused)."""

    def __init__(self, pid: int, pidfd: int = -1, waker: socket.socket | None = None) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.waker = waker
        self.why_no_waker = ""  # when the worker named a wake socket the agent could not take
        self._lock = threading.Lock()
        self._closed = False
        # poll, not select: an agent serving many clients holds descriptors past
        # select's 1,024
        self._poll = select.poll()
        if pidfd >= 0:
            self._poll.register(pidfd, select.POLLIN)

    @classmethod
    def open(cls, pid: int, wake_fd: int = -1, pidfd: int = -1) -> WorkerProcess:
        """Hold process ``pid``: a dup of ``pidfd`` when given (the client registry's,
        checked against pid reuse at ``Hello``), else a new one; and the worker's
        descriptor ``wake_fd`` when it is a datagram socket pair the worker made
        (``_waker_of``). Raises ``ProcessLookupError``
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
        if wake_fd >= 0:
            if own < 0:
                proc.why_no_waker = "no pidfd for the worker"
            else:
                proc.waker, proc.why_no_waker = _waker_of(own, wake_fd, pid)
        return proc

    @property
    def wakes(self) -> bool:
        return self.waker is not None

    def exited(self) -> bool:
        """Whether the process has exited (its pid may name another one by now)."""
        with self._lock:
            if self._closed:
                return True
            if self.pidfd < 0:
                return False
            return bool(self._poll.poll(0))

    def wake(self) -> None:
        """Tell the worker to look at its progress page (best effort)."""
        with self._lock:
            if self._closed or self.waker is None:
                return
            try:
                self.waker.send(b"\x01", socket.MSG_DONTWAIT)
            except OSError:  # full (the worker reads none): its poll times out and it looks
                pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.pidfd >= 0:
                try:
                    os.close(self.pidfd)
                except OSError:
                    pass
            if self.waker is not None:
                self.waker.close()
            self.pidfd, self.waker = -1, None


def _waker_of(pidfd: int, fd: int, pid: int) -> tuple[socket.socket | None, str]:
    """Our descriptor of the worker's ``fd`` when it is one end of a Unix datagram
    socket pair that process ``pid`` made (its peer credentials are the worker's),
    else None and why not. A client may name any of its descriptors: the agent sends
    only on such a socket (never to a logger or another peer as itself), never
    blocks on it, and keeps nothing else."""
    try:
        got = pidfd_getfd(pidfd, fd)
    except OSError as exc:
        return None, f"pidfd_getfd: {exc.strerror or exc}"
    try:
        sock = socket.socket(fileno=got)
    except OSError:
        os.close(got)
        return None, "not a socket"
    try:
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_DGRAM:
            peer = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
            if peer[0] == pid:
                return sock, ""
    except OSError:
        pass
    sock.close()
    return None, "not a datagram socket pair the worker made"
