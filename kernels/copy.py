"""Move whole blocks between a layer's paged KV cache and a contiguous chunk buffer.

``gather`` packs the named blocks, in the order given, into a 1-D uint8 buffer (``len ==
len(block_ids) * layout.block_nbytes``); ``scatter`` is its exact inverse. Only whole
blocks move: the CPU backend's slab order makes partial-block copies wrong.

Same device (CPU cache, host buffer): blocks go straight between the two, one numpy
memcpy per run of consecutive ids (``kvnode.kernels.hostcopy``, the one host copy path:
torch's CPU copies split over an OpenMP team that stalls beside vLLM's). GPU cache, host buffer: the blocks are packed on
the device (slices for a few runs, one indexed kernel for many) and cross the bus in one
copy, so a registered (pinned) buffer gets one DMA per call. Both calls return once the
buffer's bytes are final, so the caller may commit, reuse or release it.

``gather_layers``/``scatter_layers`` do the same for every layer of a chunk at once; the
buffer is the per-layer buffers concatenated in the order of the layers. With a GPU
cache and a host buffer, all layers are packed into one device staging buffer and cross
the bus in ONE copy: per call overhead, not bandwidth, limits per-layer calls (H100,
32 layers of 2 MiB: 0.29 of a raw copy synchronous, 0.49 queued). The packing is one
Triton launch over every layer (``kvnode.kernels.onelaunch``) where triton imports and
the layout is one the kernel covers (``kvnode.kernels.plan.coverable``); otherwise layers
that are evenly spaced views of one allocation (cross-layer caches) move with one
indexed kernel over a stacked view, and separate per-layer tensors need one kernel each.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from types import ModuleType

import torch

from kvnode.kernels import hostcopy
from kvnode.kernels.hostmem import register_host_memory, unregister_host_memory
from kvnode.kernels.layout import KVLayout, physical_blocks
from kvnode.kernels.plan import NotCoverable
from kvnode.kernels.staging import staging_buffer

log = logging.getLogger(__name__)

__all__ = [
    "kernel_stats",
    "gather",
    "gather_layers",
    "register_host_memory",
    "scatter",
    "scatter_layers",
    "unregister_host_memory",
    "wait",
]

# On the GPU, above this many runs one indexed kernel beats a loop of slice copies
# (H100, 128 KiB flash blocks: a slice copy ~10 us, index upload + kernel ~25 us).
_RUNS_MAX = 2

# Device copies of recent block id lists (a chunk's ids serve every layer).
_INDEX_CACHE_MAX = 16
_index_cache: dict[tuple[tuple[int, ...], int, int], torch.Tensor] = {}
_index_lock = threading.Lock()

BlockIds = Sequence[int] | torch.Tensor
Runs = hostcopy.Runs
_runs = hostcopy.runs_of


def gather(
    kv: torch.Tensor,
    layout: KVLayout,
    block_ids: BlockIds,
    dst: torch.Tensor,
    *,
    sync: bool = True,
) -> None:
    """Copy blocks ``block_ids`` of ``kv`` into ``dst``, block after block.

    ``sync=False`` (GPU cache, host ``dst``): return once the copies are queued on the
    current stream; ``dst`` is final only after ``wait(kv.device)``. Lets a caller queue
    every layer of a chunk and wait once."""
    blocks = physical_blocks(kv, layout)
    ids = _check_ids(block_ids, layout)
    out = _chunk_view(dst, blocks, len(ids))
    if out.device == blocks.device:
        _copy_blocks_out(blocks, ids, out)
        return
    staged = torch.empty_like(out, device=blocks.device)
    _copy_blocks_out(blocks, ids, staged)
    # One stream throughout: a side stream for the host-link copy was measured slower
    # (H100, 2 MiB per call: the extra events cost more host time than the overlap saves).
    out.copy_(staged, non_blocking=True)
    if sync:
        wait(blocks.device)


def scatter(
    src: torch.Tensor,
    kv: torch.Tensor,
    layout: KVLayout,
    block_ids: BlockIds,
    *,
    sync: bool = True,
) -> None:
    """Copy ``src`` (as written by ``gather``) into blocks ``block_ids`` of ``kv``.

    ``sync=False`` (GPU cache, host ``src``): return once the copies are queued; ``src``
    must stay unchanged until ``wait(kv.device)``. Work queued later on the same stream
    (the forward pass) sees the blocks either way."""
    blocks = physical_blocks(kv, layout)
    ids = _check_ids(block_ids, layout)
    inp = _chunk_view(src, blocks, len(ids))
    if inp.device == blocks.device:
        _copy_blocks_in(blocks, ids, inp)
        return
    _copy_blocks_in(blocks, ids, inp.to(blocks.device, non_blocking=True))
    if sync:  # the caller may release ``src`` on return: the device must have read it
        wait(blocks.device)


def gather_layers(
    kvs: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: BlockIds,
    dst: torch.Tensor,
    *,
    sync: bool = True,
) -> None:
    """``gather`` of every layer in ``kvs`` (all on one device, all of ``layout``) into
    consecutive parts of ``dst``, in the order given. ``sync`` as for ``gather``."""
    ids = _check_ids(block_ids, layout)
    _layers_buffer(dst, len(kvs), len(ids), layout)
    if not kvs:
        return
    device = _one_device(kvs)
    if dst.device == device or not ids:
        # Same device: nothing crosses a bus, per-layer copies are memory-bound anyway.
        for kv, out in zip(kvs, _split(dst, len(kvs)), strict=True):
            gather(kv, layout, ids, out, sync=sync)
        return
    staged = staging_buffer(device, dst.numel())
    if not _one_launch(kvs, layout, ids, staged, gather=True):
        _pack(kvs, layout, ids, staged)
    dst.copy_(staged, non_blocking=True)
    if sync:
        wait(device)


def scatter_layers(
    src: torch.Tensor,
    kvs: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: BlockIds,
    *,
    sync: bool = True,
) -> None:
    """Inverse of ``gather_layers``: ``src`` (as it wrote it) into blocks ``block_ids``
    of every layer in ``kvs``. ``sync`` as for ``scatter``."""
    ids = _check_ids(block_ids, layout)
    _layers_buffer(src, len(kvs), len(ids), layout)
    if not kvs:
        return
    device = _one_device(kvs)
    if src.device == device or not ids:
        for kv, inp in zip(kvs, _split(src, len(kvs)), strict=True):
            scatter(inp, kv, layout, ids, sync=sync)
        return
    staged = staging_buffer(device, src.numel())
    staged.copy_(src, non_blocking=True)
    if not _one_launch(kvs, layout, ids, staged, gather=False):
        _unpack(staged, kvs, layout, ids)
    if sync:  # the caller may release ``src`` on return: the device must have read it
        wait(device)


def _one_launch(
    kvs: Sequence[torch.Tensor], layout: KVLayout, ids: list[int], chunk: torch.Tensor, gather: bool
) -> bool:
    """Every layer between the caches and ``chunk`` (same device) in one Triton launch;
    False when the per-layer path must do it (no triton, a layout the kernel does not
    cover, a launch that failed: each counted)."""
    kernel = _kernel_module()
    if kernel is None:
        return False
    try:
        plan = kernel.plan_layers(kvs, layout, ids, chunk.data_ptr())
    except NotCoverable:
        _count("not_coverable")
        return False
    try:
        kernel.launch(plan, chunk.device, gather=gather)
    except Exception as exc:  # a compiler or driver refusal: the per-layer path still works
        _disable_kernel(exc)
        return False
    _count("launches")
    return True


_kernel_state: dict[str, object] = {"module": None, "tried": False, "disabled": False}
_kernel_counts = {"launches": 0, "not_coverable": 0, "unavailable": 0, "failed": 0}


def kernel_stats() -> dict[str, int | bool]:
    """Counters of the one-launch path: launches, and the calls that fell back to the
    per-layer path (not_coverable, unavailable, failed)."""
    loaded = _kernel_state["module"] is not None and not _kernel_state["disabled"]
    return {**_kernel_counts, "loaded": loaded}


def _count(name: str) -> None:
    _kernel_counts[name] += 1  # a lost increment under a race only skews a counter


def _kernel_module() -> ModuleType | None:
    """``kvnode.kernels.onelaunch``, imported on first use (triton is not a dependency
    of the CPU install, and importing it costs a second); None where it cannot run."""
    if not _kernel_state["tried"]:
        _kernel_state["tried"] = True
        try:
            from kvnode.kernels import onelaunch

            _kernel_state["module"] = onelaunch
        except ImportError as exc:
            log.info("kvnode: one-launch chunk copies off (%s); copying layer by layer", exc)
    if _kernel_state["disabled"] or _kernel_state["module"] is None:
        _count("unavailable")
        return None
    return _kernel_state["module"]  # type: ignore[return-value]


def _disable_kernel(exc: BaseException) -> None:
    _count("failed")
    if not _kernel_state["disabled"]:
        _kernel_state["disabled"] = True
        log.warning("kvnode: one-launch chunk copy failed (%s); copying layer by layer", exc)


def _pack(kvs: Sequence[torch.Tensor], layout: KVLayout, ids: list[int], out: torch.Tensor) -> None:
    """Every layer's blocks ``ids`` into ``out`` (same device), layer after layer."""
    blocks = [physical_blocks(kv, layout) for kv in kvs]
    stacked = _stacked(blocks)
    runs = _runs(ids)
    if stacked is None:
        for layer, part in zip(blocks, _split(out, len(blocks)), strict=True):
            _copy_blocks_out(layer, ids, part.view(len(ids), *layer.shape[1:]), runs)
        return
    staged = out.view(len(blocks), len(ids), *stacked.shape[2:])
    if len(runs) <= _RUNS_MAX:
        for first, pos, count in runs:
            staged[:, pos : pos + count].copy_(stacked[:, first : first + count])
    else:
        src, dst = _widest(stacked, staged)
        torch.index_select(src, 1, _index(ids, stacked.device), out=dst)


