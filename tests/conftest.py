"""Shared fixtures: a real agent process on a private runtime directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KVNODE = [sys.executable, "-m", "kvnode"]


class AgentProcess:
    """A ``kvnode agent`` subprocess; ``start()`` returns once it answers."""

    def __init__(
        self,
        runtime_dir: Path,
        cpu_bytes: str = "64MiB",
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.runtime_dir = runtime_dir
        self.cpu_bytes = cpu_bytes
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("KVNODE_AGENT_LOG_LEVEL", "info")
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = runtime_dir.parent / f"{runtime_dir.name}-agent.log"

    def start(self, timeout_s: float = 20.0) -> AgentProcess:
        from kvnode.errors import KVNodeError
        from kvnode.ipc.client import AgentClient

        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [
                *KVNODE,
                "agent",
                "--runtime-dir",
                str(self.runtime_dir),
                "--cpu-bytes",
                self.cpu_bytes,
                *self.args,
            ],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        probe = AgentClient(self.runtime_dir, name="probe", timeout_s=0.5, heartbeat=False)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"agent exited with {self.proc.returncode}: {self.log()}")
                try:
                    probe.stats()
                    return self
                except KVNodeError:
                    probe._reset_socket()
                    time.sleep(0.05)
        finally:
            probe.close()
        raise RuntimeError(f"agent did not answer within {timeout_s}s: {self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        rc = self.proc.returncode
        self.proc = None
        unlink_agent_segments(self.runtime_dir, self.env)
        return rc

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def unlink_agent_segments(runtime_dir: Path, env: dict[str, str] | None = None) -> None:
    """Remove what an agent killed without a chance to clean up left in /dev/shm (its
    arena, lookup index and disk listing). A clean stop has unlinked them already; a restarted agent
    on the same directory would too, but a test's directory is never used again."""
    import posix_ipc

    from kvnode.agent.config import load_config

    overrides = {"agent.runtime_dir": str(runtime_dir)}
    name = load_config(env=dict(env or {}), overrides=overrides).segment_name
    from kvnode.ipc.shmindex import listing_name

    for n in (name, name + "-idx", listing_name(name + "-idx")):
        try:
            posix_ipc.unlink_shared_memory(n)
        except posix_ipc.ExistentialError:
            pass


def build_test_model(name: str, size: str) -> str:
    """A random-weight model of scripts/build_model.py, built offline once into
    .cache/models/NAME."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import build_model
    finally:
        sys.path.pop(0)
    return str(build_model.build(REPO / ".cache" / "models" / name, size))


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The tiny Llama every real-vLLM test uses."""
    return build_test_model("tiny-llama", "tiny")


@pytest.fixture
def runtime_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    return d


@pytest.fixture
def agent(runtime_dir: Path) -> Iterator[AgentProcess]:
    a = AgentProcess(runtime_dir).start()
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture
def client(agent: AgentProcess) -> Iterator[object]:
    from kvnode.ipc.client import AgentClient

    c = AgentClient(agent.runtime_dir, name="test", timeout_s=2.0)
    c.connect()
    try:
        yield c
    finally:
        c.close()
