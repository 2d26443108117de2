"""The one-launch chunk kernel against the per-layer reference path, byte for byte.

On a machine without a GPU the kernel runs under Triton's interpreter on CPU tensors
(small shapes: the interpreter is slow); on a GPU host the same tests run it compiled on
CUDA tensors. The reference is ``gather``/``scatter`` of one layer at a time."""

from __future__ import annotations

import pytest
import torch
from kv_caches import BLOCK_SIZE, MAKERS, NUM_BLOCKS, stacked_layers
from onelaunch_import import DEVICE, onelaunch, reason

from kvnode.kernels import KVLayout, detect_layout, gather, scatter
from kvnode.kernels import copy as kcopy
from kvnode.kernels.plan import NotCoverable, Row, chunk_rows, segments

pytestmark = pytest.mark.skipif(onelaunch is None, reason=reason or "triton")

LAYERS = 3
IDS = {
    "one": [7],
    "run": list(range(4, 12)),
    "scattered": [23, 1, 19, 5, 7, 9, 11, 13, 15, 2],
    "all_reversed": list(range(NUM_BLOCKS - 1, -1, -1)),
}
SHARING = {
    "separate": lambda name, dtype: [MAKERS[name](dtype, DEVICE) for _ in range(LAYERS)],
    "stacked": lambda name, dtype: stacked_layers(name, dtype, LAYERS, DEVICE),
}


def reference(kvs: list[torch.Tensor], layouts: list[KVLayout], ids: list[list[int]]) -> bytes:
    """Per-layer gathers, concatenated: what the connector stores."""
    parts = []
    for kv, layout, layer_ids in zip(kvs, layouts, ids, strict=True):
        part = torch.empty(len(layer_ids) * layout.block_nbytes, dtype=torch.uint8, device=DEVICE)
        gather(kv, layout, layer_ids, part)
        parts.append(part.cpu().numpy().tobytes())
    return b"".join(parts)


def run(rows: list[Row], ids: list[list[int]], *, gather: bool) -> None:
    assert onelaunch is not None
    onelaunch.launch(onelaunch.plan(rows, ids), torch.device(DEVICE), gather=gather)
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def chunk_buffer(nbytes: int, fill: int = 0xA5) -> torch.Tensor:
    return torch.full((nbytes,), fill, dtype=torch.uint8, device=DEVICE)


@pytest.mark.parametrize("sharing", sorted(SHARING))
@pytest.mark.parametrize("ids", IDS.values(), ids=IDS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_launch_equals_per_layer(
    layout_name: str, dtype: torch.dtype, sharing: str, ids: list[int]
) -> None:
    kvs = SHARING[sharing](layout_name, dtype)
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE)
    want = reference(kvs, [layout] * LAYERS, [ids] * LAYERS)
    chunk = chunk_buffer(len(want))
    assert kcopy._one_launch(kvs, layout, ids, chunk, gather=True)
    assert chunk.cpu().numpy().tobytes() == want

    targets = SHARING[sharing](layout_name, dtype)
    before = [t.clone() for t in targets]
    assert kcopy._one_launch(targets, layout, ids, chunk, gather=False)
    assert reference(targets, [layout] * LAYERS, [ids] * LAYERS) == want
    others = [b for b in range(NUM_BLOCKS) if b not in ids]
    got = reference(targets, [layout] * LAYERS, [others] * LAYERS)
    assert got == reference(before, [layout] * LAYERS, [others] * LAYERS), "other blocks written"


def test_several_groups_in_one_launch() -> None:
    # A full-attention group (every block of the chunk) and a sliding-window group (its
    # last blocks only), with different layouts, interleaved layers, one launch.
    full = [MAKERS["flash"](torch.bfloat16, DEVICE) for _ in range(2)]
    window = [MAKERS["blocks_first"](torch.bfloat16, DEVICE) for _ in range(2)]
    lf = detect_layout(full[0], NUM_BLOCKS, BLOCK_SIZE)
    lw = detect_layout(window[0], NUM_BLOCKS, BLOCK_SIZE)
    ids = [[3, 4, 5, 20, 21, 0], [17, 2]]
    kvs, layouts, groups = [full[0], window[0], full[1], window[1]], [lf, lw, lf, lw], [0, 1, 0, 1]
    want = reference(kvs, layouts, [ids[g] for g in groups])
    chunk = chunk_buffer(len(want))
    rows = chunk_rows(kvs, layouts, groups, ids, chunk.data_ptr())
    run(rows, ids, gather=True)
    assert chunk.cpu().numpy().tobytes() == want

    blank = [torch.zeros_like(kv) for kv in kvs]
    run(chunk_rows(blank, layouts, groups, ids, chunk.data_ptr()), ids, gather=False)
    assert reference(blank, layouts, [ids[g] for g in groups]) == want


