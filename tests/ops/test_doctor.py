"""``kvnode doctor`` against real things: a live peer that accepts our CURVE key, one
that refuses it (another fleet's certificate), a port nobody listens on, S3 on
loopback with and without the bucket, and a running agent's health."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import KVNODE, AgentProcess
from tests.tiers.conftest import S3Endpoint


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fleet(tmp_path: Path, name: str) -> tuple[Path, Path]:
    keys, authorized = tmp_path / f"{name}-keys", tmp_path / f"{name}-authorized"
    r = subprocess.run([*KVNODE, "keygen", name, "--dir", str(keys)], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    authorized.mkdir()
    shutil.copy(keys / f"{name}.key", authorized / f"{name}.key")
    return keys / f"{name}.key_secret", authorized


def _doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[dict[str, Any]]]:
    r = subprocess.run([*KVNODE, "doctor", "--json", *args], capture_output=True, text=True,
                       timeout=120, env={**os.environ, **(env or {})})  # fmt: skip
    assert r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout)["findings"]


def _about(findings: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [f for f in findings if f["key"] == key]


def test_peers_accepting_refusing_and_absent(tmp_path: Path) -> None:
    secret, authorized = _fleet(tmp_path, "fleet")
    other_secret, other_authorized = _fleet(tmp_path, "other")
    listen = f"tcp://127.0.0.1:{_port()}"
    peer = AgentProcess(tmp_path / "peer", args=[
        "--set", f"peers.listen={listen}", "--set", f"peers.curve_secret_key={secret}",
        "--set", f"peers.curve_authorized_dir={authorized}"]).start()  # fmt: skip
    absent = f"tcp://127.0.0.1:{_port()}"
    try:
        base = ["--runtime-dir", str(tmp_path / "me"), "--set", f"peers.seeds={listen},{absent}"]
        code, got = _doctor(*base, "--set", f"peers.curve_secret_key={secret}",
                            "--set", f"peers.curve_authorized_dir={authorized}")  # fmt: skip
        seeds = {f["text"].split(" ")[0]: f for f in _about(got, "peers.seeds")}
        assert seeds[listen]["level"] == "ok" and "accepts our key" in seeds[listen]["text"]
        assert seeds[absent]["level"] == "FAIL" and "unreachable" in seeds[absent]["text"]
        assert code == 1
        # Another fleet's certificate: the peer refuses the handshake, and the doctor says
        # so (the agent's own link would only ever show "connecting").
        code, got = _doctor(*base, "--set", f"peers.curve_secret_key={other_secret}",
                            "--set", f"peers.curve_authorized_dir={other_authorized}")  # fmt: skip
        refused = _about(got, "peers.curve_secret_key")
        assert any(f["level"] == "FAIL" and "refused the handshake" in f["text"] for f in refused)
    finally:
        peer.stop()


def test_s3_bucket_reach(tmp_path: Path) -> None:
    s3 = S3Endpoint()
    s3.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    os.environ.update(env)
    try:
        bucket = s3.new_bucket()
        base = ["--runtime-dir", str(tmp_path / "me"), "--set", f"s3.endpoint_url={s3.url}",
                "--set", "s3.region=us-east-1"]  # fmt: skip
        _, got = _doctor(*base, "--set", f"s3.bucket={bucket}", env=env)
        assert any(
            f["level"] == "ok" and "reachable" in f["text"] for f in _about(got, "s3.bucket")
        )
        _, got = _doctor(*base, "--set", "s3.bucket=missing-bucket", env=env)
        assert any(f["level"] == "FAIL" and "no such bucket" in f["text"]
                   for f in _about(got, "s3.bucket"))  # fmt: skip
    finally:
        s3.stop()


def test_a_running_agent_is_checked_not_its_ports(tmp_path: Path) -> None:
    port = _port()
    agent = AgentProcess(tmp_path / "run", args=["--set", f"metrics.port={port}"]).start()
    assert agent.proc is not None
    pid = agent.proc.pid
    try:
        code, got = _doctor("--runtime-dir", str(agent.runtime_dir), "--offline",
                            "--set", f"metrics.port={port}")  # fmt: skip
    finally:
        agent.stop()
    (metrics,) = _about(got, "metrics.port")
    assert metrics["level"] == "ok" and "running agent" in metrics["text"]
    assert f"pid {pid}," in metrics["text"], metrics  # read from its lock file
    (alive,) = _about(got, "agent")
    assert alive["level"] == "ok" and "answers" in alive["text"]
    # The arena the running agent really holds (started with its own --cpu-bytes), not the
    # size this configuration would ask for.
    (arena,) = _about(got, "arena.cpu_bytes")
    assert arena["level"] == "ok" and "running agent holds 64.0MiB" in arena["text"], arena
    assert all(f["level"] != "FAIL" for f in got), got
    assert code == 0


def _peer_state(agent: AgentProcess, seed: str, want: str) -> dict[str, Any]:
    import time

    from kvnode.ipc.client import AgentClient

    c = AgentClient(agent.runtime_dir, name="state-probe", timeout_s=3.0, heartbeat=False)
    try:
        end = time.monotonic() + 20
        while True:
            peers = c.stats()["peers"]["peers"]
            if peers[seed]["state"] == want:
                return dict(peers[seed])
            assert time.monotonic() < end, peers
            time.sleep(0.1)
    finally:
        c.close()


def test_link_state_tells_refused_from_unreachable(tmp_path: Path) -> None:
    """Before: a peer refusing our CURVE key showed "connecting" like a peer that is down,
    and nothing was logged on our side."""
    secret, authorized = _fleet(tmp_path, "fleet")
    other_secret, other_authorized = _fleet(tmp_path, "other")
    listen = f"tcp://127.0.0.1:{_port()}"
    absent = f"tcp://127.0.0.1:{_port()}"
    peer = AgentProcess(tmp_path / "peer", args=[
        "--set", f"peers.listen={listen}", "--set", f"peers.curve_secret_key={secret}",
        "--set", f"peers.curve_authorized_dir={authorized}"]).start()  # fmt: skip
    same = AgentProcess(tmp_path / "same", args=[
        "--set", f"peers.seeds={listen},{absent}", "--set", f"peers.curve_secret_key={secret}",
        "--set", f"peers.curve_authorized_dir={authorized}"]).start()  # fmt: skip
    other = AgentProcess(tmp_path / "other", args=[
        "--set", f"peers.seeds={listen}", "--set", f"peers.curve_secret_key={other_secret}",
        "--set", f"peers.curve_authorized_dir={other_authorized}"]).start()  # fmt: skip
    try:
        _peer_state(same, listen, "up")
        _peer_state(same, absent, "unreachable")
        _peer_state(other, listen, "refused")
    finally:
        for a in (other, same, peer):
            a.stop()
    assert f"peer {listen} refused the handshake" in other.log()


def test_check_config_connect_reaches_the_seeds(tmp_path: Path) -> None:
    secret, authorized = _fleet(tmp_path, "fleet")
    absent = f"tcp://127.0.0.1:{_port()}"
    args = [*KVNODE, "agent", "--runtime-dir", str(tmp_path / "me"), "--check-config",
            "--set", f"peers.seeds={absent}", "--set", f"peers.curve_secret_key={secret}",
            "--set", f"peers.curve_authorized_dir={authorized}"]  # fmt: skip
    offline = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert offline.returncode == 0, offline.stderr  # nothing checked over the network
    online = subprocess.run([*args, "--connect"], capture_output=True, text=True, timeout=60)
    assert online.returncode == 2
    assert (
        f"kvnode: config peers.seeds: {absent}" in online.stderr and "unreachable" in online.stderr
    )
