"""Restarts and reclaims with real agent and client processes: a restarted agent is
never mistaken for the old one, idle clients remap by themselves, and a client whose
socket closes or whose process dies is reclaimed within a second, also from another
pid namespace."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from kvnode.ipc import protocol as P
from kvnode.ipc.client import AgentClient, Status
from tests.conftest import AgentProcess

REPO = Path(__file__).resolve().parents[2]


def _wait(pred, timeout_s: float = 5.0, step_s: float = 0.02) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if pred():
            return time.monotonic() - t0
        time.sleep(step_s)
    raise AssertionError(f"condition not met within {timeout_s}s")


def _payload(i: int) -> bytes:
    return (i.to_bytes(4, "little") * 16384)[: 40_000 + i]


def test_restart_twice_idle_and_active_clients_remap_and_lose_nothing(runtime_dir: Path) -> None:
    a = AgentProcess(runtime_dir).start()
    unmaps: list[int] = []
    maps: list[int] = []
    idle = AgentClient(
        runtime_dir, name="idle", timeout_s=1.0, retry_interval_s=0.05,
        on_map=lambda b: maps.append(len(b)), on_unmap=lambda b: unmaps.append(len(b)),
    )  # fmt: skip
    active = AgentClient(runtime_dir, name="active", timeout_s=1.0, retry_interval_s=0.05)
    wrong = dropped = 0
    try:
        idle.connect()
        active.connect()
        for gen_round in range(3):
            keys = [os.urandom(16) for _ in range(40)]
            for i, k in enumerate(keys):
                assert active.put(k, _payload(i)) == Status.OK
            for i, k in enumerate(keys):
                got = idle.get(k)
                wrong += got != _payload(i)
            s = active.stats()
            dropped += s["counters"]["drops"]
            if gen_round == 2:
                break
            old_gen = idle.generation
            if gen_round == 0:
                a.kill()  # crash
            else:
                a.stop()  # orderly
            a = AgentProcess(runtime_dir).start()
            # The idle client makes no call: its heartbeat hears "stale generation"
            # and it registers and remaps on its own.
            _wait(lambda g=old_gen: idle.generation not in (0, g), timeout_s=6.0)
        assert wrong == 0, f"{wrong} reads returned wrong bytes"
        assert dropped == 0, f"{dropped} good entries dropped"
        assert idle.remaps == 2 and len(maps) == 3 and len(unmaps) == 2
    finally:
        idle.close()
        active.close()
        a.stop()


def test_old_generation_request_is_refused_not_served(runtime_dir: Path) -> None:
    a = AgentProcess(runtime_dir).start()
    try:
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 2000)
        s.connect(f"ipc://{runtime_dir / 'agent.sock'}")
        s.send(P.encode(P.Hello(1, "old", os.getpid())))
        w = P.decode_reply(s.recv())
        assert isinstance(w, P.Welcome)
        s.close()
        a.stop()
        a = AgentProcess(runtime_dir).start()
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 2000)
        s.connect(f"ipc://{runtime_dir / 'agent.sock'}")
        s.send(P.encode(P.ReserveReq(2, w.client_id, w.generation, [b"k" * 16], [10])))
        rep = P.decode_reply(s.recv())
        assert isinstance(rep, P.Error) and rep.code == P.ErrCode.STALE_GENERATION
        s.close()
    finally:
        a.stop()


RAW_HOLDER = r"""
import os, sys, time, zmq
sys.path.insert(0, sys.argv[2])
from kvnode.ipc import protocol as P
s = zmq.Context().socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0)
s.connect("ipc://" + sys.argv[1] + "/agent.sock")
def ask(m):
    s.send(P.encode(m)); return P.decode_reply(s.recv())
w = ask(P.Hello(1, "holder", os.getpid()))
print(ask(P.ReserveReq(2, w.client_id, w.generation, [b"R" * 16], [1 << 20])).status[0], flush=True)
mode = sys.argv[3]
if mode == "close":
    s.close(0)      # the process lives on, its socket is gone
    time.sleep(600)
time.sleep(600)     # killed from outside
"""


def _reserved(c: AgentClient) -> int:
    return int(c.stats()["arena"]["reserved"])


def test_closed_socket_of_a_live_process_is_reclaimed_within_one_second(
    agent: AgentProcess,
) -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", RAW_HOLDER, str(agent.runtime_dir), str(REPO), "close"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "0"
        with AgentClient(agent.runtime_dir, timeout_s=2) as c:
            took = _wait(lambda: _reserved(c) == 0, timeout_s=1.0)
            assert p.poll() is None  # still alive: only the socket went
            assert c.stats()["counters"]["reclaimed_leases"] == 1
        print(f"socket close reclaimed in {took * 1000:.0f} ms")
    finally:
        p.kill()
        p.wait()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare(1) not installed")
def test_killed_client_in_another_pid_namespace_is_reclaimed_within_one_second(
    agent: AgentProcess,
) -> None:
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine refuses new pid namespaces: {probe.stderr.decode().strip()}")
    p = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child",
         sys.executable, "-c", RAW_HOLDER, str(agent.runtime_dir), str(REPO), "kill"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "0"
        with AgentClient(agent.runtime_dir, timeout_s=2) as c:
            assert _reserved(c) == 1
            os.killpg(p.pid, signal.SIGKILL)
            took = _wait(lambda: _reserved(c) == 0, timeout_s=1.0)
        print(f"other pid namespace: reclaimed in {took * 1000:.0f} ms")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def test_generation_bound_calls_are_not_resent_into_a_new_generation(runtime_dir: Path) -> None:
    """A drop (or release, commit, abort) meant for the old arena must not act on the
    new one: it raises ClientUnknown instead of being resent after re-registering."""
    from kvnode.errors import ClientUnknown

    a = AgentProcess(runtime_dir).start()
    stale = AgentClient(runtime_dir, name="stale", timeout_s=1.0, retry_interval_s=0.05,
                        heartbeat=False)  # fmt: skip
    fresh = AgentClient(runtime_dir, name="fresh", timeout_s=1.0, retry_interval_s=0.05)
    try:
        stale.connect()
        key = os.urandom(16)
        a.stop()
        a = AgentProcess(runtime_dir).start()
        assert fresh.put(key, b"good bytes of the new generation") == Status.OK
        with pytest.raises(ClientUnknown):
            stale.drop([key])  # meant for the old arena's entry
        assert fresh.get(key) == b"good bytes of the new generation"
        assert stale.generation == fresh.generation  # registered again meanwhile
        assert stale.lookup([key]) == [1]
    finally:
        stale.close()
        fresh.close()
        a.stop()
