"""The agent's GPU copier, run on CPU tensors with the kernel under Triton's interpreter
(on a GPU host the same tests run on CUDA tensors): save into arena extents, load back
layer by layer, every byte against the per-layer reference path."""

from __future__ import annotations

import pytest
import torch
from kv_caches import BLOCK_SIZE, MAKERS, NUM_BLOCKS
from onelaunch_import import DEVICE, onelaunch, reason

from kvnode.kernels import detect_layout, gather, gpumove
from kvnode.kernels.gpumove import ChunkCopy, CopyError, DeviceCopier, OpenedLayer

pytestmark = pytest.mark.skipif(onelaunch is None, reason=reason or "triton")

ARENA_BYTES = 1 << 20


def export(name: str, layers: int, group: int = 0, start: int = 0) -> list[OpenedLayer]:
    """Layers of one group laid out in a chunk entry from ``start``."""
    out = []
    for i in range(layers):
        kv = MAKERS[name](torch.bfloat16, DEVICE)
        layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
        out.append(OpenedLayer(kv, layout, group, start + i * BPC * layout.block_nbytes))
    _filled()
    return out


def _filled() -> None:
    """The caches were written on the default stream; the copier runs on its own (in
    the agent, the worker's ready event orders the two)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


BPC = 4  # blocks per chunk


def entry(layers: list[OpenedLayer], blocks: list[int]) -> bytes:
    """The reference payload: per-layer gathers, layer after layer."""
    parts = []
    for lay in layers:
        buf = torch.empty(len(blocks) * lay.layout.block_nbytes, dtype=torch.uint8, device=DEVICE)
        gather(lay.kv, lay.layout, blocks, buf)
        parts.append(buf.cpu().numpy().tobytes())
    return b"".join(parts)


def read(arena: torch.Tensor, extents: tuple[tuple[int, int], ...]) -> bytes:
    return b"".join(arena[o : o + n].numpy().tobytes() for o, n in extents)


def blank(layers: list[OpenedLayer]) -> list[OpenedLayer]:
    out = [
        OpenedLayer(torch.zeros_like(lay.kv), lay.layout, lay.group, lay.payload_offset)
        for lay in layers
    ]
    _filled()
    return out


@pytest.fixture
def arena() -> torch.Tensor:
    t = torch.full((ARENA_BYTES,), 0xEE, dtype=torch.uint8)
    return t.pin_memory() if DEVICE == "cuda" else t


@pytest.mark.parametrize("route", ["staging", "direct"])
@pytest.mark.parametrize("name", ["flash", "flash_hnd", "mla", "cpu"])
def test_save_then_load_layer_by_layer(arena: torch.Tensor, name: str, route: str) -> None:
    layers = export(name, 3)
    size = 3 * BPC * layers[0].layout.block_nbytes
    split = size // 3 + 8  # an entry in two extents, not at a layer boundary
    chunks = [
        ChunkCopy(0, (3, 9, 4, 20), ((4096, split), (65536, size - split))),
        ChunkCopy(0, (0, 1, 2, 23), ((200_000, size),)),
    ]
    copier = DeviceCopier(torch.device(DEVICE), arena, route)
    assert copier.save(layers, chunks) == 2 * size
    for c in chunks:
        assert read(arena, c.extents) == entry(layers, list(c.blocks))
    assert arena[4096 + split : 65536].eq(0xEE).all(), "bytes outside the extents written"

    targets = blank(layers)
    done: list[int] = []
    assert copier.load(targets, chunks, on_layer=done.append) == 2 * size
    assert done == [0, 1, 2]
    for c in chunks:
        assert entry(targets, list(c.blocks)) == entry(layers, list(c.blocks))
    others = [b for b in range(NUM_BLOCKS) if b not in (3, 9, 4, 20, 0, 1, 2, 23)]
    assert not any(entry(targets, others)), "blocks outside the job written"


@pytest.mark.parametrize("route", ["staging", "direct"])
def test_partial_load_and_two_groups(arena: torch.Tensor, route: str) -> None:
    full = export("flash", 2, group=0)
    window = export("blocks_first", 2, group=1)
    fsize = 2 * BPC * full[0].layout.block_nbytes
    wsize = 2 * BPC * window[0].layout.block_nbytes
    layers = [full[0], window[0], full[1], window[1]]
    saves = [
        ChunkCopy(0, (5, 6, 7, 8), ((0, fsize),)),
        ChunkCopy(1, (10, 11, 12, 13), ((300_000, wsize // 2), (500_000, wsize - wsize // 2))),
    ]
    copier = DeviceCopier(torch.device(DEVICE), arena, route)
    copier.save(layers, saves)
    assert read(arena, saves[0].extents) == entry(full, [5, 6, 7, 8])
    assert read(arena, saves[1].extents) == entry(window, [10, 11, 12, 13])

    # A prefix hit that starts two blocks into each entry lands in other blocks.
    loads = [
        ChunkCopy(0, (1, 2), saves[0].extents, block_offset=2),
        ChunkCopy(1, (14, 15), saves[1].extents, block_offset=2),
    ]
    targets = blank(layers)
    copier.load(targets, loads)
    for lay, src in zip(targets, layers, strict=True):
        blocks = [1, 2] if lay.group == 0 else [14, 15]
        was = [7, 8] if lay.group == 0 else [12, 13]
        assert entry([lay], blocks) == entry([src], was)


def test_bad_jobs_are_refused(arena: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    layers = export("flash", 2)
    size = 2 * BPC * layers[0].layout.block_nbytes
    copier = DeviceCopier(torch.device(DEVICE), arena)
    cases = {
        "outside": ChunkCopy(0, (1, 2, 3, 4), ((ARENA_BYTES - 8, size),)),
        "hold": ChunkCopy(0, (1, 2, 3, 4), ((0, size - 1),)),
        "duplicate": ChunkCopy(0, (1, 1, 3, 4), ((0, size),)),
        r"outside \[0": ChunkCopy(0, (1, 2, 3, NUM_BLOCKS), ((0, size),)),
        "group": ChunkCopy(3, (1, 2, 3, 4), ((0, size),)),
    }
    for match, chunk in cases.items():
        with pytest.raises(CopyError, match=match):
            copier.save(layers, [chunk])
    good = ChunkCopy(0, (5, 6, 7, 8), ((0, size),))
    with pytest.raises(CopyError, match="group"):  # every chunk checked before one moves
        copier.save(layers, [good, cases["group"]])
    monkeypatch.setattr(gpumove, "CHUNK_BYTES_MAX", size - 1)
    with pytest.raises(CopyError, match="at most"):
        copier.save(layers, [good])
    assert arena.eq(0xEE).all(), "a refused job wrote into the arena"
    with pytest.raises(ValueError, match="route"):
        DeviceCopier(torch.device(DEVICE), arena, "sideways")


@pytest.mark.parametrize("route", ["staging", "direct"])
def test_a_job_larger_than_the_staging_runs_in_batches(arena: torch.Tensor, route: str) -> None:
    layers = export("flash", 2)
    size = 2 * BPC * layers[0].layout.block_nbytes
    chunks = [
        ChunkCopy(
            0,
            tuple(range(4 * i, 4 * i + 4)),
            ((i * 3 * size, size // 2), (i * 3 * size + size, size - size // 2)),
        )
        for i in range(5)
    ]
    copier = DeviceCopier(torch.device(DEVICE), arena, route, staging_bytes_max=2 * size)
    assert copier.save(layers, chunks) == 5 * size
    for c in chunks:
        assert read(arena, c.extents) == entry(layers, list(c.blocks))
    assert copier.staging_bytes <= 2 * size
    targets = blank(layers)
    done: list[int] = []
    assert copier.load(targets, chunks, on_layer=done.append) == 5 * size
    assert done == [0, 1], "each layer is reported once, when all of its batches are queued"
    for c in chunks:
        assert entry(targets, list(c.blocks)) == entry(layers, list(c.blocks))
