"""The worker side with GPU caches and real agent processes: the client owns the arena
mapping and its hooks register it with cudaHostRegister on every (re)mapping; chunks
move GPU -> arena -> GPU through the kernels, every byte checked, across two agent
restarts. Runs under ``make gpu-check``; skips without a GPU."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kvnode.connector.link import AgentLink, default_client_factory
from kvnode.connector.scheduler import ChunkOp
from kvnode.connector.worker import WorkerSide
from kvnode.errors import KVNodeError
from tests.conftest import AgentProcess

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
]

NUM_BLOCKS, BS, LAYERS, CHUNKS = 64, 16, 4, 4
DEADLINE_S = 20.0


def _until(check: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _pinned(buf: Any) -> bool:
    t = torch.frombuffer(buf, dtype=torch.uint8, count=4096)
    try:
        return bool(t.is_pinned())
    finally:
        del t  # an export would keep the segment from being unmapped


def _reach(c: Any) -> bool:
    try:
        c.lookup([b"\0" * 16], promote=False)
        return True
    except KVNodeError:
        return False


def _expected(kv: dict[str, torch.Tensor], blocks: tuple[int, ...]) -> bytes:
    # FlashAttention layout [2, num_blocks, ...]: a block is its K part then its V part.
    parts = [kv[n][:, b].contiguous().view(torch.uint8).cpu() for n in sorted(kv) for b in blocks]
    return b"".join(p.numpy().tobytes() for p in parts)


def test_registration_follows_two_agent_restarts(tmp_path: Path) -> None:
    from kvnode.ipc.client import AgentClient
    from kvnode.kernels.hostmem import ArenaMapping, unregister_host_memory

    unregistered: list[Any] = []

    def unregister(handle: Any) -> None:
        unregistered.append(handle)
        unregister_host_memory(handle)

    arena = ArenaMapping(unregister=unregister)  # real populate + cudaHostRegister
    rd = tmp_path / "run"
    agent = AgentProcess(rd).start()
    link = AgentLink(
        default_client_factory(str(rd), "gpu-test", 2.0, arena.on_map, arena.on_unmap),
        retry_interval_s=0.05,
        retry_max_s=0.2,
        background=False,
    )
    reader = AgentClient(rd, name="reader", timeout_s=2.0)
    try:
        _until(link.try_connect, "agent did not answer")
        g = torch.Generator().manual_seed(0)
        shape = (2, NUM_BLOCKS, BS, 4, 64)  # FlashAttention's layout
        src = {f"l{i}": torch.randn(*shape, generator=g).cuda() for i in range(LAYERS)}
        dst = {k: torch.zeros_like(v) for k, v in src.items()}
        ws = WorkerSide(link, 0, NUM_BLOCKS, BS, 2, arena=arena)
        wd = WorkerSide(link, 0, NUM_BLOCKS, BS, 2, arena=arena)
        assert ws.register(src).layout == "flash" and wd.register(dst).layout == "flash"
        for round_ in range(3):
            if round_:
                epoch = arena.epoch
                agent.stop()
                agent = AgentProcess(rd).start()
                # The client remaps on its own: unmap hook (+1), map hook (+1).
                _until(lambda e=epoch: arena.epoch >= e + 2, "the client did not remap")
                assert len(unregistered) == round_
            buf = link.call(lambda c: c.buffer)
            assert _pinned(buf), f"round {round_}: the mapped arena is not registered"
            ops = [ChunkOp(i, (os.urandom(16),), (2 * i + 5, 2 * i + 6)) for i in range(CHUNKS)]
            ws.save({"r": ops})
            assert ws.take_stats(wait=True)["save_chunks"] == CHUNKS
            _until(lambda: _reach(reader), "the reader did not reach the agent")
            for o in ops:
                assert reader.get(o.keys[0]) == _expected(src, o.block_ids), f"round {round_}"
            moved = [ChunkOp(o.index, o.keys, (40 + 2 * i, 41 + 2 * i)) for i, o in enumerate(ops)]
            wd.load({"q": moved})
            assert wd.take_load_errors() == set()
            for k in src:
                for o, m in zip(ops, moved, strict=True):
                    assert torch.equal(dst[k][:, list(m.block_ids)], src[k][:, list(o.block_ids)])
    finally:
        reader.close()
        link.close()
        agent.stop()
    assert len(unregistered) == 3, "every registration was undone before its unmap"
