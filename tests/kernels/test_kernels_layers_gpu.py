"""gather_layers/scatter_layers between a CUDA (or ROCm) cache and registered host
memory: the same bytes as per-layer gathers, through one staging buffer."""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import pytest
import torch
from kv_caches import BLOCK_SIZE, MAKERS, NUM_BLOCKS, stacked_layers

from kvnode.kernels import (
    KVLayout,
    detect_layout,
    gather,
    gather_layers,
    register_host_memory,
    scatter_layers,
    unregister_host_memory,
    wait,
)
from kvnode.kernels.staging import release_staging

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
]

LAYERS = 4
IDS = {
    "one_run": list(range(3, 11)),
    "few_runs": [0, 1, 2, 12, 13, 20],
    "many_runs": [23, 1, 19, 5, 7, 9, 11, 13, 15, 2, 17, 21],  # the indexed-kernel path
}


@pytest.fixture
def host() -> Iterator[torch.Tensor]:
    """A registered anonymous shared mapping, as the connector registers the arena."""
    mm = mmap.mmap(-1, 1 << 22)
    handle = register_host_memory(mm)
    assert handle is not None, "cudaHostRegister refused the mapping"
    view = torch.frombuffer(mm, dtype=torch.uint8)
    yield view
    del view
    unregister_host_memory(handle)
    mm.close()


def layers(sharing: str, name: str, dtype: torch.dtype) -> list[torch.Tensor]:
    if sharing == "stacked":
        return stacked_layers(name, dtype, LAYERS, "cuda")
    return [MAKERS[name](dtype, "cuda") for _ in range(LAYERS)]


def per_layer(kvs: list[torch.Tensor], layout: KVLayout, ids: list[int]) -> torch.Tensor:
    """The reference: one (synchronous) per-layer gather each, into pageable memory."""
    parts = [torch.empty(len(ids) * layout.block_nbytes, dtype=torch.uint8) for _ in kvs]
    for kv, part in zip(kvs, parts, strict=True):
        gather(kv, layout, ids, part)
    return torch.cat(parts)


@pytest.mark.parametrize("sharing", ["separate", "stacked"])
@pytest.mark.parametrize("ids", IDS.values(), ids=IDS.keys())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_round_trip_equals_per_layer(
    host: torch.Tensor, name: str, dtype: torch.dtype, ids: list[int], sharing: str
) -> None:
    kvs = layers(sharing, name, dtype)
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE)
    want = per_layer(kvs, layout, ids)
    buf = host[4096 : 4096 + want.numel()]
    buf.fill_(0xA5)
    gather_layers(kvs, layout, ids, buf)
    assert torch.equal(buf, want)

    targets = layers(sharing, name, dtype)
    snapshot = [kv.clone() for kv in targets]
    scatter_layers(buf, targets, layout, ids)
    assert torch.equal(per_layer(targets, layout, ids), want)
    others = [b for b in range(NUM_BLOCKS) if b not in ids]
    assert torch.equal(per_layer(targets, layout, others), per_layer(snapshot, layout, others))


def test_queued_calls_share_the_staging_buffer(host: torch.Tensor) -> None:
    # sync=False twice on one stream, one wait: the second call's packing must not
    # overwrite the staging buffer before the first call's host copy has read it.
    release_staging()
    a = layers("separate", "flash", torch.bfloat16)
    b = layers("separate", "flash", torch.bfloat16)
    layout = detect_layout(a[0], NUM_BLOCKS, BLOCK_SIZE)
    ids = IDS["many_runs"]
    n = LAYERS * len(ids) * layout.block_nbytes
    gather_layers(a, layout, ids, host[:n], sync=False)
    gather_layers(b, layout, ids, host[n : 2 * n], sync=False)
    wait("cuda")
    assert torch.equal(host[:n], per_layer(a, layout, ids))
    assert torch.equal(host[n : 2 * n], per_layer(b, layout, ids))
    ta, tb = (
        layers("separate", "flash", torch.bfloat16),
        layers("separate", "flash", torch.bfloat16),
    )
    scatter_layers(host[:n], ta, layout, ids, sync=False)
    scatter_layers(host[n : 2 * n], tb, layout, ids, sync=False)
    wait("cuda")
    assert torch.equal(per_layer(ta, layout, ids), host[:n])
    assert torch.equal(per_layer(tb, layout, ids), host[n : 2 * n])
    # A larger chunk regrows the buffer; a smaller one reuses it.
    for count in (NUM_BLOCKS, 2):
        ids = list(range(count))
        m = LAYERS * count * layout.block_nbytes
        gather_layers(a, layout, ids, host[:m])
        assert torch.equal(host[:m], per_layer(a, layout, ids))


def test_side_stream_and_pageable_buffer() -> None:
    kvs = layers("separate", "flash_hnd", torch.float16)
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE)
    ids = IDS["many_runs"]
    want = per_layer(kvs, layout, ids)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = torch.empty_like(want)  # pageable
        gather_layers(kvs, layout, ids, got)
        targets = [torch.zeros_like(kv) for kv in kvs]
        scatter_layers(got, targets, layout, ids)
    side.synchronize()
    assert torch.equal(got, want)
    assert torch.equal(per_layer(targets, layout, ids), want)


def test_device_buffer() -> None:
    # A buffer on the cache's device: no staging, per-layer copies.
    kvs = layers("stacked", "flash", torch.bfloat16)
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE)
    ids = IDS["few_runs"]
    want = per_layer(kvs, layout, ids)
    buf = torch.empty(want.numel(), dtype=torch.uint8, device="cuda")
    gather_layers(kvs, layout, ids, buf)
    assert torch.equal(buf.cpu(), want)
    targets = layers("stacked", "flash", torch.bfloat16)
    scatter_layers(buf, targets, layout, ids)
    assert torch.equal(per_layer(targets, layout, ids), want)
