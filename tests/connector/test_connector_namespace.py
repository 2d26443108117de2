"""Namespaces from the workers' handshakes, and the model identity in them."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvnode.connector.metadata import KVNodeHandshake  # noqa: E402
from kvnode.connector.namespace import model_identity, rank_namespaces  # noqa: E402
from kvnode.connector.stats import KVNodeStats  # noqa: E402


def test_rank_namespaces_need_every_rank() -> None:
    hs = KVNodeHandshake(layout="cpu", block_shape=(2, 2, 128, 64), dtype="float32")
    ns = rank_namespaces("m", "float32", 128, 256, 2, 1, {(0, 0): hs, (0, 1): hs})
    assert ns is not None and [n.tp_rank for n in ns] == [0, 1]
    assert ns[0].fingerprint() != ns[1].fingerprint()
    assert ns[0].kv_layout == "cpu" and ns[0].block_shape == (2, 2, 128, 64)
    assert rank_namespaces("m", "float32", 128, 256, 2, 1, {(0, 0): hs}) is None


def test_local_model_identity_follows_the_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "model.safetensors").write_bytes(b"a" * 5000)
    first = model_identity(str(tmp_path))
    assert model_identity(str(tmp_path)) == first
    (tmp_path / "model.safetensors").write_bytes(b"b" * 5000)  # same size, new weights
    assert model_identity(str(tmp_path)) != first
    assert model_identity("org/model", "v2") == "org/model@v2"


def test_stats_aggregate_and_reduce() -> None:
    a = KVNodeStats(data={"load_bytes": 4_000_000_000, "load_s": 2.0, "hit_tokens": 10})
    b = KVNodeStats(data={"load_bytes": 0, "load_s": 0.0, "query_tokens": 40})
    total = a.aggregate(b)
    out = total.reduce()
    assert out["load_GBps"] == 2.0 and out["hit_rate"] == 0.25
    assert not total.is_empty() and KVNodeStats(data={"x": 0}).is_empty()
