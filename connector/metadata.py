"""What the scheduler side tells the workers each step, and what workers tell it once.

Plain dataclasses: vLLM pickles connector metadata between its processes. No KV bytes
travel here, only keys and block ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)

from kvnode.connector.scheduler import ChunkOp


@dataclass
class KVNodeConnectorMetadata(KVConnectorMetadata):
    """One step's work. Loads run before the forward pass, saves after it."""

    loads: dict[str, list[ChunkOp]] = field(default_factory=dict)  # req_id -> chunks
    saves: dict[str, list[ChunkOp]] = field(default_factory=dict)
    # The scheduler side just failed to reach the agent: workers skip this step's
    # copies instead of each waiting out its own timeout.
    agent_down: bool = False


@dataclass
class KVNodeHandshake(KVConnectorHandshakeMetadata):
    """A worker's KV cache description, sent once to the scheduler side after
    ``register_kv_caches``: chunk keys name the layout, and only workers know it."""

    layout: str
    block_shape: tuple[int, ...]  # (num_layers, *shape of one block of one layer)
    dtype: str
    # Per cached KV cache group, in GroupPlan order: (layout, block_shape, dtype) of its
    # layers. Empty for one plain full-attention group (the fields above describe it).
    groups: tuple[tuple[str, tuple[int, ...], str], ...] = ()
