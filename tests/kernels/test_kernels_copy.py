"""gather/scatter round trips against an independent per-block reference, on the CPU."""

from __future__ import annotations

import mmap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_caches import BLOCK_SIZE, DTYPES, MAKERS, NUM_BLOCKS

from kvnode.kernels import detect_layout, gather, scatter


def block_bytes(kv: torch.Tensor, name: str, block: int) -> torch.Tensor:
    """The bytes of one block in the documented canonical order, built by hand."""
    if name == "flash":
        parts = [kv[0, block], kv[1, block]]  # all of K, then all of V
    elif name == "flash_hnd":
        parts = [kv[0, block].transpose(0, 1), kv[1, block].transpose(0, 1)]  # memory order
    else:
        parts = [kv[block]]
    return torch.cat([p.contiguous().view(-1).view(torch.uint8) for p in parts])


def expected(kv: torch.Tensor, name: str, ids: list[int]) -> torch.Tensor:
    if not ids:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat([block_bytes(kv, name, b) for b in ids])


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Random bit patterns include NaNs, which never compare equal as floats.
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def chunk(layout_nbytes: int, count: int) -> torch.Tensor:
    return torch.full((count * layout_nbytes,), 0xA5, dtype=torch.uint8)


ids_lists = st.lists(st.integers(0, NUM_BLOCKS - 1), unique=True, max_size=NUM_BLOCKS)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(MAKERS)), dtype=st.sampled_from(DTYPES), ids=ids_lists)
def test_round_trip_random_ids(name: str, dtype: torch.dtype, ids: list[int]) -> None:
    kv = MAKERS[name](dtype)
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    buf = chunk(layout.block_nbytes, len(ids))
    gather(kv, layout, ids, buf)
    assert torch.equal(buf, expected(kv, name, ids))

    target = MAKERS[name](dtype)
    before = [block_bytes(target, name, b) for b in range(NUM_BLOCKS)]
    scatter(buf, target, layout, ids)
    for b in range(NUM_BLOCKS):
        want = block_bytes(kv, name, b) if b in ids else before[b]
        assert torch.equal(block_bytes(target, name, b), want), f"block {b}"


@pytest.mark.parametrize(
    "ids",
    [
        [],
        [7],
        list(range(4, 12)),  # one run
        [3, 4, 5, 10, 11, 0],  # few runs
        [23, 1, 19, 5, 7, 9, 11, 13, 15, 2],  # more runs than the slice-copy limit
        list(range(NUM_BLOCKS - 1, -1, -1)),  # every block, reversed
    ],
    ids=["empty", "one", "run", "few_runs", "scattered", "all_reversed"],
)
def test_every_layout_and_dtype(layout_name: str, dtype: torch.dtype, ids: list[int]) -> None:
    kv = MAKERS[layout_name](dtype)
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    buf = chunk(layout.block_nbytes, len(ids))
    gather(kv, layout, ids, buf)
    assert torch.equal(buf, expected(kv, layout_name, ids))
    blank = torch.zeros_like(kv)
    scatter(buf, blank, layout, torch.tensor(ids, dtype=torch.int64))
    again = chunk(layout.block_nbytes, len(ids))
    gather(blank, layout, ids, again)
    assert torch.equal(again, buf)


def test_wrong_block_ids_give_other_bytes(layout_name: str) -> None:
    # Negative control: the reference must be able to fail.
    kv = MAKERS[layout_name](torch.float32)
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    buf = chunk(layout.block_nbytes, 3)
    gather(kv, layout, [1, 2, 3], buf)
    assert not torch.equal(buf, expected(kv, layout_name, [1, 2, 4]))
    assert not torch.equal(buf, expected(kv, layout_name, [3, 2, 1]))
    assert torch.equal(buf, expected(kv, layout_name, [1, 2, 3]))


def test_scatter_leaves_other_blocks_alone(layout_name: str) -> None:
    kv = MAKERS[layout_name](torch.bfloat16)
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    snapshot = kv.clone()
    ids = [2, 9, 10, 17]
    scatter(torch.zeros(len(ids) * layout.block_nbytes, dtype=torch.uint8), kv, layout, ids)
    for b in range(NUM_BLOCKS):
        got, was = block_bytes(kv, layout_name, b), block_bytes(snapshot, layout_name, b)
        if b in ids:
            assert not got.any()
        else:
            assert torch.equal(got, was), f"block {b} changed"


