"""The worker side with GPU caches and a real agent: the arena is registered as pinned
host memory at connect, chunks move GPU -> arena -> GPU through the kernels."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import xxhash

from kvnode.connector.link import AgentLink, default_client_factory
from kvnode.connector.scheduler import ChunkOp
from kvnode.connector.worker import WorkerSide

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
]

NUM_BLOCKS, BS = 64, 16


def _agent(rd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "kvnode", "agent", "--runtime-dir", str(rd), "--cpu-bytes", "64MiB"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_gpu_caches_roundtrip_through_a_real_agent(tmp_path: Path) -> None:
    from kvnode.kernels.hostmem import register_host_memory, unregister_host_memory

    regs: list[object] = []
    agent = _agent(tmp_path)
    try:
        link = AgentLink(
            default_client_factory(str(tmp_path), "gpu-test", 2.0),
            on_connect=lambda c: regs.append(register_host_memory(c.buffer)),
            on_disconnect=lambda c: unregister_host_memory(regs.pop()) if regs else None,
            background=False,
        )
        deadline = time.monotonic() + 20
        while not link.try_connect():
            assert time.monotonic() < deadline, "agent did not answer"
            link._next_retry_s = 0.0
            time.sleep(0.1)
        assert regs and regs[0] is not None, "arena was not registered as pinned memory"
        g = torch.Generator().manual_seed(0)
        # FlashAttention's layout: [2, num_blocks, block_size, heads, head_size].
        src = {f"l{i}": torch.randn(2, NUM_BLOCKS, BS, 4, 64, generator=g).cuda() for i in range(4)}
        dst = {k: torch.zeros_like(v) for k, v in src.items()}
        sum64 = lambda b: xxhash.xxh3_64_intdigest(b) or 1  # noqa: E731
        ws, wd = (WorkerSide(link, 0, NUM_BLOCKS, BS, 2, checksum=sum64) for _ in range(2))
        assert ws.register(src).layout == "flash" and wd.register(dst).layout == "flash"
        assert not ws.on_cpu
        ops = [ChunkOp(i, (os.urandom(16),), (2 * i + 5, 2 * i + 6)) for i in range(4)]
        ws.save({"r": ops})
        assert ws.stats.save_chunks == 4
        moved = [ChunkOp(op.index, op.keys, (40 + 2 * i, 41 + 2 * i)) for i, op in enumerate(ops)]
        wd.load({"q": moved})
        assert wd.take_load_errors() == set()
        for k in src:
            for a, b in zip((o.block_ids for o in ops), (m.block_ids for m in moved), strict=True):
                assert torch.equal(dst[k][:, list(b)], src[k][:, list(a)])
        link.close()
        assert not regs
    finally:
        agent.terminate()
        agent.wait(20)
