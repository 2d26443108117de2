"""Agent mode below vLLM: the CPU mover's pieces, cross-memory attach between real
processes, and a real agent process moving chunks between real worker processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kvnode.agent.movers import cpu
from kvnode.agent.movers.base import MoverError
from kvnode.connector.export import block_parts, forward_order
from tests.conftest import AgentProcess

LAYERS, BLOCKS, HEADS, BLOCK_SIZE, HEAD = 6, 64, 2, 16, 64
BPC = 4  # blocks per chunk


# ---------------------------------------------------------------- pieces
def test_batches_pair_any_pieces_byte_for_byte() -> None:
    rng = random.Random(7)
    for _ in range(50):
        total = rng.randrange(1, 5000)
        local, remote = _split(rng, total, 0), _split(rng, total, 100_000)
        out = list(cpu.batches(local, remote, iov_max=8))
        # Replay on byte arrays: the pairing must send remote byte i to local byte i.
        src = np.arange(200_000, dtype=np.int64)
        dst = np.full(total, -1, dtype=np.int64)
        for loc, rem, n in out:
            assert len(loc) <= 8 and len(rem) <= 8
            assert sum(x for _, x in loc) == sum(x for _, x in rem) == n
            flat = np.concatenate([src[a : a + x] for a, x in rem])
            pos = 0
            for a, x in loc:
                dst[a : a + x] = flat[pos : pos + x]
                pos += x
        want = np.concatenate([src[a : a + x] for a, x in remote])
        assert np.array_equal(dst, want)


def _split(rng: random.Random, total: int, base: int) -> list[tuple[int, int]]:
    pieces, pos, addr = [], 0, base
    while pos < total:
        n = min(total - pos, rng.randrange(1, 300))
        pieces.append((addr if base else pos, n))
        addr += n + rng.choice((0, 0, 17))
        pos += n
    return pieces


def test_batches_refuse_unequal_lengths() -> None:
    with pytest.raises(ValueError):
        list(cpu.batches([(0, 10)], [(0, 12)]))


def test_block_parts_of_vllm_layouts() -> None:
    cpu_cache = torch.zeros(8, 2, 16, 128).view(torch.uint8)  # CPU backend: one piece
    assert block_parts(cpu_cache.numpy()) == (2 * 16 * 128 * 4, [(0, 2 * 16 * 128 * 4)])
    flash = torch.zeros(2, 8, 16, 4, 32)  # [K/V, blocks, ...]: two pieces per block
    blocks = flash.movedim(1, 0).contiguous().view(torch.uint8)  # as physical_blocks sees it
    view = flash.view(torch.uint8).movedim(1, 0).numpy()
    half = 16 * 4 * 32 * 4
    assert block_parts(view) == (half, [(0, half), (8 * half, half)])
    assert blocks.shape[0] == 8


def test_forward_order_sorts_layer_numbers() -> None:
    names = [f"model.layers.{i}.self_attn.attn" for i in (10, 2, 1, 0)]
    assert forward_order(names) == [names[3], names[2], names[1], names[0]]


def test_extent_pieces_map_payload_ranges() -> None:
    out: list[tuple[int, int]] = []
    cpu.extent_pieces(1000, [(0, 100), (500, 100)], 50, 100, out)
    assert out == [(1050, 50), (1500, 50)]
    with pytest.raises(MoverError):
        cpu.extent_pieces(0, [(0, 100)], 50, 100, [])


# ---------------------------------------------------------------- two processes
def _holder(conn: Any) -> None:
    arr = np.arange(1 << 20, dtype=np.uint8)
    conn.send((os.getpid(), int(arr.ctypes.data)))
    conn.recv()  # the parent read and wrote
    conn.send(bytes(arr[:64]))
    conn.recv()


def test_cross_memory_attach_reads_and_writes_another_process() -> None:
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    p = ctx.Process(target=_holder, args=(there,))
    p.start()
    try:
        pid, addr = here.recv()
        got = bytearray(1 << 20)
        local = [(cpu._addr(got), len(got))]
        assert cpu.transfer(pid, local, [(addr, 1 << 20)], write=False) == 1 << 20
        assert bytes(got) == bytes(np.arange(1 << 20, dtype=np.uint8))
        mark = bytearray(b"\xaa" * 64)
        cpu.transfer(pid, [(cpu._addr(mark), 64)], [(addr, 64)], write=True)
        here.send("go")
        assert here.recv() == bytes(mark)
        with pytest.raises(MoverError):  # an unmapped remote range is an error, not a crash
            cpu.transfer(pid, [(cpu._addr(got), 16)], [(8, 16)], write=False)
        here.send("done")
    finally:
        p.join(10)


# ---------------------------------------------------------------- through an agent
def _cache(
    seed: int, blocks: int = BLOCKS, head: int = HEAD, layers: int = LAYERS
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.self_attn.attn": torch.randn(
            blocks, HEADS, BLOCK_SIZE, 2 * head, generator=g
        )
        for i in range(layers)
    }


def _path(
    runtime_dir: str, kv: dict[str, torch.Tensor], transfer_agent: bool = True, wait_s: float = 0
) -> Any:
    """A worker on ``kv`` in agent mode. ``wait_s``: its link reconnects in the
    background, as the connector's does, and may take that long to come up first."""
    from kvnode.connector.agent_mode import AgentPath
    from kvnode.connector.link import AgentLink, default_client_factory
    from kvnode.connector.worker import WorkerSide
    from kvnode.kernels.hostmem import ArenaMapping

    arena = ArenaMapping()
    factory = default_client_factory(runtime_dir, "mover-test", 5.0, arena.on_map, arena.on_unmap)
    if wait_s:
        link = AgentLink(factory, retry_interval_s=0.2, retry_max_s=2.0)
        deadline = time.monotonic() + wait_s
        while not link.up:
            assert time.monotonic() < deadline, "never connected"
            time.sleep(0.02)
    else:
        link = AgentLink(factory, background=False)
        assert link.try_connect()
    blocks = next(iter(kv.values())).shape[0]
    w = WorkerSide(link, 0, blocks, BLOCK_SIZE, BPC, arena=arena)
    w.register(kv)
    return w, AgentPath(link, w)


def _ops(n: int, first_block: int, tag: int = 0) -> dict[str, list[Any]]:
    from kvnode.connector.scheduler import ChunkOp

    return {
        "r": [
            ChunkOp(
                i,
                (bytes([tag, i]) * 8,),
                tuple(range(first_block + BPC * i, first_block + BPC * (i + 1))),
            )
            for i in range(n)
        ]
    }


def _save(path: Any, ops: dict[str, list[Any]]) -> None:
    assert path.ready()
    path.track(ops)
    path.save(ops)
    deadline = time.monotonic() + 30
    while not path.finished(set(ops)):
        assert time.monotonic() < deadline
        time.sleep(0.001)


def _load(path: Any, ops: dict[str, list[Any]]) -> set[int]:
    assert path.ready()
    path.load(ops)
    for name in path.layer_pos:
        path.wait_for_layer(name)
    path.finish_loads()
    return path.take_load_errors()


def test_saved_by_one_process_loaded_by_another_every_byte(big_agent: AgentProcess) -> None:
    rd = str(big_agent.runtime_dir)
    src = _cache(1)
    w1, p1 = _path(rd, src)
    _save(p1, _ops(6, 0))
    assert w1.stats.save_chunks == 6
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    w2, p2 = _path(rd, dst)
    assert _load(p2, _ops(6, 32)) == set()  # into other blocks
    for k in src:
        assert torch.equal(src[k][: 6 * BPC], dst[k][32 : 32 + 6 * BPC]), k
    # The chunk format is the one worker mode uses: a worker-mode load reads them too.
    dst2 = {k: torch.zeros_like(v) for k, v in src.items()}
    w3, _ = _path(rd, dst2)
    w3.load(_ops(6, 8))
    assert w3.take_load_errors() == set()
    for k in src:
        assert torch.equal(src[k][: 6 * BPC], dst2[k][8 : 8 + 6 * BPC]), k
    t = big_agent_stats(big_agent)["transfers"]
    assert t["agent"]["save_chunks"] == 6 and t["agent"]["load_chunks"] == 6
    assert t["worker"]["save_bytes"] == 0


