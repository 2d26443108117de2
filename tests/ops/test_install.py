"""``make run`` installs only what the agent needs; ``make test`` keeps the rest. The
install script runs here against a stand-in venv whose pip records what it was asked."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import REPO


def _install(tmp_path: Path, mode: str) -> tuple[str, str]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls"
    for tool in ("python", "pip"):
        stub = venv / "bin" / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
        stub.chmod(0o755)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("apt-get", "systemd-analyze"):  # would be called by system-deps.sh
        stub = fake_bin / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexit 1\n')
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:/usr/bin:/bin"}
    r = subprocess.run(["bash", "scripts/install.sh", "python3", str(venv), mode], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return log.read_text(), r.stderr


def test_run_installs_the_agent_only(tmp_path: Path) -> None:
    calls, _ = _install(tmp_path, "run")
    installs = [x for x in calls.splitlines() if x.startswith("pip install") and "-U" not in x]
    assert installs == ["pip install -q -e .[s3]"]
    assert "apt-get" not in calls and "systemd" not in calls


def test_test_installs_everything(tmp_path: Path) -> None:
    calls, _ = _install(tmp_path, "test")
    assert "pip install -q -e .[dev,s3,cpu]" in calls


def test_make_run_uses_the_run_install() -> None:
    r = subprocess.run(["make", "-n", "-B", "run", "VENV=/nonexistent"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert 'scripts/install.sh "python3" "/nonexistent" run' in r.stdout
    assert " test" not in r.stdout
