"""The tiers inside a real agent process, driven through the real client library:
restart from disk, corruption on disk, a full file system, S3 shared across agents,
S3 going away mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kvnode.ipc.client import AgentClient
from kvnode.ipc.protocol import Lookup, Status

MiB = 1024 * 1024
KVNODE = Path(sys.executable).with_name("kvnode")

pytestmark = pytest.mark.skipif(not KVNODE.exists(), reason="kvnode command not installed")


class AgentProc:
    def __init__(self, runtime_dir: Path, env: dict[str, str], cpu_bytes: str = "64MiB") -> None:
        self.runtime_dir = runtime_dir
        full = {k: v for k, v in os.environ.items() if not k.startswith("KVNODE_")}
        full.update(env)
        full.setdefault("KVNODE_ARENA_PREFAULT", "false")
        self.log = open(runtime_dir.parent / f"{runtime_dir.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(KVNODE), "agent", "--runtime-dir", str(runtime_dir), "--cpu-bytes", cpu_bytes],
            env=full,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.client = AgentClient(runtime_dir=runtime_dir, name="tier-test", timeout_s=2.0)
        end = time.monotonic() + 20
        while True:
            try:
                self.client.connect()
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"agent did not start: {self.logtext()}") from None
                time.sleep(0.1)

    def logtext(self) -> str:
        return (self.runtime_dir.parent / f"{self.runtime_dir.name}.log").read_text()[-3000:]

    def tiers(self) -> dict[str, Any]:
        return self.client.stats()["tiers"]

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        self.log.close()


@pytest.fixture
def agents():
    started: list[AgentProc] = []

    def start(runtime_dir: Path, **env: str) -> AgentProc:
        runtime_dir.mkdir(parents=True, exist_ok=True)
        a = AgentProc(runtime_dir, {f"KVNODE_{k.upper()}": v for k, v in env.items()})
        started.append(a)
        return a

    yield start
    for a in started:
        try:
            a.stop()
        except Exception:
            pass


def key(i: int) -> bytes:
    return (0xC0FFEE00 + i).to_bytes(16, "big")


def chunk(i: int, n: int = MiB) -> bytes:
    return os.urandom(n - 1) + bytes([i])


def wait_for(pred: Any, timeout_s: float = 10.0) -> Any:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def lookup_until_hit(c: AgentClient, k: bytes) -> list[Lookup]:
    seen = [c.lookup([k])[0]]
    while seen[-1] == Lookup.PENDING:
        time.sleep(0.01)
        seen.append(c.lookup([k])[0])
        assert len(seen) < 1000
    return seen


def put_all(c: AgentClient, datas: dict[bytes, bytes]) -> None:
    for k, v in datas.items():
        st = c.put(k, v)
        if st == Status.NO_SPACE:  # write-back holds pages until copied: try again
            time.sleep(0.2)
            st = c.put(k, v)
        assert st in (Status.OK, Status.EXISTS), st


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_restart_serves_from_disk(agents, tmp_path, policy):
    disk = tmp_path / "disk"
    env = {"disk_path": str(disk), "disk_write_policy": policy}
    a = agents(tmp_path / "run", **env)
    datas = {key(i): chunk(i) for i in range(8)}
    put_all(a.client, datas)
    if policy == "write_through":
        wait_for(lambda: a.tiers()["disk"]["entries"] == 8)
    a.stop()  # SIGTERM: write-back copies the arena out within the flush deadline
    b = agents(tmp_path / "run", **env)
    wait_for(lambda: b.tiers()["disk"]["entries"] == 8)
    for k, v in datas.items():
        seen = lookup_until_hit(b.client, k)
        assert seen[0] == Lookup.PENDING and seen[-1] == Lookup.HIT
        assert b.client.get(k) == v
    assert b.tiers()["disk"]["hits"] == 8


def test_corrupt_file_is_never_served(agents, tmp_path):
    disk = tmp_path / "disk"
    a = agents(tmp_path / "run", disk_path=str(disk), disk_write_policy="write_through")
    v = chunk(1)
    assert a.client.put(key(1), v) == Status.OK
    wait_for(lambda: a.tiers()["disk"]["entries"] == 1)
    a.stop()
    (f,) = list(disk.glob("*/*.kv"))
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    f.write_bytes(raw)
    b = agents(tmp_path / "run", disk_path=str(disk))
    seen = lookup_until_hit_or_miss(b.client, key(1))
    assert seen[-1] == Lookup.MISS
    assert b.client.get(key(1)) is None
    t = b.tiers()["disk"]
    assert t["corrupt"] == 1 and t["errors"] >= 1 and t["entries"] == 0
    assert not f.exists()


def lookup_until_hit_or_miss(c: AgentClient, k: bytes) -> list[Lookup]:
    seen = [c.lookup([k])[0]]
    while seen[-1] == Lookup.PENDING:
        time.sleep(0.01)
        seen.append(c.lookup([k])[0])
        assert len(seen) < 1000
    return seen


def test_full_file_system_agent_keeps_serving_from_memory(agents, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    a = None
    try:
        a = agents(tmp_path / "run", disk_path=str(mnt / "kv"), disk_write_policy="write_through")
        wait_for(lambda: a.tiers()["disk"]["scanning"] == 0)  # it has measured the mount
        (mnt / "filler").write_bytes(bytes(1536 * 1024))  # another tenant fills it
        datas = {key(i): chunk(i, 256 * 1024) for i in range(12)}
        put_all(a.client, datas)
        wait_for(lambda: a.tiers()["disk"]["errors"] >= 1)
        for k, v in datas.items():
            assert a.client.lookup([k]) == [Lookup.HIT]
            assert a.client.get(k) == v
        assert not list(mnt.glob("kv/*/.*.tmp"))
    finally:
        if a is not None:
            a.stop()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.s3
@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_fresh_agent_is_served_from_s3(agents, tmp_path, s3_endpoint, policy):
    bucket = s3_endpoint.new_bucket()
    s3 = {"s3_bucket": bucket, "s3_endpoint_url": s3_endpoint.url, "s3_region": "us-east-1"}
    a = agents(tmp_path / "a", disk_path=str(tmp_path / "da"), s3_write_policy=policy, **s3)
    datas = {key(i): chunk(i) for i in range(6)}
    put_all(a.client, datas)
    if policy == "write_through":
        wait_for(lambda: a.tiers()["s3"]["writes"] == 6)
    a.stop()
    b = agents(tmp_path / "b", disk_path=str(tmp_path / "db"), **s3)  # a new node
    for k, v in datas.items():
        seen = lookup_until_hit(b.client, k)
        assert seen[0] == Lookup.PENDING and seen[-1] == Lookup.HIT
        assert b.client.get(k) == v
    t = b.tiers()["s3"]
    assert t["hits"] == 6 and t["errors"] == 0
    assert b.client.lookup([key(99)]) in ([Lookup.PENDING], [Lookup.MISS])
    wait_for(lambda: b.client.lookup([key(99)]) == [Lookup.MISS])


@pytest.mark.s3
def test_s3_outage_mid_run(agents, tmp_path, s3_private):
    bucket = s3_private.new_bucket()
    a = agents(
        tmp_path / "a",
        s3_bucket=bucket,
        s3_endpoint_url=s3_private.url,
        s3_region="us-east-1",
        s3_write_policy="write_through",
        s3_timeout_s="1",
        s3_retries_max="1",
    )
    assert a.client.put(key(1), chunk(1)) == Status.OK
    wait_for(lambda: a.tiers()["s3"]["writes"] == 1)
    s3_private.stop()
    datas = {key(i): chunk(i, 256 * 1024) for i in range(2, 10)}
    put_all(a.client, datas)  # write-through copies fail: counted, never block
    t0 = time.monotonic()
    for i in range(100, 140):
        assert a.client.lookup([key(i)])[0] in (Lookup.MISS, Lookup.PENDING)
    assert time.monotonic() - t0 < 2.0  # lookups answer fast
    wait_for(lambda: a.tiers()["s3"]["errors"] >= 1, 20)
    wait_for(lambda: all(a.client.lookup([key(i)])[0] == Lookup.MISS for i in range(100, 140)), 20)
    for k, v in datas.items():
        assert a.client.get(k) == v  # the arena serves on
    wait_for(lambda: a.tiers()["s3"]["queue_depth"] == 0, 20)  # nothing stuck behind it
    t = a.tiers()["s3"]
    assert t["errors"] >= 1 and t["dropped"] + t["errors"] >= len(datas)


def test_disk_keys_are_listed_for_lookups_without_a_round_trip(agents, tmp_path):
    """A real agent whose only lower tier is the disk publishes the disk's keys next
    to the arena's index: a scheduler reading both knows which misses are certain.
    Keys found at start, written back and dropped are all followed; adding S3 or peers
    (tiers it cannot list) turns the index back to "ask the agent"."""
    import hashlib

    from kvnode.ipc.shmindex import LOWER_ASK, LOWER_LISTED, ShmIndexReader, listing_name

    def hkey(i: int) -> bytes:  # chunk keys are content hashes: the index relies on it
        return hashlib.blake2b(key(i), digest_size=16).digest()

    disk = tmp_path / "disk"
    env = {"disk_path": str(disk), "disk_write_policy": "write_through"}
    a = agents(tmp_path / "run", **env)
    datas = {hkey(i): chunk(i) for i in range(4)}
    put_all(a.client, datas)
    wait_for(lambda: a.tiers()["disk"]["entries"] == 4)
    a.stop()
    b = agents(tmp_path / "run", **env)
    c = b.client
    idx = ShmIndexReader(c.index_segment)
    listing = ShmIndexReader(listing_name(c.index_segment))
    try:
        wait_for(lambda: idx.lower_mode == LOWER_LISTED)
        assert listing.generation == idx.generation == c.generation
        assert listing.contains_many(list(datas)).all()  # found by the start-up scan
        assert not idx.contains_many(list(datas)).any()  # not in the arena
        other = hkey(99)
        assert not listing.contains_many([other]).any()
        assert c.put(other, chunk(99)) == Status.OK  # written through to disk
        wait_for(lambda: listing.contains_many([other]).all())
        c.drop([hkey(0)])
        wait_for(lambda: not listing.contains_many([hkey(0)]).any())
        assert listing.contains_many([hkey(1), hkey(2), hkey(3), other]).all()
        assert c.stats()["lookup_index"]["listing_complete"] == 1
    finally:
        listing.close()
        idx.close()
    b.stop()
    with_peers = agents(
        tmp_path / "run2", **env, peers_seeds="tcp://127.0.0.1:9", peers_insecure="true"
    )
    idx = ShmIndexReader(with_peers.client.index_segment)
    try:
        time.sleep(0.2)
        assert idx.lower_mode == LOWER_ASK
    finally:
        idx.close()
