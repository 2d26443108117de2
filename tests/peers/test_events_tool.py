"""``kvnode events`` against a real agent process: the live stream from a PUB the agent
binds (endpoint taken from the agent's config file), replay from a sequence number,
the terminal format, and the collector case (the agent connects, the tool binds)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvnode.ipc.checksum import checksum
from kvnode.ipc.client import AgentClient, Status
from tests.conftest import AgentProcess

TOOL = [sys.executable, "-m", "kvnode", "events"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Chain:
    """Chunks committed one after another, each naming the previous as its parent."""

    def __init__(self, client: AgentClient) -> None:
        self.client = client
        self.keys: list[bytes] = []
        self.tokens: list[list[int]] = []

    def add(self) -> None:
        key, data = os.urandom(16), os.urandom(4096)
        toks = [len(self.keys), len(self.keys) + 1, 7]
        ((st, slot),) = self.client.reserve([key], [len(data)])
        assert st == Status.OK and slot is not None
        self.client.write(slot, data)
        parent = self.keys[-1] if self.keys else b""
        assert self.client.commit([key], [checksum(data)], [parent], [toks]) == [Status.OK]
        self.keys.append(key)
        self.tokens.append(toks)

    def check(self, ev: dict[str, Any]) -> None:
        """A BlockStored line names one of our chunks, its parent and its tokens."""
        assert ev["type"] == "BlockStored" and ev["medium"] == "CPU"
        i = [k.hex() for k in self.keys].index(ev["block_hashes"][0])
        assert ev["parent_block_hash"] == (self.keys[i - 1].hex() if i else None)
        assert ev["token_ids"] == self.tokens[i] and ev["block_size"] == 3


def _tool(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*TOOL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # the tool says when its socket is set up
    assert "connected to" in line or "listening on" in line, line + proc.stderr.read()
    return proc


def _feed_until_done(proc: subprocess.Popen[str], chain: Chain, timeout_s: float = 15.0) -> str:
    """Commit chunks until the tool has seen enough and exits (a subscription takes a
    moment to reach the publisher; the first chunks may go by before it)."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the tool saw too few events"
        chain.add()
        time.sleep(0.1)
    out, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    return out


def test_tail_replay_and_terminal_lines(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    replay = f"tcp://127.0.0.1:{_port()}"
    cfg.write_text(
        f'[events]\nendpoint = "tcp://*:{_port()}"\nreplay_endpoint = "{replay}"\ninsecure = true\n'
    )
    agent = AgentProcess(tmp_path / "run", args=["--config", str(cfg)]).start()
    client = AgentClient(agent.runtime_dir, name="events-tool-test", timeout_s=2.0)
    try:
        chain = Chain(client)
        # Live: the endpoint comes from the config the agent runs with.
        out = _feed_until_done(_tool("--config", str(cfg), "--json", "--count", "3"), chain)
        lines = [json.loads(x) for x in out.splitlines()]
        assert len(lines) == 3
        for ev in lines:
            chain.check(ev)
        assert [x["seq"] for x in lines] == sorted(x["seq"] for x in lines)
        # Replay from 0: the start-up AllBlocksCleared, then every chunk in order.
        n = len(chain.keys)
        proc = _tool("--config", str(cfg), "--json", "--replay-from", "0", "--count", str(n + 1))
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        got = [json.loads(x) for x in out.splitlines()]
        assert got[0]["type"] == "AllBlocksCleared" and got[0]["seq"] == 0
        assert [x["block_hashes"][0] for x in got[1:]] == [k.hex() for k in chain.keys]
        for ev in got[1:]:
            chain.check(ev)
        # The terminal format: one line per event.
        proc = _tool("--config", str(cfg), "--replay-from", "0", "--count", "2")
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        first, second = out.splitlines()
        assert "AllBlocksCleared" in first
        assert "BlockStored" in second and chain.keys[0].hex()[:12] in second
    finally:
        client.close()
        agent.stop()


def test_collector_endpoint_is_bound_by_the_tool(tmp_path: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{_port()}"
    # A non-wildcard endpoint: the agent connects to a collector, here the tool.
    agent = AgentProcess(
        tmp_path / "run",
        args=["--set", f"events.endpoint={endpoint}", "--set", "events.insecure=true"],
    ).start()
    client = AgentClient(agent.runtime_dir, name="events-tool-test", timeout_s=2.0)
    try:
        chain = Chain(client)
        proc = _tool("--runtime-dir", str(agent.runtime_dir), "--endpoint", endpoint,
                     "--bind", "--json", "--count", "2")  # fmt: skip
        lines = [json.loads(x) for x in _feed_until_done(proc, chain).splitlines()]
        assert len(lines) == 2
        for ev in lines:
            chain.check(ev)
    finally:
        client.close()
        agent.stop()


def test_events_off_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[events]\n")
    done = subprocess.run([*TOOL, "--config", str(cfg)], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert done.returncode == 2 and "events.endpoint" in done.stderr


def test_another_nodes_agent_is_tailed_by_its_address(tmp_path: Path) -> None:
    """The agent binds a wildcard; the tool, given the node's address (as for another
    node), connects to it instead of binding it (which failed: address in use)."""
    port = _port()
    agent = AgentProcess(
        tmp_path / "run",
        args=["--set", f"events.endpoint=tcp://*:{port}", "--set", "events.insecure=true"],
    ).start()
    client = AgentClient(agent.runtime_dir, name="events-tool-test", timeout_s=2.0)
    try:
        chain = Chain(client)
        proc = _tool("--runtime-dir", str(tmp_path / "elsewhere"),
                     "--endpoint", f"tcp://127.0.0.1:{port}", "--json", "--count", "2")  # fmt: skip
        lines = [json.loads(x) for x in _feed_until_done(proc, chain).splitlines()]
        assert len(lines) == 2
        for ev in lines:
            chain.check(ev)
    finally:
        client.close()
        agent.stop()


def test_collector_config_without_bind_says_how(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[events]\nendpoint = "tcp://127.0.0.1:{_port()}"\ninsecure = true\n')
    done = subprocess.run([*TOOL, "--config", str(cfg)], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert done.returncode == 2 and "--bind" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
