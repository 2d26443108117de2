"""The disk tier: one file per chunk under ``disk.path``, surviving restarts.

Layout: ``<path>/<first key byte, hex>/<key hex>.kv``, each file a ``format`` header
block followed by the payload. Writes go to ``.<key hex>.<tag>.<n>.tmp`` in the same
directory, are fdatasync'ed (``disk.fsync``) and renamed into place, so a crash
mid-write leaves at worst a temp file, which the next start removes; a lost rename
only loses the entry. Reads land in arena slots with one ``preadv`` (header block plus
the slot's extents), optionally with O_DIRECT. The in-memory index (key -> size) is
rebuilt at start from headers alone and kept in LRU order; capacity is enforced by
evicting least recently read files. While the limit is below ``disk.bytes`` (after an
ENOSPC, or a start on a full file system) free space is re-measured every
``FREE_RECHECK_S`` from ``healthy()`` too, which the manager asks on every write and
lookup: a tier with no room at all gets no ``put()`` calls, so the re-check cannot
wait for one.

All file system calls go through ``FileSystem``, the seam tests use to inject ENOSPC
and EIO.
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import secrets
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvnode.agent.tiers.base import Listing, SlotBuffers, TierStats, read_back, sealed_header
from kvnode.agent.tiers.format import (
    CODEC_NONE,
    HEADER_BYTES,
    NO_FINGERPRINT,
    ChunkMeta,
    decode_header,
    decode_meta,
)
from kvnode.errors import CorruptEntry, DiskError, DiskFull

log = logging.getLogger("kvnode.tiers.disk")

SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
DIRECT_ALIGN = 4096
IOV_MAX = 1024  # buffers per preadv/pwritev call (Linux UIO_MAXIOV)
RECOVERY_THREADS = 32  # header reads in flight during the start-up scan
CHANGES_MAX = 65536  # recovered/evicted chunks remembered for KV events between polls
LISTING_LOG_MAX = 1 << 18  # entry changes kept for the lookup listing between polls
# While the limit is below disk.bytes, free space is measured again this often (one
# statvfs): space freed by others is used again within this time, well inside the 30 s
# the docs promise.
FREE_RECHECK_S = 5.0


class FileSystem:
    """The disk tier's only door to the OS. Subclass to inject faults."""

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def preadv(self, fd: int, bufs: list[memoryview], offset: int) -> int:
        return os.preadv(fd, bufs, offset)

    def pwritev(self, fd: int, bufs: list[memoryview], offset: int) -> int:
        return os.pwritev(fd, bufs, offset)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return os.pread(fd, n, offset)

    def fstat_size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def fstat_regular(self, fd: int) -> bool:
        return stat.S_ISREG(os.fstat(fd).st_mode)

    def ftruncate(self, fd: int, n: int) -> None:
        os.ftruncate(fd, n)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def touch(self, path: str) -> None:
        os.utime(path)

    def scandir(self, path: str) -> list[os.DirEntry[str]]:
        with os.scandir(path) as it:
            return list(it)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)

    def free_bytes(self, path: str) -> int:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize


