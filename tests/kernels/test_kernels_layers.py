"""gather_layers/scatter_layers against per-layer gather/scatter, on the CPU.

The GPU packing (``_pack``/``_unpack``: every layer into one staging buffer, with one
indexed kernel for layers of one allocation) is device-independent torch code; it is
checked here on CPU tensors too, so a machine without a GPU still covers its logic."""

from __future__ import annotations

import pytest
import torch
from kv_caches import BLOCK_SIZE, MAKERS, NUM_BLOCKS, stacked_layers

from kvnode.kernels import KVLayout, detect_layout, gather, gather_layers, scatter_layers
from kvnode.kernels.copy import _pack, _stacked, _unpack
from kvnode.kernels.layout import physical_blocks

LAYERS = 3
IDS = {
    "empty": [],
    "one": [7],
    "run": list(range(4, 12)),
    "few_runs": [3, 4, 5, 10, 11, 0],
    "scattered": [23, 1, 19, 5, 7, 9, 11, 13, 15, 2],  # the indexed path on a GPU
    "all_reversed": list(range(NUM_BLOCKS - 1, -1, -1)),
}


def separate_layers(name: str, dtype: torch.dtype) -> list[torch.Tensor]:
    return [MAKERS[name](dtype) for _ in range(LAYERS)]


LAYER_SETS = {"separate": separate_layers, "stacked": lambda n, d: stacked_layers(n, d, LAYERS)}


def per_layer(kvs: list[torch.Tensor], layout: KVLayout, ids: list[int]) -> torch.Tensor:
    """The reference: what the connector stored before, one gather per layer."""
    parts = []
    for kv in kvs:
        part = torch.full((len(ids) * layout.block_nbytes,), 0x5A, dtype=torch.uint8)
        gather(kv, layout, ids, part)
        parts.append(part)
    return torch.cat(parts)


def blank(sharing: str, name: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Zeroed layers laid out (and sharing memory) like ``LAYER_SETS[sharing]``'s."""
    kvs = LAYER_SETS[sharing](name, dtype)
    for kv in kvs:
        kv.zero_()
    return kvs


def fresh(nbytes: int) -> torch.Tensor:
    return torch.full((nbytes,), 0xA5, dtype=torch.uint8)


@pytest.mark.parametrize("sharing", sorted(LAYER_SETS))
@pytest.mark.parametrize("ids", IDS.values(), ids=IDS.keys())
def test_round_trip_equals_per_layer(
    layout_name: str, dtype: torch.dtype, sharing: str, ids: list[int]
) -> None:
    kvs = LAYER_SETS[sharing](layout_name, dtype)
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE)
    want = per_layer(kvs, layout, ids)
    buf = fresh(want.numel())
    gather_layers(kvs, layout, ids, buf)
    assert torch.equal(buf, want)

    targets = blank(sharing, layout_name, dtype)
    scatter_layers(buf, targets, layout, torch.tensor(ids, dtype=torch.int64))
    assert torch.equal(per_layer(targets, layout, ids), want)
    others = [b for b in range(NUM_BLOCKS) if b not in ids]
    assert not per_layer(targets, layout, others).any(), "other blocks were written"


@pytest.mark.parametrize("sharing", sorted(LAYER_SETS))
@pytest.mark.parametrize("ids", IDS.values(), ids=IDS.keys())
def test_device_packing_equals_per_layer(
    layout_name: str, dtype: torch.dtype, sharing: str, ids: list[int]
) -> None:
    # The staging-buffer path a GPU cache takes, run on CPU tensors.
    kvs = LAYER_SETS[sharing](layout_name, dtype)
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE)
    want = per_layer(kvs, layout, ids)
    staged = fresh(want.numel())
    if ids:
        _pack(kvs, layout, ids, staged)
    assert torch.equal(staged, want)
    targets = blank(sharing, layout_name, dtype)
    if ids:
        _unpack(staged, targets, layout, ids)
    assert torch.equal(per_layer(targets, layout, ids), want)
    others = [b for b in range(NUM_BLOCKS) if b not in ids]
    assert not per_layer(targets, layout, others).any(), "other blocks were written"


def test_stacked_view_only_for_evenly_spaced_layers(layout_name: str) -> None:
    kvs = stacked_layers(layout_name, torch.float16, 4)
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE)
    blocks = [physical_blocks(kv, layout) for kv in kvs]
    stacked = _stacked(blocks)
    assert stacked is not None
    for i, layer in enumerate(blocks):
        assert torch.equal(stacked[i], layer)
    assert _stacked(blocks[::-1]) is None  # decreasing addresses
    assert _stacked([blocks[0], blocks[1], blocks[3]]) is None  # uneven
    assert _stacked([blocks[0], blocks[0]]) is None  # one layer twice
    assert _stacked(blocks[:1]) is None
    separate = [physical_blocks(kv, layout) for kv in separate_layers(layout_name, torch.float16)]
    assert _stacked(separate) is None


def test_layer_order_is_kept() -> None:
    kvs = stacked_layers("flash", torch.float32, 4)
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE)
    ids = IDS["scattered"]
    order = [kvs[2], kvs[0], kvs[3], kvs[1]]
    buf = fresh(4 * len(ids) * layout.block_nbytes)
    gather_layers(order, layout, ids, buf)
    assert torch.equal(buf, per_layer(order, layout, ids))
    _pack(order, layout, ids, staged := fresh(buf.numel()))
    assert torch.equal(staged, buf)
    assert not torch.equal(buf, per_layer(kvs, layout, ids))  # negative control


def test_no_layers() -> None:
    layout = detect_layout(MAKERS["flash"](torch.float32), NUM_BLOCKS, BLOCK_SIZE)
    gather_layers([], layout, [1, 2], fresh(0))
    scatter_layers(fresh(0), [], layout, [1, 2])


def test_bad_arguments() -> None:
    kvs = separate_layers("flash", torch.float32)
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE)
    nbytes = LAYERS * 2 * layout.block_nbytes
    with pytest.raises(ValueError, match="bytes"):
        gather_layers(kvs, layout, [1, 2], fresh(nbytes - layout.block_nbytes))
    with pytest.raises(ValueError, match="bytes"):
        scatter_layers(fresh(nbytes + 1), kvs, layout, [1, 2])
    with pytest.raises(ValueError, match="uint8"):
        gather_layers(kvs, layout, [1, 2], torch.zeros(nbytes // 4, dtype=torch.float32))
    with pytest.raises(IndexError):
        gather_layers(kvs, layout, [1, NUM_BLOCKS], fresh(nbytes))
    with pytest.raises(ValueError, match="duplicate"):
        scatter_layers(fresh(nbytes), kvs, layout, [3, 3])
    with pytest.raises(ValueError, match="device"):
        gather_layers([kvs[0], kvs[1].to("meta"), kvs[2]], layout, [1, 2], fresh(nbytes))
    with pytest.raises(ValueError, match="does not match"):
        gather_layers([kvs[0], kvs[1][:, :-1], kvs[2]], layout, [1, 2], fresh(nbytes))
