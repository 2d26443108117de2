"""Local data path through a real agent: put/get throughput against memcpy, batched
lookup latency and control-plane ops/s with 4 client processes.

Prints one JSON object. The reference (numpy copy of the same sizes, same process,
warm buffers) is measured in the same run, so ratios compare across noisy machines.
Puts are reserve + copy + commit, gets are pin + copy + release, batched as a vLLM
step would (``batch_bytes`` per round trip pair).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvnode.ipc.client import AgentClient, Status  # noqa: E402
from tests.conftest import AgentProcess  # noqa: E402

MiB = 1 << 20


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _sources(size: int, batch: int) -> list[np.ndarray]:
    # Distinct buffers, as a vLLM step's chunks are: one source reused would sit in cache.
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, size, dtype=np.uint8) for _ in range(batch)]


def memcpy_gbps(size: int, batch: int, reps: int) -> float:
    srcs = _sources(size, batch)
    dst = [np.empty(size, np.uint8) for _ in range(batch)]
    for d, s in zip(dst, srcs):
        np.copyto(d, s)  # warm
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for d, s in zip(dst, srcs):
            np.copyto(d, s)
        times.append(time.perf_counter() - t0)
    return _gbps(size * batch, statistics.median(times))


def put_get_gbps(c: AgentClient, size: int, batch: int, reps: int, tag: int) -> tuple[float, float]:
    srcs = _sources(size, batch)
    out = [np.empty(size, np.uint8) for _ in range(batch)]
    for o in out:
        o[:] = 0
    arena = np.frombuffer(c.buffer, np.uint8)
    put_t, get_t = [], []
    for r in range(reps):
        keys = [(tag << 100 | r << 32 | i).to_bytes(16, "little") for i in range(batch)]
        t0 = time.perf_counter()
        res = c.reserve(keys, [size] * batch)
        for (st, slot), src in zip(res, srcs):
            assert st == Status.OK and slot is not None, st
            pos = 0
            for off, n in slot.extents:
                arena[off : off + n] = src[pos : pos + n]
                pos += n
        c.commit(keys)
        t1 = time.perf_counter()
        pins = c.pin(keys)
        for (st, slot), o in zip(pins, out):
            assert st == Status.OK and slot is not None
            pos = 0
            for off, n in slot.extents:
                o[pos : pos + n] = arena[off : off + n]
                pos += n
        c.release(keys)
        t2 = time.perf_counter()
        put_t.append(t1 - t0)
        get_t.append(t2 - t1)
        assert np.array_equal(out[-1], srcs[-1])
        c.drop(keys)  # keep the arena from filling: eviction is measured elsewhere
    return _gbps(size * batch, statistics.median(put_t)), _gbps(
        size * batch, statistics.median(get_t)
    )


def lookup_latency(c: AgentClient, n: int) -> tuple[float, float]:
    keys = [os.urandom(16) for _ in range(64)]
    for _ in range(200):
        c.lookup(keys)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.lookup(keys)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6


def _ops_worker(runtime_dir: str, seconds: float, q: mp.Queue) -> None:
    c = AgentClient(runtime_dir, name="ops", timeout_s=5)
    c.connect()
    key = [os.urandom(16)]
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        c.lookup(key)
        n += 1
    q.put(n)
    c.close()


def ops_per_s(runtime_dir: Path, clients: int, seconds: float) -> float:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_ops_worker, args=(str(runtime_dir), seconds, q)) for _ in range(clients)
    ]
    for p in procs:
        p.start()
    total = sum(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def _shmem_thp() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text()
        return text.split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batch-bytes", type=int, default=64 * MiB)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    args = ap.parse_args()
    reps = 3 if args.quick else args.reps
    with tempfile.TemporaryDirectory() as tmp:
        agent = AgentProcess(Path(tmp) / "run", cpu_bytes="1GiB").start()
        try:
            c = AgentClient(agent.runtime_dir, name="bench", timeout_s=10)
            c.connect()
            out: dict[str, object] = {"batch_bytes": args.batch_bytes}
            p50, p99 = lookup_latency(c, 300 if args.quick else 3000)
            ref, put, get = [], [], []
            for tag, size in ((1, 2 * MiB), (2, 32 * MiB)):
                batch = max(1, args.batch_bytes // size)
                m = memcpy_gbps(size, batch, reps)
                p, g = put_get_gbps(c, size, batch, reps, tag)
                label = f"{size // MiB}mib"
                out[f"memcpy_gbps_{label}"] = round(m, 2)
                out[f"put_gbps_{label}"] = round(p, 2)
                out[f"get_gbps_{label}"] = round(g, 2)
                ref.append(m)
                put.append(p)
                get.append(g)
            memcpy = statistics.mean(ref)
            out["memcpy_gbps"] = round(memcpy, 2)
            out["put_gbps"] = round(statistics.mean(put), 2)
            out["get_gbps"] = round(statistics.mean(get), 2)
            out["put_ratio"] = round(min(p / m for p, m in zip(put, ref)), 3)
            out["get_ratio"] = round(min(g / m for g, m in zip(get, ref)), 3)
            p50b, p99b = lookup_latency(c, 300 if args.quick else 3000)
            out["lookup64_us_p50_after_copies"] = round(p50b, 1)
            out["lookup64_us_p50"] = round(p50, 1)
            out["lookup64_us_p99"] = round(p99, 1)
            c.close()
            out["ops_per_s_4clients"] = round(
                ops_per_s(agent.runtime_dir, 4, 1.0 if args.quick else 3.0)
            )
            out["cpus"] = os.cpu_count()
            out["shmem_thp"] = _shmem_thp()
        finally:
            agent.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
