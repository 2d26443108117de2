"""Copy plans for the one-launch chunk kernel: every layer of a chunk as rows of one table.

A layer's block, in the order ``gather`` writes it (``layout.physical_blocks``), is
``n_seg`` runs ("segments") of ``seg_bytes`` dense bytes, segment ``s`` at ``s *
seg_stride`` from the block's start, block ``b`` at ``b * block_stride`` from the
layer's base: FlashAttention's ``[2, num_blocks, ...]`` is two segments (K, V) far
apart, blocks-first, MLA and the CPU layout are one segment, a layer of a cross-layer
allocation is one segment with a wide block stride. A block whose bytes need more than
one level of segments (a generic strided view) is not ``coverable``: such layers keep
the per-layer path of ``kvnode.kernels.copy``.

``build_plan`` turns ``Row``s (a layer, the row of block ids it uses, the address of
its bytes in a chunk buffer) into one int64 table, so a single launch moves every row:
every layer of a chunk (``chunk_rows``), of every group (groups have their own block
tables and, for sliding windows, fewer blocks per chunk), or one layer of many chunks.
The table is plain data: it is built and checked on any device; the kernel only reads it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvnode.kernels.layout import KVLayout, physical_blocks

# Columns of a table row (int64 each). Addresses are bytes, strides and sizes are words.
COL_CACHE, COL_BLOCK_STRIDE, COL_SEG_STRIDE, COL_NSEG, COL_SEG_WORDS = 0, 1, 2, 3, 4
COL_NBLOCKS, COL_IDS, COL_CHUNK = 5, 6, 7
COLS = 8

# Words the kernel moves per load: the widest that divides every address, stride and
# size of the plan. When all of them are multiples of ALIGN_MAX bytes the kernel says
# so, and contiguous tiles compile to 16-byte accesses.
WORD_SIZES = (8, 4, 2, 1)
ALIGN_MAX = 16
# Grid axes 1 and 2 of a CUDA launch are limited to this many programs.
GRID_AXIS_MAX = 65535
# Layers of one launch: one table row each (a model with several groups has a few
# hundred at most).
PLAN_LAYERS_MAX = 4096


class NotCoverable(ValueError):
    """The layers cannot move in one launch (layout, devices, grid); use the per-layer path."""


@dataclass(frozen=True, slots=True)
class Segments:
    """Where one layer's blocks are, in bytes."""

    base: int  # address of block 0, segment 0
    block_stride: int
    n_seg: int
    seg_stride: int  # 0 when n_seg == 1
    seg_bytes: int

    @property
    def block_bytes(self) -> int:
        return self.n_seg * self.seg_bytes


# Segments of recently planned layers: a model's layers are planned for every chunk, and
# working them out costs more than the rest of the plan. Keyed by everything they
# depend on, so a freed and reused address with another shape gets its own entry.
SEGMENTS_CACHE_MAX = 4096
_segments_cache: dict[tuple[object, ...], Segments] = {}


def segments(kv: torch.Tensor, layout: KVLayout) -> Segments:
    """The segments of ``kv``'s blocks; ``NotCoverable`` when one level is not enough."""
    key = (kv.data_ptr(), kv.shape, kv.stride(), kv.dtype, kv.device, layout)
    seg = _segments_cache.get(key)
    if seg is None:
        seg = _segments(kv, layout)
        if len(_segments_cache) >= SEGMENTS_CACHE_MAX:
            _segments_cache.clear()  # a new set of caches: start over
        _segments_cache[key] = seg
    return seg


def _segments(kv: torch.Tensor, layout: KVLayout) -> Segments:
    blocks = physical_blocks(kv, layout)  # [num_blocks, ...] uint8, innermost dense
    outer: list[tuple[int, int]] = []  # (size, stride) of dims outside the dense run
    run = 1  # bytes of the innermost dense run
    for size, stride in reversed(list(zip(blocks.shape[1:], blocks.stride()[1:], strict=True))):
        if size == 1:
            continue  # its stride does not matter
        if not outer and stride == run:
            run *= size
        elif outer and outer[-1][1] * outer[-1][0] == stride:
            outer[-1] = (outer[-1][0] * size, outer[-1][1])  # merges into the outer level
        else:
            outer.append((size, stride))
    if len(outer) > 1:
        raise NotCoverable(f"blocks of {tuple(kv.shape)} strides {kv.stride()} need {outer}")
    n_seg, seg_stride = outer[0] if outer else (1, 0)
    return Segments(blocks.data_ptr(), blocks.stride(0), n_seg, seg_stride, run)


def coverable(kv: torch.Tensor, layout: KVLayout) -> bool:
    try:
        segments(kv, layout)
    except NotCoverable:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Row:
    """One layer's part of a launch: blocks ``block_ids[ids_row]`` of ``kv`` to/from the
    bytes at ``chunk_address`` (``len(ids) * block_bytes`` of them)."""

    kv: torch.Tensor
    layout: KVLayout
    ids_row: int
    chunk_address: int


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """One launch's work: ``table`` (int64 ``[rows, COLS]``, then every row of block
    ids) and the grid's extents."""

    table: torch.Tensor  # host int64
    layers: int  # rows of the table (grid axis 1)
    word: int  # bytes per load
    align: int  # bytes every address, stride and size is a multiple of (<= ALIGN_MAX)
    seg_max: int
    blocks_max: int
    tiles_max: int  # programs per segment at ``tile_words`` words each
    tile_words: int
    nbytes: int  # bytes the launch moves


