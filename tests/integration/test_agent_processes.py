"""A real agent process, real client processes, real sockets and shared memory."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
import zmq

from kvnode.errors import AgentUnavailable
from kvnode.ipc import protocol as P
from kvnode.ipc.client import AgentClient, Lookup, Status, checksum
from kvnode.ipc.segment import segment_exists
from tests.conftest import AgentProcess

WRITER = r"""
import hashlib, json, os, sys
from kvnode.ipc.client import AgentClient, Status
rt, wid, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = AgentClient(rt, name=f"w{wid}", timeout_s=5); c.connect()
stored = 0
for i in range(n):
    key = hashlib.blake2b(f"{wid}-{i}".encode(), digest_size=16).digest()
    data = hashlib.shake_256(key).digest(50_000 + 997 * i)
    st = c.put(key, data)
    assert st in (Status.OK, Status.EXISTS, Status.NO_SPACE), st
    stored += st == Status.OK
    # read back someone else's chunk when present
    other = hashlib.blake2b(f"{(wid + 1) % 4}-{i}".encode(), digest_size=16).digest()
    got = c.get(other)
    if got is not None:
        assert got == hashlib.shake_256(other).digest(50_000 + 997 * i), "corrupt read"
print(json.dumps({"stored": stored}))
c.close()
"""

HOLDER = r"""
import os, sys, time
from kvnode.ipc.client import AgentClient
rt = sys.argv[1]
c = AgentClient(rt, name="holder", timeout_s=5); c.connect()
c.put(b"P" * 16, os.urandom(1 << 20))
(st, slot), = c.reserve([b"R" * 16], [8 << 20])   # a write lease it never commits
assert slot is not None
c.pin([b"P" * 16])
print("ready", flush=True)
time.sleep(600)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def test_concurrent_clients_store_and_read_byte_for_byte(agent: AgentProcess) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(agent.runtime_dir), str(w), "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )  # fmt: skip
        for w in range(4)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert json.loads(out)["stored"] > 0
    with AgentClient(agent.runtime_dir, timeout_s=2) as c:
        s = c.stats()
        assert s["counters"]["commits"] >= 4 and s["counters"]["errors"] == 0
        assert s["arena"]["reserved"] == 0 and s["arena"]["pinned"] == 0


def test_killed_client_leaks_nothing_within_one_second(agent: AgentProcess) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(agent.runtime_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with AgentClient(agent.runtime_dir, timeout_s=2) as c:
            s = c.stats()
            assert s["arena"]["reserved"] == 1 and s["arena"]["pinned"] == 1
            used_before = s["arena"]["bytes_used"]
            holder.send_signal(signal.SIGKILL)  # not reaped yet: a zombie counts as dead
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.0:
                s = c.stats()
                if s["arena"]["reserved"] == 0 and s["arena"]["pinned"] == 0:
                    break
                time.sleep(0.02)
            assert s["arena"]["reserved"] == 0 and s["arena"]["pinned"] == 0, (
                "not reclaimed within 1 s"
            )
            assert s["arena"]["bytes_used"] == used_before - (8 << 20)
            assert s["counters"]["reclaimed_leases"] == 1 and s["counters"]["reclaimed_pins"] == 1
            # the lease's key is free again for others
            assert c.put(b"R" * 16, b"x" * 100) == Status.OK
    finally:
        holder.kill()
        holder.wait()


def test_fuzzed_frames_do_not_stop_the_agent(agent: AgentProcess) -> None:
    rng = random.Random(1234)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{agent.runtime_dir / 'agent.sock'}")
    frames: list[list[bytes]] = [
        [b""],
        [b"\x01"],
        [b"\x07" + msgspec.msgpack.encode([1, 1, "x", 1])],
        [b"\x01" + msgspec.msgpack.encode([99, 5])],
        [b"\x01" + msgspec.msgpack.encode([3, 6, 999, [b"k"]])],  # unknown client
        [b"\x01" + msgspec.msgpack.encode([3, 7, 1, [b"k"] * 100_000])],
        [b"a", b"b", b"c"],
        [os.urandom(64 << 20)],  # over request_bytes_max: the connection is dropped
    ]
    for _ in range(300):
        frames.append([bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200)))])
        frames.append([b"\x01" + bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 60)))])
    for f in frames:
        sock.send_multipart(f)
    time.sleep(0.5)
    errors = 0
    while sock.poll(200):
        rep = P.decode_reply(sock.recv())
        errors += isinstance(rep, P.Error)
    sock.close()
    assert errors > 100  # bad requests got error replies
    with AgentClient(agent.runtime_dir, timeout_s=2) as c:
        assert c.put(b"k" * 16, b"still serving") == Status.OK
        assert c.get(b"k" * 16) == b"still serving"
        s = c.stats()
        assert s["counters"]["bad_frames"] > 100
    assert agent.proc is not None and agent.proc.poll() is None


def test_clients_survive_an_agent_restart(runtime_dir: Path) -> None:
    a = AgentProcess(runtime_dir).start()
    c = AgentClient(runtime_dir, timeout_s=1.0, retry_interval_s=0.05)
    try:
        c.connect()
        assert c.put(b"a" * 16, b"before") == Status.OK
        gen = c.generation
        a.kill()  # crash: socket and segment left behind
        with pytest.raises(AgentUnavailable):
            c.lookup([b"a" * 16])
        a = AgentProcess(runtime_dir).start()  # cleans the stale socket and segment
        deadline = time.monotonic() + 5
        while True:
            try:
                states = c.lookup([b"a" * 16])
                break
            except AgentUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert states == [Lookup.MISS]  # a fresh arena
        assert c.generation != gen
        assert c.put(b"b" * 16, b"after") == Status.OK and c.get(b"b" * 16) == b"after"
    finally:
        c.close()
        a.stop()


