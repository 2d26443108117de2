"""Paged KV cache layouts: which dimension indexes blocks and how many bytes a block has.

A layer's cache is one tensor holding ``num_blocks`` blocks. The block dimension is 0 or
1 of the logical shape; every other dimension belongs to the block. A block's bytes, in
the order gather writes them, are its elements in physical (memory) order with the block
dimension taken out (``physical_blocks``): K then V for FlashAttention's
``[2, num_blocks, ...]``, the backend's own slab order for the CPU backend. That order
depends on the layout, so the layout name belongs in the chunk namespace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Backends whose cache puts K/V (dim of size 2) before the block dimension.
_KV_FIRST_BACKENDS = ("FLASH_ATTN", "ROCM_ATTN", "FLEX_ATTENTION", "XFORMERS")


@dataclass(frozen=True, slots=True)
class KVLayout:
    name: str  # "cpu" | "flash" | "flash_hnd" | "blocks_first" | "blocks_first_hnd" | "mla" | "generic"
    block_dim: int  # logical dim of the tensor that indexes blocks (0 or 1)
    num_blocks: int
    block_nbytes: int  # bytes of ONE block of ONE layer (all of its K and V)

    def __post_init__(self) -> None:
        if self.block_dim not in (0, 1):
            raise ValueError(f"block_dim must be 0 or 1, not {self.block_dim}")
        if self.num_blocks <= 0 or self.block_nbytes <= 0:
            raise ValueError(f"empty layout: {self}")


def detect_layout(
    kv: torch.Tensor, num_blocks: int, block_size: int, backend: str | None = None
) -> KVLayout:
    """Find the block dimension of a layer's cache from its shape, ``num_blocks`` and,
    when the shape alone is ambiguous, the attention backend's name."""
    shape = tuple(kv.shape)
    candidates = [d for d in (0, 1) if d < len(shape) and shape[d] == num_blocks]
    if not candidates:
        raise ValueError(f"no dim 0 or 1 of shape {shape} equals num_blocks={num_blocks}")
    if len(candidates) == 2:
        block_dim = _break_tie(shape, backend)
    else:
        block_dim = candidates[0]
    block_nbytes = kv.numel() * kv.element_size() // num_blocks
    name = _name(kv, block_dim, block_size)
    return KVLayout(name, block_dim, num_blocks, block_nbytes)


def physical_blocks(kv: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """A uint8 view ``[num_blocks, ...]`` of ``kv``: block dimension first, the rest in
    memory order, bytes last. A view, never a copy; ``kv`` may be strided (a layer's view
    into a cross-layer allocation)."""
    if kv.shape[layout.block_dim] != layout.num_blocks:
        raise ValueError(f"tensor of shape {tuple(kv.shape)} does not match {layout}")
    if kv.numel() * kv.element_size() != layout.num_blocks * layout.block_nbytes:
        raise ValueError(f"tensor of {kv.dtype} {tuple(kv.shape)} does not match {layout}")
    if kv.is_contiguous():  # the common case: skip the permutation
        blocks = kv if layout.block_dim == 0 else kv.movedim(layout.block_dim, 0)
    else:
        order = _memory_order(kv)
        blocks = kv.permute(order).movedim(order.index(layout.block_dim), 0)
    if blocks.stride(-1) != 1:
        raise ValueError(f"innermost dim of {tuple(kv.shape)} is not dense: {kv.stride()}")
    return blocks.view(torch.uint8)


def _memory_order(kv: torch.Tensor) -> list[int]:
    # Outermost first. Size-1 dims do not affect addresses (their strides are arbitrary):
    # put them outermost so the innermost dim is a real, dense one.
    return sorted(range(kv.dim()), key=lambda d: (kv.shape[d] > 1, -kv.stride()[d], d))


def _break_tie(shape: tuple[int, ...], backend: str | None) -> int:
    if backend is not None:
        upper = backend.upper()
        return 1 if any(upper.startswith(b) for b in _KV_FIRST_BACKENDS) else 0
    # FlashAttention's [2, num_blocks, ...] is the common 5-D form with K/V first.
    return 1 if len(shape) == 5 and shape[0] == 2 else 0


def _name(kv: torch.Tensor, block_dim: int, block_size: int) -> str:
    shape = tuple(kv.shape)
    if kv.dim() == 3 and block_dim == 0:
        return "mla"
    if kv.dim() == 4 and block_dim == 0 and shape[2] == block_size:
        return "cpu"
    if kv.dim() == 5 and shape[1 - block_dim] == 2:
        # Logical [.., block_size, heads, head_size]; HND when heads are outside tokens.
        base = "flash" if block_dim == 1 else "blocks_first"
        hnd = shape[3] > 1 and shape[2] > 1 and kv.stride(3) > kv.stride(2)
        return base + "_hnd" if hnd else base
    return "generic"
