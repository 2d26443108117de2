"""Agent mode's copy rate on the CPU: a worker process exports a paged KV cache shaped
like vLLM's CPU cache, N chunks are saved through the agent (which reads them with
cross-memory attach and checksums them) and loaded back into a second worker process's
cache (verified, then written layer by layer), every byte checked.

Prints one JSON object. The reference is a memcpy of the same bytes (numpy, from the
same cache layout into a touched buffer and back), measured in the same run between
the repeats. Figures are medians over the repeats with min and max; ``ratio`` is the
agent's throughput over memcpy's (save + load bytes over save + load time).
``lookup_ms_*``: another client's lookup round trips (one every 3 ms) while the agent
is idle (1 s, before the repeats: the reference) and during the repeats, when the
copy threads are busy: how long the loop keeps clients waiting behind copies.
The workers' caches are on huge pages (``kvnode.hugepages = always``: the bench's
processes run on every core, where the connector's ``auto`` would leave them on small
pages; ``--hugepages`` picks).

``--mover-only``: the same jobs through the agent's CPU mover driven in this process
(no agent loop, no ZeroMQ, no index), against one worker process's cache: how fast
the mover itself copies here, to set against the whole agent's figure.

``--fresh``: loads into a fresh worker process with a vLLM-sized cache (2 GiB), from
its export on, while its cache goes onto huge pages in the background (the first
requests of a vLLM process that just started): ``fresh_load_ms`` per load of
``--chunks-per-job`` chunks, against the same loads into a fresh worker whose
collapse is off (the reference, in the same run).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAYERS, HEADS, BLOCK_SIZE, HEAD = 8, 4, 128, 64  # the bench model: 4 MiB per 256 tokens
BPC = 2  # blocks per 256-token chunk
BLOCK_BYTES = HEADS * BLOCK_SIZE * 2 * HEAD * 4  # float32


def _cache(blocks: int, seed: int | None) -> dict[str, torch.Tensor]:
    shape = (blocks, HEADS, BLOCK_SIZE, 2 * HEAD)
    out = {}
    for i in range(LAYERS):
        t = torch.empty(shape)
        if seed is None:
            t.zero_()
        else:
            t.copy_(torch.from_numpy(_fill(shape, seed * 100 + i)))
        out[f"model.layers.{i}.self_attn.attn"] = t
    return out


def _fill(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _path(
    runtime_dir: str,
    kv: dict[str, torch.Tensor],
    wait_collapse: bool = True,
    hugepages: str = "always",  # the bench's workers share the cores: collapse there too
) -> Any:
    from kvnode.connector.agent_mode import AgentPath
    from kvnode.connector.link import AgentLink, default_client_factory
    from kvnode.connector.worker import WorkerSide
    from kvnode.kernels.hostmem import ArenaMapping

    arena = ArenaMapping()
    factory = default_client_factory(runtime_dir, "copy-bench", 10.0, arena.on_map, arena.on_unmap)
    link = AgentLink(factory, background=False)
    if not link.try_connect():
        raise RuntimeError("no agent")
    blocks = next(iter(kv.values())).shape[0]
    w = WorkerSide(link, 0, blocks, BLOCK_SIZE, BPC, arena=arena)
    w.register(kv)
    path = AgentPath(link, w, hugepages=hugepages)
    if not path.ready():
        raise RuntimeError("export refused")
    if path.hugepages is not None and wait_collapse:  # the steady state: on huge pages
        path.hugepages.done.wait(60)
    return path


def _ops(n: int, first: int, rep: int, per_job: int) -> list[dict[str, list[Any]]]:
    from kvnode.connector.scheduler import ChunkOp

    steps: list[dict[str, list[Any]]] = []
    for s in range(0, n, per_job):
        ops = [
            ChunkOp(c, (rep.to_bytes(4, "little") + c.to_bytes(12, "little"),),
                    tuple(range(first + BPC * c, first + BPC * (c + 1))))
            for c in range(s, min(n, s + per_job))
        ]  # fmt: skip
        steps.append({f"req-{rep}-{s}": ops})
    return steps


def saver(runtime_dir: str, n: int, reps: int, per_job: int, hp: str, conn: Any) -> None:
    kv = _cache(n * BPC, seed=1)
    path = _path(runtime_dir, kv, hugepages=hp)
    conn.send("ready")
    for rep in range(reps):
        conn.recv()
        t0, c0 = time.perf_counter(), time.process_time()
        steps = _ops(n, 0, rep, per_job)
        for step in steps:
            path.track(step)
            path.save(step)
        want = {rid for step in steps for rid in step}
        # The worker sleeps while the agent copies (a worker that polls its progress
        # page in a tight loop takes a core from the copy on a small machine).
        path.wait_saves()
        done = path.finished(want)
        conn.send((time.perf_counter() - t0, time.process_time() - c0))
        if done != want:
            raise RuntimeError(f"saves not finished: {sorted(want - done)}")
    conn.send(dict(path.stats.take()))


def loader(runtime_dir: str, n: int, reps: int, per_job: int, hp: str, conn: Any) -> None:
    kv = _cache(n * BPC, seed=None)
    path = _path(runtime_dir, kv, hugepages=hp)
    want = _cache(n * BPC, seed=1)
    conn.send("ready")
    for rep in range(reps):
        conn.recv()
        for t in kv.values():
            t.zero_()
        t0, c0 = time.perf_counter(), time.process_time()
        for step in _ops(n, 0, rep, per_job):
            path.load(step)
            for name in path.layer_pos:
                path.wait_for_layer(name)
            path.finish_loads()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        errors = path.take_load_errors()
        same = not errors and all(torch.equal(kv[k], want[k]) for k in kv)
        conn.send((elapsed, same, cpu))


def prober(runtime_dir: str, conn: Any) -> None:
    """Another client's lookups, one every 3 ms, while told to run: their round-trip
    times in ms (the agent's loop answering while its copy threads are busy, or idle)."""
    from kvnode.ipc.client import AgentClient

    c = AgentClient(runtime_dir, name="copy-bench-probe", timeout_s=10.0, heartbeat=False)
    c.connect()
    keys = [os.urandom(16) for _ in range(8)]
    while conn.recv() == "go":
        times: list[float] = []
        while not conn.poll():
            t0 = time.perf_counter()
            c.lookup(keys, promote=False)
            times.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.003)
        conn.recv()
        conn.send(times)
    c.close()