@pytest.mark.parametrize("threads", [1, 3])
def test_many_layers_any_copy_threads_checksums_match_worker_mode(
    tmp_path: Path, threads: int
) -> None:
    """12 layers: the chunk format orders layers by name (1, 10, 11, 2, ...) and the
    agent copies in forward order (0, 1, 2, ...), so each chunk's checksum is fed out
    of copy order; saves split over ``threads`` copying threads. A worker-mode load
    checks every chunk against the agent's checksum: any slip is a load error."""
    agent = AgentProcess(
        tmp_path / "run", cpu_bytes="256MiB", env={"KVNODE_AGENT_CPU_COPY_THREADS": str(threads)}
    ).start()
    try:
        rd = str(agent.runtime_dir)
        src = _cache(9, layers=12)
        _, p1 = _path(rd, src)
        _save(p1, _ops(7, 0, tag=9))  # 7 chunks: uneven runs per thread
        assert p1.stats.save_chunks == 7
        dst = {k: torch.zeros_like(v) for k, v in src.items()}
        w2, _ = _path(rd, dst)
        w2.load(_ops(7, 28, tag=9))
        assert w2.take_load_errors() == set()
        assert w2.stats.checksum_errors == 0
        for k in src:
            assert torch.equal(src[k][: 7 * BPC], dst[k][28 : 28 + 7 * BPC]), k
    finally:
        agent.stop()


@pytest.mark.parametrize("threads", [1, 3])
def test_a_chunk_that_fails_its_checksum_is_never_written_into_the_worker(
    tmp_path: Path, threads: int
) -> None:
    """A chunk whose arena bytes no longer match its checksum is reported bad before
    any layer is announced, and its blocks in the worker keep what they held; the
    chunks before it load (vLLM recomputes from the bad one on), with any number of
    copying threads (the bad chunk in another thread's run than the first)."""
    from kvnode.ipc.client import AgentClient

    agent = AgentProcess(
        tmp_path / "run", cpu_bytes="256MiB", env={"KVNODE_AGENT_CPU_COPY_THREADS": str(threads)}
    ).start()
    try:
        rd = str(agent.runtime_dir)
        src = _cache(11)
        _, p1 = _path(rd, src)
        _save(p1, _ops(6, 0, tag=21))
        bad = _ops(6, 0, tag=21)["r"][4].keys[0]
        c = AgentClient(rd, name="scribbler", timeout_s=5.0, heartbeat=False)
        try:
            [(_, slot)] = c.pin([bad])
            assert slot is not None
            view = c.views(slot)[0]
            view[100] ^= 0xFF  # one byte of layer 0 of chunk 4
            c.release([bad])
        finally:
            c.close()
        dst = {k: torch.full_like(v, 7.0) for k, v in src.items()}
        w2, p2 = _path(rd, dst)
        ops = _ops(6, 32, tag=21)
        errors = _load(p2, ops)
        assert errors == {b for op in ops["r"][4:] for b in op.block_ids}
        for k in src:
            assert torch.equal(src[k][: 4 * BPC], dst[k][32 : 32 + 4 * BPC]), k
            bad_blocks = dst[k][32 + 4 * BPC : 32 + 5 * BPC]
            assert bool((bad_blocks == 7.0).all()), f"{k}: the bad chunk was written"
        # Counted once the loop settles the job, just after the worker was told.
        deadline = time.monotonic() + 5
        while big_agent_stats(agent)["transfers"]["agent"]["checksum_errors"] != 1:
            assert time.monotonic() < deadline, big_agent_stats(agent)["transfers"]["agent"]
            time.sleep(0.01)
    finally:
        agent.stop()


def test_a_save_reported_finished_is_found_by_the_next_lookup(big_agent: AgentProcess) -> None:
    """Once the worker hears its save ended, every process finds the chunks: the agent
    commits a save's entries before it writes the job's outcome into the worker."""
    from kvnode.ipc.client import AgentClient
    from kvnode.ipc.protocol import Lookup

    rd = str(big_agent.runtime_dir)
    _, p1 = _path(rd, _cache(4))
    other = AgentClient(rd, name="other-process", timeout_s=5.0, heartbeat=False)
    try:
        for round_ in range(40):
            ops = _ops(2, 0, tag=100 + round_)
            assert p1.ready()
            p1.track(ops)
            p1.save(ops)
            deadline = time.monotonic() + 30
            while not p1.finished(set(ops)):  # as vLLM's step loop: poll, no sleep
                assert time.monotonic() < deadline
            keys = [op.keys[0] for op in ops["r"]]
            assert other.lookup(keys) == [Lookup.HIT] * len(keys), round_
    finally:
        other.close()


def test_a_missing_chunk_is_a_load_error_from_that_chunk_on(big_agent: AgentProcess) -> None:
    rd = str(big_agent.runtime_dir)
    _, p1 = _path(rd, _cache(2))
    _save(p1, _ops(3, 0, tag=5))
    ops = _ops(4, 16, tag=5)  # the 4th was never saved
    _, p2 = _path(rd, _cache(3))
    errors = _load(p2, ops)
    assert errors == set(ops["r"][3].block_ids)


def big_agent_stats(agent: AgentProcess) -> dict[str, Any]:
    from kvnode.ipc.client import AgentClient

    c = AgentClient(agent.runtime_dir, name="stats", timeout_s=2.0, heartbeat=False)
    try:
        return c.stats()
    finally:
        c.close()


def _dying_worker(runtime_dir: str, load: bool, ready: Any) -> None:
    """Exports a large cache, hands over one big job, and dies without waiting."""
    kv = _cache(4, blocks=512, head=1024)  # 512 KiB blocks: a job of 2 GiB-ish copies
    _, path = _path(runtime_dir, kv)
    assert path.ready()
    ops = _ops(16, 0, tag=9)
    if load:
        path.load(ops)
    else:
        path.track(ops)
        path.save(ops)
    path.link.call(lambda c: c.flush(0.5))  # the job's request has left
    ready.set()
    os._exit(0)


