"""Disk tier specifics: restart recovery, crash leftovers, capacity, injected and real
file system errors."""

from __future__ import annotations

import errno
import mmap
import os
import stat
import subprocess
from pathlib import Path

import pytest

from kvnode.agent.tiers.base import SlotBuffers
from kvnode.agent.tiers.disk import FREE_RECHECK_S, DiskStore, FileSystem
from kvnode.agent.tiers.format import HEADER_BYTES, checksum
from kvnode.errors import CorruptEntry, DiskError, DiskFull

KiB = 1024
MiB = 1024 * KiB


def slot(data: bytes) -> SlotBuffers:
    buf = mmap.mmap(-1, max(4096, -(-len(data) // 4096) * 4096))
    buf[: len(data)] = data
    return SlotBuffers.of(buf, len(data))


def empty(n: int) -> SlotBuffers:
    return SlotBuffers.of(mmap.mmap(-1, max(4096, -(-n // 4096) * 4096)), n)


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_restart_rebuilds_index_and_lru_order(tmp_path):
    d = DiskStore(str(tmp_path), 10 * MiB)
    datas = {key(i): os.urandom(100 * KiB + i) for i in range(5)}
    for k, v in datas.items():
        assert d.put(k, slot(v), checksum(v))
    os.utime(d.path_of(key(0)), ns=(10**18, 2 * 10**18))  # key 0 read most recently
    again = DiskStore(str(tmp_path), 10 * MiB)
    assert again.gauges()["entries"] == 5
    assert list(again.entries)[-1] == key(0)
    for k, v in datas.items():
        out = empty(len(v))
        assert again.read_into(k, out) == checksum(v)
        assert bytes(out.views[0]) == v


def test_crash_leftovers_are_removed_and_never_read(tmp_path):
    d = DiskStore(str(tmp_path), 10 * MiB)
    v = os.urandom(50 * KiB)
    d.put(key(1), slot(v), checksum(v))
    sub = Path(d.path_of(key(2))).parent
    tmp = sub / f".{key(2).hex()}.999.0.tmp"
    tmp.write_bytes(b"half a file")
    half = Path(d.path_of(key(3)))
    half.write_bytes(Path(d.path_of(key(1))).read_bytes()[: HEADER_BYTES + 10])
    junk = Path(d.path_of(key(4)))
    junk.write_bytes(b"not ours")
    again = DiskStore(str(tmp_path), 10 * MiB)
    assert not tmp.exists() and not half.exists() and not junk.exists()
    assert again.stale_tmp_removed == 1
    assert again.stats.snapshot()["corrupt"] == 2
    assert set(again.entries) == {key(1)}


def test_capacity_evicts_least_recently_read(tmp_path):
    size = 100 * KiB
    d = DiskStore(str(tmp_path), 3 * (size + HEADER_BYTES))
    for i in range(3):
        d.put(key(i), slot(os.urandom(size)), 0)
    d.read_into(key(0), empty(size))  # 0 is now the most recent
    d.put(key(3), slot(os.urandom(size)), 0)
    assert set(d.entries) == {key(0), key(2), key(3)}
    assert not Path(d.path_of(key(1))).exists()
    assert d.stats.snapshot()["evictions"] == 1
    assert d.put(key(9), slot(os.urandom(4 * size)), 0) is False  # larger than the tier


class FaultyFS(FileSystem):
    def __init__(self) -> None:
        self.fail_write: int | None = None
        self.fail_read: int | None = None

    def pwritev(self, fd, bufs, offset):
        if self.fail_write is not None:
            raise OSError(self.fail_write, os.strerror(self.fail_write))
        return super().pwritev(fd, bufs, offset)

    def preadv(self, fd, bufs, offset):
        if self.fail_read is not None:
            raise OSError(self.fail_read, os.strerror(self.fail_read))
        return super().preadv(fd, bufs, offset)


def test_enospc_is_counted_and_the_tier_keeps_serving(tmp_path):
    fs = FaultyFS()
    d = DiskStore(str(tmp_path), 10 * MiB, fs=fs)
    v = os.urandom(64 * KiB)
    d.put(key(1), slot(v), checksum(v))
    fs.fail_write = errno.ENOSPC
    with pytest.raises(DiskFull):
        d.put(key(2), slot(v), checksum(v))
    assert d.stats.snapshot()["errors"] == 1
    assert not any(p.name.endswith(".tmp") for p in Path(d.path_of(key(2))).parent.iterdir())
    assert d.bytes_limit == d.gauges()["bytes"]  # believes the file system now
    out = empty(len(v))
    assert d.read_into(key(1), out) == checksum(v)
    fs.fail_write = None
    assert d.put(key(3), slot(v), checksum(v))  # room made by evicting the oldest
    assert d.size_of(key(1)) is None and d.size_of(key(3)) == len(v)


def test_eio_on_read_drops_the_entry(tmp_path):
    fs = FaultyFS()
    d = DiskStore(str(tmp_path), 10 * MiB, fs=fs)
    v = os.urandom(64 * KiB)
    d.put(key(1), slot(v), checksum(v))
    d.put(key(2), slot(v), checksum(v))
    fs.fail_read = errno.EIO
    with pytest.raises(DiskError):
        d.read_into(key(1), empty(len(v)))
    fs.fail_read = None
    assert d.size_of(key(1)) is None and not Path(d.path_of(key(1))).exists()
    assert d.read_into(key(2), empty(len(v))) == checksum(v)
    assert d.stats.snapshot()["errors"] == 1


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_small_file_system(small_tmpfs):
    # disk.bytes far above what the mount holds: the tier starts from the real limit...
    d = DiskStore(str(small_tmpfs / "kv"), 64 * MiB, o_direct=True)
    assert d.bytes_limit <= 2 * MiB
    # ...then another tenant takes most of the space: ENOSPC, counted, nothing torn.
    (small_tmpfs / "filler").write_bytes(b"\0" * (1024 + 512) * KiB)
    kept, errors = {}, 0
    for i in range(12):  # ~3 MiB through what is left
        v = os.urandom(128 * KiB)
        try:
            if d.put(key(i), slot(v), checksum(v)):
                kept[key(i)] = v
        except DiskFull:
            errors += 1
    assert errors >= 1 and d.stats.snapshot()["errors"] == errors
    assert not list(small_tmpfs.glob("kv/*/.*.tmp"))
    assert d.bytes_limit < 2 * MiB
    # The tier shrank to what the file system holds and kept serving.
    assert len(d.entries) >= 1
    for k in list(d.entries):
        out = empty(d.size_of(k))
        assert d.read_into(k, out) == checksum(kept[k])
        assert bytes(out.views[0]) == kept[k]
    assert key(11) in d.entries  # the newest was stored after the error


def test_probe_while_the_start_up_scan_has_not_run(tmp_path):
    d = DiskStore(str(tmp_path), 10 * MiB)
    v = os.urandom(70 * KiB)
    d.put(key(1), slot(v), checksum(v))
    d.put(key(2), slot(v), checksum(v))
    late = DiskStore(str(tmp_path), 10 * MiB, scan=False)
    assert late.size_of(key(1)) is None and late.may_probe(key(1))
    assert late.probe(key(1)) == len(v) and late.probe(key(9)) is None
    out = empty(len(v))
    assert late.read_into(key(1), out) == checksum(v)
    late.recover()
    assert not late.may_probe(key(3))
    assert late.gauges()["entries"] == 2
    assert late.gauges()["bytes"] == 2 * (len(v) + HEADER_BYTES)


def test_entry_dropped_during_the_scan_stays_dropped(tmp_path):
    d = DiskStore(str(tmp_path), 10 * MiB)
    v = os.urandom(70 * KiB)
    d.put(key(1), slot(v), checksum(v))
    raw = bytearray(Path(d.path_of(key(1))).read_bytes())
    raw[-1] ^= 1  # payload corrupt, header fine: the scan indexes it
    Path(d.path_of(key(1))).write_bytes(raw)

    class HookFS(FileSystem):
        hook = None

        def pread(self, fd, n, offset):
            data = super().pread(fd, n, offset)
            hook, HookFS.hook = HookFS.hook, None
            if hook is not None:
                hook()
            return data

    late = DiskStore(str(tmp_path), 10 * MiB, fs=HookFS(), scan=False)

    def lookup_meanwhile() -> None:  # a lookup while the scan runs finds it corrupt
        assert late.probe(key(1)) == len(v)
        with pytest.raises(CorruptEntry):
            late.read_into(key(1), empty(len(v)))

    HookFS.hook = lookup_meanwhile
    late.recover()
    assert HookFS.hook is None
    assert late.gauges()["entries"] == 0 and late.size_of(key(1)) is None


def test_scan_leaves_our_own_writes_in_progress_alone(tmp_path):
    d = DiskStore(str(tmp_path), 10 * MiB)
    ours = Path(d._tmp_path(key(5)))
    ours.write_bytes(b"being written")
    crashed = ours.with_name(f".{key(6).hex()}.999999.0.tmp")
    crashed.write_bytes(b"left by a crash")
    d.recover()
    assert ours.exists() and not crashed.exists()


# -- a full file system: the tier stops writing, and resumes once space is freed ----------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fill_up(mnt: Path) -> Path:
    """Take every free byte of the mount, as another tenant would."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * (64 * KiB))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_enospc_on_an_empty_tier_recovers_without_a_put(small_tmpfs):
    clock = Clock()
    d = DiskStore(str(small_tmpfs / "kv"), 64 * MiB, clock=clock)
    filler = fill_up(small_tmpfs)
    v = os.urandom(128 * KiB)
    with pytest.raises(DiskFull):
        d.put(key(1), slot(v), checksum(v))
    assert d.bytes_limit == 0 and not d.healthy()  # the manager now sends no writes
    filler.unlink()
    clock.now += FREE_RECHECK_S / 2
    assert not d.healthy()  # free space is not measured on every call
    clock.now += FREE_RECHECK_S
    assert d.healthy() and d.bytes_limit > len(v)  # healthy() alone re-measured it
    assert d.put(key(2), slot(v), checksum(v))
    out = empty(len(v))
    assert d.read_into(key(2), out) == checksum(v)
    assert d.stats.snapshot()["errors"] == 1


def test_agent_started_on_a_full_disk_writes_once_space_is_freed(small_tmpfs):
    DiskStore(str(small_tmpfs / "kv"), 64 * MiB)  # its directories, made while there is room
    filler = fill_up(small_tmpfs)
    clock = Clock()
    d = DiskStore(str(small_tmpfs / "kv"), 64 * MiB, clock=clock)
    assert d.bytes_limit == 0 and not d.healthy()
    filler.unlink()
    clock.now += FREE_RECHECK_S
    assert d.healthy()
    v = os.urandom(128 * KiB)
    assert d.put(key(1), slot(v), checksum(v))


class RoomFS(FileSystem):
    """Free space as the test says (a unit test of the re-check logic)."""

    room = 0
    calls = 0

    def free_bytes(self, path: str) -> int:
        self.calls += 1
        return self.room


def test_free_space_recheck_is_rate_limited_and_independent_of_put(tmp_path):
    fs, clock = RoomFS(), Clock()
    d = DiskStore(str(tmp_path), 64 * MiB, fs=fs, clock=clock)
    assert not d.healthy() and fs.calls == 1
    fs.room = 10 * MiB
    for _ in range(100):  # the loop asks often: one statvfs per period at most
        assert not d.healthy()
        clock.now += FREE_RECHECK_S / 200
    assert fs.calls == 1
    clock.now += FREE_RECHECK_S
    assert d.healthy() and d.bytes_limit == 10 * MiB and fs.calls == 2


def test_chunk_meta_lives_in_the_header_and_evictions_are_reported(tmp_path) -> None:
    """Tokens and parent written with a chunk come back from a fresh scan (a restart);
    chunks the tier evicts to make room are reported once, for KV events."""
    from kvnode.agent.tiers.format import ChunkMeta

    meta = ChunkMeta.of(b"p" * 16, [1, 2, 3])
    d = DiskStore(tmp_path, 10 * (HEADER_BYTES + 100_000), scan=False)
    d.put(key(1), slot(os.urandom(100_000)), 0, meta=meta)
    d.put(key(2), slot(os.urandom(100_000)), 0)
    d.close()
    again = DiskStore(tmp_path, 10 * (HEADER_BYTES + 100_000), scan=False)
    again.recover()
    found, gone = again.take_changes()
    assert dict(found) == {key(1): meta, key(2): None} and gone == []
    assert again.take_changes() == ([], [])
    again.set_capacity(HEADER_BYTES + 100_000)  # room for one: one goes
    (gone_key,) = again.take_changes()[1]
    assert gone_key in (key(1), key(2)) and again.size_of(gone_key) is None


def test_listing_follows_every_change_of_the_books(tmp_path, monkeypatch) -> None:
    """What the shared lookup listing is built from: nothing while the scan runs, all
    keys first, then every add and removal in order (writes, evictions, deletes), and
    all keys again after more changes piled up than are kept."""
    from kvnode.agent.tiers import disk as disk_mod

    v = os.urandom(100 * KiB)
    d0 = DiskStore(str(tmp_path), 10 * MiB)
    assert d0.put(key(0), slot(v), checksum(v))
    d = DiskStore(str(tmp_path), 10 * MiB, scan=False)
    assert d.take_listing() is None  # the start-up scan has not run
    d.recover()
    first = d.take_listing()
    assert first is not None and first.full == [key(0)] and first.changes == []
    assert d.put(key(1), slot(v), checksum(v))
    d.delete(key(0))
    d.set_capacity(50 * KiB)  # no room for key 1: evicted
    got = d.take_listing()
    assert got is not None and got.full is None
    assert got.changes == [(True, key(1)), (False, key(0)), (False, key(1))]
    assert d.take_listing() == disk_mod.Listing(None, [])
    d.set_capacity(10 * MiB)
    monkeypatch.setattr(disk_mod, "LISTING_LOG_MAX", 2)
    for i in range(2, 6):
        assert d.put(key(i), slot(v), checksum(v))
    again = d.take_listing()
    assert again is not None and sorted(again.full or []) == [key(i) for i in range(2, 6)]


# -- what another process may put at a chunk's path ---------------------------------------
def _in_time(fn, timeout_s: float = 10.0):
    """``fn()`` on a thread: its result, or a failure when it is still blocked."""
    import threading

    out: list = []

    def run() -> None:
        try:
            out.append((fn(), None))
        except BaseException as exc:
            out.append((None, exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"{fn} still blocked after {timeout_s} s"
    got, exc = out[0]
    if exc is not None:
        raise exc
    return got


@pytest.mark.parametrize("what", ["fifo", "link to a fifo", "link to a chunk"])
def test_a_non_file_at_a_chunks_path_is_dropped_never_waited_on(tmp_path, what):
    """A FIFO (or a link) where a chunk file was: the start-up scan, a probe while it
    runs and a read each drop it as corrupt at once. Opening a FIFO to read waits for
    a writer: the scan never ended and the I/O thread that read it was lost."""
    d = DiskStore(str(tmp_path / "kv"), 10 * MiB)
    v, w = os.urandom(50 * KiB), os.urandom(50 * KiB)
    assert d.put(key(1), slot(v), checksum(v)) and d.put(key(2), slot(w), checksum(w))
    bad = Path(d.path_of(key(1)))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def plant() -> None:
        bad.unlink(missing_ok=True)
        if what == "fifo":
            os.mkfifo(bad)
        else:
            bad.symlink_to(fifo if what == "link to a fifo" else d.path_of(key(2)))

    try:
        plant()
        with pytest.raises((CorruptEntry, DiskError)):  # the runtime read
            _in_time(lambda: d.read_into(key(1), empty(len(v))))
        plant()
        again = _in_time(lambda: DiskStore(str(tmp_path / "kv"), 10 * MiB))  # the scan
        assert set(again.entries) == {key(2)} and not os.path.lexists(bad)
        assert again.stats.snapshot()["corrupt"] == 1
        plant()
        late = DiskStore(str(tmp_path / "kv"), 10 * MiB, scan=False)
        assert _in_time(lambda: late.probe(key(1))) is None  # a probe while scanning
        assert not os.path.lexists(bad)
        out = empty(len(w))
        assert again.read_into(key(2), out) == checksum(w) and bytes(out.views[0]) == w
    finally:
        for p in (fifo, bad):  # a thread left blocked on a FIFO gets its writer
            if p.exists() and stat.S_ISFIFO(p.stat().st_mode):
                try:
                    os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass


def test_temp_files_of_a_crashed_agent_with_our_pid_are_removed(tmp_path):
    """A restarted agent in a container has the pid of the one that crashed: its
    temp files are stale all the same, and removed; only this start's are kept."""
    d = DiskStore(str(tmp_path), 10 * MiB)
    sub = Path(d.path_of(key(7))).parent
    crashed = sub / f".{key(7).hex()}.{os.getpid()}.0{'.tmp'}"
    crashed.write_bytes(b"left by a crash of an agent with this pid")
    ours = Path(d._tmp_path(key(8)))
    ours.write_bytes(b"being written")
    d.recover()
    assert not crashed.exists() and ours.exists()
    assert d.stale_tmp_removed == 1
