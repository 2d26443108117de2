"""A real agent's KV-event replay socket under requesters that ask and never read.

The agent publishes ``--batches`` event batches (one commit each, 256 tokens per chunk);
then ``--requesters`` sockets each send ``--requests`` replay requests from sequence 0
and never read an answer. While they sit there, one client looks up a key in a loop.
Prints one JSON object: lookup latency with no flood (the reference, same run) and
during the flood, lookups that failed their timeout, the agent's resident memory before,
at its peak during, and after the requesters left, the replay counters the agent
reports, and whether SIGTERM still stopped the agent and removed its arena.

With ``--curve`` the replay socket is on the fleet certificate and the requesters hold
an authorized key (the worst case: a fleet member that misbehaves). Without it the
replay socket is plaintext tcp on loopback (``events.insecure``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from kvnode.agent.replay import END_SEQ
from kvnode.errors import KVNodeError
from kvnode.ipc.checksum import checksum
from kvnode.ipc.client import AgentClient, Status

CHUNK_TOKENS = 256
DATA_BYTES = 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def agent_segments(runtime_dir: Path) -> set[str]:
    """Names in /dev/shm of the agent's arena, lookup index and disk listing."""
    from kvnode.agent.config import load_config
    from kvnode.ipc.shmindex import listing_name

    cfg = load_config(env={}, overrides={"agent.runtime_dir": str(runtime_dir)})
    name = cfg.segment_name.lstrip("/")
    return {name, name + "-idx", listing_name(name + "-idx").lstrip("/")}


