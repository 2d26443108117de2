"""GPU agent mode between processes: workers export their caches with CUDA/HIP IPC
handles, an agent process opens them and moves a chunk through a shared arena file:
byte-exact, per-layer interprocess events, an agent restart under an exporting worker,
an expandable-segments cache, and the refusal of memory outside torch's default pool."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gpu_agent_procs as P
import pytest
import torch
from onelaunch_import import onelaunch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
    pytest.mark.skipif(onelaunch is None, reason="needs triton"),
    pytest.mark.timeout(180),
]
ARENA_BYTES = 4 << 20
CTX = mp.get_context("spawn")


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Path]:
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    path = shm / f"kvnode-test-arena-{os.getpid()}-{id(tmp_path)}"
    path.write_bytes(b"\xee" * ARENA_BYTES)
    yield path
    path.unlink(missing_ok=True)


class Proc:
    def __init__(self, target: Any, *args: Any) -> None:
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()

    def recv(self, timeout: float = 120) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.proc.name} said nothing in {timeout} s")
        return self.conn.recv()

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


def entry(path: Path, size: int) -> bytes:
    data = path.read_bytes()
    return data[4096 : 4096 + size // 2] + data[1 << 20 : (1 << 20) + size - size // 2]


@pytest.mark.parametrize("route", ["staging", "direct"])
@pytest.mark.parametrize("alloc_conf", ["", "expandable_segments:True"])
def test_two_workers_through_the_agent(arena: Path, route: str, alloc_conf: str) -> None:
    a, b = Proc(P.worker, True, alloc_conf), Proc(P.worker, False, alloc_conf)
    agent = None
    try:
        exports = [a.recv(), b.recv()]
        assert exports[0][0] == "export" and exports[1][0] == "export", exports
        a.conn.send(("blocks",))
        want = a.recv()
        agent = Proc(P.agent, str(arena), route, exports)
        kind, size = agent.recv()
        assert kind == "saved" and size == len(want)
        assert entry(arena, size) == want, "the arena holds other bytes than the worker's"
        layer = len(want) // P.LAYERS
        for i in range(P.LAYERS):
            assert agent.recv() == ("layer", i)
            b.conn.send(("layer", i))  # wait on the layer's event, then read the layer
            assert b.recv() == want[i * layer : (i + 1) * layer], f"layer {i} differs"
        assert agent.recv() == ("loaded", size)
    finally:
        for p in (agent, a, b):
            if p is not None:
                p.stop()


def test_agent_restart_under_an_exporting_worker(arena: Path) -> None:
    a = Proc(P.worker, True)
    try:
        export = a.recv()
        a.conn.send(("blocks",))
        want = a.recv()
        first = Proc(P.agent, str(arena), "staging", [export])
        assert first.recv()[0] == "saved"
        first.proc.kill()  # dies holding the worker's handles open
        first.proc.join(30)
        arena.write_bytes(b"\xee" * ARENA_BYTES)
        a.conn.send(("ready",))
        assert a.recv() == "ok"
        second = Proc(P.agent, str(arena), "staging", [export])  # same export, new agent
        kind, size = second.recv()
        assert kind == "saved" and entry(arena, size) == want
        second.stop()
        a.conn.send(("blocks",))  # the worker is unharmed
        assert a.recv() == want
    finally:
        a.stop()


def test_memory_outside_the_default_pool_is_refused() -> None:
    if not hasattr(torch.cuda, "use_mem_pool"):
        pytest.skip("this torch has no torch.cuda.use_mem_pool")
    w = Proc(P.worker, False, "", True)
    try:
        kind, why = w.recv()
        assert kind == "refused" and "private memory pool" in why
    finally:
        w.stop()
