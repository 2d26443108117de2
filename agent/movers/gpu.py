"""The GPU mover: CUDA/HIP IPC handles of a worker's cache, the arena registered once.

A GPU worker exports every layer with an IPC handle, one ``ready`` event and one event
per layer (``kvnode.kernels.gpuexport``); its export's device is ``cuda:<uuid>``, so
each GPU gets its own mover and copy thread. ``attach`` checks the probe like the CPU
mover (the progress page and the probe are host memory of the worker, reached with
cross-memory attach), then opens the handles on the agent's own ordinal of that GPU and
checks each opened layer against the export's block stride and parts: a handle that
does not map the memory the export describes is refused.

Jobs run on the device's ``DeviceCopier`` (``kvnode.kernels.gpumove``): a save packs
every layer of every chunk in one launch after the worker's ``ready`` event and lands
in the arena, then the agent checksums what landed; a load verifies each entry in the
arena first, then copies layer by layer, recording the layer's event before writing
its progress mark, so the worker's stream waits on the event, never its host.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from kvnode.agent.movers.base import ChunkWork, Export, Job, Layer, MoverError
from kvnode.agent.movers.cpu import CpuMover, _addr, _why_not, transfer
from kvnode.ipc import progress as PG
from kvnode.ipc.checksum import checksum
from kvnode.kernels import ipchandle as H
from kvnode.kernels.gpuexport import open_events, split_wire_handles
from kvnode.kernels.gpumove import ChunkCopy, CopyError, DeviceCopier, OpenedLayer
from kvnode.kernels.hostmem import HostRegistration, register_host_memory, unregister_host_memory
from kvnode.kernels.layout import KVLayout
from kvnode.kernels.plan import NotCoverable, segments

log = logging.getLogger("kvnode.agent")


@dataclass(slots=True)
class Opened:
    """An export as this agent reaches it."""

    layers: list[OpenedLayer]
    ready: Any  # torch.cuda.Event (None with CPU tensors)
    events: list[Any]
    copier: DeviceCopier


class _Registration:
    """The arena's ``cudaHostRegister``, once per process for every GPU mover (the
    registration is portable: every device's DMA and kernels reach it)."""

    _lock = threading.Lock()
    _users = 0
    _handle: HostRegistration | None = None

    @classmethod
    def acquire(cls, arena: memoryview) -> bool:
        with cls._lock:
            if cls._users == 0:
                cls._handle = register_host_memory(arena)
            cls._users += 1
            return cls._handle is not None

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0:
                unregister_host_memory(cls._handle)
                cls._handle = None


