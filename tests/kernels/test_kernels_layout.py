from __future__ import annotations

import pytest
import torch
from kv_caches import BLOCK_SIZE, HEAD, HEADS, MAKERS, NUM_BLOCKS

from kvnode.kernels import KVLayout, detect_layout, register_host_memory

EXPECTED = {
    # maker: (name, block_dim, elements per block)
    "cpu": ("cpu", 0, HEADS * BLOCK_SIZE * 2 * HEAD),
    "flash": ("flash", 1, 2 * BLOCK_SIZE * HEADS * HEAD),
    "flash_hnd": ("flash_hnd", 1, 2 * BLOCK_SIZE * HEADS * HEAD),
    "blocks_first": ("blocks_first", 0, 2 * BLOCK_SIZE * HEADS * HEAD),
    "mla": ("mla", 0, BLOCK_SIZE * 72),
    "cross_layer": ("cpu", 0, HEADS * BLOCK_SIZE * 2 * HEAD),
}


def test_detect_every_layout(layout_name: str, dtype: torch.dtype) -> None:
    kv = MAKERS[layout_name](dtype)
    name, block_dim, elements = EXPECTED[layout_name]
    layout = detect_layout(kv, NUM_BLOCKS, BLOCK_SIZE)
    assert layout == KVLayout(name, block_dim, NUM_BLOCKS, elements * kv.element_size())


@pytest.mark.parametrize(
    ("backend", "block_dim"),
    [("FLASH_ATTN", 1), ("FLASHINFER", 0), ("TRITON_ATTN", 0), (None, 1)],
)
def test_two_blocks_tie_broken_by_backend(backend: str | None, block_dim: int) -> None:
    # With num_blocks == 2 both dim 0 and dim 1 match; the backend decides.
    kv = torch.zeros(2, 2, BLOCK_SIZE, HEADS, HEAD)
    assert detect_layout(kv, 2, BLOCK_SIZE, backend).block_dim == block_dim


def test_no_block_dim() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        detect_layout(torch.zeros(2, 3, BLOCK_SIZE, 4), 5, BLOCK_SIZE)


def test_layout_validates() -> None:
    with pytest.raises(ValueError):
        KVLayout("cpu", 2, 4, 64)
    with pytest.raises(ValueError):
        KVLayout("cpu", 0, 0, 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_register_host_memory_without_gpu() -> None:
    assert register_host_memory(bytearray(4096)) is None
