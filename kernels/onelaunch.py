"""One Triton launch moves a chunk of every layer: gather (cache -> chunk) and scatter.

The launch reads a ``ChunkPlan`` table (``kvnode.kernels.plan``): per layer the cache's
base address, block and segment strides, the row of its group's block ids and where its
part of the chunk starts. The grid is ``(blocks x segments, layers, tiles)``; a program
copies one tile of one segment of one block of one layer, so a chunk of a 32-layer model
with 16 blocks of two segments is one launch of a few thousand programs instead of 32
launches and their per-call overhead (which, not bandwidth, kept per-layer copies at
0.26-0.43 of raw DMA on an H200). The chunk address may be a device buffer (a staging
buffer, then one bus copy) or host memory the device can reach (the arena, registered
with ``cudaHostRegister``): the kernel then reads or writes it across the bus itself.

Without a GPU the same kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``
set before triton is imported) on CPU tensors; that is how its bytes are checked on
machines without a GPU. Importing this module needs triton; ``available()`` in
``kvnode.kernels.copy`` says whether it imported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kvnode.kernels import plan as _plan
from kvnode.kernels.layout import KVLayout
from kvnode.kernels.plan import ChunkPlan, Row, build_plan, layers_plan

# Bytes one program copies: large enough that a program's fixed cost (loading its table
# row and block id) is small, small enough that a chunk spreads over every SM.
TILE_BYTES = 16 << 10
_WORD_TYPES = {8: tl.int64, 4: tl.int32, 2: tl.int16, 1: tl.int8}
# A jitted function reads only constexpr globals.
COLS = tl.constexpr(_plan.COLS)
COL_CACHE = tl.constexpr(_plan.COL_CACHE)
COL_BLOCK_STRIDE = tl.constexpr(_plan.COL_BLOCK_STRIDE)
COL_SEG_STRIDE = tl.constexpr(_plan.COL_SEG_STRIDE)
COL_NSEG = tl.constexpr(_plan.COL_NSEG)
COL_SEG_WORDS = tl.constexpr(_plan.COL_SEG_WORDS)
COL_NBLOCKS = tl.constexpr(_plan.COL_NBLOCKS)
COL_IDS = tl.constexpr(_plan.COL_IDS)
COL_CHUNK = tl.constexpr(_plan.COL_CHUNK)


@triton.jit
def _chunk_copy(
    table,
    SEG_MAX: tl.constexpr,
    TILE: tl.constexpr,
    WORD: tl.constexpr,
    ALIGN: tl.constexpr,
    AW: tl.constexpr,
    GATHER: tl.constexpr,
):
    pid = tl.program_id(0)
    layer = tl.program_id(1)
    tile = tl.program_id(2)
    j = pid // SEG_MAX  # block of the chunk
    s = pid % SEG_MAX  # segment of the block
    row = table + layer * COLS
    # The plan guarantees every address, stride and size is a multiple of ALIGN bytes
    # (AW words): saying so lets the compiler issue 16-byte accesses.
    n_seg = tl.load(row + COL_NSEG)
    seg_words = tl.multiple_of(tl.load(row + COL_SEG_WORDS), AW)
    start = tile * TILE
    # Layers with fewer blocks (a sliding-window group), fewer segments or shorter
    # segments than the grid's widest leave the spare programs idle.
    if (j < tl.load(row + COL_NBLOCKS)) & (s < n_seg) & (start < seg_words):
        block = tl.load(table + tl.load(row + COL_IDS) + j)
        cache = tl.multiple_of(tl.load(row + COL_CACHE).to(tl.pointer_type(WORD)), ALIGN)
        chunk = tl.multiple_of(tl.load(row + COL_CHUNK).to(tl.pointer_type(WORD)), ALIGN)
        at = block * tl.load(row + COL_BLOCK_STRIDE) + s * tl.load(row + COL_SEG_STRIDE)
        src = cache + tl.multiple_of(at, AW)
        dst = chunk + tl.multiple_of((j * n_seg + s) * seg_words, AW)
        offs = start + tl.max_contiguous(tl.multiple_of(tl.arange(0, TILE), TILE), TILE)
        mask = offs < seg_words
        if GATHER:
            tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)
        else:
            tl.store(src + offs, tl.load(dst + offs, mask=mask), mask=mask)


def plan(rows: Sequence[Row], block_ids: Sequence[Sequence[int]]) -> ChunkPlan:
    """``build_plan`` with this kernel's tile size."""
    return build_plan(rows, block_ids, TILE_BYTES)


def plan_layers(
    kvs: Sequence[torch.Tensor], layout: KVLayout, ids: Sequence[int], chunk_address: int
) -> ChunkPlan:
    """``layers_plan`` (one group's chunk, from a cached template) with this tile size."""
    return layers_plan(kvs, layout, ids, chunk_address, TILE_BYTES)


def launch(p: ChunkPlan, device: torch.device, *, gather: bool) -> None:
    """Queue the copy on the current stream of ``device``. The table is uploaded on the
    same stream; on a GPU the host copy stays alive until the upload has run (torch's
    caching host allocator tracks it)."""
    if p.nbytes == 0:
        return
    grid = (p.blocks_max * p.seg_max, p.layers, p.tiles_max)
    consts = dict(SEG_MAX=p.seg_max, TILE=p.tile_words, WORD=_WORD_TYPES[p.word])
    consts.update(ALIGN=p.align, AW=p.align // p.word, GATHER=gather)
    if device.type == "cpu":
        _chunk_copy[grid](p.table, **consts)
        return
    # Triton launches on the current device's current stream: make them ``device``'s
    # (an agent serves several GPUs from one process).
    with torch.cuda.device(device):
        table = p.table.pin_memory().to(device, non_blocking=True)
        _chunk_copy[grid](table, **consts)