def chunk_rows(
    kvs: Sequence[torch.Tensor],
    layouts: Sequence[KVLayout],
    groups: Sequence[int],
    block_ids: Sequence[Sequence[int]],
    chunk_address: int,
) -> list[Row]:
    """Rows for one chunk buffer at ``chunk_address`` holding layer after layer, in the
    order given, each ``len(block_ids[groups[i]]) * block_nbytes`` bytes: the payload
    ``gather_layers`` writes (one group) and the group payloads laid end to end."""
    if not len(kvs) == len(layouts) == len(groups):
        raise ValueError("kvs, layouts and groups differ in length")
    rows, pos = [], chunk_address
    for kv, layout, group in zip(kvs, layouts, groups, strict=True):
        rows.append(Row(kv, layout, group, pos))
        pos += len(block_ids[group]) * layout.block_nbytes
    return rows


def build_plan(
    rows: Sequence[Row], block_ids: Sequence[Sequence[int]], tile_bytes: int
) -> ChunkPlan:
    """The table of ``rows``. Block ids must be checked by the caller (in range of their
    layers, unique within a row): the kernel trusts them."""
    if not 0 < len(rows) <= min(PLAN_LAYERS_MAX, GRID_AXIS_MAX):
        raise NotCoverable(f"{len(rows)} rows (1 to {PLAN_LAYERS_MAX} per launch)")
    segs = [segments(r.kv, r.layout) for r in rows]
    for r, seg in zip(rows, segs, strict=True):
        if seg.block_bytes != r.layout.block_nbytes:
            raise ValueError(f"layout {r.layout} does not match {seg}")
    ids_at, offset = [], len(rows) * COLS
    for ids in block_ids:
        ids_at.append(offset)
        offset += len(ids)
    align = _align(segs, [r.chunk_address for r in rows])
    word = min(align, WORD_SIZES[0])
    tile_words = max(1, tile_bytes // word)
    flat: list[int] = []
    for r, seg in zip(rows, segs, strict=True):
        flat += [seg.base, seg.block_stride // word, seg.seg_stride // word, seg.n_seg]
        flat += [seg.seg_bytes // word, len(block_ids[r.ids_row]), ids_at[r.ids_row]]
        flat.append(r.chunk_address)
    for ids in block_ids:
        flat += [int(i) for i in ids]
    tiles_max = max(-(-s.seg_bytes // word // tile_words) for s in segs)
    if tiles_max > GRID_AXIS_MAX:
        raise NotCoverable(f"segments of {tiles_max} tiles exceed the grid")
    return ChunkPlan(
        table=torch.tensor(flat, dtype=torch.int64),
        layers=len(rows),
        word=word,
        align=align,
        seg_max=max(s.n_seg for s in segs),
        blocks_max=max((len(ids) for ids in block_ids), default=0),
        tiles_max=tiles_max,
        tile_words=tile_words,
        nbytes=sum(
            len(block_ids[r.ids_row]) * s.block_bytes for r, s in zip(rows, segs, strict=True)
        ),
    )


# Plans of one group's layers, by layers, layout and chunk size: a model's chunks differ
# only in their block ids and address, so their tables are a template's copy with those
# filled in (measured: 80 layers planned from scratch cost as much as 0.1-0.3 of the
# copy itself on a GPU).
TEMPLATES_MAX = 64
_templates: dict[tuple[object, ...], ChunkPlan] = {}


def layers_plan(
    kvs: Sequence[torch.Tensor],
    layout: KVLayout,
    ids: Sequence[int],
    chunk_address: int,
    tile_bytes: int,
) -> ChunkPlan:
    """``build_plan(chunk_rows(kvs, [layout] * n, [0] * n, [ids], chunk_address), [ids])``
    from a cached template: the table of every layer of one group's chunk."""
    n = len(kvs)
    if n == 0:
        raise NotCoverable("no layers")
    layers = tuple((kv.data_ptr(), kv.shape, kv.stride(), kv.dtype) for kv in kvs)
    key = (layers, kvs[0].device, layout, len(ids), tile_bytes)
    template = _templates.get(key)
    if template is None:
        rows = chunk_rows(kvs, [layout] * n, [0] * n, [ids], 0)
        template = build_plan(rows, [[0] * len(ids)], tile_bytes)
        if len(_templates) >= TEMPLATES_MAX:
            _templates.pop(next(iter(_templates)))
        _templates[key] = template
    if chunk_address % template.align:  # a less aligned buffer: plan it for itself
        rows = chunk_rows(kvs, [layout] * n, [0] * n, [ids], chunk_address)
        return build_plan(rows, [ids], tile_bytes)
    table = template.table.clone()
    table[COL_CHUNK : n * COLS : COLS] += chunk_address
    table[n * COLS :] = torch.as_tensor(ids, dtype=torch.int64)
    return dataclasses.replace(template, table=table)


def _align(segs: Sequence[Segments], chunks: Sequence[int]) -> int:
    values = list(chunks)
    for s in segs:
        values += [s.base, s.block_stride, s.seg_stride, s.seg_bytes]
    common = math.gcd(*values)
    return next(a for a in (ALIGN_MAX, 8, 4, 2, 1) if common % a == 0)
