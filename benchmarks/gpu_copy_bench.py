"""Chunk gather/scatter throughput against a raw copy of the same bytes; prints one JSON.

On a GPU: a FlashAttention-layout paged cache (``[2, num_blocks, block_size, heads,
head_size]`` per layer) and one chunk (``chunk_tokens`` tokens, all layers) gathered
into / scattered from a registered (pinned) host mapping with ``kvnode.kernels``; the
reference is one contiguous device->host and host->device ``copy_`` of the same bytes
between the same buffers. Without a GPU: the vLLM CPU layout, and the reference is a
torch copy of the same bytes in host memory. Block ids are random (a fragmented cache).
Times are medians over repeats; each repeat ends with the device synchronized.
``gather``/``scatter``: one call per layer, each waits for its copies (the default);
``*_queued``: every layer queued with ``sync=False``, one wait per chunk.
``*_layers``: one ``gather_layers``/``scatter_layers`` call for all layers of the chunk
(on a GPU: packed in one device staging buffer, one copy across the bus); its bytes are
checked against the per-layer gathers'.
"""

from __future__ import annotations

import argparse
import json
import mmap
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch

from kvnode.kernels import (
    KVLayout,
    detect_layout,
    gather,
    gather_layers,
    register_host_memory,
    scatter,
    scatter_layers,
    unregister_host_memory,
    wait,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse() -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32 if gpu else 8)
    p.add_argument("--heads", type=int, default=16 if gpu else 4)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16 if gpu else 128)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--num-blocks", type=int, default=1024 if gpu else 64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if gpu else "fp32")
    p.add_argument("--repeats", type=int, default=30 if gpu else 10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    return p.parse_args()


def make_caches(a: argparse.Namespace, device: str) -> list[torch.Tensor]:
    shape: tuple[int, ...]
    if device == "cuda":
        shape = (2, a.num_blocks, a.block_size, a.heads, a.head_size)
    else:
        shape = (a.num_blocks, a.heads, a.block_size, 2 * a.head_size)
    dtype = DTYPES[a.dtype]
    return [torch.randn(shape, device=device).to(dtype) for _ in range(a.layers)]


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up: allocator, kernels, page faults
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> int:
    a = parse()
    if a.chunk_tokens % a.block_size:
        raise SystemExit("--chunk-tokens must be a multiple of --block-size")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    caches = make_caches(a, device)
    layout = detect_layout(caches[0], a.num_blocks, a.block_size)
    chunk_nbytes = a.layers * (a.chunk_tokens // a.block_size) * layout.block_nbytes
    arena = mmap.mmap(-1, chunk_nbytes)
    handle = register_host_memory(arena)
    try:
        result = measure(a, caches, layout, torch.frombuffer(arena, dtype=torch.uint8))
    finally:
        unregister_host_memory(handle)
    result["host_registered"] = handle is not None
    arena.close()
    print(json.dumps(result))
    return 0 if result["verified"] else 1


def measure(
    a: argparse.Namespace, caches: list[torch.Tensor], layout: KVLayout, host: torch.Tensor
) -> dict[str, object]:
    device = caches[0].device.type
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    blocks_per_chunk = a.chunk_tokens // a.block_size
    ids = random.Random(a.seed).sample(range(a.num_blocks), blocks_per_chunk)
    layer_nbytes = blocks_per_chunk * layout.block_nbytes
    slices = [host[i * layer_nbytes : (i + 1) * layer_nbytes] for i in range(a.layers)]

    def do_gather(sync: bool = True) -> None:
        for kv, out in zip(caches, slices, strict=True):
            gather(kv, layout, ids, out, sync=sync)
        wait(device)

    def do_scatter(sync: bool = True) -> None:
        for kv, src in zip(caches, slices, strict=True):
            scatter(src, kv, layout, ids, sync=sync)
        wait(device)

    flat = torch.empty(host.numel(), dtype=torch.uint8, device=device)
    other = flat if device == "cuda" else torch.empty_like(flat)
    t_gather = timed(do_gather, a.repeats, sync)
    verified = _verify(caches[-1], layout, ids, slices[-1])
    t_scatter = timed(do_scatter, a.repeats, sync)
    # Every layer queued, one wait per chunk (sync=False); same bytes, checked again.
    t_gather_q = timed(lambda: do_gather(sync=False), a.repeats, sync)
    verified = verified and _verify(caches[-1], layout, ids, slices[-1])
    t_scatter_q = timed(lambda: do_scatter(sync=False), a.repeats, sync)
    # All layers in one call; must give the per-layer gathers' bytes exactly.
    want = host.clone()
    host.fill_(0)
    t_gather_l = timed(lambda: gather_layers(caches, layout, ids, host), a.repeats, sync)
    verified = verified and bool(torch.equal(host, want))
    t_scatter_l = timed(lambda: scatter_layers(host, caches, layout, ids), a.repeats, sync)
    host.fill_(0)
    do_gather()  # what scatter_layers wrote must read back the same
    verified = verified and bool(torch.equal(host, want))
    t_ref_out = timed(lambda: host.copy_(flat, non_blocking=True), a.repeats, sync)
    t_ref_in = timed(lambda: other.copy_(host, non_blocking=True), a.repeats, sync)

    def gbps(seconds: float) -> float:
        return round(host.numel() / seconds / 1e9, 2)

    return {
        "bench": "gpu_copy",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "layout": layout.name,
        "dtype": a.dtype,
        "layers": a.layers,
        "heads": a.heads,
        "head_size": a.head_size,
        "block_size": a.block_size,
        "chunk_tokens": a.chunk_tokens,
        "blocks_per_chunk": blocks_per_chunk,
        "chunk_bytes": host.numel(),
        "repeats": a.repeats,
        "verified": verified,
        "gather_gbps": gbps(t_gather),
        "scatter_gbps": gbps(t_scatter),
        "ref_out_gbps": gbps(t_ref_out),  # device->host (GPU) or a host copy (CPU)
        "ref_in_gbps": gbps(t_ref_in),  # host->device (GPU) or a host copy (CPU)
        "gather_ratio": round(t_ref_out / t_gather, 3),
        "scatter_ratio": round(t_ref_in / t_scatter, 3),
        "gather_queued_gbps": gbps(t_gather_q),
        "scatter_queued_gbps": gbps(t_scatter_q),
        "gather_queued_ratio": round(t_ref_out / t_gather_q, 3),
        "scatter_queued_ratio": round(t_ref_in / t_scatter_q, 3),
        "gather_layers_gbps": gbps(t_gather_l),
        "scatter_layers_gbps": gbps(t_scatter_l),
        "gather_layers_ratio": round(t_ref_out / t_gather_l, 3),
        "scatter_layers_ratio": round(t_ref_in / t_scatter_l, 3),
        "gather_ms": round(t_gather * 1e3, 3),
        "scatter_ms": round(t_scatter * 1e3, 3),
        "gather_layers_ms": round(t_gather_l * 1e3, 3),
        "scatter_layers_ms": round(t_scatter_l * 1e3, 3),
    }


def _verify(kv: torch.Tensor, layout: KVLayout, ids: list[int], got: torch.Tensor) -> bool:
    """The last gather's bytes equal a plain per-block copy of the same blocks."""
    dim = layout.block_dim
    parts = [kv.select(dim, b).contiguous().view(-1).view(torch.uint8).cpu() for b in ids]
    return bool(torch.equal(torch.cat(parts), got))


if __name__ == "__main__":
    sys.exit(main())
