"""KV cache groups: which of vLLM's groups kvnode caches, and what a chunk of each holds.

vLLM's hybrid KV cache manager gives every group of layers its own block table. kvnode
stores each group under its own keys (the group's description is in its namespace) and
keeps, per chunk, only what a later prefix hit needs from that group:

- full attention: every block of the chunk;
- sliding window ``W``: the chunk's last ``ceil((W - 1) / block_size)`` blocks (all of
  them when the window is longer than a chunk). A hit ending at token ``T`` reads tokens
  ``[T - W + 1, T)``; the earliest hit that reads chunk ``c`` ends at its end, so no hit
  needs the blocks before them. vLLM frees (nulls) the blocks behind the window, so the
  ones kvnode leaves out are often gone anyway.

Any other group (Mamba or linear-attention state, chunked-local, cross or
encoder-only attention, sink or replay variants) holds state kvnode cannot restore. A
prefix hit must restore every group vLLM treats as transferred, so a model with such a
group gets no hits and no saves: vLLM serves it, hybrid manager on, without the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvnode.ipc.checksum import checksum

FULL = "full_attention"
SLIDING = "sliding_window"


@dataclass(frozen=True, slots=True)
class CacheGroup:
    """One of vLLM's KV cache groups that kvnode caches."""

    index: int  # vLLM's group id: the position of its block table
    kind: str  # FULL | SLIDING
    sliding_window: int  # tokens; 0 for full attention
    layer_names: tuple[str, ...]  # sorted: the payload's layer order

    def stored_blocks(self, blocks_per_chunk: int, block_size: int) -> int:
        """Blocks of each chunk this group keeps: the chunk's tail the window reads."""
        if self.kind == FULL:
            return blocks_per_chunk
        need = -(-(self.sliding_window - 1) // block_size)
        return max(1, min(blocks_per_chunk, need))

    def first_needed_token(self, end: int) -> int:
        """The first token a hit ending at ``end`` needs from this group."""
        return 0 if self.kind == FULL else max(0, end - self.sliding_window + 1)

    def tag(self) -> str:
        """The group's part of the namespace: kind, window and which layers."""
        layers = checksum([name.encode() for name in self.layer_names])
        window = f":w={self.sliding_window}" if self.kind == SLIDING else ""
        return f"{self.kind}{window}:n={len(self.layer_names)}:l={layers:016x}"


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """What kvnode does with a model's KV cache groups."""

    groups: tuple[CacheGroup, ...]  # the groups cached, by vLLM group id; empty: off
    num_vllm_groups: int
    why_off: str = ""

    @property
    def plain(self) -> bool:
        """One full-attention group: keys and loads exactly as before groups existed."""
        return self.num_vllm_groups == 1 and len(self.groups) == 1 and self.groups[0].kind == FULL

    @property
    def group_ids(self) -> tuple[int, ...]:
        return tuple(g.index for g in self.groups)


def plan_groups(kv_cache_config: Any) -> GroupPlan:
    """Classify vLLM's ``KVCacheConfig.kv_cache_groups``. Every group vLLM transfers
    (``enable_kv_transfer``) must be one kvnode restores, else nothing is cached."""
    vllm_groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    out: list[CacheGroup] = []
    for index, group in enumerate(vllm_groups):
        if not getattr(group, "enable_kv_transfer", True):
            continue  # rebuilt by vLLM from its source group after a load
        kind, window = _kind(group.kv_cache_spec)
        if kind is None:
            name = type(group.kv_cache_spec).__name__
            return GroupPlan((), len(vllm_groups), f"KV cache group {index} is {name}")
        out.append(CacheGroup(index, kind, window, tuple(sorted(group.layer_names))))
    if not out:
        return GroupPlan((), len(vllm_groups), "no KV cache group to cache")
    sizes = {vllm_groups[g.index].kv_cache_spec.block_size for g in out}
    if len(sizes) > 1:
        return GroupPlan((), len(vllm_groups), f"groups of block sizes {sorted(sizes)}")
    return GroupPlan(tuple(out), len(vllm_groups))


def _kind(spec: Any) -> tuple[str | None, int]:
    """(kind, window) of a group's spec; kind None when kvnode cannot restore it."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    odd = _variants()
    if isinstance(spec, odd):
        return None, 0
    if isinstance(spec, FullAttentionSpec):
        # Also a sliding-window layer when the hybrid manager is off: vLLM then keeps
        # every token's KV for it, and a full copy is what it reads.
        return FULL, 0
    if isinstance(spec, SlidingWindowSpec) and spec.prefix_cacheable:
        return SLIDING, int(spec.sliding_window)
    return None, 0


def _variants() -> tuple[type, ...]:
    """Full-attention specs whose blocks are not plain per-token KV."""
    import vllm.v1.kv_cache_interface as kvi

    names = ("SinkFullAttentionSpec", "RSWASpec", "HiddenStateCacheSpec")
    return tuple(getattr(kvi, n) for n in names if hasattr(kvi, n))


def group_blocks(block_ids: Sequence[Sequence[int]], group: CacheGroup) -> list[int]:
    """The block table of ``group`` among vLLM's per-group tables."""
    return list(block_ids[group.index]) if group.index < len(block_ids) else []
