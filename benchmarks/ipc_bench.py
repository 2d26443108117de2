"""Local data path through a real agent: put/get throughput against memcpy, batched
lookup latency against a raw ZeroMQ request/reply and against the shared index,
lookup tail latency with 1000 idle clients registered, ops/s with 4 client processes,
and a no-hit lookup with a disk tier (asked of the agent, and answered from the shared
index plus the disk listing).

Prints one JSON object. Each reference is measured in the same run (numpy copy of the
same sizes; a raw pyzmq ipc DEALER/ROUTER echo of the lookup's frame sizes between two
processes), interleaved with what it is compared to, over several repeats: figures are
medians over the repeats, with their min and max. Puts are reserve + copy + commit,
gets are pin + copy + release, batched as a vLLM step would (``batch_bytes`` per round
trip pair). As in the connector, the commit and the release are sent without waiting
for their answer: the agent still applies them in order, so a put's commit is done
before the get's pin is answered (its cost lands in the get, not outside the timing).
The lookup and its echo are called in turns, so both see the same scheduling.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from kvnode.errors import KVNodeError
from kvnode.ipc import protocol as P
from kvnode.ipc.client import AgentClient, Status
from kvnode.ipc.shmindex import (
    LOWER_LISTED,
    ShmIndexReader,
    ShmIndexWriter,
    capacity_for,
    listing_name,
)

MiB = 1 << 20
ARENA = "1GiB"
PAGE_BYTES = 64 * 1024
IDLE_CLIENTS = 1000


class Agent:
    """A ``kvnode agent`` subprocess on a private runtime directory."""

    def __init__(
        self, runtime_dir: Path, settings: dict[str, str], cpu_bytes: object = ARENA
    ) -> None:
        self.runtime_dir = runtime_dir
        sets = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
        cmd = [sys.executable, "-m", "kvnode", "agent", "--runtime-dir", str(runtime_dir)]
        self.log_path = runtime_dir.parent / "agent.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [*cmd, "--cpu-bytes", str(cpu_bytes), "--log-level", "warning", *sets],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited: {self.log_path.read_text()[-2000:]}")
            probe = AgentClient(self.runtime_dir, name="probe", timeout_s=0.5, heartbeat=False)
            try:
                probe.stats()
                return
            except KVNodeError:
                time.sleep(0.05)
            finally:
                probe.close()
        raise RuntimeError(f"agent did not answer in {timeout_s}s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def spread(values: list[float], digits: int = 1) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def percentile(lat: list[float], q: float) -> float:
    lat = sorted(lat)
    return lat[min(len(lat) - 1, int(len(lat) * q))]


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
        c.commit_async(keys)  # as the connector's saves do: the answer is read later
        t1 = time.perf_counter()
        pins = c.pin(keys)
        for (st, slot), o in zip(pins, out):
            assert st == Status.OK and slot is not None
            pos = 0
            for off, n in slot.extents:
                o[pos : pos + n] = arena[off : off + n]
                pos += n
        c.release(keys, wait=False)  # as the connector's loads do
        t2 = time.perf_counter()
        put_t.append(t1 - t0)
        get_t.append(t2 - t1)
        assert np.array_equal(out[-1], srcs[-1])
        c.drop(keys)  # keep the arena from filling: eviction is measured elsewhere
    return _gbps(size * batch, statistics.median(put_t)), _gbps(
        size * batch, statistics.median(get_t)
    )


def timed(fn: Callable[[], Any], n: int, warm: int = 200) -> list[float]:
    """Seconds per call of ``fn``, ``n`` samples after ``warm`` unmeasured calls."""
    for _ in range(warm):
        fn()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    return lat


def timed_pair(
    fa: Callable[[], Any], fb: Callable[[], Any], n: int, warm: int = 200
) -> tuple[list[float], list[float]]:
    """Seconds per call of ``fa`` and ``fb``, called in turns: on a shared machine the
    scheduler moves threads between CPUs from one moment to the next (a wake-up across
    CPUs costs about twice one on the same CPU here), so a ratio is only fair between
    calls made under the same conditions."""
    for _ in range(warm):
        fa()
        fb()
    la, lb = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        la.append(t1 - t0)
        lb.append(t2 - t1)
    return la, lb


def lookup_keys() -> list[bytes]:
    return [os.urandom(16) for _ in range(64)]


def lookup_frames() -> tuple[int, int]:
    """Sizes of a 64-key lookup request and of its reply, as they go on the wire."""
    keys = lookup_keys()
    req = P.encode(P.LookupReq(1 << 40, 1 << 40, 1 << 40, keys, True))
    rep = P.encode(P.LookupRep(1 << 40, [int(P.Lookup.HIT)] * 64))
    return len(req), len(rep)


# ---------------------------------------------------------------- raw echo reference
def _echo_server(endpoint: str, reply_bytes: int, ready: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    ready.set()
    reply = os.urandom(reply_bytes)
    while True:
        identity, frame = sock.recv_multipart()
        if frame == b"stop":
            break
        sock.send_multipart([identity, reply])
    sock.close(0)
    ctx.term()


class Echo:
    """A raw pyzmq ipc DEALER/ROUTER request/reply with a server in another process:
    the floor any control call over this transport pays."""

    def __init__(self, tmp: Path, request_bytes: int, reply_bytes: int) -> None:
        self.endpoint = f"ipc://{tmp / 'echo.sock'}"
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        self.proc = ctx.Process(target=_echo_server, args=(self.endpoint, reply_bytes, ready))
        self.proc.start()
        if not ready.wait(30):
            raise RuntimeError("echo server did not start")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)
        self.request = os.urandom(request_bytes)

    def call(self) -> None:
        self.sock.send(self.request)
        self.sock.recv()

    def close(self) -> None:
        self.sock.send(b"stop")
        self.proc.join(10)
        self.sock.close(0)
        self.ctx.term()


# ---------------------------------------------------------------- idle clients
class IdleClients:
    """``count`` registered clients that say nothing: raw DEALER sockets that sent a
    protocol ``Hello`` and stay open (the agent keeps them until they disconnect)."""

    def __init__(self, runtime_dir: Path, count: int, timeout_s: float = 30.0) -> None:
        self.ctx = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, count + 64)
        endpoint = f"ipc://{runtime_dir / 'agent.sock'}"
        self.socks = []
        for i in range(count):
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            sock.send(P.encode(P.Hello(i + 1, f"idle-{i}", os.getpid())))
            self.socks.append(sock)
        deadline = time.monotonic() + timeout_s
        for sock in self.socks:
            left_ms = max(1, int((deadline - time.monotonic()) * 1000))
            if not sock.poll(left_ms):
                raise RuntimeError("an idle client got no Welcome")
            rep = P.decode_reply(sock.recv())
            if not isinstance(rep, P.Welcome):
                raise RuntimeError(f"idle client refused: {rep}")

    def close(self) -> None:
        for sock in self.socks:
            sock.close(0)
        self.ctx.term()


def clients_count(c: AgentClient) -> int:
    return int(c.stats()["clients"])


def wait_clients(c: AgentClient, at_most: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while clients_count(c) > at_most and time.monotonic() < deadline:
        time.sleep(0.05)


# ---------------------------------------------------------------- the shared index
def disk_miss_repeats(tmp: Path, repeats: int, n: int) -> dict[str, object]:
    """Unique prompts with a disk tier: a 64-key lookup where nothing is cached, asked
    of the agent (what a scheduler had to do whenever a lower tier existed) and
    answered from the arena's index plus the disk listing (what it does now when the
    disk is the only lower tier), called in turns."""
    agent = Agent(
        tmp / "run-disk",
        {"disk.path": str(tmp / "disk"), "disk.bytes": str(1 << 30), "arena.page_bytes": "65536"},
    )
    try:
        agent.wait()
        c = AgentClient(agent.runtime_dir, name="bench-disk", timeout_s=10)
        c.connect()
        for _ in range(64):  # a disk that holds something
            assert c.put(os.urandom(16), os.urandom(64 * 1024)) in (Status.OK, Status.EXISTS)
        idx = ShmIndexReader(c.index_segment)
        deadline = time.monotonic() + 10
        while idx.lower_mode != LOWER_LISTED and time.monotonic() < deadline:
            time.sleep(0.01)
        listing = ShmIndexReader(listing_name(c.index_segment))
        keys = lookup_keys()

        def from_shm() -> None:
            present = idx.contains_many(keys)
            if idx.lower_mode == LOWER_LISTED and not present.all():
                listing.contains_many([keys[int(present.argmin())]])

        agent_us, shm_us = [], []
        for _ in range(repeats):
            a_lat, s_lat = timed_pair(lambda: c.lookup(keys), from_shm, n)
            agent_us.append(statistics.median(a_lat) * 1e6)
            shm_us.append(statistics.median(s_lat) * 1e6)
        listed = idx.lower_mode == LOWER_LISTED
        idx.close()
        listing.close()
        c.close()
    finally:
        agent.stop()
    return {
        "disk_lookup64_miss_agent_us_p50": round(statistics.median(agent_us), 1),
        "disk_lookup64_miss_listed_us_p50": round(statistics.median(shm_us), 1),
        "disk_listed": listed,
    }


def shm_lookup_us(n: int) -> list[float]:
    """contains_many of 64 keys (half present) on an index sized for the bench's arena
    and filled to its most entries (load factor 0.5), writer and reader in-process."""
    pages = int(ARENA.removesuffix("GiB")) * 1024 * MiB // PAGE_BYTES
    name = f"/kvnode-bench-idx-{uuid.uuid4().hex[:12]}"
    w = ShmIndexWriter(name, capacity_for(pages))
    try:
        held = [os.urandom(16) for _ in range(pages)]
        for k in held:
            w.insert(k)
        r = ShmIndexReader(name, stale_s=3600)
        keys = held[:32] + lookup_keys()[:32]
        assert r.contains_many(keys).sum() == 32
        lat = timed(lambda: r.contains_many(keys), n)
        r.close()
    finally:
        w.close()
    return [x * 1e6 for x in lat]


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


def control_repeats(c: AgentClient, tmp: Path, repeats: int, n: int) -> dict[str, object]:
    """Lookup of 64 keys, its raw echo reference and the shared-index path, taken in
    turns so each repeat's ratio compares like with like."""
    echo = Echo(tmp, *lookup_frames())
    keys = lookup_keys()
    echo_us, lookup_us, ratio, shm_us = [], [], [], []
    try:
        for _ in range(repeats):
            e_lat, lk_lat = timed_pair(echo.call, lambda: c.lookup(keys), n)
            e = statistics.median(e_lat) * 1e6
            lk = statistics.median(lk_lat) * 1e6
            echo_us.append(e)
            lookup_us.append(lk)
            ratio.append(lk / e)
            shm_us.append(statistics.median(shm_lookup_us(n)))
    finally:
        echo.close()
    return {
        "echo_us_p50": round(statistics.median(echo_us), 1),
        "echo_us_p50_spread": spread(echo_us),
        "lookup64_us_p50": round(statistics.median(lookup_us), 1),
        "lookup64_us_p50_spread": spread(lookup_us),
        "lookup64_over_echo": round(statistics.median(ratio), 3),
        "lookup64_over_echo_spread": spread(ratio, 3),
        "lookup64_shm_us_p50": round(statistics.median(shm_us), 1),
        "lookup64_shm_us_p50_spread": spread(shm_us),
    }


