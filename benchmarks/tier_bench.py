"""Tier throughput: the disk and S3 tiers' real code paths against plain I/O of the same
bytes, measured in the same run. Prints one JSON object.

Disk: ``DiskStore.put`` from arena slots and ``DiskStore.read_into`` into arena slots
(header, checksums, temp file + rename included) versus plain ``pwritev``/``preadv`` of
the same slots to files in the same directory, with the same O_DIRECT and fsync
settings. Before every read pass each file is dropped from the page cache
(fsync'ed writes, then ``posix_fadvise(DONTNEED)``), the same for both sides.

S3: ``S3Store.put``/``read_into`` versus boto3 ``put_object``/``get_object`` of the
same payloads with the same client, against a loopback moto server.

Each side runs ``--repeats`` times, interleaved (order alternating) so both see the
same machine noise; the numbers are medians. Targets: every ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvnode.agent.tiers.base import SlotBuffers
from kvnode.agent.tiers.disk import DiskStore
from kvnode.agent.tiers.format import checksum

PAGE_BYTES = 64 * 1024


def _slots(arena: mmap.mmap, count: int, size: int) -> list[SlotBuffers]:
    pages = -(-size // PAGE_BYTES)
    view = memoryview(arena)
    return [SlotBuffers(view, [(i * pages, pages)], PAGE_BYTES, size) for i in range(count)]


def _drop_cache(paths: list[str]) -> None:
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _interleaved(
    res: dict[str, list[float]],
    a_name: str,
    a: Callable[[int], None],
    b_name: str,
    b: Callable[[int], None],
    args: argparse.Namespace,
) -> None:
    """Run ``a(i)`` and ``b(i)`` chunk by chunk, alternating which goes first, so slow
    patches of a shared device hit both sides alike. Appends GB/s of each side."""
    spent = {a_name: 0.0, b_name: 0.0}
    for i in range(args.chunks):
        pair = [(a_name, a), (b_name, b)]
        for name, fn in pair if i % 2 == 0 else pair[::-1]:
            t0 = time.perf_counter()
            fn(i)
            spent[name] += time.perf_counter() - t0
    total = args.chunks * args.chunk_bytes
    for name, secs in spent.items():
        res[name].append(_gbps(total, secs))


class RawDisk:
    """Plain file I/O of the same slots: no header, checksum or rename."""

    def __init__(self, root: Path, o_direct: bool, fsync: bool) -> None:
        self.root, self.o_direct, self.fsync = root, o_direct, fsync
        root.mkdir(parents=True)

    def path(self, i: int) -> str:
        return str(self.root / f"{i}.raw")

    def _bufs(self, s: SlotBuffers) -> list[memoryview]:
        return (s.padded(4096) if self.o_direct else None) or s.views

    def write(self, i: int, s: SlotBuffers) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if self.o_direct else 0)
        fd = os.open(self.path(i), flags, 0o600)
        try:
            os.pwritev(fd, self._bufs(s), 0)
            if self.o_direct:
                os.ftruncate(fd, s.size)
            if self.fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def read(self, i: int, s: SlotBuffers) -> None:
        fd = os.open(self.path(i), os.O_RDONLY | (os.O_DIRECT if self.o_direct else 0))
        try:
            n = os.preadv(fd, self._bufs(s), 0)
        finally:
            os.close(fd)
        if n != s.size:
            raise RuntimeError("short raw read")


def _disk_round(
    args: argparse.Namespace,
    root: Path,
    rep: int,
    src: list[SlotBuffers],
    dst: list[SlotBuffers],
    res: dict[str, list[float]],
) -> None:
    store = DiskStore(str(root / "tier"), 1 << 50, args.o_direct, args.fsync)
    raw = RawDisk(root / "raw", args.o_direct, args.fsync)
    keys = [(rep << 32 | i).to_bytes(16, "big") for i in range(args.chunks)]
    csums = [checksum(sl.views) for sl in src]

    def tier_write(i: int) -> None:
        if not store.put(keys[i], src[i], csums[i]):
            raise RuntimeError("tier refused a write")

    def tier_read(i: int) -> None:
        if store.read_into(keys[i], dst[i]) is None:
            raise RuntimeError("tier lost a chunk")

    _interleaved(res, "tw", tier_write, "rw", lambda i: raw.write(i, src[i]), args)
    _drop_cache([store.path_of(k) for k in keys] + [raw.path(i) for i in range(args.chunks)])
    _interleaved(res, "tr", tier_read, "rr", lambda i: raw.read(i, dst[i]), args)
    if any(bytes(d.views[0]) != bytes(s.views[0]) for d, s in zip(dst, src)):
        raise RuntimeError("read back different bytes")


def bench_disk(args: argparse.Namespace, src: list[SlotBuffers], dst: list[SlotBuffers]) -> dict:
    base = Path(tempfile.mkdtemp(prefix="kvnode-tier-bench-", dir=args.dir))
    res: dict[str, list[float]] = {k: [] for k in ("tw", "tr", "rw", "rr")}
    try:
        for rep in range(args.repeats):
            _disk_round(args, base / str(rep), rep, src, dst, res)
            shutil.rmtree(base / str(rep))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    m = {k: statistics.median(v) for k, v in res.items()}
    return {
        "disk_write_gbps": round(m["tw"], 3),
        "disk_read_gbps": round(m["tr"], 3),
        "raw_write_gbps": round(m["rw"], 3),
        "raw_read_gbps": round(m["rr"], 3),
        "disk_write_ratio": round(m["tw"] / m["rw"], 3),
        "disk_read_ratio": round(m["tr"] / m["rr"], 3),
    }


def _s3_round(
    args: argparse.Namespace,
    store: Any,
    rep: int,
    src: list[SlotBuffers],
    dst: list[SlotBuffers],
    res: dict[str, list[float]],
) -> None:
    client = store.client
    keys = [(rep << 32 | i).to_bytes(16, "big") for i in range(args.chunks)]
    payloads = [b"".join(sl.views) for sl in src]

    def tier_put(i: int) -> None:
        store.put(keys[i], src[i], 0)

    def raw_put(i: int) -> None:
        client.put_object(Bucket="bench", Key=f"raw/{keys[i].hex()}", Body=payloads[i])

    def tier_get(i: int) -> None:
        if store.read_into(keys[i], dst[i]) is None:
            raise RuntimeError("S3 tier lost a chunk")

    def raw_get(i: int) -> None:
        client.get_object(Bucket="bench", Key=f"raw/{keys[i].hex()}")["Body"].read()

    _interleaved(res, "tp", tier_put, "rp", raw_put, args)
    _interleaved(res, "tg", tier_get, "rg", raw_get, args)


def bench_s3(args: argparse.Namespace, src: list[SlotBuffers], dst: list[SlotBuffers]) -> dict:
    import logging

    from moto.server import ThreadedMotoServer

    from kvnode.agent.tiers.s3 import S3Store, make_client

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    res: dict[str, list[float]] = {k: [] for k in ("tp", "tg", "rp", "rg")}
    try:
        client = make_client(f"http://127.0.0.1:{port}", "us-east-1", timeout_s=60)
        client.create_bucket(Bucket="bench")
        store = S3Store("bench", client, prefix="tier/")
        for rep in range(args.repeats):
            _s3_round(args, store, rep, src, dst, res)
    finally:
        server.stop()
    m = {k: statistics.median(v) for k, v in res.items()}
    return {
        "s3_put_gbps": round(m["tp"], 3),
        "s3_get_gbps": round(m["tg"], 3),
        "raw_s3_put_gbps": round(m["rp"], 3),
        "raw_s3_get_gbps": round(m["rg"], 3),
        "s3_put_ratio": round(m["tp"] / m["rp"], 3),
        "s3_get_ratio": round(m["tg"] / m["rg"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="directory for the disk runs (default: TMPDIR)")
    ap.add_argument("--chunk-bytes", type=int, default=4 * 1024 * 1024)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--s3-chunks", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--o-direct", action="store_true")
    ap.add_argument("--no-fsync", dest="fsync", action="store_false")
    ap.add_argument("--no-s3", dest="s3", action="store_false")
    args = ap.parse_args(argv)
    pages = -(-args.chunk_bytes // PAGE_BYTES)
    arena = mmap.mmap(-1, 2 * args.chunks * pages * PAGE_BYTES)
    slots = _slots(arena, 2 * args.chunks, args.chunk_bytes)
    src, dst = slots[: args.chunks], slots[args.chunks :]
    for s in src:
        s.views[0][:] = os.urandom(s.size)
    out: dict[str, object] = {
        "chunk_bytes": args.chunk_bytes,
        "chunks": args.chunks,
        "repeats": args.repeats,
        "o_direct": args.o_direct,
        "fsync": args.fsync,
    }
    out.update(bench_disk(args, src, dst))
    if args.s3:
        n = min(args.s3_chunks, args.chunks)
        s3_args = argparse.Namespace(**{**vars(args), "chunks": n})
        out.update(bench_s3(s3_args, src[:n], dst[:n]))
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
