"""``kvnode stats`` against a real agent."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from kvnode.ipc.client import AgentClient
from tests.conftest import AgentProcess

STATS = [sys.executable, "-m", "kvnode", "stats"]


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STATS, *args], capture_output=True, text=True, timeout=timeout)


def test_json_reflects_stores_and_reads(agent: AgentProcess, client: AgentClient) -> None:
    client.put(b"k" * 16, b"x" * 5000)
    client.get(b"k" * 16)
    r = _run("--runtime-dir", str(agent.runtime_dir), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["counters"]["commits"] == 1 and s["counters"]["bytes_out"] == 5000
    assert s["arena"]["entries"] == 1 and s["clients"] >= 1
    assert set(s["latency_us"]) >= {"lookup", "reserve", "commit", "pin", "release"}
    # put reserved: a measured time. Nothing was looked up: null, not an instant 0.0.
    assert s["latency_us"]["reserve"]["count"] >= 1 and s["latency_us"]["reserve"]["p50"] > 0
    assert s["latency_us"]["lookup"] == {"p50": None, "p90": None, "p99": None, "count": 0}


def test_check_exit_status(agent: AgentProcess, tmp_path: Path) -> None:
    assert _run("--runtime-dir", str(agent.runtime_dir), "--check").returncode == 0
    r = _run("--runtime-dir", str(tmp_path / "none"), "--check", "--timeout", "0.3")
    assert r.returncode == 1 and "not healthy" in r.stderr


def test_check_finds_agent_through_environment(agent: AgentProcess) -> None:
    import os

    env = {**os.environ, "KVNODE_AGENT_RUNTIME_DIR": str(agent.runtime_dir)}
    r = subprocess.run([*STATS, "--check"], env=env, capture_output=True, timeout=30)
    assert r.returncode == 0


def test_table_and_watch(agent: AgentProcess, client: AgentClient) -> None:
    client.put(b"t" * 16, b"y" * 3000)
    r = _run("--runtime-dir", str(agent.runtime_dir))
    assert r.returncode == 0 and "arena" in r.stdout and "lookup" in r.stdout
    p = subprocess.Popen(
        [*STATS, "--runtime-dir", str(agent.runtime_dir), "--watch", "0.3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(2.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=10)
    assert p.returncode == 0, err
    lines = [ln for ln in out.splitlines() if "lookup_keys/s=" in ln]
    assert len(lines) >= 2, out  # piped: one flushed line a refresh, rates from the second on
