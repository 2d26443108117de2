"""The GPU mover: CUDA/HIP IPC handles of a worker's cache, the arena registered once.

A GPU worker exports every layer with an IPC handle, one ``ready`` event and one event
per layer (``kvnode.kernels.gpuexport``); its export's device is ``cuda:<uuid>``, so
each GPU gets its own mover and copy thread. ``attach``, on the agent's loop, checks
the probe like the CPU mover (the progress page and the probe are host memory of the
worker, reached with cross-memory attach) and decodes and bounds every handle, which
needs neither torch nor the GPU. Opening them (torch's import, the CUDA context, about
0.1 s per handle) runs on the mover's opener thread, never on the loop; the export's
first job waits for it. There each opened layer is checked against the export's block
stride and parts; an export that fails to open fails its jobs (counted), said once in
the log.

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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvnode.agent.movers.base import ChunkWork, Export, Job, Layer, MoverError
from kvnode.agent.movers.cpu import CpuMover, _addr, _why_not, transfer
from kvnode.ipc import progress as PG
from kvnode.ipc.checksum import checksum_extents
from kvnode.kernels import ipchandle as H

if TYPE_CHECKING:  # torch and the copier are imported off the loop, where copies run
    import torch

    from kvnode.kernels.gpumove import ChunkCopy, DeviceCopier, OpenedLayer

log = logging.getLogger("kvnode.agent")

OPEN_WAIT_S = 60.0  # how long a job waits for its export's handles to open


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
    _handle: Any = None

    @classmethod
    def acquire(cls, arena: memoryview) -> bool:
        from kvnode.kernels import hostmem

        with cls._lock:
            if cls._users == 0:
                cls._handle = hostmem.register_host_memory(arena)
            cls._users += 1
            return cls._handle is not None

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            if cls._users <= 0:
                return
            cls._users -= 1
            if cls._users == 0:
                from kvnode.kernels import hostmem

                hostmem.unregister_host_memory(cls._handle)
                cls._handle = None


class GpuMover(CpuMover):
    """One GPU's mover (``device`` is ``cuda:<uuid>``). ``route``: ``staging`` or
    ``direct`` (``kvnode.kernels.gpumove``)."""

    def __init__(self, arena: memoryview, device: str = "cuda", route: str = "staging") -> None:
        super().__init__(arena, threads=1)  # cross-memory attach: the probe and the progress page
        self.device = device
        self.layerwise_saves = False
        self.route = route
        # Registered on the first job, on the copy thread: a large arena takes seconds,
        # which the agent's loop must not wait for.
        self.registered = False
        self._acquired = False
        self._arena = arena
        self._arena_tensor: Any = None
        self._uuids: dict[str, int] | None = None
        self._copiers: dict[Any, DeviceCopier] = {}
        self._opener = ThreadPoolExecutor(1, thread_name_prefix=f"kvnode-open-{device}")
        self._open_failures_logged: set[str] = set()

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
            self._check_handles(export)
        except H.HandleError as exc:
            return f"the agent cannot open pid {export.pid}'s GPU cache: {exc}"[:300]
        export.state = self._opener.submit(self._open, export)
        return ""

    def _check_handles(self, export: Export) -> None:
        H.check_wire_handles(export.handles, len(export.layers))

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
        """On the opener thread: map the worker's layers and events on this agent's
        ordinal of their GPU."""
        from kvnode.kernels.gpuexport import open_events

        uuids = self._device_uuids()
        handles, ready, events = H.split_wire_handles(export.handles, len(export.layers))
        kvs = H.open_cache(handles, uuids)
        layers = [opened_layer(x, kv) for x, kv in zip(export.layers, kvs, strict=True)]
        ready_ev, layer_evs = open_events(ready, events, uuids)
        return Opened(layers, ready_ev, layer_evs, self._copier(kvs[0].device))

    def _device_uuids(self) -> dict[str, int]:
        if self._uuids is None:
            self._uuids = H.device_uuids()
        return self._uuids

    def _copier(self, device: torch.device) -> DeviceCopier:
        from kvnode.kernels.gpumove import DeviceCopier

        copier = self._copiers.get(device)
        if copier is None:
            if self._arena_tensor is None:
                import torch

                self._arena_tensor = torch.frombuffer(self._arena, dtype=torch.uint8)
            copier = DeviceCopier(device, self._arena_tensor, self.route)
            self._copiers[device] = copier
        return copier

    def _opened(self, export: Export) -> Opened:
        """The export as opened (waiting for the opener); ``MoverError`` says why not."""
        state = export.state
        if isinstance(state, Future):
            try:
                state = export.state = state.result(OPEN_WAIT_S)
            except Exception as exc:  # noqa: BLE001 - every way of failing to open
                why = f"the agent cannot open pid {export.pid}'s GPU cache: {exc}"[:300]
                export.state = why
                if why not in self._open_failures_logged and len(self._open_failures_logged) < 64:
                    self._open_failures_logged.add(why)
                    log.warning("%s; its jobs fail (the worker recomputes)", why)
        if isinstance(state, str):
            raise MoverError(state)
        if not isinstance(state, Opened):
            raise MoverError("the export is not open in this agent")
        return state

    def device_stats(self) -> dict[str, object]:
        """The agent's own memory on this GPU: its staging buffers and what torch's
        allocator holds for it (the CUDA context, a few hundred MiB, comes on top).
        The workers' caches it maps are theirs, counted in their processes."""
        out: dict[str, object] = {"arena_registered": self.registered}
        for device, copier in list(self._copiers.items()):
            out["staging_bytes"] = copier.staging_bytes
            if device.type == "cuda":
                import torch

                out["reserved_bytes"] = int(torch.cuda.memory_reserved(device))
        return out

    def detach(self, export: Export) -> None:
        export.state = None  # the opened storages go; torch closes their IPC mappings

    def close(self) -> None:
        self._opener.shutdown(wait=True, cancel_futures=True)
        self._copiers.clear()
        if self._acquired:
            self._acquired = self.registered = False
            _Registration.release()

    # ------------------------------------------------------------------ jobs
    def run(self, job: Job) -> bool:
        """Whole saves only (the worker records its stream's event at the end of the
        forward pass): ``layerwise`` jobs are refused for GPU exports."""
        if not self._acquired:
            self._acquired = True
            self.registered = self._register(self._arena)
        try:
            opened = self._opened(job.export)
            if job.load:
                self._load_gpu(job, opened)
            else:
                self._save_gpu(job, opened)
        except MoverError as exc:
            job.fail(str(exc))
        except (RuntimeError, ValueError) as exc:  # CUDA errors, refused jobs (CopyError)
            job.fail(f"GPU copy failed: {exc}")
        return True

    def _save_gpu(self, job: Job, opened: Opened) -> None:
        work = [c for c in job.chunks if c.status == PG.CHUNK_PENDING]
        self._check(job)
        t0 = time.perf_counter()
        job.moved_bytes += opened.copier.save(opened.layers, _copies(work), ready=opened.ready)
        log.debug("saved %d chunks in %.3f ms", len(work), (time.perf_counter() - t0) * 1e3)
        for c in work:
            c.checksum = checksum_extents(self.view, c.extents)
            c.status = PG.CHUNK_OK

    def _load_gpu(self, job: Job, opened: Opened) -> None:
        ex = job.export
        for c in job.chunks:  # the writer's checksum, before a byte reaches the worker
            if c.status == PG.CHUNK_PENDING:
                got = checksum_extents(self.view, c.extents)
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
            ex.wake()

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
    from kvnode.kernels.gpumove import OpenedLayer
    from kvnode.kernels.layout import KVLayout
    from kvnode.kernels.plan import NotCoverable, segments

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
    try:
        seg = segments(kv, layout)
    except NotCoverable as exc:
        raise MoverError(f"layer {x.name}: {exc}") from exc
    parts = tuple((s * seg.seg_stride, seg.seg_bytes) for s in range(seg.n_seg))
    if seg.block_stride != x.block_stride or parts != tuple(x.parts):
        raise MoverError(
            f"layer {x.name}: the handle maps blocks {seg.block_stride}/{parts}, "
            f"the export says {x.block_stride}/{x.parts}"
        )
    return OpenedLayer(kv, layout, 0, x.payload_offset)


def _copies(work: list[ChunkWork]) -> list[ChunkCopy]:
    from kvnode.kernels.gpumove import ChunkCopy

    return [ChunkCopy(0, c.blocks, tuple(c.extents), c.block_offset) for c in work]
