"""gather/scatter between a CUDA (or ROCm) cache and registered host memory."""

from __future__ import annotations

import mmap

import pytest
import torch
from kv_caches import BLOCK_SIZE, MAKERS, NUM_BLOCKS

from kvnode.kernels import (
    detect_layout,
    gather,
    register_host_memory,
    scatter,
    unregister_host_memory,
    wait,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
]

IDS = {
    "one_run": list(range(3, 11)),
    "few_runs": [0, 1, 2, 12, 13, 20],
    "many_runs": [23, 1, 19, 5, 7, 9, 11, 13, 15, 2, 17, 21],  # the indexed-kernel path
}


@pytest.fixture
def arena() -> mmap.mmap:
    """An anonymous shared mapping, registered like the connector registers the arena."""
    mm = mmap.mmap(-1, 1 << 22)
    handle = register_host_memory(mm)
    assert handle is not None, "cudaHostRegister refused the mapping"
    yield mm
    unregister_host_memory(handle)
    mm.close()


@pytest.mark.parametrize("ids", IDS.values(), ids=IDS.keys())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["flash", "flash_hnd", "blocks_first", "mla"])
def test_round_trip_through_registered_memory(
    arena: mmap.mmap, name: str, dtype: torch.dtype, ids: list[int]
) -> None:
    kv = MAKERS[name](dtype, "cuda")
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    nbytes = len(ids) * layout.block_nbytes
    host = torch.frombuffer(arena, dtype=torch.uint8)[4096 : 4096 + nbytes]
    gather(kv, layout, ids, host)

    # Same bytes as the CPU path produces from a CPU copy of the cache.
    cpu_kv = (
        kv.cpu() if name != "flash_hnd" else kv.permute(0, 1, 3, 2, 4).cpu().permute(0, 1, 3, 2, 4)
    )
    cpu_layout = detect_layout(cpu_kv, NUM_BLOCKS, BLOCK_SIZE)
    want = torch.empty(nbytes, dtype=torch.uint8)
    gather(cpu_kv, cpu_layout, ids, want)
    assert torch.equal(host, want)

    target = MAKERS[name](dtype, "cuda")
    before = target.clone()
    scatter(host, target, layout, ids)
    bd = layout.block_dim
    others = [b for b in range(NUM_BLOCKS) if b not in ids]
    as_bytes = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731
    assert torch.equal(
        as_bytes(target.index_select(bd, torch.tensor(ids, device="cuda"))),
        as_bytes(kv.index_select(bd, torch.tensor(ids, device="cuda"))),
    )
    keep = torch.tensor(others, device="cuda")
    assert torch.equal(
        as_bytes(target.index_select(bd, keep)), as_bytes(before.index_select(bd, keep))
    )
    del host


def test_pageable_host_buffer_also_works() -> None:
    kv = MAKERS["flash"](torch.bfloat16, "cuda")
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    ids = [4, 9, 2]
    host = torch.empty(len(ids) * layout.block_nbytes, dtype=torch.uint8)
    gather(kv, layout, ids, host)
    blank = torch.zeros_like(kv)
    scatter(host, blank, layout, ids)
    assert torch.equal(blank[:, ids].view(torch.uint8), kv[:, ids].view(torch.uint8))


def test_negative_control_on_gpu() -> None:
    kv = MAKERS["flash"](torch.float16, "cuda")
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    a = torch.empty(2 * layout.block_nbytes, dtype=torch.uint8)
    b = torch.empty_like(a)
    gather(kv, layout, [1, 2], a)
    gather(kv, layout, [1, 3], b)
    assert not torch.equal(a, b)


def test_queued_copies_then_one_wait(arena: mmap.mmap) -> None:
    # sync=False for every layer of a chunk, one wait: what a connector does per chunk.
    layers = [MAKERS["flash"](torch.bfloat16, "cuda") for _ in range(4)]
    layout = detect_layout(layers[0], NUM_BLOCKS, BLOCK_SIZE)
    ids = IDS["many_runs"]
    per = len(ids) * layout.block_nbytes
    host = torch.frombuffer(arena, dtype=torch.uint8)
    for i, kv in enumerate(layers):
        gather(kv, layout, ids, host[i * per : (i + 1) * per], sync=False)
    wait(layers[0].device)
    targets = [torch.zeros_like(kv) for kv in layers]
    for i, kv in enumerate(targets):
        scatter(host[i * per : (i + 1) * per], kv, layout, ids, sync=False)
    wait("cuda")
    for kv, got in zip(layers, targets, strict=True):
        assert torch.equal(got[:, ids].view(torch.uint8), kv[:, ids].view(torch.uint8))
    del host


def test_side_stream_same_bytes() -> None:
    # Block id uploads are cached per stream: a side stream gets its own.
    kv = MAKERS["flash"](torch.float16, "cuda")
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    ids = IDS["many_runs"]
    main = torch.empty(len(ids) * layout.block_nbytes, dtype=torch.uint8)
    gather(kv, layout, ids, main)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        other = torch.empty_like(main)
        gather(kv, layout, ids, other)
        blank = torch.zeros_like(kv)
        scatter(other, blank, layout, ids)
    side.synchronize()
    assert torch.equal(main, other)
    assert torch.equal(blank[:, ids].view(torch.uint8), kv[:, ids].view(torch.uint8))
