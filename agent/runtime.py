"""The runtime directory and the arena segment: taken, checked and set up at start,
released at stop, by one object.

The directory holds the socket and the lock. An agent running as root must not be
steered by another user: a directory it does not own, or one others may write, is
refused, and files in it are opened with ``O_NOFOLLOW`` so a planted symlink cannot
make the agent write elsewhere.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import resource
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvnode.agent.config import Config, format_size
from kvnode.errors import ArenaError, ConfigError
from kvnode.ipc.process import lock_text
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
        os.write(fd, lock_text().encode())
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


SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory
ARENA_STEP_BYTES = 256 * 1024**2  # reserved (and touched) per step: stop and progress between
PROGRESS_EVERY_S = 1.0


def shm_free_bytes(path: str = SHM_DIR) -> int | None:
    """Bytes a new segment can still take in /dev/shm (None when it cannot be told)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def index_bytes(cfg: Config, pages_total: int) -> int:
    """Shared memory the lookup index takes beside the arena (0 when not published)."""
    if not cfg.arena.publish_index:
        return 0
    from kvnode.ipc.shmindex import capacity_for, segment_bytes

    return segment_bytes(capacity_for(pages_total))


def check_shm_room(cfg: Config, size: int) -> None:
    """Refuse an arena /dev/shm has no room for, before anything is created: touching
    a page tmpfs cannot back kills the process with SIGBUS, segment left behind."""
    free = shm_free_bytes()
    if free is not None and free < size:
        raise ConfigError(
            "arena.cpu_bytes",
            f"the arena and its index ({format_size(size)}) do not fit in {SHM_DIR} "
            f"({format_size(free)} free): lower arena.cpu_bytes or enlarge {SHM_DIR}",
        )


def create_arena(
    cfg: Config,
    pages_total: int,
    stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int, int], None] | None = None,
) -> Segment:
    """Create the arena and reserve its memory in tmpfs (``posix_fallocate``: no room
    is an error here, never a SIGBUS later in the agent or a client), touching each
    step too when ``arena.prefault`` is on. ``stop()`` is asked between steps (the
    caller then unlinks the segment); ``progress(done, total)`` is told after each."""
    size = pages_total * cfg.arena.page_bytes
    check_shm_room(cfg, size + index_bytes(cfg, pages_total))
    seg = Segment.create(
        cfg.segment_name, size, group=cfg.agent.group, prefault=False,
        hugepages=cfg.arena.hugepages,
    )  # fmt: skip
    try:
        _reserve(seg, size, cfg.arena.prefault, stop, progress)
    except BaseException:
        seg.unlink()
        seg.close()
        raise
    return seg


def _reserve(
    seg: Segment,
    size: int,
    touch: bool,
    stop: Callable[[], bool],
    progress: Callable[[int, int], None] | None,
) -> None:
    import posix_ipc

    shm = posix_ipc.SharedMemory(seg.name, 0)
    zeros = bytes(min(ARENA_STEP_BYTES, size)) if touch else b""
    try:
        for off in range(0, size, ARENA_STEP_BYTES):
            if stop():
                return
            n = min(ARENA_STEP_BYTES, size - off)
            try:
                os.posix_fallocate(shm.fd, off, n)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    break  # no fallocate on this filesystem: the room check is all we have
                raise ConfigError(
                    "arena.cpu_bytes",
                    f"{SHM_DIR} has no room left for the arena after {format_size(off)} "
                    f"of {format_size(size)} ({exc.strerror})",
                ) from None
            if touch:
                seg.view[off : off + n] = zeros[:n]
            if progress is not None:
                progress(off + n, size)
    finally:
        shm.close_fd()


class ArenaProgress:
    """Says how far the arena's set-up is, at most once a second: a log line (seen on
    a terminal and in the journal) and systemd's STATUS=."""

    def __init__(self, status: Callable[[str], Any], clock: Callable[[], float] = time.monotonic):
        self.status = status
        self.clock = clock
        self.t0 = clock()
        self._next = self.t0 + PROGRESS_EVERY_S

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if now < self._next or done >= total:
            return
        self._next = now + PROGRESS_EVERY_S
        rate = done / max(now - self.t0, 1e-9)
        text = (
            f"arena: {format_size(done)} of {format_size(total)} ready "
            f"({done / total:.0%}, about {(total - done) / rate:.0f}s left)"
        )
        log.info("%s", text)
        self.status(text)


def blame(cfg: Config, exc: BaseException) -> ConfigError | None:
    """A start-up failure as an error naming the setting that caused it, or None when
    it is not one the configuration explains (a bug: the caller logs the traceback)."""
    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, ArenaError):
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return ConfigError("arena.cpu_bytes", f"{SHM_DIR} is full: {exc}")
        return ConfigError("agent.runtime_dir", str(exc))
    if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] in ("boto3", "botocore"):
        return ConfigError("s3.bucket", "the S3 tier needs boto3: pip install 'kvnode[s3]'")
    text = str(exc)
    if type(exc).__name__ == "ZMQError":
        for key in ("events.endpoint", "events.replay_endpoint", "peers.listen"):
            section, name = key.split(".")
            endpoint = getattr(getattr(cfg, section), name)
            if endpoint and endpoint in text:
                return ConfigError(key, f"cannot bind {endpoint}: {getattr(exc, 'strerror', text)}")
    if isinstance(exc, OSError) and cfg.disk.path and cfg.disk.path in str(exc.filename or ""):
        return ConfigError("disk.path", f"{cfg.disk.path}: {exc.strerror or exc}")
    return None
