"""The CPU mover: Linux cross-memory attach between the arena and a worker's memory.

``process_vm_readv``/``process_vm_writev`` copy between this process and another in
one system call per batch of iovecs, without the other process doing anything. They
need ptrace rights over the worker: the same uid (and, under Yama's ``ptrace_scope``
1, the worker's ``prctl(PR_SET_PTRACER, agent_pid)``), or ``CAP_SYS_PTRACE``.

A layer's blocks become remote iovecs directly (consecutive blocks merge into one),
the arena extents of the chunks local ones: no staging buffer on either side. Saves
read each layer of every chunk of a job in one call, then checksum what landed in
the arena (the agent is the writer, so the checksum is its). Loads verify each chunk
in the arena against its writer's checksum first, then write layer by layer, each
layer followed by its progress byte, so the worker's attention for layer i runs
while layer i+1 is copied.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xxhash

from kvnode.agent.movers.base import ChunkWork, Export, Job, Layer, Mover, MoverError
from kvnode.ipc import progress as PG
from kvnode.ipc.checksum import checksum

log = logging.getLogger("kvnode.agent")

IOV_MAX = 1024  # UIO_MAXIOV: iovecs per system call on either side
Piece = tuple[int, int]  # (address, bytes)

_libc = ctypes.CDLL(None, use_errno=True)
_vm_fn = {}
for _name in ("process_vm_readv", "process_vm_writev"):
    _fn = getattr(_libc, _name, None)
    if _fn is not None:
        _fn.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
            ctypes.c_ulong,
        ]  # fmt: skip
        _fn.restype = ctypes.c_ssize_t
        _vm_fn[_name] = _fn


def available() -> bool:
    return len(_vm_fn) == 2


def _iovecs(pieces: Sequence[Piece]) -> np.ndarray:
    return np.array(pieces, dtype=np.uint64).reshape(-1, 2)


def transfer(pid: int, local: Sequence[Piece], remote: Sequence[Piece], write: bool) -> int:
    """Copy ``remote`` (the worker's memory) into ``local`` (ours), or the reverse
    when ``write``. Both lists cover the same number of bytes; any number of pieces
    (batched by ``IOV_MAX``). Returns the bytes moved; raises ``MoverError`` naming
    the errno, or on a short copy (a remote range not mapped)."""
    fn = _vm_fn["process_vm_writev" if write else "process_vm_readv"]
    moved = 0
    for loc, rem, nbytes in batches(local, remote):
        liov, riov = _iovecs(loc), _iovecs(rem)
        got = fn(pid, liov.ctypes.data, len(liov), riov.ctypes.data, len(riov), 0)
        if got < 0:
            err = ctypes.get_errno()
            raise MoverError(f"{'process_vm_writev' if write else 'process_vm_readv'} pid "
                             f"{pid}: {errno.errorcode.get(err, err)} ({os.strerror(err)})")  # fmt: skip
        if got != nbytes:
            raise MoverError(f"short copy with pid {pid}: {got} of {nbytes} bytes")
        moved += got
    return moved


def batches(
    local: Sequence[Piece], remote: Sequence[Piece], iov_max: int = IOV_MAX
) -> Iterator[tuple[list[Piece], list[Piece], int]]:
    """Pair two piece lists of equal total length into batches of at most
    ``iov_max`` iovecs a side with equal byte counts (pieces split where needed,
    neighbours merged)."""
    loc: list[Piece] = []
    rem: list[Piece] = []
    nbytes = li = ri = lpos = rpos = 0
    while li < len(local) and ri < len(remote):
        la, ln = local[li]
        ra, rn = remote[ri]
        n = min(ln - lpos, rn - rpos)
        if n > 0:
            _add(loc, la + lpos, n)
            _add(rem, ra + rpos, n)
            nbytes += n
        lpos += n
        rpos += n
        if lpos >= ln:
            li, lpos = li + 1, 0
        if rpos >= rn:
            ri, rpos = ri + 1, 0
        if len(loc) >= iov_max - 1 or len(rem) >= iov_max - 1:
            yield loc, rem, nbytes
            loc, rem, nbytes = [], [], 0
    if li < len(local) or ri < len(remote):
        left = sum(n for _, n in local[li:]) - lpos + sum(n for _, n in remote[ri:]) - rpos
        if left:
            raise ValueError("local and remote pieces differ in length")
    if nbytes:
        yield loc, rem, nbytes


def _add(pieces: list[Piece], addr: int, n: int) -> None:
    if pieces:
        last_addr, last_n = pieces[-1]
        if last_addr + last_n == addr:
            pieces[-1] = (last_addr, last_n + n)
            return
    pieces.append((addr, n))


def block_pieces(layer: Layer, blocks: Sequence[int], out: list[Piece]) -> None:
    """The worker-side pieces of ``blocks`` of ``layer``, in payload order."""
    base, stride = layer.base, layer.block_stride
    for b in blocks:
        if not 0 <= b < layer.num_blocks:
            raise MoverError(f"block {b} outside layer {layer.name} ({layer.num_blocks} blocks)")
        at = base + b * stride
        for off, n in layer.parts:
            _add(out, at + off, n)


def extent_pieces(
    arena: int, extents: Sequence[tuple[int, int]], start: int, n: int, out: list[Piece]
) -> None:
    """The arena pieces of payload bytes ``[start, start + n)`` of an entry whose
    payload lies in ``extents`` (arena offset, length), in order."""
    pos = 0
    end = start + n
    for off, ln in extents:
        lo, hi = max(start, pos), min(end, pos + ln)
        if hi > lo:
            _add(out, arena + off + lo - pos, hi - lo)
        pos += ln
        if pos >= end:
            break
    if pos < end:
        raise MoverError(f"entry of {pos} bytes has no payload bytes [{start}, {end})")


class CpuMover(Mover):
    """Cross-memory attach. ``arena``: the agent's mapping of the arena segment."""

    device = "cpu"

    def __init__(self, arena: memoryview) -> None:
        if not available():
            raise MoverError("process_vm_readv/process_vm_writev are not in this libc")
        self.view = arena
        self.addr = int(np.frombuffer(arena, dtype=np.uint8).ctypes.data)
        # Checksums run beside the copies (xxhash lets go of the GIL, as do the copies).
        self._helper = ThreadPoolExecutor(1, thread_name_prefix="kvnode-mover-cpu-sum")

    # ------------------------------------------------------------------ attach
    def attach(self, export: Export, probe: int, nonce: bytes) -> str:
        pid = export.pid
        got = bytearray(len(nonce))
        try:
            transfer(pid, [(_addr(got), len(got))], [(probe, len(nonce))], write=False)
        except MoverError as exc:
            return _why_not(pid, str(exc))
        if bytes(got) != nonce:
            return f"pid {pid} is not the process that exported (probe bytes differ)"
        answer = bytearray(nonce[::-1])
        try:
            transfer(pid, [(_addr(answer), len(answer))], [(probe, len(answer))], write=True)
            for layer in export.layers:  # every layer's first and last block reachable
                ends: list[Piece] = []
                block_pieces(layer, (0, layer.num_blocks - 1), ends)
                one = bytearray(1)
                probe_pieces = [(a, 1) for a, _ in ends] + [(a + n - 1, 1) for a, n in ends]
                for piece in probe_pieces:
                    transfer(pid, [(_addr(one), 1)], [piece], write=False)
        except MoverError as exc:
            return _why_not(pid, str(exc))
        return ""

    # ------------------------------------------------------------------ jobs
    def run(self, job: Job) -> None:
        try:
            if job.load:
                self._load(job)
            else:
                self._save(job)
        except MoverError as exc:
            job.fail(str(exc))

    def _check(self, job: Job) -> None:
        if not job.export.alive:
            raise MoverError("the exporting worker is gone")
        if time.monotonic() > job.deadline:
            raise MoverError("job deadline passed")

    def _save(self, job: Job) -> None:
        """Each layer of every chunk in one read; a helper thread checksums the layers
        already read (in payload order) while the next one is read."""
        ex = job.export
        work = [c for c in job.chunks if c.status == PG.CHUNK_PENDING]
        read = {layer.name: threading.Event() for layer in ex.layers}
        hashing = self._helper.submit(self._hash_saved, ex, work, read)
        try:
            for layer in ex.layers:
                self._check(job)
                local: list[Piece] = []
                remote: list[Piece] = []
                for c in work:
                    span = len(c.blocks) * layer.block_nbytes
                    extent_pieces(self.addr, c.extents, layer.payload_offset, span, local)
                    block_pieces(layer, c.blocks, remote)
                job.moved_bytes += transfer(ex.pid, local, remote, write=False)
                read[layer.name].set()
        finally:
            for ev in read.values():
                ev.set()  # a failed read: the helper stops waiting (its sums go unused)
            sums = hashing.result()
        for c, value in zip(work, sums):
            c.checksum = value
            c.status = PG.CHUNK_OK

    def _hash_saved(
        self, ex: Export, work: list[ChunkWork], read: dict[str, threading.Event]
    ) -> list[int]:
        """Checksums of the chunks' entries, fed layer by layer in payload order as
        the copy thread reports each layer read."""
        hashers = [xxhash.xxh3_64() for _ in work]
        for layer in sorted(ex.layers, key=lambda x: x.payload_offset):
            read[layer.name].wait()
            for c, h in zip(work, hashers):
                pieces: list[Piece] = []
                extent_pieces(
                    0, c.extents, layer.payload_offset, len(c.blocks) * layer.block_nbytes, pieces
                )
                for off, n in pieces:
                    h.update(self.view[off : off + n])
        return [h.intdigest() or 1 for h in hashers]

    def _load(self, job: Job) -> None:
        """Verify every chunk (on the helper thread) while the layers are written; a
        layer's progress byte goes out only once every chunk of the job is verified,
        so the worker never takes unverified bytes as loaded. A chunk that fails is
        reported bad and vLLM recomputes it (as when worker mode's check fails)."""
        ex = job.export
        pending = [c for c in job.chunks if c.status == PG.CHUNK_PENDING]
        verifying = self._helper.submit(self._verify, pending)
        slot = ex.slot_address(job.slot)
        seq = bytes([job.seq])
        unannounced: list[int] = []
        verified = False
        try:
            for i, layer in enumerate(ex.layers):
                self._check(job)
                local: list[Piece] = []
                remote: list[Piece] = []
                for c in pending:
                    start = layer.payload_offset + c.block_offset * layer.block_nbytes
                    n = len(c.blocks) * layer.block_nbytes
                    extent_pieces(self.addr, c.extents, start, n, local)
                    block_pieces(layer, c.blocks, remote)
                if local:
                    job.moved_bytes += transfer(ex.pid, local, remote, write=True)
                unannounced.append(i)
                if not verified and verifying.done():
                    verified = self._verified(job, pending, verifying.result(), slot)
                if verified:
                    self._announce(job, slot, unannounced, seq)
            if not verified:
                verified = self._verified(job, pending, verifying.result(), slot)
            self._announce(job, slot, unannounced, seq)
        finally:
            verifying.result()  # the helper is done before the job is handed back

    def _verify(self, chunks: list[ChunkWork]) -> list[int]:
        return [
            PG.CHUNK_OK
            if c.checksum and checksum([self.view[o : o + n] for o, n in c.extents]) == c.checksum
            else PG.CHUNK_BAD
            for c in chunks
        ]

    def _verified(self, job: Job, pending: list[ChunkWork], codes: list[int], slot: int) -> bool:
        """Record the chunks' verdicts and tell the worker (before any layer byte)."""
        self._check(job)
        for c, code in zip(pending, codes):
            c.status = code
        for c in job.chunks:
            job.outcomes[c.index] = c.status
        nl = len(job.export.layers)
        self._write_bytes(job.export, slot + PG.chunk_byte(nl, 0), bytes(job.outcomes))
        return True

    def _announce(self, job: Job, slot: int, layers: list[int], seq: bytes) -> None:
        self._check(job)
        for i in layers:
            self._write_bytes(job.export, slot + PG.layer_byte(i), seq)
        layers.clear()

    def _write_bytes(self, ex: Export, addr: int, data: bytes) -> None:
        buf = bytearray(data)
        transfer(ex.pid, [(_addr(buf), len(buf))], [(addr, len(buf))], write=True)

    def report(self, job: Job) -> None:
        ex = job.export
        if not ex.alive or time.monotonic() > job.deadline:
            return  # the worker stopped waiting (or is gone): its slot may be reused
        for c in job.chunks:
            job.outcomes[c.index] = c.status
        slot = ex.slot_address(job.slot)
        codes = bytearray(job.outcomes)
        result = bytearray([PG.RESULT_FAILED if job.failed else PG.RESULT_OK])
        done = bytearray([job.seq])
        # One call, in this order: chunk codes, result, done (the worker reads done first).
        local = [(_addr(codes), len(codes)), (_addr(result), 1), (_addr(done), 1)]
        remote = [
            (slot + PG.chunk_byte(len(ex.layers), 0), len(codes)),
            (slot + PG.RESULT, 1),
            (slot + PG.DONE, 1),
        ]
        fn = _vm_fn["process_vm_writev"]
        liov, riov = _iovecs(local), _iovecs(remote)
        if fn(ex.pid, liov.ctypes.data, 3, riov.ctypes.data, 3, 0) < 0:
            log.debug("job outcome not reported to pid %d: errno %d", ex.pid, ctypes.get_errno())

    def close(self) -> None:
        self._helper.shutdown(wait=True)


def _addr(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


def _why_not(pid: int, err: str) -> str:
    """One line: why the agent cannot reach the worker's memory, and what would let it."""
    if "EPERM" in err or "EACCES" in err:
        scope = _ptrace_scope()
        yama = f", Yama ptrace_scope={scope}" if scope is not None else ""
        return (
            f"the agent (uid {os.getuid()}) may not attach to pid {pid}{yama}: run the agent "
            f"as vLLM's user or give it CAP_SYS_PTRACE ({err})"
        )
    if "ESRCH" in err:
        return f"pid {pid} is not visible to the agent (another pid namespace?) ({err})"
    return f"the agent cannot reach pid {pid}'s KV cache: {err}"


def _ptrace_scope() -> int | None:
    try:
        return int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip())
    except (OSError, ValueError):
        return None


__all__ = ["ChunkWork", "CpuMover", "available", "batches", "transfer"]
