"""Block gather/scatter between vLLM's paged KV cache and contiguous chunk buffers.

``layout`` says where the blocks are in a layer's tensor, ``copy`` moves whole blocks,
``hostcopy`` is the one host-to-host copy path (numpy memcpy), ``hostmem`` keeps the
arena mapping ready (populated, pinned for DMA) through the client's remaps,
``staging`` holds the device buffers through which multi-layer copies cross the bus.
"""

from kvnode.kernels.copy import gather, gather_layers, scatter, scatter_layers, wait
from kvnode.kernels.hostmem import (
    ArenaMapping,
    HostRegistration,
    StaleMapping,
    register_host_memory,
    unregister_host_memory,
)
from kvnode.kernels.layout import KVLayout, detect_layout

__all__ = [
    "ArenaMapping",
    "HostRegistration",
    "KVLayout",
    "detect_layout",
    "gather",
    "gather_layers",
    "register_host_memory",
    "scatter",
    "scatter_layers",
    "StaleMapping",
    "unregister_host_memory",
    "wait",
]
