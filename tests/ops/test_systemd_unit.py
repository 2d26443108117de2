"""The systemd unit, sysusers snippet and example config, checked by systemd's tools."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import MISSING
from pathlib import Path

import pytest
import tomllib

from kvnode.agent import config as cfgmod

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "kvnode-agent.service"
SYSUSERS = ROOT / "systemd" / "kvnode.sysusers.conf"
EXAMPLE = ROOT / "systemd" / "agent.toml.example"
EXEC_START = "/usr/local/bin/kvnode agent --config /etc/kvnode/agent.toml"

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (scripts/system-deps.sh installs it as root)",
)


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> every value it is given (systemd keys may repeat), comments dropped."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, val = line.partition("=")
        out.setdefault(key.strip(), []).append(val.strip())
    return out


def verifiable_copy(tmp_path: Path, text: str, name: str = "kvnode-agent.service") -> Path:
    """The unit with ExecStart pointed at an executable stub, since kvnode is not
    installed at /usr/local/bin here; everything else is verified as shipped."""
    stub = tmp_path / "bin" / "kvnode"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    path = tmp_path / name
    path.write_text(text.replace("/usr/local/bin/kvnode", str(stub)))
    return path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60)
    if "Failed to initialize" in proc.stderr or "Operation not permitted" in proc.stderr:
        pytest.skip(f"systemd-analyze cannot run in this container: {proc.stderr.strip()}")
    return proc


@needs_analyze
def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    proc = analyze("verify", str(verifiable_copy(tmp_path, UNIT.read_text())))
    # verify exits 0 on unknown keys and bad values but warns: no output at all.
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout + proc.stderr == ""


@needs_analyze
def test_verify_rejects_broken_units(tmp_path: Path) -> None:
    """Negative controls: the check above would see these mistakes."""
    typo = UNIT.read_text().replace("LimitMEMLOCK=", "LimitMEMLOK=")
    proc = analyze("verify", str(verifiable_copy(tmp_path, typo, "typo.service")))
    assert "Unknown key" in proc.stderr
    missing = UNIT.read_text()  # ExecStart= left at a binary that does not exist here
    (tmp_path / "missing.service").write_text(missing.replace("/usr/local/bin/kvnode", "/nonexistent/kvnode"))  # fmt: skip
    proc = analyze("verify", str(tmp_path / "missing.service"))
    assert proc.returncode != 0
    assert "not executable" in proc.stderr


@needs_analyze
def test_hardening_exposure(tmp_path: Path) -> None:
    path = verifiable_copy(tmp_path, UNIT.read_text())
    proc = analyze("security", "--offline=true", "--threshold=25", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout)
    assert score, proc.stdout
    assert float(score.group(1)) <= 2.5, proc.stdout  # "OK"; an unhardened unit scores 9.5


def test_unit_contract() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == [EXEC_START]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    assert s["User"] == s["Group"] == ["kvnode"]
    assert s["RuntimeDirectory"] == ["kvnode"]
    assert s["RuntimeDirectoryMode"] == ["0750"]
    assert s["LimitMEMLOCK"] == ["infinity"]
    assert s["RemoveIPC"] == ["no"]
    assert "KVNODE_AGENT_RUNTIME_DIR=%t/kvnode" in s["Environment"]
    flush_s = cfgmod.AgentSection().shutdown_flush_s
    assert float(s["TimeoutStopSec"][0]) > flush_s
    # ProtectSystem=strict leaves /dev writable (the arena in /dev/shm); the disk tier's
    # default home must be writable.
    assert s["ProtectSystem"] == ["strict"]
    assert s["StateDirectory"] == ["kvnode"]
    for hidden in ("ProtectProc", "PrivateUsers", "DynamicUser"):
        assert hidden not in s, f"{hidden} breaks client checks or group access"


def test_sysusers_creates_the_user(tmp_path: Path) -> None:
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers not installed (scripts/system-deps.sh installs it)")
    (tmp_path / "etc").mkdir()
    for name in ("passwd", "group", "shadow", "gshadow"):
        (tmp_path / "etc" / name).write_text("")
    conf_dir = tmp_path / "usr/lib/sysusers.d"
    conf_dir.mkdir(parents=True)
    shutil.copy(SYSUSERS, conf_dir / "kvnode.conf")
    proc = subprocess.run(
        [tool, f"--root={tmp_path}", "kvnode.conf"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    passwd = (tmp_path / "etc/passwd").read_text()
    group = (tmp_path / "etc/group").read_text()
    user = next(line.split(":") for line in passwd.splitlines() if line.startswith("kvnode:"))
    assert int(user[2]) < 1000, "a system uid, out of reach of logind's RemoveIPC="
    assert user[5] == "/var/lib/kvnode"
    assert user[6] == "/usr/sbin/nologin"
    assert re.search(rf"^kvnode:x:{user[3]}:", group, re.M)


def _default(f: object) -> object:
    if f.default is not MISSING:  # type: ignore[attr-defined]
        return f.default  # type: ignore[attr-defined]
    return f.default_factory()  # type: ignore[attr-defined]


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    cfg = cfgmod.load_config(str(EXAMPLE), env={})
    assert set(data) == set(cfgmod.SECTIONS)
    for section in cfgmod.SECTIONS:
        body = text.split(f"[{section}]", 1)[1].split("\n[", 1)[0]
        for f in cfgmod._fields(section):
            assert re.search(rf"^#? ?{f.name} = ", body, re.M), f"{section}.{f.name} missing"
            if f.name in data[section]:
                got = getattr(getattr(cfg, section), f.name)
                assert got == _default(f), f"{section}.{f.name}: example {got!r} != default"
        for name in data[section]:
            assert name in {f.name for f in cfgmod._fields(section)}, f"unknown {section}.{name}"


def test_example_config_loads_and_sources_are_the_file() -> None:
    cfg = cfgmod.load_config(str(EXAMPLE), env={})
    assert cfg.sources["agent.shutdown_flush_s"] == f"file:{EXAMPLE}"
    assert cfg.sources.get("arena.cpu_bytes") is None  # machine-dependent, left commented


@needs_analyze
def test_agent_mode_drop_in_verifies_and_grants_only_ptrace(tmp_path: Path) -> None:
    """The drop-in that lets an agent under its own user attach to vLLM's processes."""
    drop_in = ROOT / "systemd" / "agent-mode.conf"
    settings = unit_settings(drop_in.read_text())
    assert settings["CapabilityBoundingSet"] == ["CAP_SYS_PTRACE"]
    assert settings["AmbientCapabilities"] == ["CAP_SYS_PTRACE"]
    unit = verifiable_copy(tmp_path, UNIT.read_text())
    d = tmp_path / "kvnode-agent.service.d"
    d.mkdir()
    (d / "agent-mode.conf").write_text(drop_in.read_text())
    proc = analyze("verify", str(unit))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout + proc.stderr == ""