def _unpack(
    inp: torch.Tensor, kvs: Sequence[torch.Tensor], layout: KVLayout, ids: list[int]
) -> None:
    """Inverse of ``_pack``."""
    blocks = [physical_blocks(kv, layout) for kv in kvs]
    stacked = _stacked(blocks)
    runs = _runs(ids)
    if stacked is None:
        for layer, part in zip(blocks, _split(inp, len(blocks)), strict=True):
            _copy_blocks_in(layer, ids, part.view(len(ids), *layer.shape[1:]), runs)
        return
    staged = inp.view(len(blocks), len(ids), *stacked.shape[2:])
    if stacked.device.type == "cpu" or len(runs) <= _RUNS_MAX:
        for first, pos, count in runs:
            stacked[:, first : first + count].copy_(staged[:, pos : pos + count])
    else:
        dst, src = _widest(stacked, staged)
        dst.index_copy_(1, _index(ids, stacked.device), src)


def _stacked(blocks: list[torch.Tensor]) -> torch.Tensor | None:
    """All layers as one ``[layers, num_blocks, ...]`` view, when they are views of one
    allocation with the same shape and strides at evenly spaced, increasing addresses
    (e.g. a cross-layer ``[num_blocks, layers, ...]`` cache); else None."""
    if len(blocks) < 2:
        return None
    first = blocks[0]
    step = blocks[1].data_ptr() - first.data_ptr()  # uint8 views: bytes = elements
    if step <= 0:  # a view cannot have negative strides; 0 means one layer twice
        return None
    storage = first.untyped_storage().data_ptr()
    for i, layer in enumerate(blocks):
        if (
            layer.shape != first.shape
            or layer.stride() != first.stride()
            or layer.data_ptr() - first.data_ptr() != i * step
            or layer.untyped_storage().data_ptr() != storage
        ):
            return None
    return first.as_strided((len(blocks), *first.shape), (step, *first.stride()))


