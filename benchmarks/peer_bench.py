"""Peer transfers on loopback: fetching chunks from a peer against a raw pyzmq TCP
transfer of the same bytes, and a lookup fanned out to 8 peers against one raw TCP echo.

Prints one JSON object. The peers are the agent's own machinery (``PeerServer`` and
``PeerManager`` over a real ``Index`` and shared-memory arena ``Segment``, as the agent
loop drives them), one loop thread per side, on 127.0.0.1 only. Each reference is
measured in the same run, interleaved with what it is compared to:

- fetch: the time from a lookup miss to N chunks committed in the fetching node's arena
  (lookup round trip, fetch request, zero-copy send out of the serving arena, copy into
  reserved pages, xxh3 check, commit) against a pyzmq DEALER/ROUTER pair moving the same
  frames (request, then one multipart reply, received zero-copy). Both with and without
  CURVE, the peer path against the reference with the same security;
- lookup: 64 keys asked of 8 peers (CURVE) until every answer is in, against one raw
  DEALER/ROUTER echo of a 64-key frame; p50 and p99 over the rounds;
- directory: a real agent process follows 8, then 64, peers' KV-event streams (CURVE;
  the peers are in this process: a PeerServer and an EventPublisher each) and answers
  lookups of 64 keys its directory places at a peer (PENDING at once, one targeted ask
  to that peer, no fan-out), in turns with lookups of 64 keys in its own arena:
  ``local_lookup_p50_us``, ``directory_lookup_p50_us_8``, ``directory_lookup_p50_us_64``.

Figures are medians over the repeats (with min and max). ``--budget-s`` bounds the run:
repeats stop early when it is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from kvnode.agent.cache import Cache
from kvnode.agent.events import MEDIUM_CPU, EventPublisher
from kvnode.agent.index import Index
from kvnode.agent.peers import Curve, PeerManager, PeerServer, new_node_id
from kvnode.errors import KVNodeError
from kvnode.ipc.checksum import checksum
from kvnode.ipc.client import AgentClient
from kvnode.ipc.protocol import Lookup
from kvnode.ipc.segment import Segment

MiB = 1 << 20
PAGE_BYTES = 2 * MiB
CLIENT = 7  # the client id chunks are committed as on the serving node
LOOKUP_KEYS = 64
LOOKUP_PEERS = 8
HOST = "tcp://127.0.0.1:*"
LOOP_POLL_MS = 1  # a node's loop wakes at least this often (server housekeeping)
WAIT_S_MAX = 30.0  # one fetch or lookup taking longer than this is a failure


# -- nodes ------------------------------------------------------------------------------


class Node:
    """One agent's peer machinery over its own arena. ``serve``: a PeerServer whose loop
    runs on a thread; ``seeds``: a PeerManager the caller drives with ``until``."""

    def __init__(
        self, arena_bytes: int, curve: Curve | None, serve: bool, seeds: list[str] | None = None
    ) -> None:
        name = f"/kvnode-peer-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.segment = Segment.create(name, arena_bytes, prefault=True, hugepages=False)
        self.index = Index(arena_bytes, PAGE_BYTES, "lru")
        self.cache = Cache(self.index)
        self.woken = threading.Event()
        self.server = (
            PeerServer(self.cache, self.segment, HOST, curve, new_node_id()) if serve else None
        )
        self.manager = (
            PeerManager(self.cache, self.segment, curve, new_node_id(), self.woken.set, seeds,
                        deadline_ms=2000, fetch_timeout_ms=20_000, fetch_bytes_max=arena_bytes)
            if seeds is not None
            else None
        )  # fmt: skip

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return self.server.endpoint

    def put(self, key: bytes, data: memoryview) -> None:
        status, e = self.index.reserve(key, len(data), CLIENT)
        if e is None:
            raise RuntimeError(f"no room for a chunk: {status}")
        at, view = 0, self.segment.view
        for off, n in e.extents(PAGE_BYTES):
            view[off : off + n] = data[at : at + n]
            at += n
        self.index.commit(key, CLIENT, checksum([data]))

    def until(self, done: Callable[[list[bytes]], bool], deadline_s: float = WAIT_S_MAX) -> None:
        """Drive the manager as the agent loop does until ``done(keys landed so far)``."""
        assert self.manager is not None
        landed: list[bytes] = []
        end = time.monotonic() + deadline_s
        while not done(landed):
            if time.monotonic() > end:
                raise RuntimeError(f"peer work did not finish: {self.manager.stats()}")
            self.woken.wait(LOOP_POLL_MS / 1000)
            self.woken.clear()
            landed.extend(f.key for f in self.manager.poll())

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
        if self.server is not None:
            self.server.close()
        self.segment.unlink()
        self.segment.close()


@contextmanager
def serving(servers: list[PeerServer]) -> Iterator[None]:
    """One loop thread answering every server, as each agent's loop would."""
    stop = threading.Event()
    poller = zmq.Poller()
    for s in servers:
        poller.register(s.socket, zmq.POLLIN)

    def loop() -> None:
        while not stop.is_set():
            ready = dict(poller.poll(LOOP_POLL_MS))
            for s in servers:
                if s.socket in ready:
                    s.handle()
                s.poll()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(5)


