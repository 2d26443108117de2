"""What peers buy a fleet: the cluster hit ratio of N real agents on a production trace.

Starts ``--nodes`` real ``kvnode agent`` processes on loopback, each with an arena of
``--blocks-per-node`` entries of ``--entry-bytes``, and replays a Mooncake-format trace
(``hash_ids``: one prefix-chained id per block) through them, the client doing what the
connector does on the node a request is routed to: look the chain up (waiting while
blocks are PENDING, as the connector polls), pin and release the leading hits, reserve,
write and commit the rest with their parents. Routing: round robin (default), or
``--route affinity`` (a cache-aware router's guess: the node it last sent the longest
prefix to when that prefix is longer than one block, else the next in turn).

Twice: peers off (node-local caches), then peers on (CURVE, every agent follows every
other's KV events into its directory; a local miss fetches from one holder). The
reference computed in the same run: one pooled cache of the same total size
(``nodes x blocks``, offline LRU). Prints one JSON line: ``hit_peers_off``,
``hit_peers_on``, ``hit_pooled``, the ratios, fetch latency (from the first lookup
answered PENDING to the blocks readable) and bytes moved between nodes.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq.auth

from kvnode.errors import KVNodeError
from kvnode.ipc.client import AgentClient
from kvnode.ipc.protocol import Lookup

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
# One trace reader and one offline LRU for every benchmark (the pooled reference here is
# the same LRU trace_bench compares policies against).
from trace_bench import DEFAULT_TRACE, Trace, load_trace, pin_prefix, sim_lru, store_missing  # noqa: E402

PENDING_WAIT_S = 2.0  # a request waits at most this long for a peer's blocks
AFFINITY_BLOCKS_MIN = 2  # a prefix this long (blocks) or longer sends a request to its node


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def key_of(block: int) -> bytes:
    return block.to_bytes(16, "little")


class Node:
    """One agent process and the client that plays the connector on it."""

    def __init__(self, root: Path, name: str, settings: dict[str, str], cpu_bytes: int) -> None:
        self.runtime = root / name
        self.runtime.mkdir(mode=0o700)
        cmd = [sys.executable, "-m", "kvnode", "agent", "--runtime-dir", str(self.runtime),
               "--cpu-bytes", str(cpu_bytes), "--log-level", "warning"]  # fmt: skip
        for k, v in settings.items():
            cmd += ["--set", f"{k}={v}"]
        self._log = open(root / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self.client: AgentClient | None = None

    def connect(self, timeout_s: float = 60.0) -> AgentClient:
        deadline = time.monotonic() + timeout_s
        while True:
            c = AgentClient(self.runtime, name="cluster-bench", timeout_s=30.0)
            try:
                c.stats()
                self.client = c
                return c
            except KVNodeError:
                c.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agent {self.runtime.name} did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class Cluster:
    def __init__(self, args: argparse.Namespace, root: Path, peers: bool) -> None:
        self.args = args
        n = args.nodes
        ports = [(free_port(), free_port(), free_port()) for _ in range(n)]
        base = {"arena.page_bytes": str(args.entry_bytes), "arena.prefault": "false",
                "arena.publish_index": "false"}  # fmt: skip
        if peers:
            keys = root / "keys"
            auth = root / "authorized"
            auth.mkdir(parents=True)
            keys.mkdir()
            pub, sec = zmq.auth.create_certificates(str(keys), "fleet")
            (auth / "fleet.key").write_bytes(Path(pub).read_bytes())
            base |= {"peers.curve_secret_key": sec, "peers.curve_authorized_dir": str(auth),
                     "peers.deadline_ms": "200", "peers.negative_ttl_s": "0.5"}  # fmt: skip
        self.nodes: list[Node] = []
        for i in range(n):
            s = dict(base)
            if peers:
                listen, pub_port, rep_port = ports[i]
                s["peers.listen"] = f"tcp://127.0.0.1:{listen}"
                s["peers.seeds"] = ",".join(
                    f"tcp://127.0.0.1:{ports[j][0]}" for j in range(n) if j != i
                )
                s["events.endpoint"] = f"tcp://*:{pub_port}"
                s["events.replay_endpoint"] = f"tcp://127.0.0.1:{rep_port}"
            self.nodes.append(Node(root, f"n{i}", s, args.blocks_per_node * args.entry_bytes))
        for node in self.nodes:
            node.connect()
        self.peers = peers
        self.fetch_s: list[float] = []

    def wait_synced(self, timeout_s: float = 60.0) -> None:
        """Until every directory follows every other node's stream."""
        want = len(self.nodes) - 1
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            assert node.client is not None
            while True:
                d = node.client.stats()["peers"].get("directory", {})
                if d.get("peers_synced", 0) >= want:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"directories not synced: {d}")
                time.sleep(0.1)

    def request(self, c: AgentClient, ids: list[int]) -> int:
        """The connector's calls for one request; returns its leading hits."""
        keys = [key_of(b) for b in ids]
        states = c.lookup(keys)
        t0 = time.perf_counter()
        waited = False
        deadline = time.monotonic() + PENDING_WAIT_S
        while True:
            n = next((i for i, s in enumerate(states) if s == Lookup.MISS), len(states))
            if Lookup.PENDING not in states[:n]:
                # Every leading block readable; a peer may hold more further on.
                if n == len(keys) or not self.peers or not waited:
                    break
                more = c.lookup(keys[n:])
                if more[0] != Lookup.PENDING:
                    break
                states = states[:n] + more
                continue
            if time.monotonic() > deadline:
                n = states.index(Lookup.PENDING)
                break
            waited = True
            time.sleep(0.0005)
            # Ask again about the blocks still coming only: a lookup is also a use of
            # the blocks it finds, and the local hits were used once already.
            p = states.index(Lookup.PENDING)
            states = states[:p] + c.lookup(keys[p:n]) + states[n:]
        if waited:
            self.fetch_s.append(time.perf_counter() - t0)
        got = pin_prefix(c, keys[:n])
        rest = keys[got:]
        if rest:
            parents = [keys[got - 1] if got else b""] + keys[got:-1]
            payload = bytes(self.args.entry_bytes)
            store_missing(c, rest, parents, self.args.entry_bytes, payload)
        return got

    def replay(self, trace: Trace) -> dict[str, Any]:
        hits = total = 0
        sent: dict[int, int] = {}  # affinity: block -> the node last sent its prefix
        turn = 0
        for ids in trace:
            i = turn % len(self.nodes)
            turn += 1
            if self.args.route == "affinity":
                # The node last sent the longest known prefix, when it is more than the
                # first block (a system prompt every request shares would send all
                # requests to one node); else the next in turn.
                n = 0
                while n < len(ids) and ids[n] in sent:
                    n += 1
                if n >= AFFINITY_BLOCKS_MIN:
                    i = sent[ids[n - 1]]
                    turn -= 1
                for b in ids:
                    sent[b] = i
            c = self.nodes[i].client
            assert c is not None
            hits += self.request(c, ids)
            total += len(ids)
        for node in self.nodes:
            assert node.client is not None
            node.client.flush()
        return {"hit_ratio": hits / total}

    def moved(self) -> dict[str, Any]:
        fetched = bytes_ = asked = routed = fallback = 0
        entries: list[int] = []
        for node in self.nodes:
            assert node.client is not None
            p = node.client.stats().get("peers", {})
            fetched += p.get("fetched", 0)
            bytes_ += p.get("fetched_bytes", 0)
            d = p.get("directory", {})
            routed += d.get("routed", 0)
            fallback += d.get("fallback", 0)
            entries.append(d.get("entries", 0))
            asked += p.get("queries", 0)
        return {"fetched_blocks": fetched, "bytes_moved": bytes_, "peer_queries": asked,
                "directory_routed": routed, "directory_fallback": fallback,
                "directory_entries_max": max(entries) if entries else 0}  # fmt: skip

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def run(args: argparse.Namespace, trace: Trace, peers: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvnode-cluster-") as tmp:
        cluster = Cluster(args, Path(tmp), peers)
        try:
            if peers:
                cluster.wait_synced()
            t0 = time.perf_counter()
            out = cluster.replay(trace)
            out["replay_s"] = round(time.perf_counter() - t0, 1)
            if peers:
                time.sleep(0.2)
                out.update(cluster.moved())
                f = sorted(cluster.fetch_s)
                if f:
                    out["fetch_ms_p50"] = round(statistics.median(f) * 1e3, 2)
                    out["fetch_ms_p99"] = round(f[int(0.99 * (len(f) - 1))] * 1e3, 2)
                    out["fetches_waited"] = len(f)
            return out
        finally:
            cluster.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--blocks-per-node", type=int, default=6000)
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--route", choices=("round-robin", "affinity"), default="round-robin")
    ap.add_argument("--entry-bytes", type=int, default=4096)
    ap.add_argument("--limit", type=int, default=None, help="first N requests only")
    args = ap.parse_args()
    t0 = time.perf_counter()
    trace = load_trace(args.trace, args.limit)
    pooled = sim_lru(trace, args.nodes * args.blocks_per_node)
    off = run(args, trace, peers=False)
    on = run(args, trace, peers=True)
    out: dict[str, Any] = {
        "nodes": args.nodes,
        "blocks_per_node": args.blocks_per_node,
        "route": args.route,
        "requests": len(trace),
        "blocks": sum(len(t) for t in trace),
        "hit_peers_off": round(off["hit_ratio"], 4),
        "hit_peers_on": round(on["hit_ratio"], 4),
        "hit_pooled": round(pooled, 4),
        "on_over_pooled": round(on["hit_ratio"] / pooled, 3) if pooled else None,
        "on_over_off": round(on["hit_ratio"] / off["hit_ratio"], 2) if off["hit_ratio"] else None,
        "peers_off_replay_s": off["replay_s"],
        "peers_on": {k: v for k, v in on.items() if k != "hit_ratio"},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
