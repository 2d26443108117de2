"""The runtime directory and the arena segment: taken, checked and set up at start,
released at stop, by one object.

The directory holds the socket and the lock. An agent running as root must not be
steered by another user: a directory it does not own, or one others may write, is
refused, and files in it are opened with ``O_NOFOLLOW`` so a planted symlink cannot
make the agent write elsewhere.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import stat
from pathlib import Path

from kvnode.agent.config import Config
from kvnode.errors import ArenaError
from kvnode.ipc.segment import Segment, group_id

log = logging.getLogger("kvnode.agent")


FD_LIMIT_WANTED = 1 << 16  # connections, tier files, pidfds: one per client at least


def raise_fd_limit(wanted: int = FD_LIMIT_WANTED) -> int:
    """Raise the soft open-file limit towards ``wanted`` (never above the hard limit):
    every client connection and its process handle take a descriptor, and the usual
    soft default (1,024) would refuse connections long before ``clients_max``.
    Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    if soft != resource.RLIM_INFINITY and soft < 4096:
        log.warning("open-file limit is %d: clients beyond a few hundred will be refused", soft)
    return int(soft)


class RuntimeDir:
    """Owns the runtime directory's lock and socket path while the agent serves."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.path = cfg.runtime_dir
        self._lock_fd: int | None = None

    @property
    def held(self) -> bool:
        return self._lock_fd is not None

    def take(self) -> None:
        """Create or check the directory, take its lock, clear a dead agent's socket."""
        group = self.cfg.agent.group
        try:
            self.path.mkdir(mode=0o750 if group else 0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ArenaError(f"cannot create runtime directory {self.path}: {exc}") from exc
        check_dir(self.path)
        if group:
            chgrp(self.path, group)
        lock_path = self.path / "agent.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ArenaError(f"cannot open lock {lock_path} (not a plain file?): {exc}") from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            os.close(fd)
            raise ArenaError(f"lock {lock_path} is not a plain file of ours: refusing it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise ArenaError(
                f"another agent is serving {self.path} (lock {lock_path} held)"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        self._remove_stale_socket()

    def _remove_stale_socket(self) -> None:
        # We hold the lock, so whatever is left here belongs to a dead agent.
        sock = self.cfg.socket_path
        try:
            st = os.lstat(sock)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ArenaError(f"{sock} exists and is not a socket: refusing to replace it")
        log.warning("removing stale socket %s left by a previous agent", sock)
        sock.unlink()

    def release(self) -> None:
        """Remove the socket (only the lock holder owns it), then drop the lock."""
        if self._lock_fd is None:
            return
        try:
            self.cfg.socket_path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None


def check_dir(path: Path) -> None:
    """Refuse a directory that is a symlink, not ours, or writable by others."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ArenaError(f"cannot inspect runtime directory {path}: {exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise ArenaError(f"runtime directory {path} is not a directory (a symlink?)")
    if st.st_uid != os.geteuid():
        raise ArenaError(
            f"runtime directory {path} is owned by uid {st.st_uid}, not by the agent's "
            f"user ({os.geteuid()}): refusing it"
        )
    if st.st_mode & stat.S_IWOTH:
        raise ArenaError(f"runtime directory {path} is writable by others: refusing it")


def chgrp(path: Path, group: str) -> None:
    try:
        os.chown(path, -1, group_id(group), follow_symlinks=False)
    except (KeyError, OSError) as exc:
        raise ArenaError(f"cannot grant group {group!r} access to {path}: {exc}") from exc


def create_arena(cfg: Config, pages_total: int) -> Segment:
    """Create the arena, not yet pre-faulted (the caller does that in steps it can
    stop)."""
    return Segment.create(
        cfg.segment_name,
        pages_total * cfg.arena.page_bytes,
        group=cfg.agent.group,
        prefault=False,
        hugepages=cfg.arena.hugepages,
    )
