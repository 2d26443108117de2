"""A local process that may open the agent's socket tries to stop it through libzmq:
by holding the routing ids the agent's socket will generate (a duplicate id is an
assertion in libzmq) and by opening connections until the agent has no descriptor
left to accept with (another assertion). Both with a real agent process."""

from __future__ import annotations

import ctypes
import os
import resource
import time
from pathlib import Path

import zmq

from kvnode.errors import KVNodeError
from kvnode.ipc import protocol as P
from kvnode.ipc.client import AgentClient
from tests.conftest import AgentProcess


def _wait(pred, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.05)


def predicted_ids(t_from: int, t_to: int, ahead: int = 40) -> set[bytes]:
    """The ids libzmq would give the next anonymous connections when the C library's
    rand() was seeded with a second in [t_from, t_to] (a few draws skipped): the
    start of the counter is two rand() values, the ids "\\0" + counter."""
    libc = ctypes.CDLL(None)
    out: set[bytes] = set()
    for t in range(t_from, t_to + 1):
        for skip in range(4):
            libc.srand(ctypes.c_uint(t))
            for _ in range(skip):
                libc.rand()
            low = libc.rand() & 0xFFFFFFFF
            high = (libc.rand() << 31) & 0xFFFFFFFF
            for j in range(ahead):
                out.add(b"\0" + (((high | low) + j) & 0xFFFFFFFF).to_bytes(4, "big"))
    return out


def _raise_own_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 16384 if hard == resource.RLIM_INFINITY else min(16384, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _stats_over(s: zmq.Socket) -> bool:
    s.send(P.encode(P.StatsReq(1)))
    return s.poll(2000) and isinstance(P.decode_reply(s.recv()), P.StatsRep)


def test_holding_predicted_routing_ids_does_not_abort_the_agent(runtime_dir: Path) -> None:
    """One process holds every id the agent's socket would give the next anonymous
    connections if its rand() were seeded with the start second (it was: a library
    seeds it with time()); ordinary clients and anonymous connections then come. Before
    the agent reseeded, the first ordinary client aborted it (socket_base.cpp:2113)."""
    env = {"KVNODE_AGENT_CONNECTIONS_PER_PROCESS_MAX": "4096",  # one attacker holds them all
           "KVNODE_AGENT_CONNECTIONS_PER_S_MAX": "100000"}  # fmt: skip
    t0 = int(time.time())
    a = AgentProcess(runtime_dir, env=env).start()
    t1 = int(time.time())
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 8192)
    held: list[zmq.Socket] = []
    anon: list[zmq.Socket] = []
    endpoint = f"ipc://{runtime_dir / 'agent.sock'}"
    try:
        # At least four candidate seconds (640 ids), also when the agent started within
        # the second it was launched in.
        for rid in predicted_ids(t0 - 3, t1):
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.setsockopt(zmq.ROUTING_ID, rid)
            d.connect(endpoint)
            held.append(d)
        assert len(held) >= 500
        assert _stats_over(held[-1])  # they are all connected (in order) by now
        for i in range(20):  # ordinary clients, and anonymous connections too
            with AgentClient(runtime_dir, name=f"c{i}", timeout_s=2.0, heartbeat=False) as c:
                c.connect()
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.connect(endpoint)
            anon.append(d)
            assert _stats_over(d)
        assert a.proc is not None and a.proc.poll() is None, a.log()[-2000:]
    finally:
        for d in held + anon:
            d.close(0)
        ctx.destroy(0)
        rc = a.stop()
    assert rc == 0, a.log()[-2000:]


def _dealers(ctx: zmq.Context, endpoint: str, n: int, reconnect: bool) -> list[zmq.Socket]:
    out = []
    for _ in range(n):
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.RECONNECT_IVL, 100 if reconnect else -1)
        d.connect(endpoint)
        out.append(d)
    return out


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_flood_of_connections_under_a_low_fd_limit(runtime_dir: Path) -> None:
    """1,200 connections that never say Hello, retried when refused, against a soft
    limit of 1,024 descriptors (the agent aborted at about 1,100: accept() failing
    with EMFILE is an assertion in libzmq): it stops accepting within its budget,
    stays up, and serves again once the flood is gone."""
    _raise_own_fd_limit()
    env = {"KVNODE_AGENT_CONNECTIONS_PER_S_MAX": "100000",
           "KVNODE_AGENT_CONNECTIONS_PER_PROCESS_MAX": "100000"}  # fmt: skip
    a = AgentProcess(runtime_dir, env=env).start()
    assert a.proc is not None
    pid = a.proc.pid
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (1024, 1024))
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 8192)
    try:
        flood = _dealers(ctx, f"ipc://{runtime_dir / 'agent.sock'}", 1200, reconnect=True)
        _wait(lambda: _fds(pid) >= 512)  # its budget: 1,024 less half
        time.sleep(1.0)  # the flood keeps knocking
        assert a.proc.poll() is None, a.log()[-2000:]
        assert _fds(pid) < 1024
        for d in flood:
            d.close(0)
        with AgentClient(runtime_dir, name="after", timeout_s=2.0, retry_interval_s=0.05,
                         heartbeat=False) as c:  # fmt: skip
            _wait(lambda: _connects(c))
            s = c.stats()
        assert s["counters"]["listener_pauses"] >= 1
        assert s["connections"]["fds_budget"] == 512
    finally:
        ctx.destroy(0)
        rc = a.stop()
    assert rc == 0, a.log()[-2000:]


def _connects(c: AgentClient) -> bool:
    try:
        c.connect()
        return True
    except KVNodeError:
        return False


def test_silent_connections_are_closed_and_one_process_gets_a_bounded_share(
    runtime_dir: Path,
) -> None:
    env = {"KVNODE_AGENT_HELLO_TIMEOUT_S": "1", "KVNODE_AGENT_CONNECTIONS_PER_PROCESS_MAX": "100"}
    a = AgentProcess(runtime_dir, env=env).start()
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 8192)
    endpoint = f"ipc://{runtime_dir / 'agent.sock'}"
    try:
        tool = ctx.socket(zmq.DEALER)  # a stats tool: no Hello, but it keeps asking
        tool.setsockopt(zmq.LINGER, 0)
        tool.connect(endpoint)
        silent = _dealers(ctx, endpoint, 60, reconnect=False)
        with AgentClient(runtime_dir, name="watch", timeout_s=2.0) as c:
            _wait(lambda: c.stats()["counters"]["refused_connections"] >= 60 and _stats_over(tool))
            assert c.stats()["connections"]["open"] <= 3  # c, its probe, the tool
            more = _dealers(ctx, endpoint, 250, reconnect=False)  # one process, past 100
            _wait(lambda: c.stats()["counters"]["refused_connections"] >= 60 + 150)
            assert c.stats()["connections"]["open"] <= 100 + 3
            c.lookup([b"k" * 16])  # the registered client was never touched
        for d in [tool, *silent, *more]:
            d.close(0)
    finally:
        ctx.destroy(0)
        a.stop()