def connect(node: Node, peers: int) -> None:
    """Ask until every peer has answered once (CURVE handshakes take a moment)."""
    assert node.manager is not None
    end = time.monotonic() + WAIT_S_MAX
    while time.monotonic() < end:
        links = node.manager.stats()["peers"]
        if sum(1 for p in links.values() if p.get("state") == "up") >= peers:
            return
        probe = [os.urandom(16)]
        node.manager.on_lookup_miss(probe)
        node.until(lambda _, k=probe[0]: not node.manager.pending(k))  # type: ignore[union-attr]
    raise RuntimeError(f"peers never answered: {node.manager.stats()['peers']}")


# -- raw references ---------------------------------------------------------------------


class RawServer:
    """A ROUTER on a thread: a request gets the given frames back (``reply`` None: the
    request itself, an echo). CURVE when keys are given (no ZAP: any client that knows
    the server key; the reference is about cost, not admission)."""

    def __init__(self, reply: list[memoryview] | None, keys: tuple[bytes, bytes] | None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        if keys is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey = keys
            self.sock.curve_server = True
        self.sock.bind(HOST)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.reply = reply
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            if not self.sock.poll(LOOP_POLL_MS * 10):
                continue
            ident, body = self.sock.recv_multipart()
            frames: list[Any] = [body] if self.reply is None else [b"rep", *self.reply]
            self.sock.send_multipart([ident, *frames], copy=False)

    def client(self, keys: tuple[bytes, bytes] | None, server_public: bytes | None) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        if keys is not None and server_public is not None:
            s.curve_publickey, s.curve_secretkey = keys
            s.curve_serverkey = server_public
        s.connect(self.endpoint)
        return s

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def raw_round_trip(sock: zmq.Socket, body: bytes, dst: memoryview | None = None) -> int:
    """One request and its whole reply, received zero-copy (and copied into ``dst``
    when given, as bytes must land in an arena); returns the reply bytes."""
    sock.send(body)
    frames = sock.recv_multipart(copy=False)
    at = 0
    for f in frames[1:]:
        n = len(f.buffer)
        if dst is not None:
            dst[at : at + n] = f.buffer
        at += n
    return at


# -- measurements -----------------------------------------------------------------------


def fetch_round(
    b: Node, keys: list[bytes], raw: zmq.Socket, dst: memoryview
) -> tuple[float, float, float]:
    """(peer, raw, raw + copy) seconds for moving the same chunks once each."""
    t0 = time.perf_counter()
    b.manager.on_lookup_miss(keys)  # type: ignore[union-attr]
    b.until(lambda landed: len(landed) == len(keys))
    peer_s = time.perf_counter() - t0
    for k in keys:
        if not b.index.drop(k):
            raise RuntimeError("a fetched chunk could not be dropped")
    b.index.take_changes()
    t0 = time.perf_counter()
    got = raw_round_trip(raw, b"fetch")
    t1 = time.perf_counter()
    got_copied = raw_round_trip(raw, b"fetch", dst)
    t2 = time.perf_counter()
    if got != len(dst) or got_copied != len(dst):
        raise RuntimeError(f"raw reply had {got} bytes, want {len(dst)}")
    return peer_s, t1 - t0, t2 - t1


def measure_fetch(
    size: int, total: int, curve: Curve | None, repeats: int, deadline: float
) -> dict[str, Any]:
    n = max(1, total // size)
    arena = n * size + 4 * PAGE_BYTES
    data = memoryview(os.urandom(n * size))
    chunks = [data[i * size : (i + 1) * size] for i in range(n)]
    keys = [os.urandom(16) for _ in range(n)]
    a = Node(arena, curve, serve=True)
    b: Node | None = None
    raw_keys = (curve.public, curve.secret) if curve is not None else None
    raw = RawServer(chunks, raw_keys)
    try:
        for k, c in zip(keys, chunks):
            a.put(k, c)
        b = Node(arena, curve, serve=False, seeds=[a.endpoint])
        client = raw.client(raw_keys, curve.public if curve is not None else None)
        dst = memoryview(bytearray(n * size))
        times: list[tuple[float, float, float]] = []
        with serving([a.server]):  # type: ignore[list-item]
            connect(b, 1)
            fetch_round(b, keys, client, dst)  # warm-up: first touches, handshakes
            for _ in range(repeats):
                times.append(fetch_round(b, keys, client, dst))
                if time.monotonic() > deadline:
                    break
        client.close(0)
    finally:
        raw.close()
        if b is not None:
            b.close()
        a.close()
    peer_gbps, raw_gbps, copy_gbps = ([n * size / t[i] / 1e9 for t in times] for i in range(3))
    return {
        "chunks": n,
        "chunk_MiB": size // MiB,
        "repeats": len(times),
        "peer_GBps": _summary(peer_gbps),
        "raw_GBps": _summary(raw_gbps),
        "raw_then_copy_GBps": _summary(copy_gbps),
        "ratio": round(statistics.median(p / r for p, r in zip(peer_gbps, raw_gbps)), 3),
        "ratio_vs_raw_then_copy": round(
            statistics.median(p / r for p, r in zip(peer_gbps, copy_gbps)), 3
        ),
    }


def measure_lookup(curve: Curve, rounds: int, deadline: float) -> dict[str, Any]:
    servers = [Node(4 * PAGE_BYTES, curve, serve=True) for _ in range(LOOKUP_PEERS)]
    b = Node(4 * PAGE_BYTES, curve, serve=False, seeds=[s.endpoint for s in servers])
    raw_keys = (curve.public, curve.secret)
    echo = RawServer(None, raw_keys)
    client = echo.client(raw_keys, curve.public)
    body = os.urandom(LOOKUP_KEYS * 16)
    lookup_us: list[float] = []
    echo_us: list[float] = []
    try:
        with serving([s.server for s in servers]):  # type: ignore[misc]
            connect(b, LOOKUP_PEERS)
            for i in range(rounds + 5):  # the first 5 warm up
                keys = [os.urandom(16) for _ in range(LOOKUP_KEYS)]  # never asked before
                t0 = time.perf_counter()
                b.manager.on_lookup_miss(keys)  # type: ignore[union-attr]
                b.until(lambda _, k=keys[0]: not b.manager.pending(k))  # type: ignore[union-attr]
                t1 = time.perf_counter()
                raw_round_trip(client, body)
                t2 = time.perf_counter()
                if i >= 5:
                    lookup_us.append((t1 - t0) * 1e6)
                    echo_us.append((t2 - t1) * 1e6)
                if time.monotonic() > deadline and len(lookup_us) >= 20:
                    break
        peers = b.manager.stats()["peers"]  # type: ignore[union-attr]
    finally:
        client.close(0)
        echo.close()
        b.close()
        for s in servers:
            s.close()
    answered = sum(p.get("lookups", 0) for p in peers.values())
    p50, echo_p50 = _pct(lookup_us, 50), _pct(echo_us, 50)
    return {
        "keys": LOOKUP_KEYS,
        "peers": LOOKUP_PEERS,
        "rounds": len(lookup_us),
        "peer_lookups_sent": answered,
        "p50_us": round(p50, 1),
        "p99_us": round(_pct(lookup_us, 99), 1),
        "echo_p50_us": round(echo_p50, 1),
        "p50_vs_echo": round(p50 / echo_p50, 2),
    }


# -- the directory: a miss answered from replayed events, not by asking ---------------
class Holder:
    """A peer the directory follows, in this process: a PeerServer (answers where its
    stream is, and "do you have" from an empty index) and an EventPublisher announcing
    ``keys`` (replayed to the agent when it subscribes)."""

    def __init__(self, curve: Curve, keys: list[bytes]) -> None:
        self.cache = Cache(Index(64 * 1024, 4096, "lru"))
        self.events = EventPublisher(HOST, replay_endpoint=HOST, curve=curve)
        self.server = PeerServer(self.cache, bytearray(64 * 1024), HOST, curve, new_node_id(),
                                 events_ports=self.events.tcp_ports())  # fmt: skip
        for k in keys:
            self.events.stored(k, None, [], MEDIUM_CPU)
        self.events.flush()

    def close(self) -> None:
        self.server.close()
        self.events.close()


def _agent(root: Path, curve_dir: Path, seeds: list[str], inflight: int) -> tuple[Any, AgentClient]:
    import subprocess
    import sys

    runtime = root / "agent"
    runtime.mkdir(mode=0o700)
    cmd = [
        sys.executable,
        "-m",
        "kvnode",
        "agent",
        "--runtime-dir",
        str(runtime),
        "--cpu-bytes",
        "64MiB",
        "--log-level",
        "warning",
        "--set",
        f"peers.curve_secret_key={curve_dir / 'keys' / 'fleet.key_secret'}",
        "--set",
        f"peers.curve_authorized_dir={curve_dir / 'authorized'}",
        "--set",
        f"peers.seeds={','.join(seeds)}",
        "--set",
        "arena.prefault=false",
        "--set",
        f"peers.fetch_inflight_max={inflight}",
        "--set",
        "peers.deadline_ms=2000",
    ]
    # fmt: skip (asks are answered after the lookups they follow: room for all of them)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + WAIT_S_MAX
    while True:
        c = AgentClient(runtime, name="peer-bench", timeout_s=10.0)
        try:
            c.stats()
            return proc, c
        except KVNodeError:
            c.close()
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("agent did not start") from None
            time.sleep(0.1)


def measure_directory(tmp: Path, curve: Curve, peers: int, rounds: int) -> dict[str, Any]:
    """A real agent follows ``peers`` in-process holders' event streams; lookups of 64
    keys its directory places at one holder (answered PENDING at once, one targeted
    ask) against lookups of 64 keys in its own arena, in turns."""
    keys = [[os.urandom(16) for _ in range(LOOKUP_KEYS)] for _ in range(rounds + 5)]
    per_peer: list[list[bytes]] = [[] for _ in range(peers)]
    for r, ks in enumerate(keys):
        per_peer[r % peers].extend(ks)
    holders = [Holder(curve, ks) for ks in per_peer]
    root = tmp / f"dir{peers}"
    root.mkdir()
    proc, c = _agent(root, tmp, [h.server.endpoint for h in holders], len(keys) * LOOKUP_KEYS)
    local = [os.urandom(16) for _ in range(LOOKUP_KEYS)]
    local_us: list[float] = []
    dir_us: list[float] = []
    try:
        with serving([h.server for h in holders]):
            end = time.monotonic() + WAIT_S_MAX * 4
            while True:
                d = c.stats()["peers"].get("directory", {})
                if d.get("peers_synced") == peers and d.get("entries") == len(keys) * LOOKUP_KEYS:
                    break
                if time.monotonic() > end:
                    raise RuntimeError(f"directory never filled: {d}")
                time.sleep(0.1)
            for _, slot in c.reserve(local, [4096] * LOOKUP_KEYS):
                c.write(slot, bytes(4096))  # type: ignore[arg-type]
            c.commit(local, [0] * LOOKUP_KEYS)
            for i, ks in enumerate(keys):
                t0 = time.perf_counter()
                hit = c.lookup(local)
                t1 = time.perf_counter()
                got = c.lookup(ks)
                t2 = time.perf_counter()
                if i >= 5:
                    local_us.append((t1 - t0) * 1e6)
                    dir_us.append((t2 - t1) * 1e6)
                assert all(s == Lookup.HIT for s in hit), hit
                assert all(s == Lookup.PENDING for s in got), c.stats()["peers"]
            asked = sum(h.server.stats()["have_requests"] for h in holders)
            d = c.stats()["peers"]["directory"]
    finally:
        c.close()
        proc.terminate()
        proc.wait(30)
        for h in holders:
            h.close()
    return {"peers": peers, "rounds": len(dir_us), "local_p50_us": round(_pct(local_us, 50), 1),
            "directory_p50_us": round(_pct(dir_us, 50), 1),
            "directory_p99_us": round(_pct(dir_us, 99), 1),
            "peer_asks_per_lookup": round(asked / len(keys), 2),
            "directory_entries": d.get("entries")}  # fmt: skip


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


def _summary(xs: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(xs), 3),
        "min": round(min(xs), 3),
        "max": round(max(xs), 3),
    }


def fleet_curve(tmp: Path) -> Curve:
    keys, auth = tmp / "keys", tmp / "authorized"
    keys.mkdir()
    auth.mkdir()
    pub, sec = zmq.auth.create_certificates(keys, "fleet")
    (auth / "fleet.key").write_bytes(Path(pub).read_bytes())
    return Curve.load(str(sec), str(auth))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="4,16,32", help="chunk sizes to fetch")
    ap.add_argument("--total-mib", type=int, default=128, help="bytes fetched per round")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lookup-rounds", type=int, default=200)
    ap.add_argument("--budget-s", type=float, default=120.0, help="stop repeating after this")
    args = ap.parse_args()
    sizes = [int(s) * MiB for s in args.sizes_mib.split(",")]
    start = time.monotonic()
    per_part = args.budget_s / (2 * len(sizes) + 1)
    out: dict[str, Any] = {"host": "127.0.0.1", "total_MiB_per_round": args.total_mib}
    with tempfile.TemporaryDirectory() as tmp:
        curve = fleet_curve(Path(tmp))
        fetch: dict[str, Any] = {}
        for size in sizes:
            for label, c in (("plain", None), ("curve", curve)):
                deadline = time.monotonic() + per_part
                got = measure_fetch(size, args.total_mib * MiB, c, args.repeats, deadline)
                fetch[f"{size // MiB}MiB_{label}"] = got
        out["fetch"] = fetch
        out["fetch_ratio_min"] = min(v["ratio"] for v in fetch.values())
        out["fetch_ratio_target"] = 0.8
        out["lookup"] = measure_lookup(curve, args.lookup_rounds, time.monotonic() + per_part)
        d8 = measure_directory(Path(tmp), curve, 8, args.lookup_rounds)
        d64 = measure_directory(Path(tmp), curve, 64, args.lookup_rounds)
        out["directory"] = {"8": d8, "64": d64}
        out["local_lookup_p50_us"] = d64["local_p50_us"]
        out["directory_lookup_p50_us_8"] = d8["directory_p50_us"]
        out["directory_lookup_p50_us_64"] = d64["directory_p50_us"]
        out["directory_64_over_local"] = round(d64["directory_p50_us"] / d64["local_p50_us"], 2)
    out["elapsed_s"] = round(time.monotonic() - start, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
