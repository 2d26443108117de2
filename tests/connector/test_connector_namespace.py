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


def _plan(*specs: object) -> object:
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    from kvnode.connector.groups import plan_groups

    groups = [KVCacheGroupSpec([f"layer.{i}"], s) for i, s in enumerate(specs)]  # type: ignore[arg-type]
    return plan_groups(KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=groups))


def _attn(window: int | None = None, sliding: bool = False) -> object:
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    kw = dict(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.float32)
    if sliding:
        return SlidingWindowSpec(sliding_window=window or 512, **kw)  # type: ignore[arg-type]
    return FullAttentionSpec(sliding_window=window, **kw)  # type: ignore[arg-type]


# rank_namespaces("m", "float32", 128, 256, 1, 1, cpu handshake), computed with the
# keys.py of before groups existed: entries already stored keep their keys.
PLAIN_GOLDEN = "2523792b47f8fb238914ee41fb511280"


def test_one_full_group_keeps_the_keys_of_before() -> None:
    """One full-attention group (also a sliding-window model with the hybrid manager
    off, as on vLLM's CPU backend): the namespace has no group field; stored keys stay
    valid."""
    from kvnode.connector.namespace import group_namespaces

    hs = KVNodeHandshake(layout="cpu", block_shape=(2, 2, 128, 64), dtype="float32")
    ns = rank_namespaces("m", "float32", 128, 256, 1, 1, {(0, 0): hs})
    assert ns is not None
    for spec in (_attn(), _attn(window=512)):
        plan = _plan(spec)
        assert plan.plain  # type: ignore[attr-defined]
        gns = group_namespaces(ns, plan, {(0, 0): hs})  # type: ignore[arg-type]
        assert gns == [ns] and gns[0][0].group == ""
        assert gns[0][0].fingerprint().hex() == PLAIN_GOLDEN


def test_hybrid_groups_name_their_group_and_layout() -> None:
    from kvnode.connector.namespace import group_namespaces

    parts = (("flash", (1, 2, 128, 2, 64), "bfloat16"), ("flash", (1, 2, 128, 2, 64), "bfloat16"))
    hs = KVNodeHandshake(layout="flash", block_shape=(2,), dtype="bfloat16", groups=parts)
    ns = rank_namespaces("m", "bfloat16", 128, 256, 1, 1, {(0, 0): hs})
    assert ns is not None
    plan = _plan(_attn(sliding=True), _attn())
    gns = group_namespaces(ns, plan, {(0, 0): hs})  # type: ignore[arg-type]
    assert gns is not None
    sw, full = gns[0][0], gns[1][0]
    assert sw.group.startswith("sliding_window:w=512") and full.group.startswith("full_attention")
    assert sw.block_shape == (1, 2, 128, 2, 64) and sw.dtype == "bfloat16/bfloat16"
    assert len({sw.fingerprint(), full.fingerprint(), ns[0].fingerprint()}) == 3
    # A worker that did not describe its groups: no keys are guessed.
    assert group_namespaces(ns, plan, {(0, 0): KVNodeHandshake("flash", (2,), "x")}) is None  # type: ignore[arg-type]
