"""A real agent process run the way systemd runs it: sd_notify readiness and stopping,
Prometheus figures that move with client traffic, SIGHUP log-level reload."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("kvnode.cli", reason="the kvnode command is not there yet")
client_mod = pytest.importorskip("kvnode.ipc.client", reason="AgentClient is not there yet")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kvnode.agent.config import load_config  # noqa: E402

KVNODE = Path(sys.executable).with_name("kvnode")
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    """``kvnode agent`` with NOTIFY_SOCKET on a datagram socket and stderr collected."""

    def __init__(
        self, runtime_dir: Path, extra_env: dict[str, str], config: Path | None,
        cpu_bytes: str = "64MiB",
    ) -> None:  # fmt: skip
        self.runtime_dir = runtime_dir
        self.metrics_port = free_port()
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(runtime_dir.parent / "notify.sock"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVNODE_")}
        env.update(
            NOTIFY_SOCKET=str(runtime_dir.parent / "notify.sock"),
            KVNODE_METRICS_PORT=str(self.metrics_port),
            KVNODE_ARENA_PREFAULT="false",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra_env)
        env.pop("JOURNAL_STREAM", None)
        cmd = [str(KVNODE), "agent", "--runtime-dir", str(runtime_dir), "--cpu-bytes", cpu_bytes]
        if config is not None:
            cmd += ["--config", str(config)]
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def recv_notify(self, timeout_s: float) -> dict[str, str]:
        """The next sd_notify datagram as a dict; fails the test on timeout."""
        self.notify.settimeout(timeout_s)
        try:
            data = self.notify.recv(4096)
        except TimeoutError:
            pytest.fail(f"no sd_notify message in {timeout_s}s; agent log:\n" + self.log())
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def wait_for(self, field: str, timeout_s: float = START_TIMEOUT_S) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                pytest.fail(f"no {field}=1 (exit {self.proc.poll()}); agent log:\n" + self.log())
            msg = self.recv_notify(left)
            if msg.get(field) == "1":
                return msg

    def wait_log(self, text: str, timeout_s: float = 10.0, start: int = 0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                if text in line:
                    return line
            time.sleep(0.05)
        pytest.fail(f"no log line with {text!r}; agent log:\n" + self.log())

    def log(self) -> str:
        return "\n".join(self.lines)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            assert resp.status == 200
            text = resp.read().decode()
        finally:
            conn.close()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        self.notify.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short paths: a Unix socket path must fit in 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="kvn-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_agent(workdir: Path) -> Iterator[Any]:
    started: list[AgentProcess] = []

    def start(
        extra_env: dict[str, str] | None = None, config: Path | None = None,
        cpu_bytes: str = "64MiB",
    ) -> AgentProcess:  # fmt: skip
        agent = AgentProcess(workdir / "run", extra_env or {}, config, cpu_bytes)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def connect(runtime_dir: Path, name: str = "ops-test") -> Any:
    c = client_mod.AgentClient(runtime_dir=str(runtime_dir), name=name, timeout_s=2.0)
    c.connect()
    return c


def test_ready_only_once_serving_then_stopping(start_agent: Any) -> None:
    agent = start_agent()
    msg = agent.wait_for("READY")
    # READY=1 means the socket answers now, not eventually.
    c = connect(agent.runtime_dir)
    try:
        assert c.stats()["pid"] == agent.proc.pid
    finally:
        c.close()
    assert msg.get("MAINPID", str(agent.proc.pid)) == str(agent.proc.pid)
    assert msg.get("STATUS")
    segment = load_config(env={}, overrides={"agent.runtime_dir": str(agent.runtime_dir)})
    shm_file = Path("/dev/shm") / segment.segment_name.lstrip("/")
    assert shm_file.exists()

    agent.proc.send_signal(signal.SIGTERM)
    agent.wait_for("STOPPING", timeout_s=10)
    assert agent.proc.wait(30) == 0, agent.log()
    assert not (agent.runtime_dir / "agent.sock").exists()
    assert not shm_file.exists(), "segment not unlinked on SIGTERM"


def test_arena_progress_in_status_and_log(start_agent: Any) -> None:
    """Before: one STATUS= line, then READY=1 after a long silence (18 s for 2.9 GiB)."""
    # Big enough that setting it up outlasts the one-second progress interval on a
    # fast machine too (1.5 GiB took 1.0-1.45 s here: the test failed by chance).
    agent = start_agent({"KVNODE_ARENA_PREFAULT": "true"}, cpu_bytes="4GiB")
    statuses = []
    while True:
        msg = agent.recv_notify(START_TIMEOUT_S)
        if msg.get("READY") == "1":
            break
        statuses.append(msg.get("STATUS", ""))
    progress = [s for s in statuses if s.startswith("arena: ") and " ready (" in s]
    assert progress, statuses
    assert agent.wait_log("arena: ") and any(" ready (" in x for x in agent.lines)


def test_metrics_follow_client_traffic(start_agent: Any) -> None:
    agent = start_agent()
    agent.wait_for("READY")
    before = agent.scrape()
    arena = (("tier", "arena"),)
    key, payload = os.urandom(16), os.urandom(100_000)
    c = connect(agent.runtime_dir)
    try:
        c.put(key, payload)
        assert bytes(c.get(key)) == payload
        after = agent.scrape()
    finally:
        c.close()
    assert after[("kvnode_clients", ())] >= 1
    assert after[("kvnode_commits_total", ())] == before[("kvnode_commits_total", ())] + 1
    assert after[("kvnode_pins_total", ())] == before[("kvnode_pins_total", ())] + 1
    for name in ("kvnode_in_bytes_total", "kvnode_out_bytes_total"):
        assert after[(name, ())] - before[(name, ())] >= len(payload), name
    assert after[("kvnode_tier_entries", arena)] == before[("kvnode_tier_entries", arena)] + 1
    assert after[("kvnode_tier_used_bytes", arena)] >= len(payload)
    assert after[("kvnode_arena_capacity_bytes", ())] == 64 * 1024**2
    count = ("kvnode_op_latency_seconds_count", (("op", "commit"),))
    assert after[count] >= before.get(count, 0) + 1


def test_sighup_changes_log_level(start_agent: Any, workdir: Path) -> None:
    config = workdir / "agent.toml"
    config.write_text('[agent]\nlog_level = "warning"\n')
    agent = start_agent(config=config)
    agent.wait_for("READY")
    mark = len(agent.lines)
    connect(agent.runtime_dir, name="before-reload").close()
    agent.scrape()
    time.sleep(0.5)
    quiet = agent.lines[mark:]
    assert not any(" INFO " in line or " DEBUG " in line for line in quiet), agent.log()

    config.write_text('[agent]\nlog_level = "debug"\n[arena]\npolicy = "lru"\n')
    mark = len(agent.lines)
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_log("INFO kvnode.agent: reload: log level warning -> debug", start=mark)
    # What a running agent cannot change is named, not silently ignored.
    agent.wait_log("arena.policy changed ('prefix' -> 'lru'); restart to apply", start=mark)
    mark = len(agent.lines)
    connect(agent.runtime_dir, name="after-reload").close()
    agent.wait_log("registered: after-reload", start=mark)
    agent.scrape()
    agent.wait_log(" DEBUG kvnode.agent.metrics: ", start=mark)

    config.write_text('[agent]\nlog_level = "bogus"\n')
    mark = len(agent.lines)
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_log("configuration not reloaded", start=mark)
    assert agent.proc.poll() is None, "a bad file on reload must not stop the agent"


def test_check_config_and_unit_flags(workdir: Path) -> None:
    """The flags the unit and the manifests pass exist."""
    out = subprocess.run(
        [str(KVNODE), "agent", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    for flag in ("--config", "--runtime-dir", "--cpu-bytes", "--check-config"):
        assert flag in out, flag
    example = Path(__file__).resolve().parents[2] / "systemd" / "agent.toml.example"
    proc = subprocess.run(
        [str(KVNODE), "agent", "--config", str(example), "--check-config"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_sighup_applies_tier_limits(start_agent: Any, workdir: Path) -> None:
    config = workdir / "agent.toml"
    disk = workdir / "disk"
    config.write_text(f'[disk]\npath = "{disk}"\nbytes = "64MiB"\nqueue_max = 8\n')
    agent = start_agent(config=config)
    agent.wait_for("READY")
    c = connect(agent.runtime_dir)
    try:
        assert c.stats()["tiers"]["disk"]["bytes_max"] == 64 * 1024**2
        config.write_text(f'[disk]\npath = "{disk}"\nbytes = "32MiB"\nqueue_max = 4\n')
        mark = len(agent.lines)
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_log("reload: disk.bytes 67108864 -> 33554432", start=mark)
        agent.wait_log("reload: disk.queue_max 8 -> 4", start=mark)
        disk_stats = c.stats()["tiers"]["disk"]
        assert disk_stats["bytes_max"] == 32 * 1024**2 and disk_stats["queue_max"] == 4
        assert not any("disk.bytes changed" in line for line in agent.lines[mark:])
    finally:
        c.close()
