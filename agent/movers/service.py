"""The agent loop's side of agent mode: export and job requests, settling jobs.

The loop owns the index, so everything that touches it happens here, on the loop:
a load's entries are pinned before its job is queued and unpinned when the copy
thread hands it back (a chunk that failed its checksum is dropped then); a save's
slots are reserved for the agent itself (``AGENT_OWNER``: a client that dies while
its save is copied cannot have the slots freed under the copy) and committed, with
the checksum the mover computed over the arena bytes, when the job comes back. The
copy threads (one per device, ``base.CopyThread``) never touch the index.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvnode.agent.cache import Cache
from kvnode.agent.clients import Client
from kvnode.agent.handlers import ClientError
from kvnode.agent.index import AGENT_OWNER, Outcome
from kvnode.agent.movers.base import (
    ChunkWork,
    CopyThread,
    Export,
    Job,
    Layer,
    Mover,
    MoverError,
    report,
)
from kvnode.agent.movers.exports import ExportRegistry
from kvnode.agent.movers.process import WorkerProcess
from kvnode.ipc import progress as PG
from kvnode.ipc import protocol as P
from kvnode.kernels import ipchandle as H  # no torch until a GPU is asked about

log = logging.getLogger("kvnode.agent")

JOB_DEADLINE_S = 30.0  # no byte of a job is written into a worker after this
JOBS_INFLIGHT_MAX = 4096  # jobs queued or copying, all devices together
JOBS_PER_CLIENT_MAX = P.JOB_SLOTS_MAX  # of which one client's (a worker: its slots)


@dataclass(frozen=True, slots=True)
class MoverOptions:
    cpu_threads: int = 2  # agent.cpu_copy_threads
    cpu_cores: str = "auto"  # agent.cpu_copy_cores: auto, all or a core list
    # A client's shares (agent.client_leases_max, agent.client_pins_max) count the
    # chunks its agent-mode saves have reserved and its loads have pinned too.
    client_leases_max: int = 65536
    client_pins_max: int = 65536


# Movers by device kind ("cpu", "cuda", ...): a factory given the arena's mapping, and
# a check of the whole device name ("" when this node has that device, else why not),
# made before a mover or a copy thread exists for it.
MoverFactory = Callable[[memoryview, MoverOptions], Mover]
DeviceCheck = Callable[[str], str]
_FACTORIES: dict[str, tuple[MoverFactory, DeviceCheck]] = {}
DEVICES_MAX = 64  # devices (movers, each with its copy thread) one agent moves for


def register_mover(kind: str, factory: MoverFactory, check: DeviceCheck) -> None:
    """Make exports of ``kind`` devices ("cuda:<uuid>" is kind "cuda") movable."""
    _FACTORIES[kind] = (factory, check)


def _cpu_factory(arena: memoryview, options: MoverOptions) -> Mover:
    from kvnode.agent.movers.cpu import CpuMover

    return CpuMover(arena, options.cpu_threads, options.cpu_cores)


def _cpu_check(device: str) -> str:
    return "" if device == "cpu" else f"{device!r} is not a device (the CPU is 'cpu')"


register_mover("cpu", _cpu_factory, _cpu_check)


def _gpu_factory(arena: memoryview, options: MoverOptions) -> Mover:
    try:  # torch and triton: imported only once a GPU worker exports
        from kvnode.agent.movers.gpu import GpuMover
    except ImportError as exc:
        raise MoverError(f"the GPU mover needs torch and triton: {exc}") from exc
    return GpuMover(arena)


@functools.cache
def _visible_gpus() -> tuple[frozenset[str], str]:
    """The UUIDs of the GPUs this agent sees, once; or why it sees none."""
    try:
        return frozenset(H.device_uuids()), ""
    except Exception as exc:  # no torch, or a CUDA/ROCm runtime that fails to start
        return frozenset(), f"the agent cannot list its GPUs: {exc}"


def _gpu_check(device: str) -> str:
    uuid = H.normalize_uuid(device.partition(":")[2])
    if not uuid:
        return f"{device!r} names no GPU (a GPU is 'cuda:<uuid>')"
    seen, why = _visible_gpus()
    if uuid not in seen:
        return (
            why
            or f"GPU {uuid} is not visible to the agent (it sees: {', '.join(sorted(seen)) or 'none'})"
        )
    return ""


register_mover("cuda", _gpu_factory, _gpu_check)  # "cuda:<uuid>": CUDA and ROCm (torch's "cuda")


class Refusal(Exception):
    """An export the agent will not take; the message is one line for the worker."""


@dataclass(slots=True)
class TransferCounters:
    exports: int = 0
    exports_refused: int = 0
    exports_dropped: int = 0
    jobs: int = 0
    jobs_failed: int = 0
    jobs_refused: int = 0  # too many in flight, or a device queue full
    layerwise_jobs: int = 0  # saves handed over during the forward pass
    save_chunks: int = 0
    save_bytes: int = 0
    save_exists: int = 0
    save_no_space: int = 0
    load_chunks: int = 0
    load_bytes: int = 0
    load_misses: int = 0
    load_wrong_size: int = 0  # stored chunks of another size than the exporter's
    refused_share: int = 0  # chunks past the client's client_leases_max / client_pins_max
    checksum_errors: int = 0
    save_copy_s: float = 0.0
    load_copy_s: float = 0.0


class Transfers:
    def __init__(
        self,
        cache: Cache,
        arena: memoryview,
        wake: Callable[[], None],
        options: MoverOptions | None = None,
    ) -> None:
        self.cache = cache
        self.arena = arena
        self.options = options or MoverOptions()
        self.page_bytes = cache.index.page_bytes
        self.wake = wake
        self.exports = ExportRegistry()
        self.counters = TransferCounters()
        self.inflight = 0
        self._inflight_by_client: dict[int, int] = {}  # jobs queued or copying per client
        # Chunks in flight per client: reserved by its saves, pinned by its loads.
        self._chunks_by_client: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self._threads: dict[str, CopyThread] = {}
        self._done: deque[Job] = deque()  # appended by copy threads, drained by the loop
        self._refusals_logged: set[str] = set()
        self.table: dict[type, Callable[[Client, Any], Any]] = {
            P.ExportReq: self.export,
            P.JobReq: self.job,
        }

    # ------------------------------------------------------------------ exports
    def export(self, c: Client, m: P.ExportReq) -> Any:
        ex: Export | None = None
        try:
            ex, thread = self._new_export(c, m)
            why = thread.mover.attach(ex, m.probe, m.nonce)
            if why:
                raise Refusal(why)
        except Refusal as r:
            if ex is not None and ex.proc is not None:
                ex.proc.close()
            self.counters.exports_refused += 1
            msg = str(r)[:300]
            if msg not in self._refusals_logged and len(self._refusals_logged) < 64:
                self._refusals_logged.add(msg)
                log.warning("export of client %x refused: %s", c.client_id, msg)
            return P.ExportRep(m.rid, 0, msg)
        for old in self.exports.add(ex):
            self._detach(old)
        self.counters.exports += 1
        thread.mover.exports_changed()
        log.info(
            "client %x (pid %d) exported %d %s layers: agent mode",
            c.client_id, ex.pid, len(ex.layers), ex.device,
        )  # fmt: skip
        why = ex.proc.why_no_waker if ex.proc is not None else ""
        if why and why not in self._refusals_logged and len(self._refusals_logged) < 64:
            self._refusals_logged.add(why)  # once per reason: seccomp or an old kernel, usually
            log.warning(
                "client %x: the agent cannot wake it (%s); its waits poll on a timer, "
                "which costs it more CPU (allow pidfd_getfd: docs/operating.md)",
                c.client_id, why,
            )  # fmt: skip
        return P.ExportRep(m.rid, ex.export_id, "", ex.woken)

    def _new_export(self, c: Client, m: P.ExportReq) -> tuple[Export, CopyThread]:
        thread = self._thread(m.device)
        pid = peer_pid(c.fd)
        if pid <= 0:
            raise Refusal("the agent cannot tell which process is on this connection")
        if c.pid and pid != c.pid and c.pid_ns == _own_pid_ns():
            raise Refusal(f"connection's process is pid {pid}, not the pid {c.pid} it named")
        layers = tuple(
            Layer(
                x.name, x.base, x.num_blocks, x.block_stride, x.block_nbytes,
                tuple((int(o), int(n)) for o, n in x.parts), x.payload_offset,
            )
            for x in m.layers
        )  # fmt: skip
        bpc = _blocks_per_chunk(layers, m.chunk_nbytes)
        if m.slot_bytes < PG.slot_bytes(len(layers)):
            raise Refusal(f"progress slots of {m.slot_bytes} bytes are too small")
        if same_clock(pid) is False:
            raise Refusal(
                f"pid {pid} runs in a time namespace of its own: the deadlines of its jobs "
                f"are not the agent's (agent mode needs one clock)"
            )
        try:  # the registry's pidfd is checked against pid reuse since Hello
            proc = WorkerProcess.open(pid, m.wake_fd, c.pidfd if c.pid == pid else -1)
        except ProcessLookupError:
            raise Refusal(f"pid {pid} exited while it exported") from None
        ex = Export(
            self.exports.new_id(), c.client_id, m.device, pid, layers, m.progress, m.slots,
            m.slot_bytes, m.chunk_nbytes, bpc, tuple(m.handles), proc=proc,
        )  # fmt: skip
        return ex, thread

    def _thread(self, device: str) -> CopyThread:
        kind = device.split(":", 1)[0]
        thread = self._threads.get(device)
        if thread is not None:
            return thread
        if kind not in _FACTORIES:
            raise Refusal(f"this agent has no mover for {device!r} devices")
        factory, check = _FACTORIES[kind]
        why = check(device)
        if why:
            raise Refusal(why)
        if len(self._threads) >= DEVICES_MAX:
            raise Refusal(f"this agent moves for {DEVICES_MAX} devices already")
        try:
            mover = factory(self.arena, self.options)
        except (MoverError, OSError, RuntimeError) as exc:
            raise Refusal(f"the {device} mover cannot start: {exc}") from exc
        thread = self._threads[device] = CopyThread(mover, self._handed_back)
        return thread

    def _detach(self, ex: Export) -> None:
        self.counters.exports_dropped += 1
        thread = self._threads.get(ex.device)
        if thread is not None:
            try:
                thread.mover.detach(ex)
                thread.mover.exports_changed()
            except Exception:
                log.exception("detaching export %x failed", ex.export_id)
        self._release(ex)  # its jobs stop at their next check (it is not alive)

    @staticmethod
    def _release(ex: Export) -> None:
        """Let go of a dropped export's worker (its pidfd and wake socket) once none
        of its jobs is in flight. Until then each of its jobs still ends with its
        outcome written into the worker while it lives (the pidfd proves the pid is
        still that worker): a worker whose client was dropped while it lives (silent
        past the heartbeat timeout, or its connection reset) never waits out a job's
        whole deadline."""
        if not ex.alive and ex.jobs <= 0 and ex.proc is not None:
            ex.proc.close()

    def client_gone(self, client_id: int) -> None:
        """The client is gone: its exports die (copies stop before their next layer)."""
        for ex in self.exports.drop_client(client_id):
            self._detach(ex)

    # ------------------------------------------------------------------ jobs
    def job(self, c: Client, m: P.JobReq) -> Any:
        ex = self.exports.get(c.client_id, m.export_id)
        if ex is None:
            # Not UNKNOWN_CLIENT: the client's registration stands (a job built before
            # it exported again names its last export), only that export is gone.
            return P.Error(m.rid, P.ErrCode.UNKNOWN_EXPORT, "no such export for this client")
        _check_job(ex, m)
        mine = self._inflight_by_client.get(c.client_id, 0)
        if self.inflight >= JOBS_INFLIGHT_MAX or mine >= JOBS_PER_CLIENT_MAX:
            self.counters.jobs_refused += 1
            who = "" if self.inflight >= JOBS_INFLIGHT_MAX else " for this client"
            return P.Error(m.rid, P.ErrCode.TOO_MANY_KEYS, f"too many jobs in flight{who}")
        thread = self._threads[ex.device]
        if m.layerwise and (m.load or not thread.mover.layerwise_saves):
            return P.Error(
                m.rid, P.ErrCode.BAD_FRAME, f"no layer-wise {'loads' if m.load else 'saves'} "
                f"for {ex.device} exports",
            )  # fmt: skip
        n = len(m.keys)
        now = time.monotonic()
        # The worker's deadline, when it sets one, not the one counted from now: the job
        # may have waited in the socket (the loop stalled), and the worker gives it up
        # by its own clock (the agent's: exports share the clock, ``same_clock``).
        deadline = now + JOB_DEADLINE_S
        if m.deadline_ns:
            deadline = min(deadline, m.deadline_ns / 1e9)
        if deadline <= now:
            self.counters.jobs_refused += 1
            return P.Error(m.rid, P.ErrCode.JOB_LATE, "the job reached the agent past its deadline")
        job = Job(ex, m.load, m.slot, m.seq, [], bytearray(n), deadline)
        job.layerwise = m.layerwise
        self.counters.layerwise_jobs += m.layerwise
        room = self._room(c.client_id, m.load)
        if room < n:  # past the client's share: the last chunks are refused, counted
            self.counters.refused_share += n - room
            for i in range(room, n):
                job.outcomes[i] = PG.CHUNK_MISSING if m.load else PG.CHUNK_NO_SPACE
        if m.load:
            self._pin(job, m, room)
        else:
            self._reserve(job, m, room)
        held = self._chunks_by_client[m.load]
        held[c.client_id] = held.get(c.client_id, 0) + len(job.chunks)
        self.counters.jobs += 1
        self.inflight += 1
        ex.jobs += 1
        self._inflight_by_client[c.client_id] = mine + 1
        if not job.chunks:
            self._finish_here(job, thread)
        elif not thread.submit(job):
            self.counters.jobs_refused += 1
            job.fail("the device's copy queue is full")
            self._finish_here(job, thread)
        return P.StatusRep(m.rid, [_wire_status(b) for b in job.outcomes])

    def _room(self, client: int, load: bool) -> int:
        """Chunks the client may still have pinned (loads) or reserved (saves): its
        share less what it holds itself and what its jobs in flight hold for it."""
        held = self.cache.held_by(client)
        if load:
            cap, own = self.options.client_pins_max, held.pins_held
        else:
            cap, own = self.options.client_leases_max, len(held.leases)
        return max(0, cap - own - self._chunks_by_client[load].get(client, 0))

    def _pin(self, job: Job, m: P.JobReq, room: int) -> None:
        pb, size = self.page_bytes, job.export.chunk_nbytes
        offsets = m.offsets or [0] * len(m.keys)
        keys = m.keys[:room]
        for i, (key, e) in enumerate(zip(keys, self.cache.pin_many(keys, AGENT_OWNER))):
            if e is None:
                job.outcomes[i] = PG.CHUNK_MISSING
                self.counters.load_misses += 1
                continue
            if e.size != size:  # not this cache's chunk format: a miss for it, kept stored
                self.cache.unpin(key)
                job.outcomes[i] = PG.CHUNK_MISSING
                self.counters.load_wrong_size += 1
                continue
            job.chunks.append(
                ChunkWork(key, tuple(m.blocks[i]), e.extents(pb), offsets[i], e.checksum, i)
            )

    def _reserve(self, job: Job, m: P.JobReq, room: int) -> None:
        size, pb = job.export.chunk_nbytes, self.page_bytes
        keys = m.keys[:room]
        groups = m.groups[:room] if m.groups else None
        answers = self.cache.reserve_many(keys, size, AGENT_OWNER, groups) if keys else []
        if answers is None:
            answers = [
                self.cache.reserve(k, size, AGENT_OWNER, groups[i] if groups else None)
                for i, k in enumerate(keys)
            ]
        job.parents = list(m.parents)
        job.tokens = [list(t) for t in m.tokens]
        for i, (out, e) in enumerate(answers):
            if out is Outcome.OK and e is not None:
                job.chunks.append(ChunkWork(m.keys[i], tuple(m.blocks[i]), e.extents(pb), index=i))
            elif out is Outcome.EXISTS:
                job.outcomes[i] = PG.CHUNK_EXISTS
                self.counters.save_exists += 1
            else:
                job.outcomes[i] = PG.CHUNK_NO_SPACE
                self.counters.save_no_space += 1

    def _finish_here(self, job: Job, thread: CopyThread) -> None:
        """A job that goes to no copy thread: settle it now (and report it)."""
        if job.load:
            report(thread.mover, job)
        self._settle(job)

    def _handed_back(self, job: Job) -> None:
        """On a copy thread: queue the job for the loop and wake it."""
        self._done.append(job)
        self.wake()

    def poll(self) -> None:
        """On the loop: settle the jobs the copy threads handed back."""
        while self._done:
            self._settle(self._done.popleft())

    def _settle(self, job: Job) -> None:
        self.inflight -= 1
        owner = job.export.client_id
        _count_down(self._inflight_by_client, owner, 1)
        _count_down(self._chunks_by_client[job.load], owner, len(job.chunks))
        ctr = self.counters
        if job.failed:
            ctr.jobs_failed += 1
            log.debug("job of export %x failed: %s", job.export.export_id, job.failed)
        if job.load:
            ctr.load_copy_s += job.copy_s
            self._settle_load(job)
        else:
            ctr.save_copy_s += job.copy_s
            self._settle_save(job)
            thread = self._threads.get(job.export.device)
            if thread is not None:  # committed first: "saved" is never ahead of a lookup
                report(thread.mover, job)
        job.export.jobs -= 1
        self._release(job.export)

    def _settle_load(self, job: Job) -> None:
        ctr = self.counters
        for c in job.chunks:
            self.cache.unpin(c.key)
            if c.status == PG.CHUNK_BAD:  # the arena's copy; a lower tier's was checked
                ctr.checksum_errors += 1  # against the same checksum when written
                self.cache.drop(c.key, lower_tiers=False)
            elif c.status == PG.CHUNK_OK and not job.failed:
                ctr.load_chunks += 1
        ctr.load_bytes += job.moved_bytes

    def _settle_save(self, job: Job) -> None:
        ok = [c for c in job.chunks if c.status == PG.CHUNK_OK and not job.failed]
        for c in job.chunks:
            if c not in ok:
                self.cache.abort(c.key, AGENT_OWNER)
        if not ok:
            return
        outs = self.cache.commit_many(
            [c.key for c in ok],
            AGENT_OWNER,
            [c.checksum for c in ok],
            [job.parents[c.index] for c in ok] if job.parents else [],
            [job.tokens[c.index] for c in ok] if job.tokens else [],
        )
        for c, out in zip(ok, outs):
            if out is not Outcome.OK:  # dropped while copied: the worker is told
                c.status = PG.CHUNK_FAILED
        n = sum(1 for o in outs if o is Outcome.OK)
        self.counters.save_chunks += n
        self.counters.save_bytes += n * job.export.chunk_nbytes

    # ------------------------------------------------------------------ stats
    def stats(self, counters: dict[str, int]) -> dict[str, Any]:
        ctr = self.counters
        agent = {k: getattr(ctr, k) for k in ctr.__slots__}  # type: ignore[attr-defined]
        agent["save_copy_s"] = round(ctr.save_copy_s, 6)
        agent["load_copy_s"] = round(ctr.load_copy_s, 6)
        agent["jobs_inflight"] = self.inflight
        agent["exporting_workers"] = len(self.exports)
        agent["exports_polling"] = sum(1 for ex in self.exports.values() if not ex.woken)
        agent["devices"] = {d: t.mover.device_stats() for d, t in list(self._threads.items())[:64]}
        agent["workers"] = [
            {"client": f"{ex.client_id:x}", "pid": ex.pid, "device": ex.device,
             "layers": len(ex.layers), "woken": ex.woken}
            for ex in self.exports.values()[:64]
        ]  # fmt: skip
        worker = {
            "save_bytes": counters.get("bytes_in", 0),
            "load_bytes": counters.get("bytes_out", 0),
        }
        return {"agent": agent, "worker": worker}

    def close(self) -> None:
        """Before the arena is unmapped: stop every copy (exports die first)."""
        for ex in self.exports.values():
            ex.alive = False
        for thread in self._threads.values():
            thread.close()
            try:
                thread.mover.close()
            except Exception:
                log.exception("closing the %s mover failed", thread.mover.device)
        self._threads.clear()
        for ex in self.exports.values():
            if ex.proc is not None:
                ex.proc.close()


def _wire_status(code: int) -> int:
    if code == PG.CHUNK_EXISTS:
        return P.Status.EXISTS
    if code == PG.CHUNK_NO_SPACE:
        return P.Status.NO_SPACE
    if code == PG.CHUNK_MISSING:
        return P.Status.NOT_FOUND
    return P.Status.OK  # queued (or decided by the copy: read in the progress slot)


def _blocks_per_chunk(layers: tuple[Layer, ...], chunk_nbytes: int) -> int:
    per_block = sum(layer.block_nbytes for layer in layers)
    if per_block <= 0 or chunk_nbytes % per_block:
        raise Refusal(f"chunk of {chunk_nbytes} bytes is not whole blocks of {per_block}")
    bpc = chunk_nbytes // per_block
    if len({layer.name for layer in layers}) != len(layers):
        raise Refusal("two layers have the same name")
    for layer in layers:
        if sum(n for _, n in layer.parts) != layer.block_nbytes:
            raise Refusal(f"layer {layer.name}: parts do not add up to its block bytes")
        if layer.payload_offset + bpc * layer.block_nbytes > chunk_nbytes:
            raise Refusal(f"layer {layer.name}: payload region outside the chunk")
        top = layer.base + (layer.num_blocks - 1) * layer.block_stride
        if top + max(o + n for o, n in layer.parts) >= 1 << 63:
            raise Refusal(f"layer {layer.name}: addresses out of range")
    # The layers' regions tile the payload, each byte one layer's: a chunk's checksum
    # then covers exactly the bytes its save copied (an overlap would leave a gap
    # of bytes no save writes, and every load of the chunk would fail its check).
    at = 0
    for layer in sorted(layers, key=lambda x: x.payload_offset):
        if layer.payload_offset != at:
            raise Refusal(f"layer {layer.name}: payload region at {layer.payload_offset}, "
                          f"not at {at} (the regions must tile the chunk)")  # fmt: skip
        at += bpc * layer.block_nbytes
    return bpc


def _count_down(counts: dict[int, int], key: int, n: int) -> None:
    """``counts[key] -= n``, the key gone at zero (a client's figures leave with it)."""
    left = counts.pop(key, 0) - n
    if left > 0:
        counts[key] = left


def _check_job(ex: Export, m: P.JobReq) -> None:
    n = len(m.keys)
    lengths = [len(m.blocks)] + [len(x) for x in (m.offsets, m.groups, m.parents, m.tokens) if x]
    if any(k != n for k in lengths):
        raise ClientError(P.ErrCode.BAD_FRAME, "job lists differ in length")
    if m.slot >= ex.slots:
        raise ClientError(P.ErrCode.BAD_FRAME, f"slot {m.slot} outside {ex.slots} slots")
    nb = min(layer.num_blocks for layer in ex.layers)
    bpc = ex.blocks_per_chunk
    for i, blocks in enumerate(m.blocks):
        off = m.offsets[i] if m.offsets else 0
        if any(b >= nb for b in blocks):
            raise ClientError(P.ErrCode.BAD_FRAME, f"block id beyond the cache's {nb} blocks")
        if m.load and (not blocks or off + len(blocks) > bpc):
            raise ClientError(P.ErrCode.BAD_FRAME, "load blocks outside the chunk")
        if not m.load and (len(blocks) != bpc or off):
            raise ClientError(P.ErrCode.BAD_FRAME, f"saves are whole chunks of {bpc} blocks")


def peer_pid(fd: int) -> int:
    """The pid of the process on the other end of a Unix socket (SO_PEERCRED), as
    the kernel names it in the agent's pid namespace; 0 when unknown."""
    if fd < 0:
        return 0
    try:
        s = socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return 0
    try:
        raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _uid, _gid = struct.unpack("3i", raw)
        return int(pid)
    except OSError:
        return 0
    finally:
        s.close()


def same_clock(pid: int) -> bool | None:
    """Whether ``pid`` reads CLOCK_MONOTONIC as the agent does (it is in the agent's
    time namespace): the deadline a worker sends with each job is then the agent's.
    None when the agent may not look (no ptrace rights: the attach then says why)."""
    try:
        mine = os.stat("/proc/self/ns/time")
    except FileNotFoundError:
        return True  # a kernel without time namespaces: one clock for every process
    except OSError:
        return False
    try:
        theirs = os.stat(f"/proc/{pid}/ns/time")
    except PermissionError:
        return None
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def _own_pid_ns() -> int:
    from kvnode.ipc.process import pid_namespace

    return pid_namespace()


__all__ = ["JOB_DEADLINE_S", "MoverOptions", "Refusal", "Transfers", "register_mover"]
