"""Start-up under bad luck and hostile neighbours: a stop signal during the arena
pre-fault leaves nothing behind, and a runtime directory another user controls is
refused before anything is written in it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvnode.agent.config import load_config
from kvnode.ipc.segment import segment_exists

KVNODE = [sys.executable, "-m", "kvnode"]


def _agent(runtime_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*KVNODE, "agent", "--runtime-dir", str(runtime_dir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _segment(runtime_dir: Path) -> str:
    return load_config(env={}, overrides={"agent.runtime_dir": str(runtime_dir)}).segment_name


def test_sigterm_during_prefault_leaves_no_segment(tmp_path: Path) -> None:
    rt = tmp_path / "run"
    name = _segment(rt)
    p = _agent(rt, "--cpu-bytes", "6GiB")
    deadline = time.monotonic() + 20
    while not segment_exists(name):  # the segment exists once pre-faulting starts
        assert p.poll() is None and time.monotonic() < deadline, p.stdout.read() if p.stdout else ""
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    assert not segment_exists(name), f"segment {name} left behind:\n{out.decode()}"
    assert p.returncode == 0, out.decode()
    assert not (rt / "agent.sock").exists()


def _refused(rt: Path) -> str:
    p = _agent(rt, "--cpu-bytes", "16MiB")
    out, _ = p.communicate(timeout=30)
    assert p.returncode != 0, out.decode()
    return out.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_runtime_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    rt = tmp_path / "run"
    rt.mkdir(mode=0o700)
    os.chown(rt, 65534, 65534)
    assert "owned by uid 65534" in _refused(rt)
    assert not (rt / "agent.lock").exists()


def test_runtime_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    rt = tmp_path / "run"
    rt.mkdir()
    rt.chmod(0o777)
    assert "writable by others" in _refused(rt)


def test_planted_lock_symlink_is_not_followed(tmp_path: Path) -> None:
    rt = tmp_path / "run"
    rt.mkdir(mode=0o700)
    victim = tmp_path / "precious"
    victim.write_text("keep me\n")
    (rt / "agent.lock").symlink_to(victim)
    assert "agent.lock" in _refused(rt)
    assert victim.read_text() == "keep me\n"


def test_runtime_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    rt = tmp_path / "run"
    rt.symlink_to(real)
    assert "not a directory" in _refused(rt)


def test_agent_makes_its_own_directory_inside_a_world_writable_parent(tmp_path: Path) -> None:
    """The sidecar's shape: an emptyDir (root-owned, mode 0777) is the parent; the agent
    creates the runtime directory in it and serves."""
    parent = tmp_path / "emptydir"
    parent.mkdir()
    parent.chmod(0o777)
    rt = parent / "kvnode"
    p = _agent(rt, "--cpu-bytes", "16MiB")
    try:
        deadline = time.monotonic() + 20
        while not (rt / "agent.sock").exists():
            assert p.poll() is None and time.monotonic() < deadline, (
                p.stdout.read() if p.stdout else ""
            )
            time.sleep(0.02)
        assert oct(rt.stat().st_mode & 0o777) == oct(0o700)
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)


def _low_fd_limit() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))


def test_agent_raises_a_low_open_file_limit_and_serves_past_it(tmp_path: Path) -> None:
    """Started with a soft limit of 256 open files (a container's default can be this
    low), the agent raises it and registers more clients than 256 descriptors hold."""
    import resource

    from kvnode.ipc.client import AgentClient

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard open-file limit here is {hard}: nothing to raise it to")
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [*KVNODE, "agent", "--runtime-dir", str(run), "--cpu-bytes", "64MiB",
         "--set", "agent.clients_max=1000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_low_fd_limit,
    )  # fmt: skip
    clients: list[AgentClient] = []
    try:
        deadline = time.monotonic() + 20
        while not (run / "agent.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        soft = next(ln.split()[3] for ln in limits.splitlines() if ln.startswith("Max open files"))
        assert soft == "unlimited" or int(soft) >= min(1 << 16, int(hard))
        for i in range(300):  # each takes a connection and a process handle: > 256 fds
            c = AgentClient(run, name=f"c{i}", timeout_s=5.0, heartbeat=False)
            c.connect()
            clients.append(c)
        assert clients[0].stats()["clients"] >= 300
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.wait(30)
