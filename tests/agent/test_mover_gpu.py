"""The GPU mover's job logic on CPU tensors: the copier's kernel runs under Triton's
interpreter, the probe and the progress page go through real cross-memory attach (to
this process). Only opening the IPC handles is replaced: that needs a GPU
(``tests/kernels/test_kernels_agent_gpu.py`` opens real ones under ``make gpu-check``)."""

from __future__ import annotations

import os
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see onelaunch_import)

from kvnode.agent.movers.base import ChunkWork, Export, Job, Layer, MoverError  # noqa: E402
from kvnode.ipc import progress as PG  # noqa: E402
from kvnode.ipc.checksum import checksum  # noqa: E402
from kvnode.kernels import detect_layout, gather  # noqa: E402
from kvnode.kernels import ipchandle as H  # noqa: E402
from kvnode.kernels.plan import segments  # noqa: E402

pytestmark = pytest.mark.skipif(find_spec("triton") is None, reason="needs triton")

LAYERS, NUM_BLOCKS, BLOCK_SIZE, BPC = 3, 24, 16, 4
ARENA_BYTES = 1 << 20
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_mover(arena: memoryview):  # type: ignore[no-untyped-def]
    from kvnode.agent.movers.gpu import GpuMover, Opened, opened_layer

    class CpuTensorMover(GpuMover):
        """The GPU mover with the export's tensors handed over instead of opened."""

        tensors: dict[int, list[torch.Tensor]] = {}

        def _check_handles(self, export: Export) -> None:
            return  # no handles: the tensors are this process's own

        def _open(self, export: Export) -> Opened:
            kvs = self.tensors[export.export_id]
            layers = [opened_layer(x, kv) for x, kv in zip(export.layers, kvs, strict=True)]
            return Opened(layers, None, [], self._copier(torch.device(DEVICE)))

    return CpuTensorMover(arena, "cuda:test")


def caches(fill: bool) -> list[torch.Tensor]:
    shape = (2, NUM_BLOCKS, BLOCK_SIZE, 2, 8)
    if not fill:
        return [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(LAYERS)]
    return [torch.randn(shape).to(torch.bfloat16) for _ in range(LAYERS)]


def export_of(kvs: list[torch.Tensor], export_id: int, page: np.ndarray) -> Export:
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE, "FLASH_ATTN")
    layers = []
    for i, kv in enumerate(kvs):
        seg = segments(kv, layout)
        parts = tuple((s * seg.seg_stride, seg.seg_bytes) for s in range(seg.n_seg))
        layers.append(
            Layer(
                f"layers.{i}",
                seg.base,
                NUM_BLOCKS,
                seg.block_stride,
                layout.block_nbytes,
                parts,
                i * BPC * layout.block_nbytes,
            )  # fmt: skip
        )
    chunk = LAYERS * BPC * layout.block_nbytes
    slots, slot_bytes = page.shape
    return Export(export_id, 1, "cuda:test", os.getpid(), tuple(layers), int(page.ctypes.data),
                  slots, slot_bytes, chunk, BPC)  # fmt: skip


def reference(kvs: list[torch.Tensor], blocks: tuple[int, ...]) -> bytes:
    layout = detect_layout(kvs[0], NUM_BLOCKS, BLOCK_SIZE, "FLASH_ATTN")
    out = []
    for kv in kvs:
        buf = torch.empty(len(blocks) * layout.block_nbytes, dtype=torch.uint8)
        gather(kv, layout, list(blocks), buf)
        out.append(buf.numpy().tobytes())
    return b"".join(out)