def test_one_layer_of_many_chunks() -> None:
    # Layer-wise loads: one launch per layer over every chunk of a batch, each chunk at
    # its own address (arena slots are not adjacent).
    kv = MAKERS["flash_hnd"](torch.float16, DEVICE)
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    ids = [[1, 2, 3], [9, 8], [23]]
    nbytes = [len(i) * layout.block_nbytes for i in ids]
    arena = chunk_buffer(sum(nbytes) + 3 * 4096)
    starts = [0, nbytes[0] + 4096, nbytes[0] + nbytes[1] + 3 * 4096]
    base = arena.data_ptr()
    run([Row(kv, layout, i, base + s) for i, s in enumerate(starts)], ids, gather=True)
    for i, start in enumerate(starts):
        got = arena[start : start + nbytes[i]].cpu().numpy().tobytes()
        assert got == reference([kv], [layout], [ids[i]])
    assert arena[nbytes[0] : nbytes[0] + 4096].eq(0xA5).all(), "bytes between slots written"

    blank = torch.zeros_like(kv)
    run([Row(blank, layout, i, base + s) for i, s in enumerate(starts)], ids, gather=False)
    assert reference([blank], [layout], [sum(ids, [])]) == reference([kv], [layout], [sum(ids, [])])


@pytest.mark.parametrize(
    ("dtype", "tokens", "offset", "word"),
    [
        (torch.float16, 15, 0, 2),  # 210-byte segments: two-byte words
        (torch.float32, 16, 4, 4),  # a chunk 4 bytes into its buffer
        (torch.float16, 16, 1, 1),  # an odd chunk address: byte words
    ],
)
def test_word_size_follows_alignment(
    dtype: torch.dtype, tokens: int, offset: int, word: int
) -> None:
    shape = (2, NUM_BLOCKS, tokens, 1, 7)
    kvs = [torch.randn(shape, device=DEVICE).to(dtype) for _ in range(2)]
    layout = detect_layout(kvs[0], NUM_BLOCKS, tokens)
    ids = [[5, 1, 2]]
    want = reference(kvs, [layout] * 2, ids * 2)
    buf = chunk_buffer(len(want) + offset)
    rows = chunk_rows(kvs, [layout] * 2, [0, 0], ids, buf.data_ptr() + offset)
    assert onelaunch is not None and onelaunch.plan(rows, ids).word == word
    run(rows, ids, gather=True)
    assert buf[offset:].cpu().numpy().tobytes() == want


def test_layout_the_kernel_cannot_cover_takes_the_per_layer_path() -> None:
    # Blocks whose bytes need two levels of segments: a view with heads split from
    # their tokens and the K/V halves (a generic strided cache).
    whole = torch.randn(2, NUM_BLOCKS, 4, BLOCK_SIZE, 2, 8, device=DEVICE)
    kvs = [whole[:, :, :, :, 0, :]] * 1 + [whole[:, :, :, :, 1, :]]
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE)
    with pytest.raises(NotCoverable):
        segments(kvs[0], layout)
    before = kcopy.kernel_stats()["not_coverable"]
    chunk = chunk_buffer(2 * 2 * layout.block_nbytes)
    assert not kcopy._one_launch(kvs, layout, [3, 4], chunk, gather=True)
    assert kcopy.kernel_stats()["not_coverable"] == before + 1
    for kv in kvs:  # the per-layer path still moves them
        part = torch.empty(2 * layout.block_nbytes, dtype=torch.uint8, device=DEVICE)
        gather(kv, layout, [3, 4], part)
        back = torch.zeros_like(kv)
        scatter(part, back, layout, [3, 4])
        assert torch.equal(back[:, [3, 4]], kv[:, [3, 4]])


def test_no_blocks_launches_nothing() -> None:
    kv = MAKERS["mla"](torch.float32, DEVICE)
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    run([Row(kv, layout, 0, 0)], [[]], gather=True)  # address 0: nothing may be touched


def test_a_failing_launch_falls_back_for_good_and_is_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert onelaunch is not None
    kvs = SHARING["separate"]("flash", torch.float16)
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE)
    chunk = chunk_buffer(LAYERS * 2 * layout.block_nbytes)

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no compiler for this device")

    before = kcopy.kernel_stats()
    monkeypatch.setattr(onelaunch, "launch", refuse)
    monkeypatch.setitem(kcopy._kernel_state, "disabled", False)
    assert not kcopy._one_launch(kvs, layout, [1, 2], chunk, gather=True)
    monkeypatch.undo()  # a working launch again: the process stays on the per-layer path
    monkeypatch.setitem(kcopy._kernel_state, "disabled", True)
    assert not kcopy._one_launch(kvs, layout, [1, 2], chunk, gather=True)
    after = kcopy.kernel_stats()
    assert after["failed"] == before["failed"] + 1
    assert after["unavailable"] == before["unavailable"] + 1
    assert not after["loaded"]
    kcopy._kernel_state["disabled"] = False


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA or ROCm GPU")
def test_gather_layers_packs_with_one_launch_on_a_gpu() -> None:
    from kvnode.kernels import gather_layers, scatter_layers

    kvs = SHARING["separate"]("flash", torch.bfloat16)
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE)
    ids = IDS["scattered"]
    host = torch.zeros(LAYERS * len(ids) * layout.block_nbytes, dtype=torch.uint8).pin_memory()
    launches = kcopy.kernel_stats()["launches"]
    gather_layers(kvs, layout, ids, host)
    scatter_layers(host, kvs, layout, ids)
    assert kcopy.kernel_stats()["launches"] == launches + 2
    assert host.numpy().tobytes() == reference(kvs, [layout] * LAYERS, [ids] * LAYERS)
