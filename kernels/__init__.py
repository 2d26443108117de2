"""Block gather/scatter between vLLM's paged KV cache and contiguous chunk buffers.

``layout`` says where the blocks are in a layer's tensor, ``copy`` moves whole blocks,
``hostmem`` pins the arena for DMA.
"""

from kvnode.kernels.copy import gather, scatter, wait
from kvnode.kernels.hostmem import HostRegistration, register_host_memory, unregister_host_memory
from kvnode.kernels.layout import KVLayout, detect_layout

__all__ = [
    "HostRegistration",
    "KVLayout",
    "detect_layout",
    "gather",
    "register_host_memory",
    "scatter",
    "unregister_host_memory",
    "wait",
]