def attach(mover, export: Export, tensors: list[torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    mover.tensors[export.export_id] = tensors
    nonce = os.urandom(16)
    probe = np.frombuffer(bytearray(nonce), dtype=np.uint8)
    assert mover.attach(export, int(probe.ctypes.data), nonce) == ""
    assert bytes(probe) == nonce[::-1], "the agent's probe write did not arrive"


def test_save_then_load_through_the_gpu_mover() -> None:
    arena = memoryview(bytearray(b"\xee" * ARENA_BYTES))
    mover = make_mover(arena)
    src, dst = caches(True), caches(False)
    page_a = np.zeros((4, PG.slot_bytes(LAYERS)), dtype=np.uint8)
    page_b = np.zeros_like(page_a)
    ea, eb = export_of(src, 11, page_a), export_of(dst, 12, page_b)
    attach(mover, ea, src)
    attach(mover, eb, dst)
    size = ea.chunk_nbytes
    chunks = [
        ChunkWork(
            b"k0", (3, 9, 4, 20), [(4096, size // 3 + 8), (65536, size - size // 3 - 8)], index=0
        ),
        ChunkWork(b"k1", (0, 1, 2, 23), [(200_000, size)], index=1),
    ]
    save = Job(ea, False, 2, 7, chunks, bytearray(2), time.monotonic() + 30)
    mover.run(save)
    mover.report(save)
    assert not save.failed and page_a[2, PG.DONE] == 7 and page_a[2, PG.RESULT] == PG.RESULT_OK
    for c in chunks:
        got = b"".join(bytes(arena[o : o + n]) for o, n in c.extents)
        assert got == reference(src, c.blocks)
        assert c.checksum == checksum([arena[o : o + n] for o, n in c.extents]) != 0

    # Load both into the second cache; one entry's checksum is wrong: never copied.
    loads = [
        ChunkWork(b"k0", (5, 6, 7, 8), chunks[0].extents, checksum=chunks[0].checksum, index=0),
        ChunkWork(
            b"k1", (10, 11, 12, 13), chunks[1].extents, checksum=chunks[1].checksum ^ 1, index=1
        ),
    ]
    load = Job(eb, True, 1, 9, loads, bytearray(2), time.monotonic() + 30)
    mover.run(load)
    mover.report(load)
    assert not load.failed
    assert [loads[0].status, loads[1].status] == [PG.CHUNK_OK, PG.CHUNK_BAD]
    assert all(page_b[1, PG.layer_byte(i)] == 9 for i in range(LAYERS)), "a layer mark is missing"
    assert bytes(page_b[1, PG.chunk_byte(LAYERS, 0) : PG.chunk_byte(LAYERS, 2)]) == bytes(
        [PG.CHUNK_OK, PG.CHUNK_BAD]
    )
    assert reference(dst, (5, 6, 7, 8)) == reference(src, (3, 9, 4, 20))
    assert not any(reference(dst, (10, 11, 12, 13))), "a chunk that failed its checksum was copied"
    mover.close()


def test_jobs_of_a_gone_worker_fail_and_bad_handles_are_refused() -> None:
    from kvnode.agent.movers.gpu import GpuMover, opened_layer

    arena = memoryview(bytearray(ARENA_BYTES))
    mover = make_mover(arena)
    src = caches(True)
    page = np.zeros((2, PG.slot_bytes(LAYERS)), dtype=np.uint8)
    ex = export_of(src, 21, page)
    attach(mover, ex, src)
    ex.alive = False
    chunk = ChunkWork(b"k", (1, 2, 3, 4), [(0, ex.chunk_nbytes)], index=0)
    job = Job(ex, False, 0, 1, [chunk], bytearray(1), time.monotonic() + 30)
    mover.run(job)
    assert "gone" in job.failed and chunk.status == PG.CHUNK_FAILED
    assert not any(arena[: ex.chunk_nbytes]), "a gone worker's job copied"

    lying = ex.layers[0].__class__(**{**_fields(ex.layers[0]), "block_stride": 64})
    with pytest.raises(MoverError, match="the export says"):
        opened_layer(lying, src[0])
    # The real opening: handles that do not decode are a refusal, never a crash.
    plain = GpuMover.__new__(GpuMover)
    plain.uuids = {}
    ex.handles = (b"junk",) * (2 * LAYERS + 1)
    nonce = os.urandom(16)
    probe = np.frombuffer(bytearray(nonce), dtype=np.uint8)
    plain.view, plain.addr = arena, 0
    why = GpuMover.attach(plain, ex, int(probe.ctypes.data), nonce)
    assert "cannot open" in why and "malformed" in why
    ex.handles = (b"junk",)
    assert "handles for 3 layers" in GpuMover.attach(plain, ex, int(probe.ctypes.data), nonce[::-1])


def _fields(layer: Layer) -> dict[str, object]:
    return {f: getattr(layer, f) for f in layer.__slots__}  # type: ignore[attr-defined]


def test_a_real_agent_refuses_gpu_handles_it_cannot_open(tmp_path: Path) -> None:
    """A GPU export reaches the GPU mover in a real agent process; handles it cannot
    open (forged, or a GPU it does not see) are one line back, and the agent serves on."""
    from kvnode.ipc import protocol as P
    from kvnode.ipc.client import AgentClient
    from tests.conftest import AgentProcess

    agent = AgentProcess(tmp_path / "run").start()
    # The first GPU export imports torch in the agent: seconds on a loaded machine.
    c = AgentClient(agent.runtime_dir, name="gpu-forger", timeout_s=60.0)
    try:
        c.connect()
        page = np.zeros((4, PG.slot_bytes(1)), dtype=np.uint8)
        nonce = os.urandom(P.PROBE_BYTES)
        probe = np.frombuffer(bytearray(nonce), dtype=np.uint8)
        layer = P.LayerExport("layers.0", 1 << 40, 8, 4096, 4096, [(0, 4096)], 0)
        # A GPU the agent does not see is refused before any handle is read; on a GPU
        # machine, the handles of its own GPU are checked.
        seen = torch.cuda.is_available()
        uuid = H.normalize_uuid(torch.cuda.get_device_properties(0).uuid) if seen else "0000"
        for handles, why in [
            ([b"junk"] * 3, "malformed"),
            ([b"junk"], "handles for 1 layers"),
        ]:
            req = lambda r, cid, g, h=handles: P.ExportReq(  # noqa: E731
                r, cid, g, f"cuda:{uuid}", [layer], int(page.ctypes.data), 4, page.shape[1],
                4 * 4096, int(probe.ctypes.data), bytes(probe), h,
            )  # fmt: skip
            eid, _gen, reason, _ = c.export(req)
            assert eid == 0 and (why if seen else "is not visible") in reason, reason
        assert c.export(lambda r, cid, g: P.ExportReq(
            r, cid, g, "cuda:0000", [layer], int(page.ctypes.data), 4, page.shape[1],
            4 * 4096, int(probe.ctypes.data), bytes(probe), [b"junk"] * 3,
        ))[2].startswith("GPU 0000 is not visible")  # fmt: skip
        assert c.stats()["transfers"]["agent"]["exporting_workers"] == 0
    finally:
        c.close()
        agent.stop()


GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU), pytest.param("cuda-expandable", marks=GPU)]


@pytest.mark.parametrize("device", DEVICES)
def test_workers_through_a_real_agent_and_its_restart(tmp_path: Path, device: str) -> None:
    """The connector's agent mode end to end below vLLM, on the CPU mover or the GPU
    mover (the same worker code): one worker's chunks saved by the agent and loaded
    layer by layer into another's cache; then the agent is killed under the exporting
    worker and a new one started: the worker exports again and saves through it."""
    from tests.agent.test_movers import _load, _ops, _save, big_agent_stats
    from tests.conftest import AgentProcess

    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if "expandable" in device else {}
    agent = AgentProcess(tmp_path / "run", cpu_bytes="256MiB", env=env).start()
    try:
        rd = str(agent.runtime_dir)
        src = _caches(device, fill=True)
        w1, p1 = _worker(rd, src)
        _save(p1, _ops(6, 0, tag=3))
        assert w1.stats.save_chunks == 6
        saved = lambda: big_agent_stats(agent)["transfers"]["agent"]["save_chunks"]  # noqa: E731
        _until(lambda: saved() == 6)  # the worker hears "copied" before the loop commits
        dst = {k: torch.zeros_like(v) for k, v in src.items()}
        w2, p2 = _worker(rd, dst)
        assert _load(p2, _ops(6, 32, tag=3)) == set()
        _same_blocks(src, 0, dst, 32, 6 * BPC)
        t = big_agent_stats(agent)["transfers"]["agent"]
        assert t["save_chunks"] == 6 and t["load_chunks"] == 6

        agent.kill()  # under both exporting workers
        agent.start()
        for p in (p1, p2):  # the worker notices the new generation and exports again
            _until(p.ready)
        _save(p1, _ops(2, 8, tag=4))  # exported again to the new generation
        _until(lambda: saved() == 2)
        assert _load(p2, _ops(2, 48, tag=4)) == set()
        _same_blocks(src, 8, dst, 48, 2 * BPC)
        t = big_agent_stats(agent)["transfers"]["agent"]
        assert t["exports"] == 2 and t["save_chunks"] == 2 and t["load_chunks"] == 2, t
        [(name, held)] = t["devices"].items()  # the agent's own memory per device
        if device == "cpu":  # no memory of its own: where its copy threads run
            assert name == "cpu" and set(held) == {"copy_cores_mode", "copy_cores", "copy_threads"}
            assert held["copy_cores_mode"] == "auto" and held["copy_threads"] >= 1
        else:
            assert name.startswith("cuda:") and 0 < held["staging_bytes"] <= held["reserved_bytes"]
    finally:
        agent.stop()


def _caches(device: str, fill: bool) -> dict[str, torch.Tensor]:
    if device == "cpu":  # vLLM's CPU layout: [blocks, heads, tokens, 2 * head]
        shape, dev = (64, 2, 16, 128), "cpu"
    else:  # FlashAttention: [K/V, blocks, tokens, heads, head]
        shape, dev = (2, 64, 16, 4, 64), "cuda"
    return {
        f"model.layers.{i}.self_attn.attn": torch.randn(shape, device=dev).to(torch.bfloat16)
        for i in range(4)
    }


def _same_blocks(
    src: dict[str, torch.Tensor], a: int, dst: dict[str, torch.Tensor], b: int, n: int
) -> None:
    for k, kv in src.items():
        dim = 0 if kv.device.type == "cpu" else 1
        want, got = kv.narrow(dim, a, n), dst[k].narrow(dim, b, n)
        assert torch.equal(want.cpu(), got.cpu()), k


def _until(ready: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():  # each step asks; meanwhile the worker copies itself
        assert time.monotonic() < deadline, "the worker did not export to the new agent"
        time.sleep(0.05)


def _worker(runtime_dir: str, kv: dict[str, torch.Tensor]) -> tuple[object, object]:
    from kvnode.connector.agent_mode import AgentPath
    from kvnode.connector.link import AgentLink, default_client_factory
    from kvnode.connector.worker import WorkerSide
    from kvnode.kernels.hostmem import ArenaMapping

    arena = ArenaMapping()
    factory = default_client_factory(runtime_dir, "mover-test", 5.0, arena.on_map, arena.on_unmap)
    link = AgentLink(factory, background=False)
    assert link.try_connect()
    first = next(iter(kv.values()))
    blocks = first.shape[0] if first.device.type == "cpu" else first.shape[1]
    w = WorkerSide(link, 0, blocks, 16, BPC, arena=arena)
    w.register(kv, None if first.device.type == "cpu" else "FLASH_ATTN")
    path = AgentPath(link, w)
    assert path.ready(), "the agent refused the export"
    return w, path


def test_the_arena_is_registered_once_per_process_on_the_first_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kvnode.agent.movers.gpu import _Registration
    from kvnode.kernels import hostmem

    monkeypatch.setattr(_Registration, "_users", 0)  # whatever earlier tests left
    monkeypatch.setattr(_Registration, "_handle", None)
    calls: list[str] = []
    monkeypatch.setattr(hostmem, "register_host_memory", lambda buf: calls.append("reg") or "h")
    monkeypatch.setattr(hostmem, "unregister_host_memory", lambda h: calls.append(f"unreg {h}"))
    arena = memoryview(bytearray(ARENA_BYTES))
    movers = [make_mover(arena), make_mover(arena)]  # two GPUs' movers
    assert calls == [], "registered on the loop, before any job"
    page = np.zeros((2, PG.slot_bytes(LAYERS)), dtype=np.uint8)
    for i, mover in enumerate(movers):
        src = caches(True)
        ex = export_of(src, 31 + i, page)
        attach(mover, ex, src)
        chunk = ChunkWork(b"k", (1, 2, 3, 4), [(i * ex.chunk_nbytes, ex.chunk_nbytes)], index=0)
        mover.run(Job(ex, False, i, 1, [chunk], bytearray(1), time.monotonic() + 30))
        assert mover.device_stats()["arena_registered"]
    assert calls == ["reg"]
    movers[0].close()
    assert calls == ["reg"], "still used by the other device's mover"
    movers[1].close()
    movers[1].close()  # closing twice releases once
    assert calls == ["reg", "unreg h"]