class GpuMover(CpuMover):
    """One GPU's mover (``device`` is ``cuda:<uuid>``). ``route``: ``staging`` or
    ``direct`` (``kvnode.kernels.gpumove``)."""

    def __init__(self, arena: memoryview, device: str = "cuda", route: str = "staging") -> None:
        super().__init__(arena)  # cross-memory attach: the probe and the progress page
        self.device = device
        self.route = route
        self.arena_tensor = torch.frombuffer(arena, dtype=torch.uint8)
        self.registered = self._register(arena)
        self.uuids = H.device_uuids()
        self._copiers: dict[torch.device, DeviceCopier] = {}

    def _register(self, arena: memoryview) -> bool:
        ok = _Registration.acquire(arena)
        if not ok:
            log.warning("the arena is not registered for DMA: GPU copies will be slower")
        return ok

    # ------------------------------------------------------------------ attach
    def attach(self, export: Export, probe: int, nonce: bytes) -> str:
        why = self._probe(export.pid, probe, nonce)
        if why:
            return why
        try:
            export.state = self._open(export)
        except (H.HandleError, MoverError, NotCoverable, RuntimeError, ImportError) as exc:
            return f"the agent cannot open pid {export.pid}'s GPU cache: {exc}"[:300]
        return ""

    def _probe(self, pid: int, probe: int, nonce: bytes) -> str:
        got = bytearray(len(nonce))
        try:
            transfer(pid, [(_addr(got), len(got))], [(probe, len(nonce))], write=False)
            if bytes(got) != nonce:
                return f"pid {pid} is not the process that exported (probe bytes differ)"
            answer = bytearray(nonce[::-1])
            transfer(pid, [(_addr(answer), len(answer))], [(probe, len(answer))], write=True)
        except MoverError as exc:
            return _why_not(pid, str(exc))
        return ""

    def _open(self, export: Export) -> Opened:
        handles, ready, events = split_wire_handles(export.handles, len(export.layers))
        kvs = H.open_cache(handles, self.uuids)
        layers = [opened_layer(x, kv) for x, kv in zip(export.layers, kvs, strict=True)]
        ready_ev, layer_evs = open_events(ready, events, self.uuids)
        return Opened(layers, ready_ev, layer_evs, self._copier(kvs[0].device))

    def _copier(self, device: torch.device) -> DeviceCopier:
        copier = self._copiers.get(device)
        if copier is None:
            copier = self._copiers[device] = DeviceCopier(device, self.arena_tensor, self.route)
        return copier

    def device_stats(self) -> dict[str, object]:
        """The agent's own memory on this GPU: its staging buffers and what torch's
        allocator holds for it (the CUDA context, a few hundred MiB, comes on top).
        The workers' caches it maps are theirs, counted in their processes."""
        out: dict[str, object] = {"arena_registered": self.registered}
        for device, copier in list(self._copiers.items()):
            out["staging_bytes"] = copier.staging_bytes
            if device.type == "cuda":
                out["reserved_bytes"] = int(torch.cuda.memory_reserved(device))
        return out

    def detach(self, export: Export) -> None:
        export.state = None  # the opened storages go; torch closes their IPC mappings

    def close(self) -> None:
        self._copiers.clear()
        if self.registered:
            self.registered = False
            _Registration.release()

    # ------------------------------------------------------------------ jobs
    def run(self, job: Job) -> None:
        opened = job.export.state
        if not isinstance(opened, Opened):
            job.fail("the export is not open in this agent")
            return
        try:
            if job.load:
                self._load_gpu(job, opened)
            else:
                self._save_gpu(job, opened)
        except (MoverError, CopyError) as exc:
            job.fail(str(exc))
        except RuntimeError as exc:  # a CUDA error: this job fails, the agent goes on
            job.fail(f"GPU copy failed: {exc}")

    def _save_gpu(self, job: Job, opened: Opened) -> None:
        work = [c for c in job.chunks if c.status == PG.CHUNK_PENDING]
        self._check(job)
        t0 = time.perf_counter()
        job.moved_bytes += opened.copier.save(opened.layers, _copies(work), ready=opened.ready)
        log.debug("saved %d chunks in %.3f ms", len(work), (time.perf_counter() - t0) * 1e3)
        for c in work:
            c.checksum = checksum([self.view[off : off + n] for off, n in c.extents])
            c.status = PG.CHUNK_OK

    def _load_gpu(self, job: Job, opened: Opened) -> None:
        ex = job.export
        for c in job.chunks:  # the writer's checksum, before a byte reaches the worker
            if c.status == PG.CHUNK_PENDING:
                got = checksum([self.view[off : off + n] for off, n in c.extents])
                c.status = PG.CHUNK_OK if c.checksum and got == c.checksum else PG.CHUNK_BAD
        for c in job.chunks:
            job.outcomes[c.index] = c.status
        work = [c for c in job.chunks if c.status == PG.CHUNK_OK]
        slot = ex.slot_address(job.slot)
        self._check(job)
        self._write_bytes(ex, slot + PG.chunk_byte(len(ex.layers), 0), bytes(job.outcomes))
        seq = bytes([job.seq])

        def layer_done(i: int) -> None:
            self._check(job)  # stops before the next layer of a worker that is gone
            self._write_bytes(ex, slot + PG.layer_byte(i), seq)

        if not work:
            for i in range(len(ex.layers)):
                layer_done(i)
            return
        job.moved_bytes += opened.copier.load(
            opened.layers, _copies(work), ready=opened.ready, events=opened.events,
            on_layer=layer_done,
        )  # fmt: skip


def opened_layer(x: Layer, kv: torch.Tensor) -> OpenedLayer:
    """The opened tensor as a layer the copier moves; ``MoverError`` unless its blocks
    are where the export says (block stride and parts)."""
    itemsize = kv.element_size()
    dims = [d for d in (0, 1) if d < kv.dim() and kv.shape[d] == x.num_blocks]
    dims = [d for d in dims if kv.stride(d) * itemsize == x.block_stride] or dims
    if not dims:
        raise MoverError(
            f"layer {x.name}: no block dimension of {x.num_blocks} in {tuple(kv.shape)}"
        )
    layout = KVLayout(x.name[:32] or "gpu", dims[0], x.num_blocks, x.block_nbytes)
    if kv.numel() * itemsize != x.num_blocks * x.block_nbytes:
        raise MoverError(f"layer {x.name}: {tuple(kv.shape)} is not {x.num_blocks} blocks")
    seg = segments(kv, layout)
    parts = tuple((s * seg.seg_stride, seg.seg_bytes) for s in range(seg.n_seg))
    if seg.block_stride != x.block_stride or parts != tuple(x.parts):
        raise MoverError(
            f"layer {x.name}: the handle maps blocks {seg.block_stride}/{parts}, "
            f"the export says {x.block_stride}/{x.parts}"
        )
    return OpenedLayer(kv, layout, 0, x.payload_offset)


def _copies(work: list[ChunkWork]) -> list[ChunkCopy]:
    return [ChunkCopy(0, c.blocks, tuple(c.extents), c.block_offset) for c in work]