def idle_client_repeats(c: AgentClient, repeats: int, n: int) -> dict[str, object]:
    """Lookup p50/p99 with only this client registered, then with IDLE_CLIENTS more."""
    keys = lookup_keys()
    one: list[float] = []
    many: list[float] = []
    p50s: list[float] = []
    for _ in range(repeats):
        base = clients_count(c)
        one.extend(timed(lambda: c.lookup(keys), n))
        idle = IdleClients(c.runtime_dir, IDLE_CLIENTS)
        try:
            if clients_count(c) < base + IDLE_CLIENTS:
                raise RuntimeError("idle clients were not all registered")
            lat = timed(lambda: c.lookup(keys), n)
            many.extend(lat)
            p50s.append(statistics.median(lat) * 1e6)
        finally:
            idle.close()
        wait_clients(c, base)
    p99_one, p99_many = percentile(one, 0.99) * 1e6, percentile(many, 0.99) * 1e6
    return {
        "lookup64_us_p50_1client": round(statistics.median(one) * 1e6, 1),
        "lookup64_us_p50_1000clients": round(statistics.median(many) * 1e6, 1),
        "lookup64_us_p99_1client": round(p99_one, 1),
        "lookup64_us_p99_1000clients": round(p99_many, 1),
        "lookup64_p99_1000_over_1": round(p99_many / p99_one, 3),
    }