class Run:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.runtime = tmp / "run"
        self.replay = f"tcp://127.0.0.1:{free_port()}"
        sets = {
            "events.endpoint": f"ipc://{tmp}/events",
            "events.replay_endpoint": self.replay,
            "arena.prefault": "false",
        }
        self.client_keys: tuple[bytes, bytes] | None = None
        self.server_public = b""
        if args.curve:
            keys = tmp / "keys"
            auth = keys / "authorized"
            auth.mkdir(parents=True)
            pub, sec = zmq.auth.create_certificates(str(keys), "fleet")
            os.link(pub, auth / "fleet.key")
            self.server_public, _ = zmq.auth.load_certificate(pub)
            self.client_keys = zmq.auth.load_certificate(sec)  # type: ignore[assignment]
            sets["peers.curve_secret_key"] = sec
            sets["peers.curve_authorized_dir"] = str(auth)
        elif args.insecure_key:
            sets["events.insecure"] = "true"
        cmd = [sys.executable, "-m", "kvnode", "agent", "--runtime-dir", str(self.runtime),
               "--cpu-bytes", "256MiB"]  # fmt: skip
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        self.log = open(tmp / "agent.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = self._connect()

    def _connect(self) -> AgentClient:
        deadline = time.monotonic() + 30
        while True:
            c = AgentClient(self.runtime, name="bench", timeout_s=self.args.timeout_s)
            try:
                c.stats()
                return c
            except KVNodeError:
                c.close()
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    def fill(self) -> None:
        """One commit per call: about one published batch each."""
        c = self.client
        parent = b""
        for i in range(self.args.batches):
            key = i.to_bytes(16, "big")
            data = os.urandom(DATA_BYTES)
            ((st, slot),) = c.reserve([key], [DATA_BYTES])
            assert st == Status.OK and slot is not None, st
            c.write(slot, data)
            tokens = list(range(i, i + CHUNK_TOKENS))
            assert c.commit([key], [checksum(data)], [parent], [tokens]) == [Status.OK]
            parent = key

    def lookups(self, seconds: float) -> dict[str, Any]:
        lat: list[float] = []
        failed = 0
        key = [(0).to_bytes(16, "big")]
        peak = rss_mib(self.proc.pid)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                self.client.lookup(key)
                lat.append(time.perf_counter() - t0)
            except KVNodeError:
                failed += 1
                self.client.close()
                self.client = self._connect()
            peak = max(peak, rss_mib(self.proc.pid))
            time.sleep(0.002)
        lat.sort()
        return {
            "lookups": len(lat),
            "failed": failed,
            "p50_ms": round(statistics.median(lat) * 1e3, 3) if lat else None,
            "max_ms": round(lat[-1] * 1e3, 3) if lat else None,
            "rss_peak_mib": round(peak, 1),
        }

    def requester(self, ctx: zmq.Context) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if not self.args.read:
            s.setsockopt(zmq.RCVHWM, 1)  # it never reads: keep its own queue empty
            s.setsockopt(zmq.RCVBUF, 4096)
        if self.client_keys is not None:
            s.curve_publickey, s.curve_secretkey = self.client_keys
            s.curve_serverkey = self.server_public
        s.connect(self.replay)
        return s

    def stop(self) -> dict[str, Any]:
        seg = agent_segments(self.runtime) & set(os.listdir("/dev/shm"))
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(self.args.stop_timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
            self.proc.kill()
            self.proc.wait()
        stopped_s = time.monotonic() - t0
        left = seg & set(os.listdir("/dev/shm"))
        self.log.close()
        return {
            "sigterm_rc": rc,
            "sigterm_s": round(stopped_s, 2),
            "shm_segments": len(seg),
            "shm_left": len(left),
        }


def read_all(socks: list[zmq.Socket], stop: threading.Event, out: dict[str, Any]) -> None:
    """Honest requesters: read every answer; count the replays that reached their end."""
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    done = batches = 0
    while not stop.is_set():
        for s, _ in poller.poll(50):
            while s.poll(0):
                frames = s.recv_multipart()
                if frames[2] == END_SEQ:
                    done += 1
                else:
                    batches += 1
    out["replays_read_to_end"] = done
    out["batches_read"] = batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=2700)
    ap.add_argument("--requesters", type=int, default=16)
    ap.add_argument("--requests", type=int, default=40, help="replay requests per requester")
    ap.add_argument("--flood-s", type=float, default=8.0)
    ap.add_argument("--timeout-s", type=float, default=5.0, help="a lookup's timeout")
    ap.add_argument("--stop-timeout-s", type=float, default=10.0)
    ap.add_argument("--curve", action="store_true")
    ap.add_argument("--read", action="store_true", help="honest requesters: read everything")
    ap.add_argument("--insecure-key", action="store_true",
                    help="set events.insecure=true (agents that know the key)")  # fmt: skip
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(args, Path(tmp))
        out: dict[str, Any] = {"batches": args.batches, "requesters": args.requesters,
                               "requests_each": args.requests, "curve": args.curve,
                               "read": args.read}  # fmt: skip
        try:
            run.fill()
            out["rss_filled_mib"] = round(rss_mib(run.proc.pid), 1)
            out["quiet"] = run.lookups(2.0)
            ctx = zmq.Context()
            socks = [run.requester(ctx) for _ in range(args.requesters)]
            for _ in range(args.requests):
                for s in socks:
                    s.send_multipart([b"", (0).to_bytes(8, "big")])
            stop = threading.Event()
            reader = threading.Thread(target=read_all, args=(socks, stop, out))
            if args.read:
                reader.start()
            out["flood"] = run.lookups(args.flood_s)
            stop.set()
            if args.read:
                reader.join()
            for s in socks:
                s.close(0)
            ctx.term()
            out["after_close"] = run.lookups(3.0)
            out["rss_after_mib"] = round(rss_mib(run.proc.pid), 1)
            stats = run.client.stats()
            out["events"] = {
                k: v for k, v in stats.get("events", {}).items() if k.startswith("replay")
            }
            ratio = out["flood"]["max_ms"] / max(out["quiet"]["max_ms"], 1e-3)
            out["flood_max_over_quiet_max"] = round(ratio, 1)
        finally:
            run.client.close()
            out.update(run.stop())
        print(json.dumps(out))


if __name__ == "__main__":
    main()
