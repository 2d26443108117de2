from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvnode.agent.config import load_config, parse_size
from kvnode.errors import ConfigError


def test_sizes() -> None:
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("4GiB") == 4 * 2**30
    assert parse_size("1.5G") == int(1.5 * 2**30)
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('[arena]\ncpu_bytes = "128MiB"\npolicy = "lru"\n[disk]\npath = "/x"\n')
    env = {"KVNODE_ARENA_CPU_BYTES": "256MiB", "KVNODE_DISK_PATH": "/y"}
    cfg = load_config(str(toml), env=env, overrides={"disk.path": "/z"})
    assert (
        cfg.arena.cpu_bytes == 256 * 2**20
        and cfg.sources["arena.cpu_bytes"] == "env:KVNODE_ARENA_CPU_BYTES"
    )
    assert cfg.arena.policy == "lru" and cfg.sources["arena.policy"].startswith("file:")
    assert cfg.disk.path == "/z" and cfg.sources["disk.path"] == "flag"
    assert cfg.agent.heartbeat_timeout_s == 10.0 and "agent.heartbeat_timeout_s" not in cfg.sources


@pytest.mark.parametrize(
    "env,key",
    [
        ({"KVNODE_ARENA_CPU_BYTES": "many"}, "arena.cpu_bytes"),
        ({"KVNODE_ARENA_POLICY": "random"}, "arena.policy"),
        ({"KVNODE_ARENA_PAGE_BYTES": "3000"}, "arena.page_bytes"),
        ({"KVNODE_ARENA_PREFAULT": "maybe"}, "arena.prefault"),
        ({"KVNODE_METRICS_PORT": "70000"}, "metrics.port"),
    ],
)
def test_invalid_values_name_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env=env)
    assert info.value.key == key


def test_unknown_key_in_file(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text("[arena]\ncpu_bites = 1\n")
    with pytest.raises(ConfigError, match="arena.cpu_bites"):
        load_config(str(toml), env={})


def test_cli_invalid_config_is_one_line_exit_2() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "kvnode", "agent", "--check-config", "--cpu-bytes", "huge"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "arena.cpu_bytes" in r.stderr


def test_cli_config_show_names_sources(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "kvnode", "config", "show", "--cpu-bytes", "1GiB", "--runtime-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, env={"KVNODE_DISK_BYTES": "2GiB", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert 'cpu_bytes = "1GiB"  # flag' in r.stdout
    assert 'bytes = "2GiB"  # env:KVNODE_DISK_BYTES' in r.stdout
    # A key left empty shows what the agent will use.
    assert f'runtime_dir = "{tmp_path}"  # flag' in r.stdout
    assert 'segment_name = "/kvnode-' in r.stdout and "# default, resolved" in r.stdout
    assert 'runtime_dir = ""' not in r.stdout


def test_shown_sizes_read_back_to_the_same_bytes() -> None:
    from kvnode.agent.config import exact_size

    for n in (1, 1500, 4096, 65536, 3 * 2**30, 2**40 + 2**20, 2**41):
        assert parse_size(exact_size(n)) == n


@pytest.mark.parametrize(
    "env,key,words",
    [
        ({"KVNODE_AGENT_CLIENTS_MAX": "abc"}, "agent.clients_max", "expected a whole number"),
        ({"KVNODE_AGENT_HEARTBEAT_INTERVAL_S": "abc"}, "agent.heartbeat_interval_s",
         "expected a number"),
        ({"KVNODE_ARENA_PREFAULT": "maybe"}, "arena.prefault", "expected true or false"),
        ({"KVNODE_ARENA_POLCY": "lru"}, "KVNODE_ARENA_POLCY",
         "did you mean KVNODE_ARENA_POLICY?"),
        ({"KVNODE_NOPE": "1"}, "KVNODE_NOPE", "unknown environment variable"),
    ],
)  # fmt: skip
def test_errors_in_words(env: dict[str, str], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env=env)
    assert info.value.key == key and words in str(info.value)
    assert "invalid literal" not in str(info.value) and "could not convert" not in str(info.value)


def test_connector_variables_are_not_agent_keys() -> None:
    cfg = load_config(None, env={"KVNODE_CONNECTOR_CHUNK_TOKENS": "128", "KVNODE_CONFIG": ""})
    assert "KVNODE_CONNECTOR_CHUNK_TOKENS" not in str(cfg.sources)


def test_misspelt_set_key_suggests() -> None:
    with pytest.raises(ConfigError, match="did you mean arena.policy"):
        load_config(None, env={}, overrides={"arena.polcy": "lru"})


def test_integers_accept_whole_forms() -> None:
    cfg = load_config(None, env={"KVNODE_AGENT_CLIENTS_MAX": " 2_048 "})
    assert cfg.agent.clients_max == 2048


def test_s3_stuck_after_reaches_the_store() -> None:
    from kvnode.agent.tiers.manager import build_stores
    from kvnode.errors import ConfigError

    cfg = load_config(env={}, overrides={"s3.bucket": "b", "s3.stuck_after_s": "9.5",
                                         "s3.endpoint_url": "http://127.0.0.1:9"})  # fmt: skip
    store = build_stores(cfg)["s3"]
    assert store.stuck_after_s == 9.5  # type: ignore[attr-defined]
    store.close()
    with pytest.raises(ConfigError, match="s3.stuck_after_s"):
        load_config(env={}, overrides={"s3.stuck_after_s": "0"})