def test_shared_memory_buffer() -> None:
    # The connector's buffers are torch.frombuffer views at an offset into an mmap.
    kv = MAKERS["flash"](torch.float16)
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    ids = [5, 6, 20]
    nbytes = len(ids) * layout.block_nbytes
    with mmap.mmap(-1, 4096 + nbytes) as mm:
        arena = torch.frombuffer(mm, dtype=torch.uint8)
        slot = arena[4096 : 4096 + nbytes]
        gather(kv, layout, ids, slot)
        assert bytes(mm[4096:]) == expected(kv, "flash", ids).numpy().tobytes()
        blank = torch.zeros_like(kv)
        scatter(slot, blank, layout, ids)
        assert same_bytes(blank[:, ids], kv[:, ids])
        del arena, slot


def test_unaligned_buffer_still_exact() -> None:
    kv = MAKERS["cpu"](torch.float32)
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    ids = [1, 8, 3, 12, 4, 19, 6, 0, 22, 15]
    backing = torch.zeros(len(ids) * layout.block_nbytes + 1, dtype=torch.uint8)
    buf = backing[1:]  # odd address: no wide-element view possible
    gather(kv, layout, ids, buf)
    assert torch.equal(buf, expected(kv, "cpu", ids))
    blank = torch.zeros_like(kv)
    scatter(buf, blank, layout, ids)
    assert same_bytes(blank[ids], kv[ids])


@pytest.mark.parametrize(
    ("ids", "error"),
    [([0, NUM_BLOCKS], IndexError), ([-1], IndexError), ([3, 3], ValueError)],
)
def test_bad_block_ids(ids: list[int], error: type[Exception]) -> None:
    kv = MAKERS["cpu"](torch.float32)
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    with pytest.raises(error):
        gather(kv, layout, ids, chunk(layout.block_nbytes, len(ids)))
    with pytest.raises(error):
        scatter(chunk(layout.block_nbytes, len(ids)), kv, layout, ids)


def test_bad_buffers() -> None:
    kv = MAKERS["flash"](torch.float32)
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    with pytest.raises(ValueError, match="bytes"):
        gather(kv, layout, [1, 2], chunk(layout.block_nbytes, 3))
    with pytest.raises(ValueError, match="uint8"):
        gather(kv, layout, [1], torch.zeros(layout.block_nbytes // 4, dtype=torch.float32))
    with pytest.raises(ValueError, match="does not match"):
        gather(kv[:, :-1], layout, [1], chunk(layout.block_nbytes, 1))


@pytest.mark.parametrize("hnd", [False, True], ids=["nhd", "hnd"])
def test_single_kv_head(hnd: bool) -> None:
    # Size-1 dims have arbitrary strides; they must not be taken for the innermost dim.
    shape = (2, NUM_BLOCKS, 1, BLOCK_SIZE, 8) if hnd else (2, NUM_BLOCKS, BLOCK_SIZE, 1, 8)
    kv = torch.randn(shape)
    if hnd:
        kv = kv.permute(0, 1, 3, 2, 4)
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    ids = [3, 0, 7]
    buf = chunk(layout.block_nbytes, len(ids))
    gather(kv, layout, ids, buf)
    assert torch.equal(buf, expected(kv, "flash", ids))
    cross = torch.randn(NUM_BLOCKS, 3, 1, BLOCK_SIZE, 16)[:, 1]  # strided, one head
    layout = detect_layout(cross, NUM_BLOCKS, BLOCK_SIZE)
    buf = chunk(layout.block_nbytes, len(ids))
    gather(cross, layout, ids, buf)
    assert torch.equal(buf, expected(cross, "cpu", ids))
    strided = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, 1, 16)[..., ::2]  # not dense
    layout = detect_layout(strided, NUM_BLOCKS, BLOCK_SIZE)
    with pytest.raises(ValueError, match="not dense"):
        gather(strided, layout, ids, chunk(layout.block_nbytes, len(ids)))
