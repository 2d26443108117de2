"""Chunk gather/scatter on a GPU against raw D2H/H2D copies of the same bytes; one JSON.

``--shape llama8b`` (32 layers) or ``llama70b`` (80 layers): FlashAttention-layout paged
caches (``[2, num_blocks, 16, 8 kv heads, 128]`` bf16 per layer, vLLM's GPU default
block of 16 tokens) and one chunk of 256 tokens, fragmented (random block ids), moved
to/from a registered (``cudaHostRegister``) host mapping like the arena. Measured in the
same run, medians over repeats, each repeat ending with the device synchronized:

- ``raw_d2h``/``raw_h2d``: one contiguous ``copy_`` of the chunk's bytes between a
  device buffer and the registered mapping (the reference: DMA at full speed);
- ``onelaunch``: one Triton launch packs every layer into a device staging buffer,
  then one DMA (``gather_layers``/``scatter_layers``); ``onelaunch_*_ratio`` is raw time
  over its time (target >= 0.9);
- ``direct``: one launch reading/writing the registered mapping itself, no staging;
- ``per_layer``: one ``gather``/``scatter`` call per layer (the earlier path);
- ``pack``: the launch alone into device memory, against a device-to-device copy of
  the same bytes (how close the kernel gets to HBM bandwidth).

Every route's bytes are checked against the per-layer path. Without a GPU there is
nothing to time: the JSON says so, and the kernel runs once under Triton's interpreter
on a tiny shape to check its bytes (``interpreter_verified``).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

SHAPES = {  # layers, kv heads, head size
    "llama8b": (32, 8, 128),
    "llama70b": (80, 8, 128),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--num-blocks", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> int:
    a = parse()
    if a.chunk_tokens % a.block_size:
        raise SystemExit("--chunk-tokens must be a multiple of --block-size")
    if not torch.cuda.is_available():
        print(json.dumps(cpu_only(a)))
        return 0
    result = measure_gpu(a)
    print(json.dumps(result))
    return 0 if result["verified"] else 1


def cpu_only(a: argparse.Namespace) -> dict[str, Any]:
    """No GPU: nothing to time. Check the kernel's bytes under the interpreter."""
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    from kvnode.kernels import detect_layout, gather
    from kvnode.kernels.copy import _one_launch

    layers, heads, head = 4, 2, 16  # tiny: the interpreter runs numpy per program
    caches = [
        torch.randn(2, 32, a.block_size, heads, head).to(torch.bfloat16) for _ in range(layers)
    ]
    layout = detect_layout(caches[0], 32, a.block_size, "FLASH_ATTN")
    ids = random.Random(a.seed).sample(range(32), 6)
    want = torch.cat([_per_layer(gather, kv, layout, ids) for kv in caches])
    got = torch.zeros_like(want)
    verified = _one_launch(caches, layout, ids, got, gather=True) and torch.equal(got, want)
    back = [torch.zeros_like(kv) for kv in caches]
    verified = verified and _one_launch(back, layout, ids, got, gather=False)
    again = torch.cat([_per_layer(gather, kv, layout, ids) for kv in back])
    return {
        "bench": "gpu_copy",
        "shape": a.shape,
        "skipped": "no CUDA or ROCm GPU: copy rates need one (make gpu-check on a GPU host)",
        "interpreter_verified": bool(verified and torch.equal(again, want)),
        "interpreter_shape": [layers, 2, 32, a.block_size, heads, head],
    }