def _one_device(kvs: Sequence[torch.Tensor]) -> torch.device:
    device = kvs[0].device
    for kv in kvs:
        if kv.device != device:
            raise ValueError(f"layers on more than one device: {device} and {kv.device}")
    return device


def _layers_buffer(buf: torch.Tensor, layers: int, count: int, layout: KVLayout) -> None:
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(f"chunk buffer must be 1-D contiguous uint8, got {buf.dtype} {buf.shape}")
    nbytes = layers * count * layout.block_nbytes
    if buf.numel() != nbytes:
        raise ValueError(
            f"chunk buffer has {buf.numel()} bytes, {layers} layers of {count} blocks need {nbytes}"
        )


def _split(buf: torch.Tensor, parts: int) -> list[torch.Tensor]:
    size = buf.numel() // parts
    return [buf[i * size : (i + 1) * size] for i in range(parts)]


def _copy_blocks_out(
    blocks: torch.Tensor, ids: list[int], out: torch.Tensor, runs: Runs | None = None
) -> None:
    runs = _runs(ids) if runs is None else runs
    if blocks.device.type == "cpu" and out.device.type == "cpu":
        hostcopy.blocks_out(blocks, ids, out, runs)
    elif len(runs) <= _RUNS_MAX:
        for first, pos, count in runs:
            out[pos : pos + count].copy_(blocks[first : first + count])
    else:
        src, dst = _widest(blocks, out)
        torch.index_select(src, 0, _index(ids, blocks.device), out=dst)


