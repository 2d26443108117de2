"""Start-up failures: each is one line naming the setting, exit 2, and nothing left in
/dev/shm or the runtime directory, whether it happens before the arena exists (a
/dev/shm too small) or after (events port in use, disk.path a file, boto3 missing).
``--check-config`` catches the same things without starting. A good start says what
it serves, one line per part; a stop says what it flushed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvnode.agent.config import load_config
from kvnode.ipc.segment import segment_exists
from tests.conftest import KVNODE, REPO

AGENT = [*KVNODE, "agent", "--cpu-bytes", "64MiB"]


def _segment(runtime: Path) -> str:
    return load_config(env={}, overrides={"agent.runtime_dir": str(runtime)}).segment_name


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})  # fmt: skip


def _one_error(r: subprocess.CompletedProcess[str], key: str) -> None:
    errors = [x for x in r.stderr.splitlines() if " ERROR " in x or x.startswith("kvnode: config")]
    assert r.returncode == 2, r.stderr
    assert len(errors) == 1 and f"config {key}:" in errors[0], r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def _nothing_left(runtime: Path) -> None:
    name = _segment(runtime)
    assert not segment_exists(name) and not segment_exists(name + "-idx")
    assert not (runtime / "agent.sock").exists()


@pytest.fixture
def busy_port() -> object:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_events_port_in_use(tmp_path: Path, busy_port: int) -> None:
    run = tmp_path / "run"
    r = _run([*AGENT, "--runtime-dir", str(run), "--set", f"events.endpoint=tcp://*:{busy_port}"])
    _one_error(r, "events.endpoint")
    _nothing_left(run)
    c = _run([*AGENT, "--runtime-dir", str(run), "--set", f"events.endpoint=tcp://*:{busy_port}",
              "--check-config"])  # fmt: skip
    _one_error(c, "events.endpoint")


def test_disk_path_is_a_file(tmp_path: Path) -> None:
    run, afile = tmp_path / "run", tmp_path / "afile"
    afile.write_text("")
    r = _run([*AGENT, "--runtime-dir", str(run), "--set", f"disk.path={afile}"])
    _one_error(r, "disk.path")
    _nothing_left(run)
    c = _run([*AGENT, "--runtime-dir", str(run), "--set", f"disk.path={afile}", "--check-config"])
    _one_error(c, "disk.path")


def test_boto3_missing(tmp_path: Path) -> None:
    """An environment without boto3: a package of that name that fails to import."""
    shadow = tmp_path / "shadow" / "boto3"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'boto3'\", name='boto3')\n"
    )
    env = {"PYTHONPATH": f"{tmp_path / 'shadow'}:{REPO}"}
    run = tmp_path / "run"
    r = _run([*AGENT, "--runtime-dir", str(run), "--set", "s3.bucket=b"], env)
    _one_error(r, "s3.bucket")
    assert "pip install 'kvnode[s3]'" in r.stderr
    _nothing_left(run)
    _one_error(_run([*AGENT, "--runtime-dir", str(run), "--set", "s3.bucket=b",
                     "--check-config"], env), "s3.bucket")  # fmt: skip


def test_check_config_catches_what_start_would_fail_on(tmp_path: Path, busy_port: int) -> None:
    cases = [
        (["--set", f"metrics.port={busy_port}"], "metrics.port"),
        (["--set", f"peers.listen=tcp://127.0.0.1:{busy_port}", "--set", "peers.insecure=true"],
         "peers.listen"),
        (["--set", "peers.listen=tcp://127.0.0.1:0", "--set", f"peers.curve_secret_key={tmp_path}/none",
          "--set", f"peers.curve_authorized_dir={tmp_path}"], "peers.curve_secret_key"),
        (["--set", "agent.group=no-such-group-here"], "agent.group"),
        (["--cpu-bytes", "900TiB"], "arena.cpu_bytes"),
    ]  # fmt: skip
    for args, key in cases:
        r = _run(
            [*KVNODE, "agent", "--runtime-dir", str(tmp_path / "run"), *args, "--check-config"]
        )
        assert r.returncode == 2, (key, r.stderr)
        assert f"config {key}:" in r.stderr, (key, r.stderr)
        assert "Traceback" not in r.stderr
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    r = _run([*KVNODE, "agent", "--runtime-dir", str(open_dir), "--check-config"])
    assert (
        r.returncode == 2
        and "config agent.runtime_dir:" in r.stderr
        and "writable by others" in r.stderr
    )
    assert list(open_dir.iterdir()) == []  # a check leaves nothing behind


def test_empty_authorized_dir_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    r = _run([*KVNODE, "keygen", "fleet", "--dir", str(keys)])
    assert r.returncode == 0, r.stderr
    empty = tmp_path / "authorized"
    empty.mkdir()
    r = _run([*KVNODE, "agent", "--runtime-dir", str(tmp_path / "run"), "--check-config",
              "--set", "peers.listen=tcp://127.0.0.1:0",
              "--set", f"peers.curve_secret_key={keys}/fleet.key_secret",
              "--set", f"peers.curve_authorized_dir={empty}"])  # fmt: skip
    _one_error(r, "peers.curve_authorized_dir")
    shutil.copy(keys / "fleet.key", empty / "fleet.key")
    r = _run([*KVNODE, "agent", "--runtime-dir", str(tmp_path / "run"), "--check-config",
              "--set", "peers.listen=tcp://127.0.0.1:0",
              "--set", f"peers.curve_secret_key={keys}/fleet.key_secret",
              "--set", f"peers.curve_authorized_dir={empty}"])  # fmt: skip
    assert r.returncode == 0, r.stderr


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                       capture_output=True, timeout=30)  # fmt: skip
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and mount namespaces (unshare -m)")
@pytest.mark.parametrize("shm_size", ["32m", "64m"])
def test_arena_larger_than_dev_shm(tmp_path: Path, shm_size: str) -> None:
    """A private /dev/shm too small for the arena (32m), or for the arena and its
    index (64m): no SIGBUS (exit 135), one line, the small /dev/shm left empty."""
    run = tmp_path / "run"
    script = (
        f"mount -t tmpfs -o size={shm_size} tmpfs /dev/shm && "
        f"{' '.join(AGENT)} --runtime-dir {run}; echo exit=$?; ls -A /dev/shm"
    )
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "exit=2", r.stdout + r.stderr
    assert lines[1:] == [], "left in /dev/shm: " + " ".join(lines[1:])
    errors = [x for x in r.stderr.splitlines() if " ERROR " in x]
    assert len(errors) == 1 and "config arena.cpu_bytes:" in errors[0], r.stderr
    assert "/dev/shm" in errors[0]


def test_start_says_what_it_serves_and_stop_what_it_flushed(tmp_path: Path) -> None:
    from tests.conftest import AgentProcess

    agent = AgentProcess(tmp_path / "run", args=["--set", f"disk.path={tmp_path / 'disk'}"]).start()
    assert agent.stop() == 0
    log = agent.log()
    for needle in (f"tier disk: {tmp_path / 'disk'} healthy", "peers: off", "events: off",
                   "metrics: off", "arena: creating", "stopped in", "to disk"):  # fmt: skip
        assert needle in log, needle + "\n" + log


def test_arena_progress_is_said_at_most_once_a_second() -> None:
    from kvnode.agent.runtime import ArenaProgress

    said: list[str] = []
    now = [0.0]
    p = ArenaProgress(said.append, clock=lambda: now[0])
    for i in range(1, 11):
        now[0] = i * 0.5
        p(i * 100, 1000)
    assert len(said) == 4  # at 1.0, 2.0, 3.0, 4.0 s (the last step is not said)
    assert said[0].startswith("arena: ") and "20%" in said[0] and "left" in said[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def _s3_agent(tmp_path: Path, bucket: str, url: str, env: dict[str, str]) -> tuple[Any, Any]:
    from tests.conftest import AgentProcess

    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    agent = AgentProcess(tmp_path / "run", env={**clean, **env},
                         args=["--set", f"s3.bucket={bucket}", "--set", f"s3.endpoint_url={url}",
                               "--set", "s3.region=us-east-1", "--set", "s3.retries_max=1"])  # fmt: skip
    agent.env = {**clean, **env}  # no AWS_* from the test's own environment
    return agent, agent.start()


@pytest.mark.parametrize("case", ["no bucket", "no credentials"])
def test_s3_unusable_at_start_is_unhealthy_at_once(tmp_path: Path, case: str) -> None:
    """Before: healthy until the first eviction or shutdown. Now the bucket is checked
    at start: unhealthy, and one log line says why, in words (no botocore retry note)."""
    import time

    from kvnode.ipc.client import AgentClient
    from tests.tiers.conftest import S3Endpoint

    s3 = S3Endpoint()
    s3.start()
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    if case == "no bucket":
        bucket, env = "no-such-bucket", creds
    else:
        os.environ.update(creds)
        bucket = s3.new_bucket()
        env = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
               "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    agent, _ = _s3_agent(tmp_path, bucket, s3.url, env)
    c = AgentClient(agent.runtime_dir, name="s3-check", timeout_s=3.0, heartbeat=False)
    try:
        end = time.monotonic() + 20
        while c.stats()["tiers"]["s3"]["healthy"]:
            assert time.monotonic() < end, "s3 still reported healthy"
            time.sleep(0.1)
        end = time.monotonic() + 10
        while "cannot be used" not in agent.log():
            assert time.monotonic() < end, agent.log()
            time.sleep(0.1)
    finally:
        c.close()
        agent.stop()
        s3.stop()
    line = next(x for x in agent.log().splitlines() if "cannot be used" in x)
    assert f"s3://{bucket}" in line and "reached max retries" not in line
    assert ("no such bucket" in line) if case == "no bucket" else ("credentials" in line.lower())


def test_empty_authorized_dir_is_said_at_start(tmp_path: Path) -> None:
    from kvnode.agent.config import load_config as load
    from kvnode.agent.service import startup_warnings

    keys = tmp_path / "keys"
    assert _run([*KVNODE, "keygen", "fleet", "--dir", str(keys)]).returncode == 0
    empty = tmp_path / "authorized"
    empty.mkdir()
    cfg = load(env={}, overrides={"peers.listen": "tcp://127.0.0.1:0",
                                  "peers.curve_secret_key": f"{keys}/fleet.key_secret",
                                  "peers.curve_authorized_dir": str(empty)})  # fmt: skip
    (warning,) = startup_warnings(cfg)
    assert "holds no public key" in warning and "peers.curve_authorized_dir" in warning
    shutil.copy(keys / "fleet.key", empty / "fleet.key")
    assert startup_warnings(cfg) == []
