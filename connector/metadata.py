"""What the scheduler side tells the workers each step, what workers tell it once, and
the KV events workers report back after each step.

Plain dataclasses: vLLM pickles connector metadata between its processes. No KV bytes
travel here, only keys, block ids, and the token ids of chunks being saved.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from vllm.distributed.kv_events import MEDIUM_CPU, BlockStored, KVCacheEvent, KVConnectorKVEvents
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
    # A request was preempted this step: its blocks go back to vLLM, so saves still
    # reading blocks (agent mode) must end before the forward pass writes any.
    preempted: bool = False


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
    # "agent": this worker may hand saves to the agent, so vLLM must keep a saved
    # request's blocks until the worker names it finished (every rank agrees).
    transfer: str = "worker"


def stored_event(op: ChunkOp) -> BlockStored:
    """vLLM's event for a chunk the connector committed. Rank 0's key names the chunk
    (every rank reports the same event, so vLLM's aggregation keeps it only when all
    ranks stored their part); ``block_size`` is the chunk's token count."""
    return BlockStored(
        block_hashes=[op.keys[0]],
        parent_block_hash=(op.parents[0] or None) if op.parents else None,
        token_ids=list(op.tokens),
        block_size=len(op.tokens),
        lora_id=None,  # the chunk key already binds the adapter (its namespace)
        medium=MEDIUM_CPU,
        lora_name=None,
        group_idx=op.group,
    )


class KVNodeEvents(KVConnectorKVEvents):
    """A step's events from the workers. vLLM merges every worker's object into the
    first (``add_events`` + ``increment_workers``); ``common_events`` keeps those that
    every worker reported: a chunk counts as stored when all ranks committed it."""

    def __init__(self, events: list[KVCacheEvent] | None = None, num_workers: int = 1) -> None:
        self._events: Counter[KVCacheEvent] = Counter(events or ())
        self._num_workers = num_workers

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._events.update(events)

    def aggregate(self) -> KVNodeEvents:
        return KVNodeEvents(self.common_events())

    def increment_workers(self, count: int = 1) -> None:
        if count <= 0:
            raise ValueError("count must be positive")
        self._num_workers += count

    def get_all_events(self) -> list[KVCacheEvent]:
        return list(self._events.elements())

    def get_number_of_workers(self) -> int:
        return self._num_workers

    def clear_events(self) -> None:
        self._events.clear()

    def common_events(self) -> list[KVCacheEvent]:
        return [ev for ev, n in self._events.items() if n >= self._num_workers]