def _copy_blocks_in(
    blocks: torch.Tensor, ids: list[int], inp: torch.Tensor, runs: Runs | None = None
) -> None:
    runs = _runs(ids) if runs is None else runs
    if blocks.device.type == "cpu" and inp.device.type == "cpu":
        hostcopy.blocks_in(inp, blocks, ids, runs)
    elif len(runs) <= _RUNS_MAX:
        for first, pos, count in runs:
            blocks[first : first + count].copy_(inp[pos : pos + count])
    else:
        dst, src = _widest(blocks, inp)
        dst.index_copy_(0, _index(ids, blocks.device), src)


def _widest(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The same bytes with the widest integer element all of them allow: fewer loads."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if all(_fits(t, size) for t in tensors):
            return [t.view(dtype) for t in tensors]
    return list(tensors)


def _fits(t: torch.Tensor, size: int) -> bool:
    aligned = t.data_ptr() % size == 0 and t.shape[-1] % size == 0
    return aligned and all(s % size == 0 for s in t.stride()[:-1])


def _check_ids(block_ids: BlockIds, layout: KVLayout) -> list[int]:
    # Python ints: for the tens of ids of a chunk, cheaper than numpy round trips.
    if isinstance(block_ids, torch.Tensor):
        ids = [int(i) for i in block_ids.reshape(-1).tolist()]
    else:
        ids = [int(i) for i in block_ids]
    if ids and (min(ids) < 0 or max(ids) >= layout.num_blocks):
        raise IndexError(f"block ids out of range [0, {layout.num_blocks}): {ids}")
    if len(set(ids)) != len(ids):
        # Scatter of duplicates would keep one of several writes; never meaningful.
        raise ValueError(f"duplicate block ids: {ids}")
    return ids


def _chunk_view(buf: torch.Tensor, blocks: torch.Tensor, count: int) -> torch.Tensor:
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(f"chunk buffer must be 1-D contiguous uint8, got {buf.dtype} {buf.shape}")
    nbytes = count * blocks[0].numel()
    if buf.numel() != nbytes:
        raise ValueError(f"chunk buffer has {buf.numel()} bytes, {count} blocks need {nbytes}")
    return buf.view(count, *blocks.shape[1:])


def _index(ids: list[int], device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.tensor(ids, dtype=torch.int64)
    # Every layer of a chunk uses the same ids: upload them once (an upload costs about
    # as much as the copy kernel). Cached tensors are only ever read. Keyed by stream:
    # another stream could run before the queued upload has.
    stream = torch.cuda.current_stream(device)
    key = (tuple(ids), stream.device_index, stream.cuda_stream)
    index = _index_cache.get(key)
    if index is None:
        # Pinned by torch's caching host allocator, which keeps the block until the
        # copy has run, so the upload is queued instead of stalling the host.
        host = torch.tensor(ids, dtype=torch.int64, pin_memory=True)
        index = host.to(device, non_blocking=True)
        with _index_lock:
            while len(_index_cache) >= _INDEX_CACHE_MAX:
                _index_cache.pop(next(iter(_index_cache)))
            _index_cache[key] = index
    return index


def wait(device: torch.device | str) -> None:
    """Wait for the copies queued by ``gather``/``scatter(..., sync=False)`` on ``device``."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    # The copies ran on the current stream; wait for it, not for the whole device.
    torch.cuda.current_stream(device).synchronize()
