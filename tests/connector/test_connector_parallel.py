"""Which parallel layouts the connector accepts: chunk keys name the TP and PP rank, so a
worker that cannot tell its rank with TP > 1 stops vLLM with a clear error (never saves
under rank 0's keys), and context parallelism, which the keys cannot describe, turns the
connector off with one warning."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm.config import KVTransferConfig, ParallelConfig
from vllm.distributed import parallel_state
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.kv_cache_interface import FullAttentionSpec

from kvnode.connector import connector as conn_mod
from kvnode.connector.connector import KVNodeConnector

BS = 16


def _connector(tmp_path: Path, role: KVConnectorRole, **parallel: int) -> KVNodeConnector:
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=torch.float32)
    vllm_config: Any = SimpleNamespace(
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVNodeConnector",
            kv_role="kv_both",
            kv_connector_extra_config={
                "kvnode.runtime_dir": str(tmp_path),
                "kvnode.chunk_tokens": 2 * BS,
            },
        ),
        cache_config=SimpleNamespace(block_size=BS),
        parallel_config=ParallelConfig(**parallel),  # vLLM's own field names
        model_config=SimpleNamespace(model="m", revision=None, dtype=torch.float32),
    )
    kv_cache_config: Any = SimpleNamespace(
        num_blocks=8,
        kv_cache_groups=[SimpleNamespace(kv_cache_spec=spec, layer_names=list(_caches()))],
    )
    return KVNodeConnector(vllm_config, role, kv_cache_config)


def _caches() -> dict[str, torch.Tensor]:
    return {"model.layers.0.self_attn.attn": torch.zeros(8, 2, BS, 64)}


def test_unknown_rank_with_tp_above_one_stops_the_connector(tmp_path: Path) -> None:
    # vLLM's groups are not initialised in this process: the rank cannot be told.
    c = _connector(tmp_path, KVConnectorRole.WORKER, tensor_parallel_size=2)
    try:
        with pytest.raises(RuntimeError, match="cannot tell this worker's rank.*tensor_parallel"):
            c.register_kv_caches(_caches())
        assert c.get_handshake_metadata() is None
    finally:
        c.shutdown()


def test_one_rank_is_rank_zero(tmp_path: Path) -> None:
    c = _connector(tmp_path, KVConnectorRole.WORKER, tensor_parallel_size=1)
    try:
        c.register_kv_caches(_caches())
        assert c.get_handshake_metadata() is not None
        assert c._worker is not None and c._worker.rank == 0
    finally:
        c.shutdown()


def test_rank_outside_the_world_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: 2)
    monkeypatch.setattr(parallel_state, "get_pp_group", lambda: SimpleNamespace(rank_in_group=0))
    with pytest.raises(RuntimeError, match="outside"):
        conn_mod._ranks(2, 1)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: 1)
    assert conn_mod._ranks(2, 1) == (1, 0)


@pytest.mark.parametrize("field", ["prefill_context_parallel_size", "decode_context_parallel_size"])
def test_context_parallel_turns_the_connector_off_with_one_warning(
    tmp_path: Path, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="kvnode")
    logging.getLogger("kvnode").propagate = True  # vLLM's handlers may have taken it
    for role in (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER):
        caplog.clear()
        kw = {field: 2, "tensor_parallel_size": 2}
        c = _connector(tmp_path, role, **kw)
        try:
            if role == KVConnectorRole.WORKER:
                c.register_kv_caches(_caches())  # no error: just off
                assert c.get_handshake_metadata() is None
            else:
                c.set_xfer_handshake_metadata({})
                assert c._sched is not None and not c._sched.active
        finally:
            c.shutdown()
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("kvnode")
        ]
        assert len(warnings) == 1 and f"{field}=2" in warnings[0], warnings