def _after_dying_worker(
    agent: AgentProcess, target: Any, args: tuple[Any, ...], exports_left: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``target(*args, ready)`` in a process that dies after setting ``ready``,
    then wait until the agent holds nothing for it: no job, pin or reservation, and
    ``exports_left`` exporting workers. Returns the agent's stats and its transfers."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=target, args=(*args, ready))
    proc.start()
    proc.join(60)
    assert ready.is_set()
    deadline = time.monotonic() + 20
    while True:
        s = big_agent_stats(agent)
        t = s["transfers"]["agent"]
        idle = t["jobs_inflight"] == 0 and s["arena"]["pinned"] == 0 and s["arena"]["reserved"] == 0
        if idle and t["exporting_workers"] == exports_left:
            return s, t
        assert time.monotonic() < deadline, s
        time.sleep(0.05)


@pytest.mark.parametrize("load", [False, True])
def test_worker_killed_mid_transfer_leaks_nothing(big_agent: AgentProcess, load: bool) -> None:
    rd = str(big_agent.runtime_dir)
    if load:  # the chunks the dying worker will load
        kv = _cache(4, blocks=512, head=1024)
        _, p = _path(rd, kv)
        _save(p, _ops(16, 0, tag=9))
    s, t = _after_dying_worker(big_agent, _dying_worker, (rd, load), 1 if load else 0)
    if not load:  # what was committed was copied whole (checksummed by the agent)
        assert s["arena"]["entries"] == t["save_chunks"]


# ---------------------------------------------------------------- layer-wise saves
def _wait_done(path: Any, rids: set[str], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.finished(rids):
        assert time.monotonic() < deadline, "the save never ended"
        time.sleep(0.001)


def test_a_layerwise_save_copies_each_layer_only_once_it_is_marked_computed(
    big_agent: AgentProcess,
) -> None:
    """The agent gets the save before the forward pass has written the later layers:
    what it stores for layer i is what the cache holds when the worker marks layer i,
    not before; and the job does not end while a layer is unmarked."""
    rd = str(big_agent.runtime_dir)
    kv = _cache(11)
    _, p1 = _path(rd, kv)
    ops = _ops(3, 0, tag=40)
    names = sorted(kv, key=lambda n: p1.layer_pos[n])
    assert p1.ready()
    for name in names[:2]:  # "computed" before the hand-over
        p1.save_layer(name, ops)
    time.sleep(0.2)  # the agent copies layers 0 and 1, then waits for layer 2
    assert not p1.finished(set(ops)) and p1._saves, "ended before every layer was marked"
    for name in names[2:]:  # the forward pass writes the later layers only now
        kv[name].mul_(-1.0).add_(3.0)
        p1.save_layer(name, ops)
        time.sleep(0.02)
    assert p1.end_layers()
    _wait_done(p1, set(ops))
    assert p1.stats.save_chunks == 3 and p1.stats.save_errors == 0
    dst = {k: torch.zeros_like(v) for k, v in kv.items()}
    w2, _ = _path(rd, dst)
    w2.load(_ops(3, 20, tag=40))
    assert w2.take_load_errors() == set()  # the agent's checksum covers what it read
    for k in kv:
        assert torch.equal(kv[k][: 3 * BPC], dst[k][20 : 20 + 3 * BPC]), k


def test_a_parked_layerwise_save_never_holds_up_another_workers_load(
    big_agent: AgentProcess,
) -> None:
    """Worker A's save waits for A's forward pass (no layer marked); worker B's load,
    queued behind it on the same copy thread, is served meanwhile: with tensor
    parallelism A's forward pass may itself wait for B's."""
    rd = str(big_agent.runtime_dir)
    src = _cache(12)
    _, p0 = _path(rd, src)
    _save(p0, _ops(4, 0, tag=50))
    _, pa = _path(rd, _cache(13))
    a_ops = _ops(2, 0, tag=51)
    pa.begin_layers(a_ops)  # nothing marked: parked at layer 0
    assert pa._layer_handed
    pa.link.call(lambda c: c.flush(1.0))
    time.sleep(0.1)
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    _, pb = _path(rd, dst)
    t0 = time.monotonic()
    assert _load(pb, _ops(4, 16, tag=50)) == set()
    assert time.monotonic() - t0 < 10, "the load waited for the parked save"
    for k in src:
        assert torch.equal(src[k][: 4 * BPC], dst[k][16 : 16 + 4 * BPC]), k
    assert not pa.finished(set(a_ops))
    for name in pa.layer_pos:
        pa.save_layer(name, a_ops)
    assert pa.end_layers()
    _wait_done(pa, set(a_ops))
    assert pa.stats.save_chunks == 2


def _parked_worker(runtime_dir: str, ready: Any) -> None:
    """Hands over a layer-wise save, marks one layer, and dies."""
    kv = _cache(14)
    _, path = _path(runtime_dir, kv)
    ops = _ops(3, 0, tag=60)
    path.save_layer(next(iter(path.layer_pos)), ops)
    path.link.call(lambda c: c.flush(0.5))
    ready.set()
    time.sleep(0.3)  # the agent copies layer 0 and parks
    os._exit(0)


def test_a_worker_that_dies_in_its_forward_pass_leaves_no_save_behind(
    big_agent: AgentProcess,
) -> None:
    s, t = _after_dying_worker(big_agent, _parked_worker, (str(big_agent.runtime_dir),), 0)
    assert s["arena"]["entries"] == 0 and t["jobs_failed"] >= 1


def test_an_export_with_a_wrong_probe_is_refused(big_agent: AgentProcess) -> None:
    from kvnode.ipc import protocol as P
    from kvnode.ipc.client import AgentClient

    kv = _cache(5)
    w, path = _path(str(big_agent.runtime_dir), kv)
    from kvnode.connector.export import layer_exports

    c = AgentClient(big_agent.runtime_dir, name="forger", timeout_s=2.0)
    c.connect()
    try:
        layers = layer_exports(w.layers)
        nonce = os.urandom(P.PROBE_BYTES)  # not what the probe buffer holds
        req = lambda r, cid, g: P.ExportReq(  # noqa: E731
            r, cid, g, "cpu", layers, int(path.page.ctypes.data), 4, path.slot_bytes,
            int(w.chunk_nbytes), int(path.probe.ctypes.data), nonce,
        )  # fmt: skip
        eid, _gen, why, _ = c.export(req)
        assert eid == 0 and "probe" in why
        # A job naming another client's export is refused, nothing written.
        assert path.ready()
        bad = lambda r, cid, g: P.JobReq(r, cid, g, path.export_id, True, 0, 1, [], [])  # noqa: E731
        with pytest.raises(Exception, match="no such export"):
            c._call(bad)
        # The export's own client: block ids beyond the cache, lists that disagree and
        # partial saves are refused before anything is pinned, reserved or copied.
        key, eid = bytes(16), path.export_id
        forged = [
            lambda r, cid, g: P.JobReq(r, cid, g, eid, True, 0, 1, [key], [[BLOCKS]]),
            lambda r, cid, g: P.JobReq(r, cid, g, eid, True, 0, 1, [key], [[0], [1]]),
            lambda r, cid, g: P.JobReq(r, cid, g, eid, False, 0, 1, [key], [[0]]),
            lambda r, cid, g: P.JobReq(
                r, cid, g, eid, True, 9999 % P.JOB_SLOTS_MAX, 1, [key], [[0]]
            ),
        ]
        for make in forged:
            with pytest.raises(Exception, match="agent error"):
                path.link.call(lambda cl, m=make: cl._call(m))
        s = big_agent_stats(big_agent)
        assert s["arena"]["pinned"] == 0 and s["arena"]["reserved"] == 0
        assert s["transfers"]["agent"]["jobs"] == 0
    finally:
        c.close()


def test_a_load_of_another_formats_chunk_leaves_it_stored(big_agent: AgentProcess) -> None:
    """A worker whose chunks have another size (another layout, or a client naming
    keys it did not save) gets a miss from that chunk on. The entry stays: an
    ordinary client cannot drop what it did not write, and it is no checksum error."""
    from kvnode.ipc.client import AgentClient

    rd = str(big_agent.runtime_dir)
    src = _cache(12)
    _, p1 = _path(rd, src)
    _save(p1, _ops(4, 0, tag=31))
    other = {k: torch.zeros(BLOCKS, HEADS, BLOCK_SIZE, HEAD) for k in src}  # half the bytes
    w2, p2 = _path(rd, other)
    assert w2.chunk_nbytes != p1.worker.chunk_nbytes
    ops = _ops(4, 8, tag=31)
    assert _load(p2, ops) == {b for op in ops["r"] for b in op.block_ids}
    assert all(bool((t == 0).all()) for t in other.values())
    t = big_agent_stats(big_agent)["transfers"]["agent"]
    assert t["checksum_errors"] == 0 and t["load_wrong_size"] == 4, t
    c = AgentClient(rd, name="look", timeout_s=5.0, heartbeat=False)
    try:
        keys = [op.keys[0] for op in ops["r"]]
        assert list(c.lookup(keys, promote=False)) == [1, 1, 1, 1]  # all still stored
    finally:
        c.close()
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    _, p3 = _path(rd, dst)
    assert _load(p3, _ops(4, 20, tag=31)) == set()
    for k in src:
        assert torch.equal(src[k][: 4 * BPC], dst[k][20 : 20 + 4 * BPC]), k


def test_a_chunk_that_fails_its_checksum_in_the_arena_is_served_again_from_disk(
    tmp_path: Path,
) -> None:
    """The arena copy that fails its checksum is dropped; the disk's copy (checked
    against the same checksum when written) is not: the next lookup promotes it and
    the load gets every byte."""
    from kvnode.ipc.client import AgentClient

    disk = tmp_path / "disk"
    agent = AgentProcess(tmp_path / "run", cpu_bytes="256MiB",
                         env={"KVNODE_DISK_PATH": str(disk)}).start()  # fmt: skip
    try:
        rd = str(agent.runtime_dir)
        src = _cache(13)
        _, p1 = _path(rd, src)
        _save(p1, _ops(3, 0, tag=41))
        keys = [op.keys[0] for op in _ops(3, 0, tag=41)["r"]]
        c = AgentClient(rd, name="scribbler", timeout_s=5.0, heartbeat=False)
        try:
            deadline = time.monotonic() + 20
            while big_agent_stats(agent)["tiers"]["disk"]["entries"] < 3:  # written behind
                assert time.monotonic() < deadline
                time.sleep(0.05)
            [(_, slot)] = c.pin([keys[1]])
            assert slot is not None
            c.views(slot)[0][100] ^= 0xFF
            c.release([keys[1]])
            dst = {k: torch.zeros_like(v) for k, v in src.items()}
            _, p2 = _path(rd, dst)
            ops = _ops(3, 16, tag=41)
            assert _load(p2, ops) == {b for op in ops["r"][1:] for b in op.block_ids}
            assert big_agent_stats(agent)["transfers"]["agent"]["checksum_errors"] == 1
            deadline = time.monotonic() + 20
            while list(c.lookup(keys)) != [1, 1, 1]:  # promoted again from the disk
                assert time.monotonic() < deadline, list(c.lookup(keys, promote=False))
                time.sleep(0.05)
        finally:
            c.close()
        assert _load(p2, ops) == set()
        for k in src:
            assert torch.equal(src[k][: 3 * BPC], dst[k][16 : 16 + 3 * BPC]), k
    finally:
        agent.stop()


def test_parked_saves_of_one_export_cost_one_system_call_a_poll(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that parks hundreds of layer-wise saves (no layer ever marked) makes
    the copy thread read their marks in one call a poll, not one a job; once the
    layers are marked every save ends, its checksum that of the bytes at the time."""
    import ctypes
    import mmap
    import threading

    import xxhash

    from kvnode.agent.movers.base import ChunkWork, CopyThread, Export, Job, Layer
    from kvnode.ipc import progress as PG

    n, nl, bn = 300, 2, 256
    calls = [0]
    real = cpu._vm_fn["process_vm_readv"]

    def counting(*args: Any) -> int:
        calls[0] += 1
        return int(real(*args))

    monkeypatch.setitem(cpu._vm_fn, "process_vm_readv", counting)
    arena = mmap.mmap(-1, n * nl * bn)
    cache = (ctypes.c_char * (nl * bn)).from_buffer(bytearray(os.urandom(nl * bn)))
    page = (ctypes.c_char * (n * PG.slot_bytes(nl))).from_buffer(bytearray(n * PG.slot_bytes(nl)))
    base, progress = ctypes.addressof(cache), ctypes.addressof(page)
    layers = tuple(Layer(f"l{i}", base + i * bn, 1, bn, bn, ((0, bn),), i * bn) for i in range(nl))
    ex = Export(1, 1, "cpu", os.getpid(), layers, progress, n, PG.slot_bytes(nl), nl * bn, 1)
    done: list[Job] = []
    all_done = threading.Event()

    def on_done(job: Job) -> None:
        done.append(job)
        if len(done) == n:
            all_done.set()

    thread = CopyThread(cpu.CpuMover(memoryview(arena), threads=1), on_done)
    try:
        for i in range(n):
            work = [ChunkWork(b"k%d" % i, (0,), [(i * nl * bn, nl * bn)])]
            job = Job(ex, False, i, 7, work, bytearray(1), time.monotonic() + 30, layerwise=True)
            while not thread.submit(job):  # the queue holds 256: the thread parks them
                time.sleep(0.001)
        time.sleep(0.3)  # every job has run once and parked
        assert thread.depth() == n and not done
        before = calls[0]
        time.sleep(0.4)  # the thread polls the parked jobs, backing off up to 20 ms
        polls = calls[0] - before
        assert 1 <= polls < n // 10, f"{polls} cross-memory reads to poll {n} parked saves"
        marks = memoryview(page).cast("B")
        for i in range(n):
            for layer in range(nl):
                marks[i * PG.slot_bytes(nl) + PG.computed_byte(nl, layer)] = 7
        assert all_done.wait(10), f"{len(done)} of {n} saves ended"
    finally:
        thread.close()
    want = xxhash.xxh3_64(bytes(cache)).intdigest() or 1
    assert all(not j.failed and j.chunks[0].checksum == want for j in done)
    assert all(arena[i * nl * bn : (i + 1) * nl * bn] == bytes(cache) for i in range(n))


def test_a_parked_job_is_never_lost_by_a_mover_that_answers_its_poll_short() -> None:
    """A mover whose ``ready_many`` answers for fewer jobs than asked (a bug) must not
    make the copy thread forget the others: every parked job runs again and ends."""
    import threading

    from kvnode.agent.movers.base import CopyThread, Export, Job, Mover

    class Short(Mover):
        device = "cpu"

        def __init__(self) -> None:
            self.runs: dict[int, int] = {}

        def attach(self, export: Export, probe: int, nonce: bytes) -> str:
            return ""

        def run(self, job: Job) -> bool:
            self.runs[job.slot] = self.runs.get(job.slot, 0) + 1
            return self.runs[job.slot] > 1  # parks the first time

        def ready_many(self, jobs: list[Job]) -> list[bool]:
            return [True] * (len(jobs) // 2)

        def report(self, job: Job) -> None:
            return

    ex = Export(1, 1, "cpu", os.getpid(), (), 0, 8, 64, 0, 1)
    done: list[Job] = []
    all_done = threading.Event()

    def on_done(job: Job) -> None:
        done.append(job)
        if len(done) == 6:
            all_done.set()

    thread = CopyThread(Short(), on_done)
    try:
        for slot in range(6):
            thread.submit(Job(ex, False, slot, 1, [], bytearray(), time.monotonic() + 30))
        assert all_done.wait(5), f"{len(done)} of 6 parked jobs ended"
    finally:
        thread.close()
    assert sorted(j.slot for j in done) == list(range(6))


def test_a_copy_never_reaches_a_process_that_took_an_exited_workers_pid() -> None:
    """The worker exits and the kernel gives its pid to another process (of the same
    user) before the agent has noticed: a copy addressed by pid would write the KV
    into that process, or save its memory as KV. Held by pidfd, the export sees its
    worker exited: the load writes nothing (not even a progress byte), the save
    commits nothing. (The other process is stood in for by a live one whose pid the
    export names, beside the pidfd of one that exited.)"""
    import mmap
    import subprocess

    from kvnode.agent.movers.base import ChunkWork, Export, Job, Layer
    from kvnode.agent.movers.process import WorkerProcess
    from kvnode.ipc import progress as PG
    from kvnode.ipc.checksum import checksum_extents

    nl, bn = 2, 256
    gone = subprocess.Popen(["sleep", "0.2"])
    dead_pidfd = os.pidfd_open(gone.pid)
    gone.wait()
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    other = ctx.Process(target=_held_cache, args=(there, nl * bn, PG.slot_bytes(nl), 0x5A))
    other.start()
    try:
        pid, base, page = here.recv()
        here.send("bytes?")
        before = here.recv()
        arena = mmap.mmap(-1, nl * bn)
        arena[:] = os.urandom(nl * bn)
        extents = [(0, nl * bn)]
        layers = tuple(
            Layer(f"l{i}", base + i * bn, 1, bn, bn, ((0, bn),), i * bn) for i in range(nl)
        )
        ex = Export(1, 1, "cpu", pid, layers, page, 1, PG.slot_bytes(nl), nl * bn, 1,
                    proc=WorkerProcess(pid, dead_pidfd))  # fmt: skip
        mover = cpu.CpuMover(memoryview(arena), threads=2)
        try:
            load = Job(ex, True, 0, 1, [ChunkWork(b"k", (0,), extents, 0,
                       checksum_extents(memoryview(arena), extents))], bytearray(1),
                       time.monotonic() + 30)  # fmt: skip
            assert mover.run(load) and load.failed
            assert "exited" in load.failed, load.failed
            mover.report(load)
            save = Job(ex, False, 0, 2, [ChunkWork(b"s", (0,), extents)], bytearray(1),
                       time.monotonic() + 30)  # fmt: skip
            assert mover.run(save) and save.failed
            assert save.chunks[0].status == PG.CHUNK_FAILED
        finally:
            mover.close()
            ex.proc.close()  # type: ignore[union-attr]
        here.send("bytes?")
        assert here.recv() == before  # neither the cache nor the progress page touched
        here.send("done")
    finally:
        other.join(10)


def test_the_agent_wakes_a_waiting_worker_instead_of_its_timer(
    big_agent: AgentProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker waiting for its load's layers sleeps in poll on its wake socket, on
    which the agent (holding its other end through pidfd_getfd) sends a byte after
    each progress write: no timer sleep at all, and about one wake-up per layer,
    where the timer's backoff woke it many times a layer (and late by up to its step)."""
    import threading

    from kvnode.connector import agent_mode

    sleeps = [0]
    real_sleep = time.sleep

    def counted_sleep(s: float) -> None:
        if threading.current_thread() is threading.main_thread():
            sleeps[0] += 1
        real_sleep(s)

    rd = str(big_agent.runtime_dir)
    src = _cache(11)
    _w, saver = _path(rd, src)
    assert saver.ready() and saver._wakes, "the agent does not hold the worker's wake socket"
    _save(saver, _ops(4, 0, tag=11))
    dst = {k: v.clone().zero_() for k, v in src.items()}
    _w2, loader = _path(rd, dst)
    assert loader.ready() and loader._wakes
    selects = [0]
    real_readable = agent_mode._readable

    def counted_readable(*a: Any) -> Any:
        selects[0] += 1
        return real_readable(*a)

    monkeypatch.setattr(agent_mode.time, "sleep", counted_sleep)
    monkeypatch.setattr(agent_mode, "_readable", counted_readable)
    assert _load(loader, _ops(4, 16, tag=11)) == set()
    monkeypatch.undo()
    assert all(torch.equal(dst[k][16:32], src[k][:16]) for k in src)
    assert sleeps[0] == 0, f"{sleeps[0]} timer sleeps"
    assert selects[0] <= 3 * LAYERS + 4, f"{selects[0]} wake-ups for {LAYERS} layers"
    assert _woken(big_agent, loader) == [True]


def test_a_wake_descriptor_that_is_no_wake_socket_is_never_written(
    big_agent: AgentProcess, tmp_path: Path
) -> None:
    """A client may name any of its descriptors as its wake socket: a full pipe (a
    write would block the copy thread), a file (a write would change it), an
    eventfd, its agent connection, a datagram socket connected to a logger (the agent
    would speak to it as itself), one it does not have. The agent keeps only a
    datagram socket pair its worker made: each export is taken (the worker then
    polls on a timer), nothing is written anywhere, and jobs run."""
    import socket

    from kvnode.connector.export import layer_exports
    from kvnode.ipc import protocol as P

    rd = str(big_agent.runtime_dir)
    w, path = _path(rd, _cache(21))
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    try:
        while True:
            os.write(wfd, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(wfd, True)
    f = open(tmp_path / "wake-file", "w+b")  # noqa: SIM115
    f.write(b"unchanged")
    f.flush()
    logger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    logger.bind(str(tmp_path / "log.sock"))
    logger.setblocking(False)
    to_logger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    to_logger.connect(str(tmp_path / "log.sock"))
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    conn_fd = path.link.call(lambda c: c._sock.getsockopt(__import__("zmq").FD))
    fds = (wfd, f.fileno(), efd, conn_fd, to_logger.fileno(), logger.fileno(), 1 << 20, -1)
    try:
        for i, fd in enumerate(fds):
            nonce = os.urandom(P.PROBE_BYTES)
            path.probe[:] = np.frombuffer(nonce, dtype=np.uint8)
            req = lambda r, cid, g, fd=fd, nonce=nonce: P.ExportReq(  # noqa: E731
                r, cid, g, "cpu", layer_exports(w.layers), int(path.page.ctypes.data),
                path.slots, path.slot_bytes, int(w.chunk_nbytes), int(path.probe.ctypes.data),
                nonce, [], fd,
            )  # fmt: skip
            eid, _gen, why, wakes = path.link.call(lambda c, m=req: c.export(m))
            assert eid and not why and not wakes, (fd, why, wakes)
            path.export_id = eid
            # Moves bytes through this export: a chunk of its own (a tag made from
            # the fd collided when two fds were equal mod 251, so one save was EXISTS).
            _save(path, _ops(1, 0, tag=230 + i))
        f.seek(0)
        assert f.read() == b"unchanged"
        assert len(os.read(rfd, 1 << 20)) > 0  # only our bytes in the pipe
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)  # never added to
        with pytest.raises(BlockingIOError):
            logger.recv(64)  # the logger heard nothing
        assert _woken(big_agent, path) == [False] * 4  # stats say they poll (4 a client)
        assert big_agent_stats(big_agent)["transfers"]["agent"]["exports_polling"] >= 4
    finally:
        for x in (f, logger, to_logger):
            x.close()
        for fd in (rfd, wfd, efd):
            os.close(fd)
    t = big_agent_stats(big_agent)["transfers"]["agent"]
    assert t["save_chunks"] >= len(fds), t


def test_a_worker_that_never_reads_its_wake_socket_never_blocks_the_copy_thread(
    big_agent: AgentProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that makes its wake socket blocking again (the file's flags are
    shared with the agent's descriptor) and never reads it: once its queue is full a
    plain send would block the copy thread forever, and every worker's jobs with it.
    The agent sends with MSG_DONTWAIT: the load ends, and so does another worker's."""
    import socket

    from kvnode.connector import agent_mode

    rd = str(big_agent.runtime_dir)
    src, dst, loader = _saved_then_loader(rd, 22, 22)
    end = loader._wake_end
    try:
        while True:  # the queue full, as if the worker had read no wake-up in a while
            end.send(b"\x01", socket.MSG_DONTWAIT)
    except BlockingIOError:
        pass
    end.setblocking(True)
    monkeypatch.setattr(agent_mode, "_drain", lambda sock: None)  # never reads
    assert _load(loader, _ops(2, 16, tag=22)) == set()
    monkeypatch.undo()
    assert all(torch.equal(dst[k][16:24], src[k][:8]) for k in src)
    other = {k: v.clone().zero_() for k, v in src.items()}
    _w3, third = _path(rd, other)
    t0 = time.monotonic()
    assert _load(third, _ops(2, 16, tag=22)) == set()
    assert time.monotonic() - t0 < 10
    assert all(torch.equal(other[k][16:24], src[k][:8]) for k in src)


def _high_fd(fd: int, at: int) -> int:
    """``fd`` again as descriptor ``at`` (past select's FD_SETSIZE of 1,024)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= at:
        if hard != resource.RLIM_INFINITY and hard <= at:
            pytest.skip(f"descriptor limit {hard} leaves no room for descriptor {at}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (at + 64, hard))
    return os.dup2(fd, at)


def test_descriptors_past_1024_are_watched_by_the_agent_and_the_worker(
    big_agent: AgentProcess,
) -> None:
    """An agent serving many clients holds more than 1,024 descriptors (it raises its
    limit to 65,536), and so may a vLLM process: select() refuses a descriptor past
    1,024 (ValueError), so a pidfd or a wake socket up there must still be watched.
    The agent's side: an export's pidfd; the worker's: its wake socket and the
    agent's pidfd, through a whole load."""
    import socket
    import subprocess

    from kvnode.agent.movers.process import WorkerProcess

    gone = subprocess.Popen(["sleep", "0.2"])
    pidfd = os.pidfd_open(gone.pid)
    high = _high_fd(pidfd, 1500)
    os.close(pidfd)
    proc = WorkerProcess(gone.pid, high)
    try:
        assert not proc.exited()
        gone.wait()
        assert proc.exited()
    finally:
        proc.close()

    rd = str(big_agent.runtime_dir)
    src, dst, loader = _saved_then_loader(rd, 23, 23)
    wake = loader._wake
    loader._wake = socket.socket(fileno=_high_fd(wake.fileno(), 1501))
    wake.close()
    old = loader._agent_pidfd
    loader._agent_pidfd = _high_fd(old, 1502)
    os.close(old)
    assert _load(loader, _ops(2, 16, tag=23)) == set()
    assert all(torch.equal(dst[k][16:24], src[k][:8]) for k in src)
    assert not loader._agent_gone()


def _woken(agent: AgentProcess, path: Any) -> list[bool]:
    """``woken`` of each export of ``path``'s client, from the agent's stats."""
    cid = f"{path.link.call(lambda c: c.client_id):x}"
    workers = big_agent_stats(agent)["transfers"]["agent"]["workers"]
    return [w["woken"] for w in workers if w["client"] == cid]


def _saved_then_loader(rd: str, seed: int, tag: int) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """A worker saves 2 chunks (blocks 0-7) of a cache seeded ``seed``; another
    exports an empty cache and is ready to load them (into blocks 16-23): (the
    source cache, the loader's cache, the loader's path)."""
    src = _cache(seed)
    _w, saver = _path(rd, src)
    _save(saver, _ops(2, 0, tag=tag))
    dst = {k: v.clone().zero_() for k, v in src.items()}
    _w2, loader = _path(rd, dst)
    assert loader.ready() and loader._wakes
    return src, dst, loader


def test_the_collapse_knows_while_the_agent_copies_for_its_worker(
    big_agent: AgentProcess,
) -> None:
    """What the huge-page collapse yields to (connector/hugepages.py): a job of this
    worker handed over and not reported done. A layer-wise save parked for its
    layers counts; once its layers are marked and the agent reports it, none does."""
    _w, path = _path(str(big_agent.runtime_dir), _cache(24))
    assert path.ready() and not path.copying()
    assert path.hugepages is not None and path.hugepages._busy == path.copying
    ops = _ops(2, 0, tag=24)
    path.begin_layers(ops)  # the step's saves go over at its first layer
    assert path._saves and path.copying()
    assert path.end_layers()  # wait_for_save: every layer marked
    deadline = time.monotonic() + 10
    while path.copying():
        assert time.monotonic() < deadline, "the save never ended"
        time.sleep(0.005)
    assert path.finished(set(ops)) == set(ops)


# ---------------------------------------------------------------- agent restarts
def _round_ops(r: int, first_block: int) -> dict[str, list[Any]]:
    """Round ``r``'s 4 chunks: keys of their own for every round."""
    from kvnode.connector.scheduler import ChunkOp

    return {
        "r": [
            ChunkOp(i, (r.to_bytes(4, "little") + bytes([i]) * 12,),
                    tuple(range(first_block + BPC * i, first_block + BPC * (i + 1))))
            for i in range(4)
        ]
    }  # fmt: skip


def _path_once_up(rd: str, kv: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    """``_path`` while the agent is restarted under us: its link reconnects in the
    background after every agent it loses, as the connector's does (a call in flight
    when the agent is killed takes the link down)."""
    return _path(rd, kv, wait_s=60)


def _restart_saver(rd: str, stop: Any, saved: Any) -> None:
    """Saves round after round (round r: the contents of seed r, keys tagged r) while
    the agent is killed and started again under it."""
    kv = _cache(0)
    w, p = _path_once_up(rd, kv)
    assert p.stats is w.stats
    r = 0
    while not stop.is_set():
        if not p.ready():
            time.sleep(0.05)
            continue
        r += 1
        for k, t in _cache(r).items():
            kv[k].copy_(t)
        ops = _round_ops(r, 0)
        before = p.stats.save_chunks  # the worker's figures (one object with w.stats)
        p.track(ops)
        p.save(ops)
        deadline = time.monotonic() + 40
        while not p.finished(set(ops)):
            assert time.monotonic() < deadline, "a save never ended"
            time.sleep(0.002)
        if p.stats.save_chunks - before == 4:
            saved.append(r)


def _restart_loader(rd: str, stop: Any, quiet: Any, saved: Any, out: Any, wholes: Any) -> None:
    """Loads saved rounds into other blocks and checks every chunk before the first
    reported error against what was saved; counts wrong chunks, the slowest load, and
    whole loads once the agent stays up (``quiet``)."""
    want_cache: dict[int, dict[str, torch.Tensor]] = {}
    dst = {k: torch.zeros_like(v) for k, v in _cache(0).items()}
    _, p = _path_once_up(rd, dst)
    wrong = whole = loads = 0
    slowest = 0.0
    while not stop.is_set():
        if not len(saved) or not p.ready():
            time.sleep(0.05)
            continue
        # Once the agent stays up, the latest round (saved to it, before long).
        r = saved[-1] if quiet.is_set() else random.choice(list(saved))
        for t in dst.values():
            t.fill_(7.0)
        ops = _round_ops(r, 16)
        t0 = time.monotonic()
        p.load(ops)
        for name in p.layer_pos:
            p.wait_for_layer(name)
        p.finish_loads()
        errors = p.take_load_errors()
        slowest = max(slowest, time.monotonic() - t0)
        want = want_cache.setdefault(r, _cache(r))
        first_bad = min([i for i, op in enumerate(ops["r"]) if set(op.block_ids) & errors],
                        default=len(ops["r"]))  # fmt: skip
        for k in dst:
            for i in range(first_bad):
                got = dst[k][16 + BPC * i : 16 + BPC * (i + 1)]
                wrong += not torch.equal(got, want[k][BPC * i : BPC * (i + 1)])
        loads += 1
        if quiet.is_set() and not errors:
            whole += 1
            wholes.value = whole
    out.put((loads, wrong, whole, slowest))


def test_agent_restarts_under_exporting_workers_never_deliver_wrong_bytes(tmp_path: Path) -> None:
    """The agent is killed (SIGKILL or SIGTERM) and started again every 0.8-2 s,
    under a worker saving and another loading in agent mode. Every chunk a load does
    not report failed holds exactly what was saved; no save or load waits for a job
    the dead agent took; once the agent stays up the workers export to it again and
    loads are whole."""
    import signal

    rd = tmp_path / "run"
    agent = AgentProcess(rd, cpu_bytes="256MiB").start()
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    saved = manager.list()
    stop, quiet, out, wholes = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Value("i", 0)
    saver = ctx.Process(target=_restart_saver, args=(str(rd), stop, saved))
    loader = ctx.Process(target=_restart_loader, args=(str(rd), stop, quiet, saved, out, wholes))
    saver.start()
    loader.start()
    rng = random.Random(5)
    try:
        end = time.monotonic() + 14
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.8, 2.0))
            agent.stop(rng.choice([signal.SIGKILL, signal.SIGTERM]))
            agent = AgentProcess(rd, cpu_bytes="256MiB").start(timeout_s=40)
        quiet.set()
        deadline = time.monotonic() + 30
        n = len(saved)
        while len(saved) < n + 2:  # rounds saved to the agent that stays up
            assert time.monotonic() < deadline, "no save since the last restart"
            time.sleep(0.1)
        # The workers' links come back on their own backoff (up to 10 s after many
        # failures): give the loader that long to load whole, not a fixed time.
        deadline = time.monotonic() + 30
        while wholes.value == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        loads, wrong, whole, slowest = out.get(timeout=60)
        saver.join(60)
        loader.join(60)
        assert saver.exitcode == 0 and loader.exitcode == 0
    finally:
        stop.set()
        for proc in (saver, loader):
            if proc.is_alive():
                proc.kill()
        manager.shutdown()
        agent.stop()
    assert wrong == 0, f"{wrong} chunks held other bytes than were saved"
    assert loads > 0 and whole > 0, (loads, whole)
    assert slowest < 5.0, f"a load took {slowest:.1f} s"  # never a dead agent's timeout


def _dropped_worker(rd: str, conn: Any) -> None:
    """A worker whose client the agent drops while it lives (the test stops it past
    the agent's heartbeat timeout) with a layer-wise save parked at the agent: how
    long the save takes to end once it runs again, and whether it saves through the
    agent again afterwards (within 20 s)."""
    kv = _cache(3)
    w, p = _path(rd, kv, wait_s=20)  # a background link: registers again, as the connector's
    _save(p, _ops(2, 0))
    assert w.stats.save_chunks == 2
    ops = _ops(2, 16, tag=9)
    assert p.ready()
    p.track(ops)
    p.save(ops, layerwise=True)  # parked at the agent: no layer is ever marked computed
    conn.send("parked")
    conn.recv()  # stopped and continued in between
    t0 = time.monotonic()
    while not p.finished(set(ops)) and time.monotonic() - t0 < 40:
        time.sleep(0.01)
    ended_s = time.monotonic() - t0
    saved_again = False
    deadline = time.monotonic() + 20
    tag = 20
    while not saved_again and time.monotonic() < deadline:
        before = w.stats.save_chunks
        if p.ready():
            tag += 1
            ops = _ops(2, 32, tag=tag)
            p.track(ops)
            p.save(ops)
            while not p.finished(set(ops)) and time.monotonic() < deadline:
                time.sleep(0.005)
            saved_again = w.stats.save_chunks - before == 2
        time.sleep(0.1)
    conn.send((ended_s, saved_again))


def test_a_worker_dropped_while_it_lives_is_told_and_exports_again(tmp_path: Path) -> None:
    """The agent drops a live worker's client (the worker is stopped past the agent's
    heartbeat timeout; a connection reset does the same) while a layer-wise save of it
    is parked. The save ends (failed) as soon as the worker runs again, not at its
    35 s deadline: the agent still tells a live worker how its jobs ended. Then the
    worker, registered again with the same agent, exports again and saves through it.
    Both failed before: the save waited out its deadline (a restart test caught a
    load waiting so: 'a load took 35.0 s'), and every later job went to the dropped
    export and failed ('no such export for this client') until the agent restarted."""
    import signal

    env = {"KVNODE_AGENT_HEARTBEAT_INTERVAL_S": "0.5", "KVNODE_AGENT_HEARTBEAT_TIMEOUT_S": "1.5"}
    agent = AgentProcess(tmp_path / "run", cpu_bytes="256MiB", env=env).start()
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    worker = ctx.Process(target=_dropped_worker, args=(str(agent.runtime_dir), there))
    worker.start()
    try:
        assert here.poll(60) and here.recv() == "parked"
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 20
            while "no request or heartbeat" not in agent.log_path.read_text():
                assert time.monotonic() < deadline, "the agent never dropped the silent worker"
                time.sleep(0.1)
            time.sleep(0.5)  # the parked save fails at the agent, which tells the worker
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        here.send("go")
        assert here.poll(90)
        ended_s, saved_again = here.recv()
        worker.join(30)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
        agent.stop()
    assert ended_s < 5.0, f"the dropped export's save ended after {ended_s:.1f} s"
    assert saved_again, "the worker never saved through the agent again"


def _held_cache(conn: Any, nbytes: int, page_bytes: int, fill: int = 0) -> None:
    """A process holding a 'cache' of ``nbytes`` (every byte ``fill``) and a progress
    page: it sends their addresses, then their bytes whenever asked."""
    cache = np.full(nbytes, fill, dtype=np.uint8)
    page = np.zeros(page_bytes, dtype=np.uint8)
    conn.send((os.getpid(), int(cache.ctypes.data), int(page.ctypes.data)))
    while conn.recv() == "bytes?":
        conn.send((bytes(cache), bytes(page)))


def test_a_stalled_copy_thread_holds_up_only_the_unit_it_has(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A copy thread the kernel stops (another process took its core) in the middle of
    a load: the other thread takes every unit left, so the stalled one has written
    one share of one layer when it comes back, not a fixed half of the job. The
    verdicts still go out before any layer byte, each layer's progress byte after all
    of that layer's bytes, and every byte lands where it belongs."""
    import mmap
    import threading

    from kvnode.agent.movers.base import ChunkWork, Export, Job, Layer
    from kvnode.ipc import progress as PG
    from kvnode.ipc.checksum import checksum_extents

    nl, nc, bn = 4, 8, 4096  # layers, chunks (one block each), block bytes
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    holder = ctx.Process(target=_held_cache, args=(there, nl * nc * bn, PG.slot_bytes(nl)))
    holder.start()
    log: list[tuple[int, int, bool]] = []  # (thread, first remote address, write)
    stalled: list[int] = []
    real = cpu.transfer

    def watched(pid: int, local: Any, remote: Any, write: bool) -> int:
        me = threading.get_ident()
        data = write and base <= remote[0][0] < base + nl * nc * bn
        if data and not stalled:
            stalled.append(me)
            # Preempted with a share in hand, until the other thread has written every
            # other share (bounded: with fixed halves it never does).
            until = time.monotonic() + 10
            while (
                time.monotonic() < until
                and sum(1 for t, a, w in log if w and t != me and base <= a < base + nl * nc * bn)
                < 2 * nl - 1
            ):
                time.sleep(0.01)
        log.append((me, remote[0][0], write))
        return real(pid, local, remote, write)

    try:
        pid, base, page = here.recv()
        arena = mmap.mmap(-1, nc * nl * bn)
        arena[:] = os.urandom(nc * nl * bn)
        view = memoryview(arena)
        layers = tuple(
            Layer(f"l{i}", base + i * nc * bn, nc, bn, bn, ((0, bn),), i * bn) for i in range(nl)
        )
        ex = Export(1, 1, "cpu", pid, layers, page, 1, PG.slot_bytes(nl), nl * bn, 1)
        chunks = []
        for c in range(nc):
            extents = [(c * nl * bn, nl * bn)]
            chunks.append(
                ChunkWork(b"%d" % c, (c,), extents, 0, checksum_extents(view, extents), c)
            )
        mover = cpu.CpuMover(view, threads=2)
        monkeypatch.setattr(cpu, "transfer", watched)
        try:
            job = Job(ex, True, 0, 1, chunks, bytearray(nc), time.monotonic() + 30)
            assert mover.run(job) and not job.failed, job.failed
            assert all(c.status == PG.CHUNK_OK for c in chunks)
        finally:
            mover.close()
        here.send("bytes?")
        cache, progress = here.recv()
        here.send("done")
    finally:
        holder.join(10)
    for i in range(nl):  # every block holds its chunk's part of that layer
        for c in range(nc):
            at = (i * nc + c) * bn
            assert cache[at : at + bn] == arena[c * nl * bn + i * bn : c * nl * bn + (i + 1) * bn]
    assert progress[PG.layer_byte(0) : PG.layer_byte(0) + nl] == bytes([1]) * nl
    data = [(t, a) for t, a, w in log if w and base <= a < base + nl * nc * bn]
    assert len(data) == 2 * nl, data  # two shares a layer
    assert sum(1 for t, _ in data if t == stalled[0]) == 1, "the stalled thread kept a share"
    writes = [(a, k) for k, (_, a, w) in enumerate(log) if w]
    verdicts = next(k for a, k in writes if a == page + PG.chunk_byte(nl, 0))
    assert all(k > verdicts for a, k in writes if base <= a < base + nl * nc * bn)
    for i in range(nl):
        mark = next(k for a, k in writes if a == page + PG.layer_byte(i))
        lo, hi = base + i * nc * bn, base + (i + 1) * nc * bn
        assert all(k < mark for a, k in writes if lo <= a < hi), f"layer {i} marked early"


def test_a_worker_exports_to_a_restarted_agent_before_any_call_has_failed(tmp_path: Path) -> None:
    """The agent is killed and started again while the worker makes no call: the next
    step's export goes to the new agent at once. (The worker's client still held the
    dead agent's Welcome: the export asked for that agent's pid, found it gone and fell
    back to worker mode, step after step, until some other call happened to fail.)"""
    import signal

    rd = tmp_path / "run"
    agent = AgentProcess(rd, cpu_bytes="64MiB").start()
    try:
        _, p = _path(str(rd), _cache(3))
        assert p.ready()
        first = p.generation
        agent.stop(signal.SIGKILL)
        agent = AgentProcess(rd, cpu_bytes="64MiB").start()
        steps = 0
        while not p.ready():
            steps += 1
            assert steps < 3, "the worker copies itself while the new agent is up"
            time.sleep(0.05)
        assert p.generation != first
        _save(p, _ops(2, 0, tag=3))
        assert p.stats.save_chunks == 2
    finally:
        agent.stop()


# ---------------------------------------------------------------- deadlines
def test_the_agent_keeps_the_deadline_its_worker_sends(big_agent: AgentProcess) -> None:
    """A job carries its worker's deadline (the worker gives the job up a margin past
    it). One that reaches the agent past it is refused as late and moves nothing; a
    layer-wise save parked for layers never marked ends, failed and unreported (the
    agent writes nothing into a worker past the deadline), at that deadline, not the
    agent's own 30 s after it took the job."""
    from kvnode.errors import KVNodeError
    from kvnode.ipc import progress as PG
    from kvnode.ipc import protocol as P

    rd = str(big_agent.runtime_dir)
    w, path = _path(rd, _cache(31))
    assert path.ready()
    eid, keys, blocks = path.export_id, [os.urandom(16)], [[0, 1, 2, 3]]

    def save(slot: int, deadline_ns: int) -> Any:
        path.page[slot] = 0
        make = lambda r, c, g: P.JobReq(  # noqa: E731
            r, c, g, eid, False, slot, 1, keys, blocks, layerwise=True, deadline_ns=deadline_ns
        )
        try:
            return path.link.call(lambda c: c._call(make, timeout_s=10.0, retry=False))
        except KVNodeError as exc:
            return exc

    late = save(1, time.monotonic_ns() - 1)
    assert isinstance(late, KVNodeError) and "past its deadline" in str(late), late
    t = big_agent_stats(big_agent)["transfers"]["agent"]
    assert t["jobs"] == 0 and t["jobs_refused"] == 1, t
    t0 = time.monotonic()
    assert isinstance(save(2, time.monotonic_ns() + 500_000_000), P.StatusRep)
    while True:  # settled: failed, its reservation let go (past the deadline, untold)
        s = big_agent_stats(big_agent)
        if s["transfers"]["agent"]["jobs_inflight"] == 0:
            break
        assert time.monotonic() - t0 < 10, "the parked save outlived its worker's deadline"
        time.sleep(0.02)
    assert time.monotonic() - t0 >= 0.5
    assert s["transfers"]["agent"]["jobs_failed"] == 1 and s["arena"]["reserved"] == 0, s
    assert path.page[2, PG.DONE] == 0  # nothing written into the worker past the deadline


def test_a_load_its_worker_gave_up_is_never_written_by_an_agent_that_stalled(
    big_agent: AgentProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's loop stalls (SIGSTOP) past the worker's deadline plus its margin
    with a load in its socket: the worker gives the load up (vLLM recomputes the
    blocks), and the agent, once it runs again, writes nothing into those blocks or
    into the job's slot. It counted its 30 s from when it read the job, and wrote
    into blocks already recomputed."""
    import signal
    import threading

    from kvnode.connector import agent_mode
    from kvnode.ipc import progress as PG

    monkeypatch.setattr(agent_mode, "JOB_DEADLINE_S", 1.5)
    monkeypatch.setattr(agent_mode, "DEADLINE_MARGIN_S", 0.5)
    rd = str(big_agent.runtime_dir)
    src, dst, loader = _saved_then_loader(rd, 32, tag=32)
    assert big_agent.proc is not None
    pid = big_agent.proc.pid
    os.kill(pid, signal.SIGSTOP)
    resume = threading.Timer(3.5, lambda: os.kill(pid, signal.SIGCONT))
    try:
        loader.load(_ops(2, 16, tag=32))
        job = loader._loads[0]
        resume.start()
        loader.finish_loads()  # gives up at its deadline plus margin, 2 s in
        assert loader.take_load_errors() == set(range(16, 24))
        for t in dst.values():  # what vLLM recomputes into them
            t[16:24].fill_(7.0)
        resume.join()
        time.sleep(2.0)  # the agent reads the job now
    finally:
        resume.cancel()
        os.kill(pid, signal.SIGCONT)
    for t in dst.values():
        assert bool((t[16:24] == 7.0).all()), "the agent wrote into blocks given up"
    assert loader.page[job.slot, PG.DONE] != job.seq
    monkeypatch.undo()
    assert _load(loader, _ops(2, 16, tag=32)) == set()  # and it serves on
    for k in src:
        assert torch.equal(dst[k][16:24], src[k][0:8])


def test_a_save_whose_reply_was_lost_is_not_finished_before_the_agent_says(
    big_agent: AgentProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link goes down (as when the scheduler side lost the agent) with a save's
    reply unread while the agent's loop is stalled. No reply is not a refusal: the
    agent may have queued the job, so its request stays unfinished (vLLM keeps the
    blocks) until the agent reports it or its deadline passes. It was finished at
    once, and the agent then read blocks vLLM had freed."""
    import signal

    from kvnode.connector import agent_mode

    monkeypatch.setattr(agent_mode, "JOB_DEADLINE_S", 3.0)
    monkeypatch.setattr(agent_mode, "DEADLINE_MARGIN_S", 0.5)
    rd = str(big_agent.runtime_dir)
    _w, path = _path(rd, _cache(33))
    assert path.ready()
    assert big_agent.proc is not None
    pid = big_agent.proc.pid
    ops = _ops(2, 0, tag=33)
    os.kill(pid, signal.SIGSTOP)
    try:
        path.track(ops)
        path.save(ops)
        time.sleep(0.2)  # the request has left the worker
        path.link.mark_down("the scheduler side lost the agent")  # its reply is lost
        assert path.finished(set(ops)) == set()
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while path.finished(set(ops)) != set(ops):
        assert time.monotonic() < deadline, "the save never ended"
        time.sleep(0.01)


def test_a_refused_load_ends_when_its_step_finishes_without_layer_waits(
    big_agent: AgentProcess,
) -> None:
    """A load the agent refuses ends at once in ``finish_loads`` even when no layer
    was waited for first: the refusal is matched to the step's loads while they are
    waited for. It was dropped, and the load waited out its 35 s deadline."""
    rd = str(big_agent.runtime_dir)
    _w, path = _path(rd, _cache(34))
    assert path.ready()
    path.export_id += 1000  # an export the agent does not hold: the job is refused
    ops = _ops(2, 0, tag=34)
    t0 = time.monotonic()
    path.load(ops)
    path.finish_loads()
    assert time.monotonic() - t0 < 5.0, "the refused load waited for its deadline"
    assert path.take_load_errors() == {b for op in ops["r"] for b in op.block_ids}


def test_jobs_end_when_their_agent_exits_just_before_the_export_again(tmp_path: Path) -> None:
    """The agent exits after the worker's step looked (its registration seemed
    current) and before it exported again: the export goes to the agent that serves
    now, and the jobs of the one that exited end then, failed, not at their deadline
    (they waited 35 s once the old agent's pidfd was given up)."""
    import signal

    rd = tmp_path / "run"
    agent = AgentProcess(rd, cpu_bytes="256MiB").start()
    try:
        _w, path = _path(str(rd), _cache(35), wait_s=30)
        assert path.ready()
        ops = _ops(1, 0, tag=35)
        path.begin_layers(ops)  # a layer-wise save the agent parks for its layers
        assert path._layer_handed and path._saves
        agent.stop(signal.SIGKILL)
        agent = AgentProcess(rd, cpu_bytes="256MiB").start()
        path._registered_again()  # as ``ready`` does when the registration seemed current
        assert path.link.call(path._export), "no export to the new agent"
        t0 = time.monotonic()
        while path.finished(set(ops)) != set(ops):
            assert time.monotonic() - t0 < 5.0, "the dead agent's save waited for its deadline"
            time.sleep(0.01)
        path.end_layers()
    finally:
        agent.stop()


_OTHER_CLOCK_WORKER = """
import sys
from tests.agent.test_movers import _cache, _path
w, path = _path(sys.argv[1], _cache(36))
print("ready" if path.ready() else "refused: " + str(path._refused))
"""


def test_a_worker_on_another_clock_is_refused_agent_mode(big_agent: AgentProcess) -> None:
    """A worker in a time namespace of its own (its CLOCK_MONOTONIC 1000 s ahead)
    sends deadlines the agent cannot read: its export is refused, with the reason,
    and it copies itself. One on the agent's clock is taken."""
    import shutil
    import subprocess
    import sys

    from kvnode.agent.movers.service import same_clock

    assert same_clock(os.getpid()) and not same_clock(0x7FFFFFF0)
    unshare = shutil.which("unshare")
    probe = subprocess.run(
        [unshare or "unshare", "--time", "--fork", "--monotonic", "1000", "true"],
        capture_output=True,
    )
    if unshare is None or probe.returncode != 0:
        pytest.skip(f"cannot make a time namespace here: {probe.stderr.decode().strip()}")
    cmd = [sys.executable, "-c", _OTHER_CLOCK_WORKER, str(big_agent.runtime_dir)]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    other = subprocess.run(
        [unshare, "--time", "--fork", "--monotonic", "1000", *cmd],
        capture_output=True, text=True, timeout=120, cwd=root, env=env,
    )  # fmt: skip
    assert other.returncode == 0, other.stderr
    assert "refused" in other.stdout and "time namespace" in other.stdout, other.stdout
    same = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert same.returncode == 0 and "ready" in same.stdout, (same.stdout, same.stderr)
