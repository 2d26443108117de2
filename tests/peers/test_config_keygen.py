"""The peers and events config sections, and ``kvnode keygen``."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.auth

from kvnode.agent.config import load_config
from kvnode.cli import main
from kvnode.errors import ConfigError


def test_defaults_are_off() -> None:
    cfg = load_config(None, env={})
    assert cfg.peers.listen == "" and cfg.peers.seeds == [] and not cfg.peers.insecure
    assert cfg.peers.deadline_ms == 5 and cfg.events.endpoint == ""


def test_lists_from_toml_env_and_flags(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('[peers]\nseeds = ["tcp://10.0.0.1:7470"]\ninsecure = true\n')
    cfg = load_config(str(toml), env={})
    assert cfg.peers.seeds == ["tcp://10.0.0.1:7470"]
    env = {"KVNODE_PEERS_SEEDS": "tcp://10.0.0.5:7470, dns:kvnode-peers:7470"}
    cfg = load_config(str(toml), env=env)
    assert cfg.peers.seeds == ["tcp://10.0.0.5:7470", "dns:kvnode-peers:7470"]
    assert cfg.sources["peers.seeds"] == "env:KVNODE_PEERS_SEEDS"
    cfg = load_config(str(toml), env=env, overrides={"peers.seeds": "dns:a:1,tcp://b:2"})
    assert cfg.peers.seeds == ["dns:a:1", "tcp://b:2"] and cfg.sources["peers.seeds"] == "flag"


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"peers.seeds": "10.0.0.1:7470", "peers.insecure": "1"}, "peers.seeds"),
        ({"peers.listen": "tcp://0.0.0.0:7470"}, "peers.curve_secret_key"),
        ({"peers.listen": "udp://x", "peers.insecure": "1"}, "peers.listen"),
        ({"peers.deadline_ms": "0"}, "peers.deadline_ms"),
        ({"events.endpoint": "http://x"}, "events.endpoint"),
        ({"events.replay_endpoint": "tcp://*:5558"}, "events.replay_endpoint"),
    ],
)
def test_invalid_values_name_the_key(overrides: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={}, overrides=overrides)
    assert info.value.key == key


def test_config_show_lists_the_sections() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvnode", "config", "show", "--json",
         "--set", "peers.seeds=tcp://a:1,tcp://b:2", "--set", "peers.insecure=true",
         "--set", "events.endpoint=tcp://*:5557"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, check=True,
    )  # fmt: skip
    data = json.loads(out.stdout)
    assert data["peers.seeds"] == {"value": ["tcp://a:1", "tcp://b:2"], "source": "flag"}
    assert data["events.endpoint"]["value"] == "tcp://*:5557"


def test_keygen_writes_a_zmq_auth_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "certs"
    assert main(["keygen", "fleet", "--dir", str(d)]) == 0
    public, secret = zmq.auth.load_certificate(d / "fleet.key_secret")
    assert secret and zmq.auth.load_certificate(d / "fleet.key") == (public, None)
    assert stat.S_IMODE((d / "fleet.key_secret").stat().st_mode) == 0o600
    assert main(["keygen", "fleet", "--dir", str(d)]) == 1  # never overwritten silently
    assert main(["keygen", "fleet", "--dir", str(d), "--force"]) == 0
    assert zmq.auth.load_certificate(d / "fleet.key_secret")[0] != public
    capsys.readouterr()
