"""Block gather/scatter between vLLM's paged KV cache and contiguous chunk buffers.

``layout`` says where the blocks are in a layer's tensor, ``copy`` moves whole blocks,
``hostcopy`` is the one host-to-host copy path (numpy memcpy), ``hostmem`` keeps the
arena mapping ready (populated, pinned for DMA) through the client's remaps,
``staging`` holds the device buffers through which multi-layer copies cross the bus,
``plan``/``onelaunch`` move a chunk of every layer in one Triton launch, ``ipchandle``,
``gpuexport`` and ``gpumove`` are GPU agent mode's device half.

The names below are imported on first use: ``ipchandle`` needs no torch, so the agent
decodes and checks GPU handles without importing it on its loop.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvnode.kernels.copy import gather, gather_layers, scatter, scatter_layers, wait
    from kvnode.kernels.hostmem import (
        ArenaMapping,
        HostRegistration,
        StaleMapping,
        register_host_memory,
        unregister_host_memory,
    )
    from kvnode.kernels.layout import KVLayout, detect_layout

_HOMES = {
    "ArenaMapping": "hostmem",
    "HostRegistration": "hostmem",
    "StaleMapping": "hostmem",
    "register_host_memory": "hostmem",
    "unregister_host_memory": "hostmem",
    "KVLayout": "layout",
    "detect_layout": "layout",
    "gather": "copy",
    "gather_layers": "copy",
    "scatter": "copy",
    "scatter_layers": "copy",
    "wait": "copy",
}

__all__ = [
    "ArenaMapping",
    "HostRegistration",
    "KVLayout",
    "StaleMapping",
    "detect_layout",
    "gather",
    "gather_layers",
    "register_host_memory",
    "scatter",
    "scatter_layers",
    "unregister_host_memory",
    "wait",
]
assert sorted(__all__) == sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'kvnode.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kvnode.kernels.{home}"), name)
    globals()[name] = value
    return value
