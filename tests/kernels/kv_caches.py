"""Paged KV caches of every supported layout, filled with random bytes.

A plain module (not conftest) so tests import it by one unambiguous name."""

from __future__ import annotations

from collections.abc import Callable

import torch

NUM_BLOCKS = 24
BLOCK_SIZE = 16
HEADS = 2
HEAD = 8


def cpu_cache(dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    # vLLM CPU backend: [num_blocks, num_kv_heads, block_size, 2 * head_size]
    return _random((NUM_BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD), dtype, device)


def flash_cache(dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    # FlashAttention: [2, num_blocks, block_size, num_kv_heads, head_size]
    return _random((2, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD), dtype, device)


def flash_hnd_cache(dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    # Same logical shape, heads outside tokens in memory (a permuted view).
    phys = _random((2, NUM_BLOCKS, HEADS, BLOCK_SIZE, HEAD), dtype, device)
    return phys.permute(0, 1, 3, 2, 4)


def blocks_first_cache(dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    # FlashInfer / Triton: [num_blocks, 2, block_size, num_kv_heads, head_size]
    return _random((NUM_BLOCKS, 2, BLOCK_SIZE, HEADS, HEAD), dtype, device)


def mla_cache(dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    # MLA: one latent vector per token, [num_blocks, block_size, head_dim]
    return _random((NUM_BLOCKS, BLOCK_SIZE, 72), dtype, device)


def cross_layer_cache(dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    # One layer's strided view of a [num_blocks, layers, ...] allocation.
    whole = _random((NUM_BLOCKS, 3, HEADS, BLOCK_SIZE, 2 * HEAD), dtype, device)
    return whole[:, 1]


MAKERS: dict[str, Callable[..., torch.Tensor]] = {
    "cpu": cpu_cache,
    "flash": flash_cache,
    "flash_hnd": flash_hnd_cache,
    "blocks_first": blocks_first_cache,
    "mla": mla_cache,
    "cross_layer": cross_layer_cache,
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _random(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    # Random bytes, not random floats: every bit pattern must survive, NaNs included.
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    return raw.view(dtype).view(shape)


def stacked_layers(
    name: str, dtype: torch.dtype, layers: int, device: str = "cpu"
) -> list[torch.Tensor]:
    """``layers`` layers of layout ``name`` in one allocation, at evenly spaced addresses
    as in a cross-layer cache: layer-major for the flash layouts, block-major (each
    layer a strided view) for the others."""
    if name == "flash":
        return list(_random((layers, 2, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD), dtype, device))
    if name == "flash_hnd":
        whole = _random((layers, 2, NUM_BLOCKS, HEADS, BLOCK_SIZE, HEAD), dtype, device)
        return list(whole.permute(0, 1, 2, 4, 3, 5))
    per_block = MAKERS[name](dtype, device).shape[1:]
    whole = _random((NUM_BLOCKS, layers, *per_block), dtype, device)
    return list(whole.unbind(1))
