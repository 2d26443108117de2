"""Copy plans of the one-launch kernel: plain data, checked without triton."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kv_caches import BLOCK_SIZE, MAKERS, NUM_BLOCKS, stacked_layers

from kvnode.kernels import detect_layout
from kvnode.kernels.plan import (
    COL_CACHE,
    COL_CHUNK,
    COL_IDS,
    COL_NBLOCKS,
    COLS,
    PLAN_LAYERS_MAX,
    NotCoverable,
    Row,
    build_plan,
    chunk_rows,
    layers_plan,
    segments,
)

SEGMENTS = {"cpu": 1, "flash": 2, "flash_hnd": 2, "blocks_first": 1, "mla": 1, "cross_layer": 1}


def test_segments_of_every_layout(layout_name: str, dtype: torch.dtype) -> None:
    for kv in [MAKERS[layout_name](dtype), stacked_layers(layout_name, dtype, 3)[1]]:
        layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
        seg = segments(kv, layout)
        assert seg.n_seg == SEGMENTS[layout_name]
        assert seg.block_bytes == layout.block_nbytes
        # Block b's first byte, per the plan, is where the tensor says it is.
        blocks = kv.movedim(layout.block_dim, 0)
        assert seg.base + 5 * seg.block_stride == blocks[5].data_ptr()


def test_table_rows_and_ids() -> None:
    kvs = [MAKERS["flash"](torch.float16) for _ in range(2)]
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE)
    ids = [[4, 5, 6], [9]]
    rows = chunk_rows(kvs, [layout] * 2, [1, 0], ids, 4096)
    plan = build_plan(rows, ids, 1 << 14)
    table = plan.table.tolist()
    assert plan.nbytes == 4 * layout.block_nbytes
    assert table[COL_NBLOCKS] == 1 and table[COLS + COL_NBLOCKS] == 3
    assert table[COL_CHUNK] == 4096 and table[COLS + COL_CHUNK] == 4096 + layout.block_nbytes
    assert table[table[COLS + COL_IDS] :][:3] == [4, 5, 6]
    assert table[table[COL_IDS]] == 9
    assert (plan.seg_max, plan.blocks_max, plan.word, plan.align) == (2, 3, 8, 16)


def test_limits_are_refused() -> None:
    kv = MAKERS["mla"](torch.float32)
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    with pytest.raises(NotCoverable, match="rows"):
        build_plan([], [[1]], 1 << 14)
    with pytest.raises(NotCoverable, match="rows"):
        build_plan([Row(kv, layout, 0, 0)] * (PLAN_LAYERS_MAX + 1), [[1]], 1 << 14)
    big = torch.zeros(2, 1, 600_000, dtype=torch.uint8)  # 75,000 words per block
    with pytest.raises(NotCoverable, match="tiles"):
        build_plan([Row(big, detect_layout(big, 2, 1), 0, 0)], [[1]], 8)
    with pytest.raises(ValueError, match="differ"):
        chunk_rows([kv], [layout, layout], [0], [[1]], 0)


def test_plans_from_a_template_equal_plans_from_scratch() -> None:
    kvs = stacked_layers("flash_hnd", torch.bfloat16, 3)
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE)
    for ids, address in [
        ([4, 5, 6], 1 << 20),
        ([9, 1, 2], 5 << 20),
        ([7, 8, 0], 3 << 12),
        ([1, 2, 3], 8),
    ]:
        rows = chunk_rows(kvs, [layout] * 3, [0] * 3, [ids], address)
        want = build_plan(rows, [ids], 1 << 14)
        got = layers_plan(kvs, layout, ids, address, 1 << 14)
        assert torch.equal(got.table, want.table), (ids, address)
        assert dataclasses.replace(got, table=want.table) == dataclasses.replace(
            want, table=want.table
        )
    other = [MAKERS["flash_hnd"](torch.bfloat16) for _ in range(3)]  # other caches: no reuse
    got = layers_plan(other, layout, [4, 5, 6], 1 << 20, 1 << 14)
    assert got.table[COL_CACHE] == segments(other[0], layout).base