def _per_layer(
    gather: Callable[..., None], kv: torch.Tensor, layout: Any, ids: list[int]
) -> torch.Tensor:
    out = torch.empty(len(ids) * layout.block_nbytes, dtype=torch.uint8, device=kv.device)
    gather(kv, layout, ids, out)
    return out.cpu()


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: compile, allocator, page faults
    torch.cuda.synchronize()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure_gpu(a: argparse.Namespace) -> dict[str, Any]:
    from kvnode.kernels import detect_layout, register_host_memory, unregister_host_memory

    layers, heads, head = SHAPES[a.shape]
    shape = (2, a.num_blocks, a.block_size, heads, head)
    caches = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    layout = detect_layout(caches[0], a.num_blocks, a.block_size, "FLASH_ATTN")
    ids = random.Random(a.seed).sample(range(a.num_blocks), a.chunk_tokens // a.block_size)
    nbytes = layers * len(ids) * layout.block_nbytes
    arena = mmap.mmap(-1, nbytes)
    reg = register_host_memory(arena)
    try:
        host = torch.frombuffer(arena, dtype=torch.uint8)
        t, checks, used = time_routes(a, caches, layout, ids, host, reg is not None)
        del host
    finally:
        unregister_host_memory(reg)
    try:
        arena.close()
    except BufferError:
        pass  # a view still holds it: it goes with the process
    return report(a, layers, heads, head, nbytes, reg is not None, t, checks, used)


def time_routes(
    a: argparse.Namespace,
    caches: list[torch.Tensor],
    layout: Any,
    ids: list[int],
    host: torch.Tensor,
    registered: bool,
) -> tuple[dict[str, float], dict[str, bool], bool]:
    """Times of every route and the reference copies; each route's bytes checked."""
    from kvnode.kernels import gather, gather_layers, onelaunch, scatter, scatter_layers
    from kvnode.kernels.copy import kernel_stats
    from kvnode.kernels.plan import chunk_rows

    layers, device = len(caches), caches[0].device
    dev = torch.empty(host.numel(), dtype=torch.uint8, device=device)
    dev2 = torch.empty_like(dev)
    span = len(ids) * layout.block_nbytes
    parts = [host[i * span : (i + 1) * span] for i in range(layers)]

    def per_layer_gather() -> None:
        for kv, out in zip(caches, parts, strict=True):
            gather(kv, layout, ids, out, sync=False)

    def per_layer_scatter() -> None:
        for kv, src in zip(caches, parts, strict=True):
            scatter(src, kv, layout, ids, sync=False)

    def one_launch(address: int, to_chunk: bool) -> Callable[[], None]:
        rows = chunk_rows(caches, [layout] * layers, [0] * layers, [ids], address)
        p = onelaunch.plan(rows, [ids])
        return lambda: onelaunch.launch(p, device, gather=to_chunk)

    t: dict[str, float] = {}
    checks: dict[str, bool] = {}
    t["raw_d2h"] = timed(lambda: host.copy_(dev, non_blocking=True), a.repeats)
    t["raw_h2d"] = timed(lambda: dev2.copy_(host, non_blocking=True), a.repeats)
    t["raw_d2d"] = timed(lambda: dev2.copy_(dev), a.repeats)
    t["per_layer_gather"] = timed(per_layer_gather, a.repeats)
    want = host.clone()  # the per-layer path's bytes: every route must match them
    host.zero_()
    launches = kernel_stats()["launches"]
    t["onelaunch_gather"] = timed(lambda: gather_layers(caches, layout, ids, host), a.repeats)
    checks["onelaunch_gather"] = bool(torch.equal(host, want))
    used = kernel_stats()["launches"] > launches
    if registered:  # the kernel reaches host memory only once it is registered
        host.zero_()
        t["direct_gather"] = timed(one_launch(host.data_ptr(), True), a.repeats)
        checks["direct_gather"] = bool(torch.equal(host, want))
    t["pack_gather"] = timed(one_launch(dev.data_ptr(), True), a.repeats)
    checks["pack_gather"] = bool(torch.equal(dev.cpu(), want))
    t["per_layer_scatter"] = timed(per_layer_scatter, a.repeats)
    t["onelaunch_scatter"] = timed(lambda: scatter_layers(host, caches, layout, ids), a.repeats)
    if registered:
        t["direct_scatter"] = timed(one_launch(host.data_ptr(), False), a.repeats)
    for kv in caches:  # what the scatters wrote must read back as the original bytes
        kv[:, ids] = 0
    scatter_layers(host, caches, layout, ids)
    host.zero_()
    per_layer_gather()
    torch.cuda.synchronize()
    checks["scatter"] = bool(torch.equal(host, want))
    return t, checks, used


def report(
    a: argparse.Namespace,
    layers: int,
    heads: int,
    head: int,
    nbytes: int,
    registered: bool,
    t: dict[str, float],
    checks: dict[str, bool],
    used_kernel: bool,
) -> dict[str, Any]:
    def ratio(ref: str, name: str) -> float:
        return round(t[ref] / t[name], 3)

    out: dict[str, Any] = {
        "bench": "gpu_copy",
        "shape": a.shape,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "layers": layers,
        "kv_heads": heads,
        "head_size": head,
        "block_size": a.block_size,
        "chunk_tokens": a.chunk_tokens,
        "chunk_bytes": nbytes,
        "repeats": a.repeats,
        "host_registered": registered,
        "onelaunch_used": used_kernel,
        "verified": all(checks.values()) and used_kernel,
        "checks": checks,
    }
    for name, seconds in t.items():
        out[f"{name}_gbps"] = round(nbytes / seconds / 1e9, 2)
    out["onelaunch_gather_ratio"] = ratio("raw_d2h", "onelaunch_gather")
    out["onelaunch_scatter_ratio"] = ratio("raw_h2d", "onelaunch_scatter")
    if "direct_gather" in t:
        out["direct_gather_ratio"] = ratio("raw_d2h", "direct_gather")
        out["direct_scatter_ratio"] = ratio("raw_h2d", "direct_scatter")
    out["per_layer_gather_ratio"] = ratio("raw_d2h", "per_layer_gather")
    out["per_layer_scatter_ratio"] = ratio("raw_h2d", "per_layer_scatter")
    out["pack_vs_d2d"] = ratio("raw_d2d", "pack_gather")
    return out


if __name__ == "__main__":
    sys.exit(main())