def copy_repeats(c: AgentClient, args: argparse.Namespace, repeats: int) -> dict[str, object]:
    """put/get against memcpy, in turns, per chunk size; ratios per repeat over the
    mean of both sizes' throughputs."""
    out: dict[str, object] = {"batch_bytes": args.batch_bytes}
    inner = 3 if args.quick else 7
    per: dict[str, list[float]] = {}
    put_ratio, get_ratio = [], []
    for _ in range(repeats):
        ref, put, get = [], [], []
        for tag, size in ((1, 2 * MiB), (2, 32 * MiB)):
            batch = max(1, args.batch_bytes // size)
            m = memcpy_gbps(size, batch, inner)
            p, g = put_get_gbps(c, size, batch, inner, tag)
            label = f"{size // MiB}mib"
            for k, v in ((f"memcpy_gbps_{label}", m), (f"put_gbps_{label}", p)):
                per.setdefault(k, []).append(v)
            per.setdefault(f"get_gbps_{label}", []).append(g)
            ref.append(m)
            put.append(p)
            get.append(g)
        put_ratio.append(statistics.mean(put) / statistics.mean(ref))
        get_ratio.append(statistics.mean(get) / statistics.mean(ref))
    for k, v in per.items():
        out[k] = round(statistics.median(v), 2)
    out["put_ratio"] = round(statistics.median(put_ratio), 3)
    out["put_ratio_spread"] = spread(put_ratio, 3)
    out["get_ratio"] = round(statistics.median(get_ratio), 3)
    out["get_ratio_spread"] = spread(get_ratio, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-bytes", type=int, default=64 * MiB)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    args = ap.parse_args()
    repeats = 2 if args.quick else args.repeats
    n = 300 if args.quick else 2000
    settings = {
        "agent.clients_max": str(IDLE_CLIENTS + 64),
        # the idle clients are one process connecting at once
        "agent.connections_per_process_max": str(IDLE_CLIENTS + 64),
        "agent.connections_per_s_max": "100000",
        "agent.heartbeat_timeout_s": "3600",  # idle clients stay registered
        "arena.page_bytes": str(PAGE_BYTES),
    }
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        agent = Agent(tmp / "run", settings)
        try:
            agent.wait()
            c = AgentClient(agent.runtime_dir, name="bench", timeout_s=10)
            c.connect()
            out = control_repeats(c, tmp, repeats, n)
            out.update(disk_miss_repeats(tmp, repeats, n))
            out.update(copy_repeats(c, args, repeats))
            keys = lookup_keys()
            p50_after = statistics.median(timed(lambda: c.lookup(keys), n))
            out["lookup64_us_p50_after_copies"] = round(p50_after * 1e6, 1)
            out.update(idle_client_repeats(c, max(2, repeats // 2), n))
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
