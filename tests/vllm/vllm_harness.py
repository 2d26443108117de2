"""Processes for the real-vLLM tests: a real agent, vLLM runner processes."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
RUNNER = Path(__file__).with_name("runner.py")
TAG = "@@kvnode@@ "
START_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 120.0

VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}


class Agent:
    """A real ``kvnode agent`` subprocess."""

    def __init__(
        self, runtime_dir: Path, log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.runtime_dir = runtime_dir
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Agent:
        env = {**os.environ, **self.env}
        self.log = open(self.log_path, "ab")  # noqa: SIM115 (lives as long as the agent)
        self.proc = subprocess.Popen(
            [
                str(BIN / "kvnode"),
                "agent",
                "--runtime-dir",
                str(self.runtime_dir),
                "--cpu-bytes",
                "256MiB",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited: {self.log_path.read_text()[-2000:]}")
            try:
                c = self.client()
                c.close()
                return self
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("agent did not answer in 30 s")

    def client(self, timeout_s: float = 2.0) -> Any:
        from kvnode.ipc.client import AgentClient

        c = AgentClient(runtime_dir=str(self.runtime_dir), name="test", timeout_s=timeout_s)
        c.connect()
        return c

    def stats(self) -> dict[str, Any]:
        c = self.client()
        try:
            return c.stats()
        finally:
            c.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if hasattr(self, "log"):
            self.log.close()


class Runner:
    """One vLLM process (tests/vllm/runner.py) driven over stdin/stdout."""

    def __init__(
        self,
        model: str,
        extra: dict[str, Any] | None,
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (lives as long as the process)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNNER), model, "none" if extra is None else json.dumps(extra)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, **VLLM_ENV, **(env or {})},
            text=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        self._read(START_TIMEOUT_S)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(TAG):
                self._lines.put(line[len(TAG) :])
            elif not self._log.closed:
                self._log.write(line.encode())
        self._lines.put(None)

    def _read(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(
                f"vLLM runner silent for {timeout_s}s; log {self.log_path}"
            ) from None
        if line is None:
            self._log.flush()
            raise AssertionError(f"vLLM runner exited: {self.log_path.read_text()[-4000:]}")
        return json.loads(line)

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read(CALL_TIMEOUT_S)

    def generate(self, prompts: list[list[int]], max_tokens: int = 8) -> list[dict[str, Any]]:
        return self.call(op="generate", prompts=prompts, max_tokens=max_tokens)["outputs"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(30)
            except Exception:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
