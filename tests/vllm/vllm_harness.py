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
        from tests.conftest import unlink_agent_segments

        unlink_agent_segments(self.runtime_dir, self.env)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if hasattr(self, "log"):
            self.log.close()
        from tests.conftest import unlink_agent_segments

        unlink_agent_segments(self.runtime_dir, self.env)


class Runner:
    """One vLLM process (tests/vllm/runner.py) driven over stdin/stdout."""

    def __init__(
        self,
        model: str,
        extra: dict[str, Any] | None,
        log_path: Path,
        env: dict[str, str] | None = None,
        llm_kwargs: dict[str, Any] | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        """``cpus``: the process runs on those cores (as ``taskset -c`` starts it)."""
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (lives as long as the process)
        self._lines: queue.Queue[str | None] = queue.Queue()
        ext = "none" if extra is None else json.dumps(extra)
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNNER), model, ext, json.dumps(llm_kwargs or {})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, **VLLM_ENV, **(env or {})},
            text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
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

    def totals(self) -> dict[str, float]:
        """The worker-side connector's counters, summed since the process started."""
        return self.call(op="totals")

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


class ApiServer:
    """vLLM's OpenAI server in its default multi-process engine. Started as a module:
    the ``vllm`` console script of the vllm-cpu build fails (its distribution is named
    vllm-cpu)."""

    def __init__(self, model: str, extra: dict[str, Any] | None, log_path: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32"]
        cmd += ["--enforce-eager", "--max-model-len", "4096", "--seed", "0"]
        cmd += ["--enable-prompt-tokens-details"]
        if extra is not None:
            ktc = {
                "kv_connector": "KVNodeConnector",
                "kv_connector_module_path": "kvnode.connector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": extra,
            }
            cmd += ["--kv-transfer-config", json.dumps(ktc)]
        env = {**os.environ, **VLLM_ENV}
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server's default engine
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import urllib.request

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"server not ready in {START_TIMEOUT_S}s; log {self.log_path}")

    def complete(self, prompt: list[int], max_tokens: int) -> dict[str, Any]:
        import urllib.request

        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions",
            data=json.dumps({"model": self.model_name(), **body}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=CALL_TIMEOUT_S) as r:
            out: dict[str, Any] = json.loads(r.read())
        return out

    def model_name(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=10) as r:
            name: str = json.loads(r.read())["data"][0]["id"]
        return name

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