def test_a_call_the_agent_took_and_never_answered_fails_once_the_agent_dies(
    runtime_dir: Path,
) -> None:
    """The agent takes a call and is killed before it answers: the call fails as soon
    as the agent has exited (its pidfd), not at the end of its timeout, which a vLLM
    step would otherwise spend waiting on every agent crash."""
    a = AgentProcess(runtime_dir).start()
    c = AgentClient(runtime_dir, timeout_s=20.0, heartbeat=False)
    try:
        c.connect()
        a.proc.send_signal(signal.SIGSTOP)  # the call reaches it; no answer comes
        killer = threading.Timer(0.5, a.kill)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(AgentUnavailable, match="exited before it answered"):
            c.lookup([b"a" * 16])
        elapsed = time.monotonic() - t0
        killer.join()
        assert elapsed < 5.0, f"the call waited {elapsed:.1f} s for an agent that had died"
        a = AgentProcess(runtime_dir).start()  # and the next call registers with the next
        deadline = time.monotonic() + 10
        while True:
            try:
                assert c.lookup([b"a" * 16]) == [Lookup.MISS]
                break
            except AgentUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        c.close()
        a.stop()


def test_a_hello_to_an_agent_that_dies_before_it_answers_fails_at_its_exit(
    runtime_dir: Path,
) -> None:
    """A client registers with an agent that is stopped, then killed, before it
    answers: the Hello fails at the agent's exit (the pid its lock file names), not
    at the end of the timeout."""
    a = AgentProcess(runtime_dir).start()
    c = AgentClient(runtime_dir, timeout_s=20.0, heartbeat=False)
    try:
        a.proc.send_signal(signal.SIGSTOP)  # it neither accepts nor answers
        killer = threading.Timer(0.5, a.kill)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(AgentUnavailable, match="exited"):
            c.connect()
        elapsed = time.monotonic() - t0
        killer.join()
        assert elapsed < 5.0, f"the Hello waited {elapsed:.1f} s for an agent that had died"
    finally:
        c.close()
        a.stop()


def test_sigterm_unlinks_segment_and_socket(runtime_dir: Path) -> None:
    a = AgentProcess(runtime_dir).start()
    with AgentClient(runtime_dir) as c:
        seg = c.stats()["runtime_dir"]
        assert seg == str(runtime_dir)
    from kvnode.agent.config import load_config

    name = load_config(None, env={}, overrides={"agent.runtime_dir": str(runtime_dir)}).segment_name
    assert segment_exists(name)
    assert a.stop() == 0
    assert not (runtime_dir / "agent.sock").exists()
    assert not segment_exists(name)


def test_second_agent_on_same_runtime_dir_is_refused(agent: AgentProcess) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "kvnode", "agent", "--runtime-dir", str(agent.runtime_dir), "--cpu-bytes", "16MiB"],
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    # A start-up refusal: one line naming the key, exit 2 (as every configuration conflict).
    assert r.returncode == 2 and "another agent" in r.stderr and "agent.runtime_dir" in r.stderr
    with AgentClient(agent.runtime_dir) as c:  # the first one is untouched
        assert c.put(b"z" * 16, b"ok") == Status.OK


def test_absent_agent_is_an_error_not_a_hang(tmp_path: Path) -> None:
    c = AgentClient(tmp_path / "nobody", timeout_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(AgentUnavailable):
        c.lookup([b"x" * 16])
    assert time.monotonic() - t0 < 1.0


def test_checksum_detects_overwritten_bytes(client: AgentClient) -> None:
    from kvnode.errors import ChecksumError

    data = os.urandom(200_000)
    assert client.put(b"c" * 16, data) == Status.OK
    ((st, slot),) = client.pin([b"c" * 16])
    assert slot is not None and slot.checksum == checksum(data)
    client.views(slot)[0][100] ^= 0xFF  # corrupt in place
    client.release([b"c" * 16])
    with pytest.raises(ChecksumError):
        client.get(b"c" * 16)


def test_eviction_under_pressure_keeps_pinned_entries(client: AgentClient) -> None:
    big = os.urandom(4 << 20)
    assert client.put(b"keep" + b"\0" * 12, big) == Status.OK
    client.pin([b"keep" + b"\0" * 12])
    for i in range(40):  # 160 MiB through a 64 MiB arena
        assert client.put(i.to_bytes(16, "little"), os.urandom(4 << 20)) == Status.OK
    assert client.get(b"keep" + b"\0" * 12) == big
    client.release([b"keep" + b"\0" * 12])
    s = client.stats()
    assert s["counters"]["evictions"] > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="granting a group the process is not in needs root")
def test_group_access_by_numeric_gid(runtime_dir: Path) -> None:
    """agent.group as a bare gid (as in containers): socket, directory and arena get it."""
    gid = 4242
    a = AgentProcess(runtime_dir, env={"KVNODE_AGENT_GROUP": str(gid)}).start()
    try:
        from kvnode.agent.config import load_config

        cfg = load_config(None, env={}, overrides={"agent.runtime_dir": str(runtime_dir)})
        shm = Path("/dev/shm") / cfg.segment_name.lstrip("/")
        for path, mode in ((runtime_dir, 0o750), (runtime_dir / "agent.sock", 0o660), (shm, 0o660)):
            st = path.stat()
            assert st.st_gid == gid, path
            assert st.st_mode & 0o777 == mode, (path, oct(st.st_mode))
    finally:
        a.stop()


def test_owner_only_by_default(agent: AgentProcess) -> None:
    assert (agent.runtime_dir / "agent.sock").stat().st_mode & 0o077 == 0
    assert agent.runtime_dir.stat().st_mode & 0o077 == 0
