"""Processes of the GPU agent-mode tests: workers that export a cache, an agent that
opens the exports and moves chunks through a shared arena file. Run with the spawn
start method (CUDA cannot be forked); each talks to the test over a pipe."""

from __future__ import annotations

import mmap
import os
from multiprocessing.connection import Connection
from typing import Any

LAYERS = 4
NUM_BLOCKS = 32
BLOCK_SIZE = 16
SHAPE = (2, NUM_BLOCKS, BLOCK_SIZE, 4, 64)  # FlashAttention NHD, bf16
BLOCKS = (3, 17, 4, 30, 9, 10, 11, 0)  # one chunk, fragmented


def worker(conn: Connection, fill: bool, alloc_conf: str = "", pool: bool = False) -> None:
    """Export ``LAYERS`` caches (random bytes when ``fill``, zeros else) with their
    events (``GpuExport``); then answer the test's requests."""
    if alloc_conf:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf
    import torch

    from kvnode.kernels import ipchandle as H
    from kvnode.kernels.gpuexport import GpuExport

    torch.manual_seed(1)
    try:
        if pool:  # memory outside the default pool, as vLLM's sleep mode makes it
            mem_pool = torch.cuda.MemPool()
            with torch.cuda.use_mem_pool(mem_pool):
                kvs = [
                    torch.zeros(SHAPE, dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)
                ]
        else:
            kvs = [_cache(torch, fill) for _ in range(LAYERS)]
        export = GpuExport(kvs)
    except H.ExportRefused as exc:
        conn.send(("refused", str(exc)))
        return
    torch.cuda.synchronize()
    conn.send(("export", export.wire_handles()))
    while True:
        msg = conn.recv()
        if msg[0] == "blocks":  # the bytes of BLOCKS, layer by layer
            conn.send(b"".join(_blocks(torch, kv) for kv in kvs))
        elif msg[0] == "layer":  # wait for the agent's layer on our stream, then read it
            i = msg[1]
            export.wait_layer(i)
            conn.send(_blocks(torch, kvs[i]))
        elif msg[0] == "ready":
            export.record_ready()
            torch.cuda.synchronize()
            conn.send("ok")
        else:
            return


def _cache(torch: Any, fill: bool) -> Any:
    if not fill:
        return torch.zeros(SHAPE, dtype=torch.bfloat16, device="cuda")
    raw = torch.randint(0, 256, (torch.Size(SHAPE).numel() * 2,), dtype=torch.uint8, device="cuda")
    return raw.view(torch.bfloat16).view(SHAPE)


def _blocks(torch: Any, kv: Any) -> bytes:
    return (
        kv[:, list(BLOCKS)]
        .permute(1, 0, 2, 3, 4)
        .contiguous()
        .view(torch.uint8)
        .cpu()
        .numpy()
        .tobytes()
    )


def agent(conn: Connection, arena_path: str, route: str, exports: list[Any]) -> None:
    """Open every export; save the first worker's chunk into the arena; load it into
    the second worker's cache (if any), telling the test of each layer as it is queued
    (the test has the worker wait on that layer's event and read it)."""
    import torch

    from kvnode.kernels import detect_layout
    from kvnode.kernels import ipchandle as H
    from kvnode.kernels.gpuexport import open_events, split_wire_handles
    from kvnode.kernels.gpumove import ChunkCopy, DeviceCopier, OpenedLayer
    from kvnode.kernels.hostmem import register_host_memory, unregister_host_memory

    uuids = H.device_uuids()
    fd = os.open(arena_path, os.O_RDWR)
    mm = mmap.mmap(fd, 0)
    os.close(fd)
    reg = register_host_memory(mm)
    arena = torch.frombuffer(mm, dtype=torch.uint8)
    opened = []
    for _, wire in exports:
        handles, ready, events = split_wire_handles(wire, LAYERS)
        kvs = H.open_cache(handles, uuids)
        layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE, "FLASH_ATTN")
        span = len(BLOCKS) * layout.block_nbytes
        layers = [OpenedLayer(kv, layout, 0, i * span) for i, kv in enumerate(kvs)]
        opened.append((layers, *open_events(ready, events, uuids)))
    device = opened[0][0][0].kv.device
    copier = DeviceCopier(device, arena, route)
    size = LAYERS * len(BLOCKS) * opened[0][0][0].layout.block_nbytes
    chunk = ChunkCopy(0, BLOCKS, ((4096, size // 2), (1 << 20, size - size // 2)))
    layers, ready, _ = opened[0]
    copier.save(layers, [chunk], ready=ready)
    conn.send(("saved", size))
    if len(opened) > 1:
        layers, ready, events = opened[1]
        copier.load(layers, [chunk], ready=ready, events=events,
                    on_layer=lambda i: conn.send(("layer", i)))  # fmt: skip
        conn.send(("loaded", size))
    conn.recv()  # stay until told (a restart test kills us here)
    del arena
    unregister_host_memory(reg)
