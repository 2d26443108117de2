"""The CPU mover: Linux cross-memory attach between the arena and a worker's memory.

``process_vm_readv``/``process_vm_writev`` copy between this process and another in
one system call per batch of iovecs, without the other process doing anything. They
need ptrace rights over the worker: the same uid (and, under Yama's ``ptrace_scope``
1, the worker's ``prctl(PR_SET_PTRACER, agent_pid)``), or ``CAP_SYS_PTRACE``.

A layer's blocks become remote iovecs directly (consecutive blocks merge into one),
the arena extents of the chunks local ones: no staging buffer on either side. The
kernel pins every page it copies, which holds one core to about half of memcpy's
rate on small pages, so the worker backs its cache with huge pages
(``connector/hugepages.py``) and ``threads`` cores copy a job at once. A job is cut
into units (a few chunks of a save, a chunk to verify, a share of a layer to write)
that the threads take in order as each comes free: a thread the kernel preempts
(other processes want the cores too) holds up only the unit it has, not a fixed share
of the job. Saves read a few chunks at a time, every readable layer in one call, and
checksum what landed in the arena while it is still in the cache (the agent is the
writer, so the checksum is its). Loads verify every chunk in the arena against its
writer's checksum first, tell the worker the verdicts, then write the good chunks
layer by layer, each layer followed by its progress byte once all its shares are
written, so the worker's attention for layer i runs while layer i+1 is copied.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import xxhash

from kvnode.agent.movers.base import ChunkWork, Export, Job, Layer, Mover, MoverError
from kvnode.agent.movers.placement import CorePlacement
from kvnode.cores import name_thread
from kvnode.ipc import progress as PG
from kvnode.ipc.checksum import checksum_extents

log = logging.getLogger("kvnode.agent")

IOV_MAX = 1024  # UIO_MAXIOV: iovecs per system call on either side
# Bytes one thread copies in a call before it checksums them (saves): large enough
# that a call's fixed cost is small, small enough that the checksum reads the bytes
# from the cache rather than from memory.
BATCH_BYTES = 2 << 20
Piece = tuple[int, int]  # (address, bytes)
E = TypeVar("E")

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


def transfer(pid: int, local: Sequence[Piece], remote: Sequence[Piece], write: bool) -> int:
    """Copy ``remote`` (the worker's memory) into ``local`` (ours), or the reverse
    when ``write``. Both lists cover the same number of bytes; any number of pieces
    (batched by ``IOV_MAX``). Returns the bytes moved; raises ``MoverError`` naming
    the errno, or on a short copy (a remote range not mapped)."""
    fn = _vm_fn["process_vm_writev" if write else "process_vm_readv"]
    moved = 0
    for loc, rem, nbytes in _pairs(local, remote):
        liov, riov = _iovec_array(loc), _iovec_array(rem)
        got = fn(pid, liov, len(loc), riov, len(rem), 0)
        if got < 0:
            err = ctypes.get_errno()
            raise MoverError(f"{'process_vm_writev' if write else 'process_vm_readv'} pid "
                             f"{pid}: {errno.errorcode.get(err, err)} ({os.strerror(err)})")  # fmt: skip
        if got != nbytes:
            raise MoverError(f"short copy with pid {pid}: {got} of {nbytes} bytes")
        moved += got
    return moved


def _pairs(
    local: Sequence[Piece], remote: Sequence[Piece]
) -> Iterable[tuple[Sequence[Piece], Sequence[Piece], int]]:
    """``batches``, without the work where the lists pair up already (the common
    case: one arena extent against one run of blocks)."""
    if len(local) == len(remote) and 0 < len(local) < IOV_MAX:
        total = 0
        for (_, ln), (_, rn) in zip(local, remote):
            if ln != rn:
                return batches(local, remote)
            total += ln
        return ((local, remote, total),)
    return batches(local, remote)


def _iovec_array(pieces: Sequence[Piece]) -> ctypes.Array[ctypes.c_uint64]:
    flat = [x for piece in pieces for x in piece]
    return (ctypes.c_uint64 * len(flat))(*flat)


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


def runs(items: list[E], n: int) -> list[list[E]]:
    """``items`` split into at most ``n`` runs of neighbours, as even as can be."""
    n = min(n, len(items))
    if n <= 1:
        return [items] if items else []
    step, extra = divmod(len(items), n)
    out, at = [], 0
    for i in range(n):
        size = step + (1 if i < extra else 0)
        out.append(items[at : at + size])
        at += size
    return out


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


class _SaveState:
    """A save in progress: its chunks, their checksums so far, which layers are read
    and how far each chunk's checksum has been fed (payload order)."""

    def __init__(self, mover: CpuMover, job: Job) -> None:
        self.work = [c for c in job.chunks if c.status == PG.CHUNK_PENDING]
        self.hashers = [xxhash.xxh3_64() for _ in self.work]
        self.pairs = list(zip(self.work, self.hashers))
        self.payload = sorted(job.export.layers, key=lambda x: x.payload_offset)
        self._rank = {id(layer): i for i, layer in enumerate(self.payload)}
        self._read = [False] * len(self.payload)
        self._hashed = 0

    def read(self, layer: Layer) -> list[Layer]:
        """``layer`` is about to be read: the layers whose checksum turn comes now."""
        self._read[self._rank[id(layer)]] = True
        due: list[Layer] = []
        while self._hashed < len(self.payload) and self._read[self._hashed]:
            due.append(self.payload[self._hashed])
            self._hashed += 1
        return due


class _Load:
    """A load as its threads run it: first a unit per chunk to verify, then the
    shares of each layer to write, in the export's order. The thread that verifies
    the last chunk tells the worker the verdicts (before any layer byte: a thread that
    takes a share of a layer before then waits for them); the thread that writes the
    last share of a layer writes its progress byte."""

    def __init__(self, mover: CpuMover, job: Job, pending: list[ChunkWork]) -> None:
        self.mover, self.job = mover, job
        self.pending = pending
        self.parts = min(mover.team(), len(pending))  # shares of each layer
        self.slot = job.export.slot_address(job.slot)
        self.counts = [0] * len(job.export.layers)
        self.verifying = len(pending)
        self.shares: list[list[ChunkWork]] = []
        self.told = threading.Event()
        self.failed = False
        self._lock = threading.Lock()
        self._seq = bytes([job.seq])

    def units(self) -> list[tuple[int, int]]:
        """(-1, chunk) to verify, then (layer, share) to write."""
        nl = len(self.job.export.layers)
        return [(-1, i) for i in range(len(self.pending))] + [
            (layer, k) for layer in range(nl) for k in range(self.parts)
        ]

    def verified(self) -> None:
        with self._lock:
            self.verifying -= 1
            last = self.verifying == 0
        if last:
            good = [c for c in self.pending if c.status == PG.CHUNK_OK]
            self.shares = runs(good, self.parts) + [[]] * self.parts
            self.tell_verdicts()
            self.told.set()

    def share(self, k: int) -> list[ChunkWork]:
        """Share ``k`` of the good chunks, once every verdict is told."""
        while not self.told.wait(0.05):
            if self.failed:
                raise MoverError("another copy thread of the job failed")
        return self.shares[k]

    def tell_verdicts(self) -> None:
        self.mover._check(self.job)  # never a byte into a worker past its deadline
        job = self.job
        for c in job.chunks:
            job.outcomes[c.index] = c.status
        nl = len(job.export.layers)
        self.mover._write_bytes(job.export, self.slot + PG.chunk_byte(nl, 0), bytes(job.outcomes))

    def written(self, layer: int) -> None:
        with self._lock:
            self.counts[layer] += 1
            last = self.counts[layer] == self.parts
        if last:
            self.announce((layer,))

    def announce(self, layers: Iterable[int]) -> None:
        self.mover._check(self.job)
        ex = self.job.export
        for i in layers:
            self.mover._write_bytes(ex, self.slot + PG.layer_byte(i), self._seq)
        ex.wake()


class CpuMover(Mover):
    """Cross-memory attach. ``arena``: the agent's mapping of the arena segment.

    ``threads`` copy at once (the copy thread and ``threads - 1`` helpers): the
    kernel copies a cross-memory attach at about half of memcpy's rate on one core,
    as it pins every page it touches, so a second core brings it near memcpy's.
    ``cores`` (``agent.cpu_copy_cores``) places them: by default off the cores vLLM's
    bound compute threads run on, no more threads than such cores
    (``placement.CorePlacement``)."""

    device = "cpu"
    layerwise_saves = True

    def __init__(
        self, arena: memoryview, threads: int = 2, cores: str | CorePlacement = "all"
    ) -> None:
        if not available():
            raise MoverError("process_vm_readv/process_vm_writev are not in this libc")
        self.view = arena
        self.addr = int(np.frombuffer(arena, dtype=np.uint8).ctypes.data)
        self.threads = max(1, int(threads))
        try:
            self.placement = cores if isinstance(cores, CorePlacement) else CorePlacement(cores)
        except ValueError as exc:
            raise MoverError(str(exc)) from exc
        # Copies and checksums let go of the GIL: these run beside the copy thread.
        self._pool = (
            ThreadPoolExecutor(
                self.threads - 1,
                thread_name_prefix="kvnode-mover-cpu",
                initializer=name_thread,
                initargs=("kvnode-copy-cpu",),
            )
            if self.threads > 1
            else None
        )

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
        if export.exited():
            return f"pid {pid} exited while it exported"
        try:
            transfer(pid, [(_addr(answer), len(answer))], [(probe, len(answer))], write=True)
            self._reach_layers(pid, export.layers)
        except MoverError as exc:
            return _why_not(pid, str(exc))
        return ""

    @staticmethod
    def _reach_layers(pid: int, layers: Sequence[Layer]) -> None:
        """Read one byte at each end of every layer's first and last block: in one
        call for the whole export (its loop time does not grow with the layers a
        client names), then, when that falls short, piece by piece for the error."""
        pieces: list[Piece] = []
        for layer in layers:
            ends: list[Piece] = []
            block_pieces(layer, (0, layer.num_blocks - 1), ends)
            pieces += [(a, 1) for a, _ in ends] + [(a + n - 1, 1) for a, n in ends]
        got = bytearray(len(pieces))
        try:
            transfer(pid, [(_addr(got), len(got))], pieces, write=False)
        except MoverError:
            one = bytearray(1)
            for piece in pieces:
                transfer(pid, [(_addr(one), 1)], [piece], write=False)
            raise

    def team(self) -> int:
        """Threads a job copies with now: ``threads``, no more than its cores."""
        return self.placement.team(self.threads)

    def exports_changed(self) -> None:
        self.placement.changed()

    def device_stats(self) -> dict[str, object]:
        return {**self.placement.stats(), "copy_threads": self.team()}

    # ------------------------------------------------------------------ jobs
    def run(self, job: Job) -> bool:
        self.placement.apply(0)
        try:
            if job.load:
                self._load(job)
            else:
                return self._save(job)
        except MoverError as exc:
            job.fail(str(exc))
        return True

    def ready(self, job: Job) -> bool:
        """Whether a parked layer-wise save can go on: its next layer is marked
        computed (or reading the marks failed: its run then fails it)."""
        try:
            return self._computed(job) > job.layer
        except MoverError:
            return True

    def ready_many(self, jobs: list[Job]) -> list[bool]:
        """``ready`` of every parked save, the marks of one export's jobs read in one
        call (a client that parks a thousand saves costs a poll one system call, not a
        thousand); an export whose read fails is asked job by job (whose runs then
        fail)."""
        by_export: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            by_export.setdefault(id(job.export), []).append(i)
        out = [True] * len(jobs)
        for idx in by_export.values():
            mine = [jobs[i] for i in idx]
            try:
                got = self._computed_many(mine)
            except MoverError:
                got = [self._computed_or_fail(job) for job in mine]
            for i, job, n in zip(idx, mine, got):
                out[i] = n > job.layer
        return out

    def _computed_or_fail(self, job: Job) -> int:
        try:
            return self._computed(job)
        except MoverError:
            return len(job.export.layers)  # its run fails it

    def _computed_many(self, jobs: list[Job]) -> list[int]:
        """``_computed`` of jobs of one export, in one call: each job's count of
        layers, from the first, whose mark is its sequence byte."""
        ex = jobs[0].export
        nl = len(ex.layers)
        marks = bytearray(nl * len(jobs))
        remote = [(ex.slot_address(job.slot) + PG.computed_byte(nl, 0), nl) for job in jobs]
        transfer(ex.pid, [(_addr(marks), len(marks))], remote, write=False)
        out = []
        for k, job in enumerate(jobs):
            at = k * nl
            n = 0
            while n < nl and marks[at + n] == job.seq:
                n += 1
            job.computed = max(job.computed, n)
            out.append(job.computed)
        return out

    def _computed(self, job: Job) -> int:
        """Read the worker's computed marks (one call): how many layers, from the
        first, the forward pass has written for this job."""
        return self._computed_many([job])[0]

    def _check(self, job: Job) -> None:
        """Before each write into the worker and after its reads: the worker is
        still there (an exited one's pid may be another process's by now)."""
        if not job.export.alive:
            raise MoverError("the exporting worker is gone")
        if job.export.exited():
            raise MoverError("the exporting worker exited")
        if time.monotonic() > job.deadline:
            raise MoverError("job deadline passed")

    def _share(self, fn: Callable[[E], int], units: Sequence[E], failed: Callable[[], None]) -> int:
        """``fn`` over every unit, in order, by this thread and the helpers together,
        each taking the next unit as it comes free. The first failure stops the
        others taking units (``failed`` is called at once, for threads waiting on the
        failed one) and is raised, once every thread has stopped. Returns the sum."""
        nxt = itertools.count()
        errors: list[BaseException] = []  # in the order they happened: the first is the cause

        def take(slot: int) -> int:
            moved = 0
            try:
                self.placement.apply(slot)
                while not errors:
                    i = next(nxt)  # one thread at a time (the GIL)
                    if i >= len(units):
                        break
                    moved += fn(units[i])
            except BaseException as exc:
                errors.append(exc)
                failed()
            return moved

        helpers = min(self.team(), len(units)) - 1
        futures = [self._pool.submit(take, k + 1) for k in range(helpers)] if self._pool else []
        total = take(0)
        total += sum(f.result() for f in futures)
        if errors:
            raise errors[0]
        return total

    def _save(self, job: Job) -> bool:
        """In the export's (forward) order, every layer that can be read now, the
        copying threads taking the job's chunks a unit (``_batches``) at a time
        (``_save_layers``). Each chunk's checksum is fed in payload order, as soon as
        the layers before in payload order are read (right after the read where
        forward and payload order agree: names sort as numbers below ten layers). A
        layer-wise save stops at a layer the worker has not marked computed (False)
        and goes on from there when run again."""
        ex = job.export
        st = job.state
        if st is None:
            st = job.state = _SaveState(self, job)
        while job.layer < len(ex.layers):
            self._check(job)  # a worker gone or a deadline passed ends the job
            if job.layerwise and job.layer >= job.computed and self._computed(job) <= job.layer:
                return False  # parked until the forward pass marks the next layer
            end = min(job.computed, len(ex.layers)) if job.layerwise else len(ex.layers)
            # Every layer that can be read now, in one call a unit (no wait per layer).
            plan = [(layer, st.read(layer)) for layer in ex.layers[job.layer : end]]
            units = self._batches(plan, st.pairs)
            job.moved_bytes += self._share(
                functools.partial(self._save_layers, job, plan), units, _nothing
            )
            job.layer = end
        self._check(job)  # after the last read: every byte came from the worker
        for c, h in zip(st.work, st.hashers):
            c.checksum = h.intdigest() or 1
            c.status = PG.CHUNK_OK
        job.state = None
        return True

    def _batches(
        self, plan: list[tuple[Layer, list[Layer]]], pairs: list[tuple[ChunkWork, Any]]
    ) -> list[list[tuple[ChunkWork, Any]]]:
        """The save's chunks in units of about ``BATCH_BYTES`` of the plan's layers."""
        if not pairs:
            return []
        per_chunk = sum(layer.block_nbytes for layer, _ in plan) * len(pairs[0][0].blocks)
        step = max(1, BATCH_BYTES // max(1, per_chunk))
        return [pairs[at : at + step] for at in range(0, len(pairs), step)]

    def _save_layers(
        self,
        job: Job,
        plan: list[tuple[Layer, list[Layer]]],
        unit: list[tuple[ChunkWork, Any]],
    ) -> int:
        """One unit of a save: its chunks' part of every layer of the plan in one
        call, then each chunk's checksum fed the layers due while the bytes are still
        in the cache."""
        self._check(job)
        local: list[Piece] = []
        remote: list[Piece] = []
        for c, _ in unit:
            for layer, _ in plan:
                self._pieces(c, layer, local, remote)
        moved = transfer(job.export.pid, local, remote, write=False)
        due = [d for _, ds in plan for d in ds]
        if due:
            for c, h in unit:
                self._hash_layers(h, c, due)
        return moved

    def _pieces(self, c: ChunkWork, layer: Layer, local: list[Piece], remote: list[Piece]) -> None:
        """Chunk ``c``'s part of ``layer``: its arena bytes (from the entry's block
        ``c.block_offset``, 0 for saves) against the worker's blocks, appended."""
        start = layer.payload_offset + c.block_offset * layer.block_nbytes
        extent_pieces(self.addr, c.extents, start, len(c.blocks) * layer.block_nbytes, local)
        block_pieces(layer, c.blocks, remote)

    def _hash_layers(self, h: Any, c: ChunkWork, layers: list[Layer]) -> None:
        """Feed ``h`` the arena bytes of ``layers`` (consecutive in payload order) of
        chunk ``c``: neighbouring regions merge, so a whole entry is one update."""
        pieces: list[Piece] = []
        n = len(c.blocks)
        for layer in layers:
            extent_pieces(0, c.extents, layer.payload_offset, n * layer.block_nbytes, pieces)
        for off, ln in pieces:
            h.update(self.view[off : off + ln])

    def _load(self, job: Job) -> None:
        """The copying threads verify the job's chunks against their writers'
        checksums, a chunk a unit; the last verdict in tells the worker every chunk's
        verdict (before any layer byte); then they write the good chunks layer by
        layer, a share of a layer a unit, and a layer's progress byte goes out once
        all its shares are written, so the worker's attention for layer i runs while
        layer i+1 is copied. A chunk that fails is never written: it is reported bad
        and vLLM recomputes it (as when worker mode's check fails)."""
        ex = job.export
        pending = [c for c in job.chunks if c.status == PG.CHUNK_PENDING]
        if not pending:  # nothing to copy: the verdicts, and every layer is as loaded as it gets
            state = _Load(self, job, pending)
            state.tell_verdicts()
            state.announce(range(len(ex.layers)))
            return
        state = _Load(self, job, pending)

        def failed() -> None:
            state.failed = True

        fn = functools.partial(self._load_unit, job, state)
        job.moved_bytes += self._share(fn, state.units(), failed)

    def _load_unit(self, job: Job, state: _Load, unit: tuple[int, int]) -> int:
        """Verify one chunk (``(-1, chunk)``) or write one share of a layer."""
        layer, k = unit
        if layer < 0:
            c = state.pending[k]
            c.status = self._verify(c)
            state.verified()
            return 0
        good = state.share(k)
        self._check(job)
        moved = 0
        if good:
            local: list[Piece] = []
            remote: list[Piece] = []
            for c in good:
                self._pieces(c, job.export.layers[layer], local, remote)
            moved = transfer(job.export.pid, local, remote, write=True)
        state.written(layer)
        return moved

    def _verify(self, c: ChunkWork) -> int:
        """Chunk ``c``'s verdict: its arena bytes against its writer's checksum."""
        ok = c.checksum and checksum_extents(self.view, c.extents) == c.checksum
        return PG.CHUNK_OK if ok else PG.CHUNK_BAD

    def _write_bytes(self, ex: Export, addr: int, data: bytes) -> None:
        buf = bytearray(data)
        transfer(ex.pid, [(_addr(buf), len(buf))], [(addr, len(buf))], write=True)

    def report(self, job: Job) -> None:
        ex = job.export
        if time.monotonic() > job.deadline or ex.exited():
            return  # the worker stopped waiting (or is gone): its slot may be reused
        # A dropped export (its client gone while the worker lives) is still told: the
        # worker waits on this slot until it is told or the deadline passes.
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
        if fn(ex.pid, _iovec_array(local), 3, _iovec_array(remote), 3, 0) < 0:
            log.debug("job outcome not reported to pid %d: errno %d", ex.pid, ctypes.get_errno())

    def close(self) -> None:
        self.placement.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _nothing() -> None:
    pass


def _addr(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


def _why_not(pid: int, err: str) -> str:
    """One line: why the agent cannot reach the worker's memory, and what would let it."""
    if "EPERM" in err or "EACCES" in err:
        scope = _ptrace_scope()
        yama = f", Yama ptrace_scope={scope}" if scope is not None else ""
        return (
            f"the agent (uid {os.getuid()}) may not attach to pid {pid}{yama}: run the agent "
            f"as vLLM's user or give it CAP_SYS_PTRACE, and let its seccomp profile allow "
            f"process_vm_readv/process_vm_writev ({err})"
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