@dataclass(slots=True)
class DiskEntry:
    size: int  # payload bytes
    file_bytes: int


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The part of ``bufs`` after the first ``n`` bytes (short read or write)."""
    out = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:] if n else b)
        n = 0
    return out


class DiskStore:
    def __init__(
        self,
        path: str,
        bytes_max: int,
        o_direct: bool = False,
        fsync: bool = True,
        fs: FileSystem | None = None,
        name: str = "disk",
        scan: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.clock = clock
        self.root = Path(path)
        self.bytes_max = bytes_max
        self.fsync = fsync
        self.o_direct = o_direct and hasattr(os, "O_DIRECT")
        self.fs = fs or FileSystem()
        self.stats = TierStats(name)
        self.entries: OrderedDict[bytes, DiskEntry] = OrderedDict()  # LRU first
        self._lock = threading.Lock()
        self._bytes = 0  # files in the index
        self._pending = 0  # bytes reserved by writes in progress
        self._writing: set[bytes] = set()
        self._tmp_seq = itertools.count()
        # Our temp files' tag: a per-start nonce, not the pid (a restarted agent in a
        # container has the same pid as the one that crashed and left its temp files).
        self._tmp_tag = secrets.token_hex(6)
        self._local = threading.local()
        self.bytes_limit = bytes_max  # lowered to what the file system really holds
        self._limit_checked = float("-inf")  # when free space was last measured
        self.recovery_s = 0.0
        self.stale_tmp_removed = 0
        self.scanning = True  # until recover() returns: the index may be incomplete
        # For KV events; bounded (a huge scan announces its newest CHANGES_MAX chunks).
        self._changes_found: deque[tuple[bytes, ChunkMeta | None]] = deque(maxlen=CHANGES_MAX)
        self._changes_gone: deque[bytes] = deque(maxlen=CHANGES_MAX)
        self._gone: set[bytes] = set()  # dropped while the scan ran: not to be re-added
        # Every change of ``entries``, in order, for the shared lookup listing; past
        # LISTING_LOG_MAX (nobody took them) the listing is rebuilt from ``entries``.
        self._listed: list[tuple[bool, bytes]] = []
        self._relist = True
        for i in range(256):
            self.fs.makedirs(str(self.root / f"{i:02x}"))
        if scan:
            self.recover()

    # -- paths -------------------------------------------------------------------
    def path_of(self, key: bytes) -> str:
        hx = key.hex()
        return str(self.root / hx[:2] / (hx + SUFFIX))

    def _tmp_path(self, key: bytes) -> str:
        hx = key.hex()
        return str(self.root / hx[:2] / f".{hx}.{self._tmp_tag}.{next(self._tmp_seq)}{TMP_SUFFIX}")

    def _header_buf(self) -> memoryview:
        """A page-aligned per-thread header block (O_DIRECT needs aligned memory)."""
        buf = getattr(self._local, "hdr", None)
        if buf is None:
            buf = self._local.hdr = memoryview(mmap.mmap(-1, HEADER_BYTES))
        return buf

    # -- start-up ----------------------------------------------------------------
    def recover(self) -> None:
        """Rebuild the index from file headers; remove temp and unreadable files.
        Subdirectories are scanned by ``RECOVERY_THREADS`` threads: on a cold cache the
        scan waits on the device, and many reads in flight hide its latency."""
        t0 = time.perf_counter()
        subs = [
            sub.path
            for sub in self.fs.scandir(str(self.root))
            if len(sub.name) == 2 and sub.is_dir(follow_symlinks=False)
        ]
        found: list[tuple[int, bytes, DiskEntry]] = []
        with ThreadPoolExecutor(RECOVERY_THREADS, thread_name_prefix="kvnode-disk-scan") as ex:
            for part in ex.map(self._recover_dir, subs):
                found.extend(part)
        found.sort(key=lambda t: t[0])  # oldest access first: LRU order survives restarts
        with self._lock:
            # Entries probed or written while the scan ran are already in, more recent.
            known = dict(self.entries)
            self.entries.clear()
            for _, key, e in found:
                if key not in known and key not in self._gone:
                    self.entries[key] = e
                    self._bytes += e.file_bytes
            self.entries.update(known)
            victims = self._make_room(0)
            self.scanning = False
            self._gone.clear()
            self._relist = True  # the listing starts from the whole index
            self._listed.clear()
        self._unlink_all(victims)
        self._refresh_limit(force=True)
        self.recovery_s = time.perf_counter() - t0
        log.info(
            "disk tier %s: %d entries, %d bytes recovered in %.3fs (%d stale temp files removed)",
            self.root, len(self.entries), self._bytes, self.recovery_s, self.stale_tmp_removed,
        )  # fmt: skip

    def _recover_dir(self, path: str) -> list[tuple[int, bytes, DiskEntry]]:
        found: list[tuple[int, bytes, DiskEntry]] = []
        for f in self.fs.scandir(path):
            self._recover_one(f, found)
        return found

    def _recover_one(self, f: os.DirEntry[str], found: list[tuple[int, bytes, DiskEntry]]) -> None:
        if f.name.endswith(TMP_SUFFIX):
            if f.name.split(".")[-3:-2] == [self._tmp_tag]:
                return  # a write of ours in progress (the scan runs while we serve)
            self._unlink(f.path)
            with self._lock:
                self.stale_tmp_removed += 1
            return
        if not f.name.endswith(SUFFIX):
            return
        try:
            st = f.stat(follow_symlinks=False)
        except OSError:
            return
        self._recover_file(f.path, f.name, st, found)

    def _recover_file(
        self, path: str, name: str, st: os.stat_result, found: list[tuple[int, bytes, DiskEntry]]
    ) -> None:
        try:
            key = bytes.fromhex(name[: -len(SUFFIX)])
            if not stat.S_ISREG(st.st_mode):
                raise CorruptEntry("not a regular file")
            fd = self._open_chunk(path, os.O_RDONLY)
            try:
                raw = self.fs.pread(fd, HEADER_BYTES, 0)  # one page: the header and meta
            finally:
                self.fs.close(fd)
            h = decode_header(raw, key)
            if h.codec != CODEC_NONE or st.st_size != h.total_bytes:
                raise CorruptEntry("length does not match header")
        except (ValueError, CorruptEntry, OSError) as exc:
            self.stats.error("unreadable file dropped", f"{path}: {exc}", "corrupt")
            self._unlink(path)
            return
        found.append((st.st_mtime_ns, key, DiskEntry(h.raw_bytes, h.total_bytes)))
        with self._lock:
            self._changes_found.append((key, decode_meta(raw)))

    # -- capacity ----------------------------------------------------------------
    def _refresh_limit(self, force: bool = False) -> None:
        """Set the limit to what the file system holds. Cheap enough for the loop
        thread: one statvfs, at most every ``FREE_RECHECK_S`` unless forced."""
        now = self.clock()
        if not force and (
            self.bytes_limit >= self.bytes_max or now - self._limit_checked < FREE_RECHECK_S
        ):
            return
        self._limit_checked = now
        try:
            room = self.fs.free_bytes(str(self.root))
        except OSError as exc:
            self.stats.error("cannot measure free space", exc)
            return
        with self._lock:
            was = self.bytes_limit
            self.bytes_limit = min(self.bytes_max, self._bytes + self._pending + room)
            back = was == 0 and self.bytes_limit > 0
        if back:
            self.stats.recovered(f"file system has room again ({self.bytes_limit} bytes usable)")

    def startup_scan(self) -> Callable[[], None] | None:
        return self.recover if self.scanning else None

    def set_capacity(self, bytes_max: int) -> int | None:
        """Runtime change of ``disk.bytes`` (SIGHUP). Shrinking evicts LRU files now."""
        old = self.bytes_max
        with self._lock:
            self.bytes_max = bytes_max
            self.bytes_limit = bytes_max
            self._limit_checked = float("-inf")  # re-read free space at the next chance
            victims = self._make_room(0)
        self._unlink_all(victims)
        return old

    def _make_room(self, need: int) -> list[str]:
        """Pop LRU entries until ``need`` more bytes fit. Caller holds the lock."""
        victims = []
        while self.entries and self._bytes + self._pending + need > self.bytes_limit:
            key, e = self.entries.popitem(last=False)
            self._bytes -= e.file_bytes
            victims.append(self.path_of(key))
            self._changes_gone.append(key)
            self._list(False, key)
        self.stats.inc("evictions", len(victims))
        return victims

    def _unlink(self, path: str) -> None:
        try:
            self.fs.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.stats.error("cannot remove a file", f"{path}: {exc}")

    def _unlink_all(self, paths: list[str]) -> None:
        for p in paths:
            self._unlink(p)

    def _list(self, added: bool, key: bytes) -> None:
        """Record a change of ``entries`` for the listing. Caller holds the lock."""
        if self._relist:
            return  # the rebuild reads ``entries`` itself
        if len(self._listed) >= LISTING_LOG_MAX:
            self._listed.clear()
            self._relist = True
            return
        self._listed.append((added, key))

    def take_listing(self) -> Listing | None:
        with self._lock:
            if self.scanning:
                return None
            if self._relist:
                self._relist = False
                self._listed.clear()
                return Listing(list(self.entries), [])
            changes, self._listed = self._listed, []
        return Listing(None, changes)

    def take_changes(self) -> tuple[list[tuple[bytes, ChunkMeta | None]], list[bytes]]:
        """Chunks the start-up scan found (with their metadata) and chunks evicted to
        make room, since the last call. Bounded: the oldest are forgotten first."""
        with self._lock:
            found, gone = list(self._changes_found), list(self._changes_gone)
            self._changes_found.clear()
            self._changes_gone.clear()
        return found, gone

    # -- the store interface --------------------------------------------------------
    def size_of(self, key: bytes) -> int | None:
        with self._lock:
            e = self.entries.get(key)
        return None if e is None else e.size

    def may_probe(self, key: bytes) -> bool:
        return self.scanning  # the index is complete once recover() returned

    def probe(self, key: bytes) -> int | None:
        """While the start-up scan runs: read this key's header now."""
        size = self.size_of(key)
        if size is not None or not self.scanning:
            return size
        path = self.path_of(key)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.stats.error("cannot stat a file", f"{path}: {exc}")
            return None
        found: list[tuple[int, bytes, DiskEntry]] = []
        self._recover_file(path, os.path.basename(path), st, found)
        if not found:
            return None
        e = found[0][2]
        with self._lock:
            if key not in self.entries:
                self.entries[key] = e
                self._bytes += e.file_bytes
                self._list(True, key)
        return e.size

    def healthy(self) -> bool:
        """False while the file system has no room for us. Also the timer of the free
        space re-check: an unhealthy tier gets no put() that could run it."""
        self._refresh_limit()
        return self.bytes_limit > 0

    def gauges(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self.entries),
                "bytes": self._bytes,
                "bytes_max": self.bytes_max,
                "bytes_limit": self.bytes_limit,
                "scanning": int(self.scanning),
            }

    def put(
        self,
        key: bytes,
        slot: SlotBuffers,
        checksum: int,
        fingerprint: bytes = NO_FINGERPRINT,
        meta: ChunkMeta | None = None,
    ) -> bool:
        t0 = time.perf_counter()
        total = HEADER_BYTES + slot.size
        self._refresh_limit()
        with self._lock:
            if key in self.entries or key in self._writing or total > self.bytes_limit:
                return False
            victims = self._make_room(total)
            self._pending += total
            self._writing.add(key)
        try:
            self._unlink_all(victims)
            self._write_file(key, slot, checksum, fingerprint, meta)
        except BaseException:
            with self._lock:
                self._pending -= total
                self._writing.discard(key)
            raise
        with self._lock:
            self._pending -= total
            self._writing.discard(key)
            self.entries[key] = DiskEntry(slot.size, total)
            self._bytes += total
            self._list(True, key)
        self.stats.write_done(t0, slot.size)
        return True

    def _write_file(
        self,
        key: bytes,
        slot: SlotBuffers,
        checksum: int,
        fingerprint: bytes,
        meta: ChunkMeta | None = None,
    ) -> None:
        hdr = self._header_buf()
        hdr[:] = sealed_header(self.stats, key, slot, checksum, fingerprint, meta)
        bufs = slot.padded(DIRECT_ALIGN) if self.o_direct else None
        tmp, final = self._tmp_path(key), self.path_of(key)
        fd = -1
        try:
            fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, direct=bufs is not None)
            if bufs is not None and fd < 0:
                bufs, fd = None, self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            self._pwritev_all(fd, [hdr, *(bufs if bufs is not None else slot.views)])
            if bufs is not None:
                self.fs.ftruncate(fd, HEADER_BYTES + slot.size)  # cut the alignment slack
            if self.fsync:
                self.fs.fdatasync(fd)
            self.fs.close(fd)
            fd = -1
            self.fs.rename(tmp, final)
        except OSError as exc:
            if fd >= 0:
                try:
                    self.fs.close(fd)
                except OSError:
                    pass
            self._unlink(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.stats.error("file system full", f"{final}: {exc}")
                with self._lock:  # the file system holds less than disk.bytes: believe it
                    self.bytes_limit = self._bytes
                    self._limit_checked = self.clock()
                raise DiskFull(f"disk tier full writing {final}") from exc
            self.stats.error("write failed", f"{final}: {exc}")
            raise DiskError(f"cannot write {final}: {exc}") from exc

    def _open(self, path: str, flags: int, direct: bool = False) -> int:
        """Open; with ``direct``, returns -1 when the file system refuses O_DIRECT."""
        if not direct:
            return self.fs.open(path, flags)
        try:
            return self.fs.open(path, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.warning("disk tier: %s refuses O_DIRECT; using buffered I/O", self.root)
            self.o_direct = False
            return -1

    def _open_chunk(self, path: str, flags: int, direct: bool = False) -> int:
        """``_open`` of a chunk file to read: a regular file of its own, never what a
        link at its path names, and never a wait (a FIFO put there would block the
        open, and the disk tier's I/O thread with it); else ``CorruptEntry``."""
        fd = self._open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, direct)
        if fd < 0:
            return fd
        try:
            regular = self.fs.fstat_regular(fd)
        except OSError:
            self.fs.close(fd)
            raise
        if not regular:
            self.fs.close(fd)
            raise CorruptEntry("not a regular file")
        return fd

    def _pwritev_all(self, fd: int, bufs: list[memoryview]) -> None:
        off = 0
        while bufs:
            n = self.fs.pwritev(fd, bufs[:IOV_MAX], off)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            off += n
            bufs = _advance(bufs, n)

    def _preadv_all(self, fd: int, bufs: list[memoryview]) -> int:
        off = 0
        while bufs:
            n = self.fs.preadv(fd, bufs[:IOV_MAX], off)
            if n == 0:
                break  # end of file
            off += n
            bufs = _advance(bufs, n)
        return off

    def read_into(self, key: bytes, slot: SlotBuffers) -> int | None:
        t0 = time.perf_counter()
        with self._lock:
            e = self.entries.get(key)
            if e is not None:
                self.entries.move_to_end(key)
        if e is None:
            return None
        path = self.path_of(key)
        try:
            got = self._read_file(key, path, e, slot)
        except FileNotFoundError:
            self._forget(key)
            return None
        except (CorruptEntry, OSError) as exc:
            self._forget(key)
            self._unlink(path)
            if isinstance(exc, CorruptEntry):
                self.stats.error("corrupt file dropped", f"{path}: {exc}", "corrupt")
                raise
            self.stats.error("read failed", f"{path}: {exc}")
            raise DiskError(f"cannot read {path}: {exc}") from exc
        try:
            self.fs.touch(path)  # access time for LRU order after a restart
        except FileNotFoundError:
            pass  # deleted meanwhile: nothing to order
        except OSError as exc:
            self.stats.error("cannot update access time", f"{path}: {exc}")
        self.stats.read_done(t0, slot.size)
        return got

    def _read_file(self, key: bytes, path: str, e: DiskEntry, slot: SlotBuffers) -> int:
        if e.size != slot.size:
            raise CorruptEntry("slot size differs from the indexed size")
        bufs = slot.padded(DIRECT_ALIGN) if self.o_direct else None
        fd = self._open_chunk(path, os.O_RDONLY, direct=bufs is not None)
        if fd < 0:
            bufs, fd = None, self._open_chunk(path, os.O_RDONLY)
        hdr = self._header_buf()
        try:
            if self.fs.fstat_size(fd) != e.file_bytes:
                raise CorruptEntry("file length changed (truncated?)")
            n = self._preadv_all(fd, [hdr, *(bufs if bufs is not None else slot.views)])
        finally:
            self.fs.close(fd)
        h = decode_header(hdr, key)
        if h.codec != CODEC_NONE or h.raw_bytes != slot.size or n != h.total_bytes:
            raise CorruptEntry("length does not match header")
        return read_back(h, slot, hdr)

    def _forget(self, key: bytes) -> None:
        with self._lock:
            if self.scanning:
                self._gone.add(key)
            e = self.entries.pop(key, None)
            if e is not None:
                self._bytes -= e.file_bytes
                self._list(False, key)

    def delete(self, key: bytes) -> None:
        self._forget(key)
        self._unlink(self.path_of(key))
        self.stats.inc("deletes")

    def close(self) -> None:
        pass
