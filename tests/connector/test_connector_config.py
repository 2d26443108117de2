from __future__ import annotations

import pytest

from kvnode.connector.config import ConnectorConfig
from kvnode.errors import ConfigError


def test_defaults_and_extra_config_and_env() -> None:
    cfg = ConnectorConfig.from_sources({}, env={})
    assert cfg.chunk_tokens == 256 and cfg.lookup_timeout_ms == 50 and not cfg.save_decode
    cfg = ConnectorConfig.from_sources(
        {"kvnode.runtime_dir": "/x", "kvnode.chunk_tokens": 512, "other.key": 1},
        env={"KVNODE_CONNECTOR_SAVE_DECODE": "true", "KVNODE_CONNECTOR_CHUNK_TOKENS": "128"},
    )
    assert cfg.runtime_dir == "/x" and cfg.chunk_tokens == 512 and cfg.save_decode
    cfg = ConnectorConfig.from_sources({}, env={"KVNODE_AGENT_RUNTIME_DIR": "/run/k"})
    assert cfg.runtime_dir == "/run/k"


def test_unknown_and_bad_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match="kvnode.chunk_token"):
        ConnectorConfig.from_sources({"kvnode.chunk_token": 256}, env={})
    with pytest.raises(ConfigError, match="integer"):
        ConnectorConfig.from_sources({"kvnode.chunk_tokens": "many"}, env={})
    with pytest.raises(ConfigError, match="boolean"):
        ConnectorConfig.from_sources({}, env={"KVNODE_CONNECTOR_SAVE_DECODE": "maybe"})
    with pytest.raises(ConfigError, match="> 0"):
        ConnectorConfig.from_sources({"kvnode.lookup_timeout_ms": 0}, env={})


def test_chunk_must_be_whole_blocks() -> None:
    cfg = ConnectorConfig(chunk_tokens=256)
    cfg.check_block_size(128)
    cfg.check_block_size(32)
    with pytest.raises(ConfigError, match="multiple of vLLM's block size 96"):
        cfg.check_block_size(96)


def test_transfer_mode() -> None:
    assert ConnectorConfig().transfer == "auto"
    assert ConnectorConfig.from_sources({"kvnode.transfer": " Agent "}).transfer == "agent"
    assert (
        ConnectorConfig.from_sources({}, {"KVNODE_CONNECTOR_TRANSFER": "worker"}).transfer
        == "worker"
    )
    with pytest.raises(ConfigError, match="kvnode.transfer"):
        ConnectorConfig.from_sources({"kvnode.transfer": "both"})


def test_hugepages_mode() -> None:
    assert ConnectorConfig().hugepages == "auto"
    assert ConnectorConfig.from_sources({"kvnode.hugepages": "Always"}).hugepages == "always"
    env = {"KVNODE_CONNECTOR_HUGEPAGES": "never"}
    assert ConnectorConfig.from_sources({}, env).hugepages == "never"
    with pytest.raises(ConfigError, match="kvnode.hugepages"):
        ConnectorConfig.from_sources({"kvnode.hugepages": "yes"})
