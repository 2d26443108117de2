"""Connector settings: read in one place, validated at start-up.

Settings live under ``kvnode.*`` in vLLM's ``kv_connector_extra_config``; each falls
back to an environment variable (``KVNODE_AGENT_RUNTIME_DIR`` for the runtime directory,
``KVNODE_CONNECTOR_<NAME>`` otherwise), then to the default below. An unknown ``kvnode.*``
key is a start-up error: a typo must not silently leave a feature at its default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from kvnode.errors import ConfigError

PREFIX = "kvnode."
RUNTIME_DIR_ENV = "KVNODE_AGENT_RUNTIME_DIR"
ENV_PREFIX = "KVNODE_CONNECTOR_"

TRANSFER_MODES = ("auto", "agent", "worker")
HUGEPAGE_MODES = ("auto", "always", "never")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    runtime_dir: str | None = None  # None: the client library's default
    chunk_tokens: int = 256
    lookup_timeout_ms: int = 50  # scheduler-side lookups: a slow agent means a miss
    io_timeout_ms: int = 1000  # worker-side pin/reserve/commit
    prefetch_deadline_ms: int = 1000  # how long a request may wait on PENDING chunks
    reconnect_interval_ms: int = 1000  # first retry delay; doubles up to reconnect_max_ms
    reconnect_max_ms: int = 10000
    save_decode: bool = False
    load: bool = True  # also off when kv_role is kv_producer
    save: bool = True  # also off when kv_role is kv_consumer
    model_id: str | None = None  # None: derived from the model path and its files
    keys_per_call_max: int = 4096  # keys in one lookup/pin/reserve message
    chunks_per_step_max: int = 4096  # chunks one step may load or save (bounds the work)
    # Who moves the bytes: "agent" (the agent, through the worker's exported cache),
    # "worker" (the worker copies through the mapped arena), "auto" (on the CPU: agent
    # mode where vLLM binds its compute threads and leaves cores to the agent's copies,
    # else worker mode, kvnode.cores.cores_left; on GPUs worker mode until agent
    # mode is verified there).
    transfer: str = "auto"
    # Agent mode on the CPU: the worker's cache onto huge pages in the background
    # (connector/hugepages.py): "auto" on cores vLLM's compute threads are not bound
    # to, where there are such cores; "always" on vLLM's cores too; "never".
    hugepages: str = "auto"

    def __post_init__(self) -> None:
        positive = (
            "chunk_tokens",
            "lookup_timeout_ms",
            "io_timeout_ms",
            "reconnect_interval_ms",
            "reconnect_max_ms",
            "keys_per_call_max",
            "chunks_per_step_max",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(PREFIX + name, f"must be > 0, got {getattr(self, name)}")
        if self.hugepages not in HUGEPAGE_MODES:
            raise ConfigError(
                PREFIX + "hugepages",
                f"must be one of {', '.join(HUGEPAGE_MODES)}, got {self.hugepages!r}",
            )
        if self.transfer not in TRANSFER_MODES:
            raise ConfigError(
                PREFIX + "transfer",
                f"must be one of {', '.join(TRANSFER_MODES)}, got {self.transfer!r}",
            )
        if self.prefetch_deadline_ms < 0:
            raise ConfigError(PREFIX + "prefetch_deadline_ms", "must be >= 0")
        if self.reconnect_max_ms < self.reconnect_interval_ms:
            raise ConfigError(
                PREFIX + "reconnect_max_ms", "must be >= kvnode.reconnect_interval_ms"
            )

    def check_block_size(self, block_size: int) -> None:
        """Chunks are whole vLLM blocks: block copies are exact, token copies are not."""
        if block_size <= 0 or self.chunk_tokens % block_size != 0:
            raise ConfigError(
                PREFIX + "chunk_tokens",
                f"{self.chunk_tokens} is not a multiple of vLLM's block size {block_size}; "
                f"use e.g. {max(block_size, (self.chunk_tokens // block_size) * block_size)} "
                "or change --block-size",
            )

    @classmethod
    def from_sources(
        cls, extra: Mapping[str, Any] | None, env: Mapping[str, str] | None = None
    ) -> ConnectorConfig:
        """Build from ``kv_connector_extra_config`` and the environment."""
        env = os.environ if env is None else env
        extra = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(k for k in extra if k.startswith(PREFIX) and k[len(PREFIX) :] not in known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting (known: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        for name, f in known.items():
            key = PREFIX + name
            env_name = RUNTIME_DIR_ENV if name == "runtime_dir" else ENV_PREFIX + name.upper()
            if key in extra:
                raw: Any = extra[key]
            elif env_name in env:
                raw = env[env_name]
            else:
                continue
            values[name] = _coerce(key, raw, f.default)
        return cls(**values)


def _coerce(key: str, raw: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(key, f"expected a boolean, got {raw!r}")
    if isinstance(default, int):
        if isinstance(raw, bool):
            raise ConfigError(key, f"expected an integer, got {raw!r}")
        try:
            return int(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(key, f"expected an integer, got {raw!r}") from exc
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ConfigError(key, f"expected a string, got {raw!r}")
    if isinstance(default, str):
        return raw.strip().lower()
    return raw or None