def _percentiles(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    at = lambda q: round(ms[min(len(ms) - 1, int(len(ms) * q))], 3)  # noqa: E731
    return {"n": len(ms), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


class Memcpy:
    """Save + load of the same bytes by memcpy: the cache's blocks into a buffer and
    back into another cache, every buffer touched beforehand (no page faults timed)."""

    def __init__(self, n: int) -> None:
        self.src = [_fill((n * BPC, HEADS, BLOCK_SIZE, 2 * HEAD), i) for i in range(LAYERS)]
        self.buf = np.ones(sum(a.nbytes for a in self.src), dtype=np.uint8)
        self.dst = [np.ones_like(a) for a in self.src]

    def run(self) -> float:
        t0 = time.perf_counter()
        pos = 0
        for a in self.src:
            np.copyto(self.buf[pos : pos + a.nbytes], a.reshape(-1).view(np.uint8))
            pos += a.nbytes
        pos = 0
        for a in self.dst:
            np.copyto(a.reshape(-1).view(np.uint8), self.buf[pos : pos + a.nbytes])
            pos += a.nbytes
        return time.perf_counter() - t0


def _agent_stats(rd: str) -> dict[str, Any]:
    from kvnode.ipc.client import AgentClient

    c = AgentClient(rd, name="copy-bench-stats", timeout_s=5.0, heartbeat=False)
    try:
        return dict(c.stats()["transfers"]["agent"])
    finally:
        c.close()


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--chunks-per-job", type=int, default=8, help="chunks one vLLM step moves")
    ap.add_argument("--mover-only", action="store_true", help="the mover alone (see above)")
    ap.add_argument("--fresh", action="store_true", help="loads into a fresh worker (above)")
    ap.add_argument("--hugepages", choices=("always", "auto", "never"), default="always")
    args = ap.parse_args()
    if args.mover_only:
        return mover_only(args)
    n = args.chunks
    if args.fresh:
        n = args.chunks_per_job
    chunk_bytes = LAYERS * BPC * BLOCK_BYTES
    arena = max(256 << 20, 2 * n * chunk_bytes)
    with tempfile.TemporaryDirectory(prefix="kvnode-copy-bench-") as tmp:
        rd = str(Path(tmp) / "run")
        agent = subprocess.Popen(
            [sys.executable, "-m", "kvnode", "agent", "--runtime-dir", rd,
             "--cpu-bytes", str(arena)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            if args.fresh:
                return _fresh(rd, args, n, agent)
            return _run(rd, args, n, chunk_bytes, agent)
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)


def _wait_agent(rd: str, agent: Any) -> None:
    deadline = time.monotonic() + 60
    while not (Path(rd) / "agent.sock").exists():
        if time.monotonic() > deadline or agent.poll() is not None:
            raise RuntimeError("agent did not start")
        time.sleep(0.1)
    time.sleep(0.5)


def _run(rd: str, args: Any, n: int, chunk_bytes: int, agent: Any) -> int:
    _wait_agent(rd, agent)
    ctx = mp.get_context("spawn")
    s_here, s_there = ctx.Pipe()
    l_here, l_there = ctx.Pipe()
    per_job, hp = args.chunks_per_job, args.hugepages
    ps = ctx.Process(target=saver, args=(rd, n, args.reps, per_job, hp, s_there))
    pl = ctx.Process(target=loader, args=(rd, n, args.reps, per_job, hp, l_there))
    p_here, p_there = ctx.Pipe()
    pp = ctx.Process(target=prober, args=(rd, p_there))
    ps.start()
    pl.start()
    pp.start()
    saves, loads, refs, checked = [], [], [], True
    save_cpu, load_cpu = [], []
    memcpy = Memcpy(n)
    assert s_here.recv() == "ready" and l_here.recv() == "ready"
    p_here.send("go")  # lookups while the agent is idle: the reference
    time.sleep(1.0)
    p_here.send("stop")
    idle_ms = p_here.recv()
    p_here.send("go")  # lookups while the repeats copy
    for _ in range(args.reps):
        time.sleep(0.05)  # the agent has settled the last loads: memcpy runs alone
        refs.append(memcpy.run())
        time.sleep(0.05)
        s_here.send("go")
        elapsed, cpu = s_here.recv()
        saves.append(elapsed)
        save_cpu.append(cpu)
        time.sleep(0.05)  # the agent commits on its loop
        l_here.send("go")
        elapsed, same, cpu = l_here.recv()
        loads.append(elapsed)
        load_cpu.append(cpu)
        checked = checked and same
    p_here.send("stop")
    busy_ms = p_here.recv()
    p_here.send("end")
    save_stats = s_here.recv()
    ps.join(30)
    pl.join(30)
    pp.join(30)
    agent_side = _agent_stats(rd)
    nbytes = n * chunk_bytes
    jobs_per_rep = -(-n // args.chunks_per_job)
    agent_gbps = [2 * nbytes / (s + lo) / 1e9 for s, lo in zip(saves, loads)]
    ref_gbps = [2 * nbytes / r / 1e9 for r in refs]
    out = {
        "bench": "agent_copy",
        "device": "cpu",
        "chunks": n,
        "chunk_bytes": chunk_bytes,
        "chunks_per_job": args.chunks_per_job,
        "reps": args.reps,
        "hugepages": args.hugepages,
        "bytes_checked": checked,
        "save_s": _stats(saves),
        "load_s": _stats(loads),
        "agent_GBps": _stats(agent_gbps),
        "memcpy_GBps": _stats(ref_gbps),
        "ratio": statistics.median(agent_gbps) / statistics.median(ref_gbps),
        "target_ratio": 0.75,
        "save_chunks": save_stats.get("save_chunks"),
        "agent_save_copy_s": agent_side.get("save_copy_s"),
        "agent_load_copy_s": agent_side.get("load_copy_s"),
        "agent_jobs": agent_side.get("jobs"),
        # CPU time the worker processes spent (handing jobs over, waiting) per job
        "worker_cpu_ms_per_job": {
            "save": round(statistics.median(save_cpu) * 1e3 / jobs_per_rep, 3),
            "load": round(statistics.median(load_cpu) * 1e3 / jobs_per_rep, 3),
        },
        "lookup_ms_idle": _percentiles(idle_ms),
        "lookup_ms_during_copies": _percentiles(busy_ms),
    }
    print(json.dumps(out))
    return 0 if checked else 1


FRESH_CACHE_BYTES = 2 << 30  # a vLLM CPU cache's size (--kv-cache-space 2 GiB)


def fresh_loader(runtime_dir: str, n: int, reps: int, collapse: bool, conn: Any) -> None:
    """A fresh worker: a 2 GiB cache (touched, as vLLM's), exported, then ``reps``
    loads of ``n`` chunks at once, 0.1 s apart (another process's turn)."""
    blocks = FRESH_CACHE_BYTES // (LAYERS * BLOCK_BYTES)
    kv = _cache(blocks, seed=None)
    want = _cache(n * BPC, seed=1)
    path = _path(runtime_dir, kv, wait_collapse=False, hugepages="always" if collapse else "never")
    times, same = [], True
    for _ in range(reps):
        t0 = time.perf_counter()
        for step in _ops(n, 0, 0, n):
            path.load(step)
            for name in path.layer_pos:
                path.wait_for_layer(name)
            path.finish_loads()
        times.append((time.perf_counter() - t0) * 1e3)
        same = same and not path.take_load_errors()
        time.sleep(0.1)
    same = same and all(torch.equal(kv[k][: n * BPC], want[k]) for k in kv)
    collapsed = path.hugepages is not None and path.hugepages.done.is_set()
    conn.send((times, same, collapsed))


def _fresh(rd: str, args: Any, n: int, agent: Any) -> int:
    _wait_agent(rd, agent)
    ctx = mp.get_context("spawn")
    s_here, s_there = ctx.Pipe()
    ps = ctx.Process(target=saver, args=(rd, n, 1, n, s_there))
    ps.start()
    assert s_here.recv() == "ready"
    s_here.send("go")
    s_here.recv()
    s_here.recv()
    ps.join(30)
    out: dict[str, Any] = {"bench": "agent_copy_fresh", "device": "cpu", "chunks": n,
                           "cache_bytes": FRESH_CACHE_BYTES, "reps": args.reps}  # fmt: skip
    checked = True
    for collapse in (False, True, False, True):  # alternated: both see the same machine
        here, there = ctx.Pipe()
        p = ctx.Process(target=fresh_loader, args=(rd, n, args.reps, collapse, there))
        p.start()
        times, same, done = here.recv()
        p.join(30)
        checked = checked and same
        key = "fresh_load_ms" if collapse else "fresh_load_ms_no_collapse"
        out.setdefault(key, []).extend(times)
        if collapse:
            out.setdefault("collapse_done_after_loads", []).append(done)
    for key in ("fresh_load_ms", "fresh_load_ms_no_collapse"):
        out[key] = {k: round(v, 2) for k, v in _stats(out[key]).items()}
    out["ratio"] = round(
        out["fresh_load_ms"]["median"] / out["fresh_load_ms_no_collapse"]["median"], 3
    )
    out["bytes_checked"] = checked
    print(json.dumps(out))
    return 0 if checked else 1


def holder(n: int, conn: Any) -> None:
    """A worker process for ``--mover-only``: a cache on huge pages and a progress
    page, held until told to go."""
    import ctypes

    from kvnode.connector.hugepages import Collapse

    kv = _cache(n * BPC, seed=1)
    page = bytearray(1 << 16)
    ranges = [(t.data_ptr(), t.numel() * t.element_size()) for t in kv.values()]
    collapse = Collapse(ranges, shared=True).start()  # on every core, as the full bench
    collapse.done.wait(60)
    page_addr = ctypes.addressof((ctypes.c_char * len(page)).from_buffer(page))
    conn.send((os.getpid(), [t.data_ptr() for t in kv.values()], page_addr))
    conn.recv()


def mover_only(args: Any) -> int:
    import mmap

    from kvnode.agent.movers.base import ChunkWork, Export, Job, Layer
    from kvnode.agent.movers.cpu import CpuMover
    from kvnode.ipc import progress as PG

    n, per_job = args.chunks, args.chunks_per_job
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    p = ctx.Process(target=holder, args=(n, there))
    p.start()
    try:
        pid, bases, page = here.recv()
        block = BLOCK_BYTES
        chunk = LAYERS * BPC * block
        arena = mmap.mmap(-1, n * chunk, flags=mmap.MAP_SHARED)  # shared memory, as the arena
        np.frombuffer(arena, dtype=np.uint8)[:] = 1
        layers = tuple(
            Layer(f"l{i}", base, n * BPC, block, block, ((0, block),), i * BPC * block)
            for i, base in enumerate(bases)
        )  # fmt: skip
        ex = Export(1, 1, "cpu", pid, layers, page, 8, PG.slot_bytes(LAYERS), chunk, BPC)
        mover = CpuMover(memoryview(arena), int(os.environ.get("KVNODE_AGENT_CPU_COPY_THREADS", 2)))
        sums: dict[int, int] = {}
        times: dict[str, list[float]] = {"save": [], "load": []}
        refs = []
        memcpy = Memcpy(n)
        for _ in range(args.reps):
            refs.append(memcpy.run())
            for kind in ("save", "load"):
                t0 = time.perf_counter()
                for first in range(0, n, per_job):
                    work = [
                        ChunkWork(b"%d" % c, tuple(range(BPC * c, BPC * (c + 1))),
                                  [(c * chunk, chunk)], checksum=sums.get(c, 0), index=i)
                        for i, c in enumerate(range(first, min(n, first + per_job)))
                    ]  # fmt: skip
                    job = Job(ex, kind == "load", 0, 1, work, bytearray(len(work)),
                              time.monotonic() + 30)  # fmt: skip
                    mover.run(job)
                    if job.failed or any(c.status != PG.CHUNK_OK for c in work):
                        raise RuntimeError(f"{kind} failed: {job.failed}")
                    for c in work:
                        sums[int(c.key)] = c.checksum
                times[kind].append(time.perf_counter() - t0)
        mover.close()
    finally:
        here.send("go")
        p.join(30)
    nbytes = n * chunk
    gbps = [2 * nbytes / (s + lo) / 1e9 for s, lo in zip(times["save"], times["load"])]
    ref = [2 * nbytes / r / 1e9 for r in refs]
    print(json.dumps({
        "bench": "agent_copy", "mode": "mover_only", "device": "cpu", "chunks": n,
        "chunk_bytes": chunk, "chunks_per_job": per_job, "reps": args.reps,
        "save_s": _stats(times["save"]), "load_s": _stats(times["load"]),
        "mover_GBps": _stats(gbps), "memcpy_GBps": _stats(ref),
        "ratio": statistics.median(gbps) / statistics.median(ref),
        "checked": "every chunk against its checksum (the full bench checks every byte)",
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
