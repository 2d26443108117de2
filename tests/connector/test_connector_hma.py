"""Hybrid KV cache groups (vLLM's hybrid manager on): vLLM's own KVCacheConfig and
KVCacheGroupSpec objects, a real agent process, real CPU tensors in each group's layout.

- sliding window + full attention: saves keep every chunk of the full group and only
  the blocks the window reads of the sliding group; a hit needs all of the full group's
  chunks and the window's chunks before the hit's end; loads are async, per group;
- Mamba + attention: no hits, no saves (the state cannot be restored);
- the connector declares SupportsHMA, so vLLM keeps its hybrid manager on.
vLLM's CPU backend never runs the hybrid manager (``support_hybrid_kv_cache()`` is
false), so the engine end to end is the GPU check (test_connector_hma_gpu.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm.config import KVTransferConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorRole,
    supports_hma,
)
from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    SlidingWindowSpec,
)

from kvnode.connector import KVNodeConnector  # noqa: E402
from kvnode.connector.groups import FULL, SLIDING, plan_groups  # noqa: E402
from kvnode.connector.metadata import KVNodeHandshake  # noqa: E402
from kvnode.connector.namespace import group_namespaces  # noqa: E402
from kvnode.connector.scheduler import SchedulerSide  # noqa: E402
from tests.connector.test_connector_scheduler import HIT, FakeLink, Req, make_ns  # noqa: E402

BS, C, W, HEADS, HEAD, NUM_BLOCKS = 16, 64, 20, 2, 8, 64
BPC = C // BS  # 4 blocks per chunk; the window (20 tokens) reads 2 of them
SW_LAYERS, FULL_LAYERS = ["model.layers.0.attn", "model.layers.2.attn"], ["model.layers.1.attn"]
PROMPT = [(i * 31 + 7) % 1000 for i in range(5 * C + 10)]  # 5 usable chunks


def attn(window: int | None = None) -> Any:
    kw: dict[str, Any] = dict(block_size=BS, num_kv_heads=HEADS, head_size=HEAD)
    if window is None:
        return FullAttentionSpec(dtype=torch.float32, **kw)
    return SlidingWindowSpec(dtype=torch.float32, sliding_window=window, **kw)


def sw_full_config() -> KVCacheConfig:
    groups = [KVCacheGroupSpec(SW_LAYERS, attn(W)), KVCacheGroupSpec(FULL_LAYERS, attn())]
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=groups)


def mamba_config() -> KVCacheConfig:
    mamba = MambaSpec(block_size=BS, shapes=((4, 8),), dtypes=(torch.float32,))
    groups = [KVCacheGroupSpec(["mixer.0"], mamba), KVCacheGroupSpec(FULL_LAYERS, attn())]
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=groups)


# ---------------------------------------------------------------- scheduler only


def sched(cfg: KVCacheConfig) -> tuple[SchedulerSide, FakeLink]:
    from kvnode.connector.config import ConnectorConfig

    plan = plan_groups(cfg)
    link = FakeLink()
    s = SchedulerSide(ConnectorConfig(chunk_tokens=C), link, BS, plan=plan)
    base = [n for n in make_ns()]
    base = [n.__class__(**{**_fields(n), "block_size": BS, "chunk_tokens": C}) for n in base]
    parts = tuple(
        ("cpu", (len(g.layer_names), HEADS, BS, 2 * HEAD), "float32") for g in plan.groups
    )
    hs = {(0, 0): KVNodeHandshake("cpu", (3,), "float32", groups=parts)}
    gns = group_namespaces(base, plan, hs)
    assert gns is not None
    s.set_namespaces(base, gns)
    return s, link


def _fields(ns: Any) -> dict[str, Any]:
    return {f: getattr(ns, f) for f in ns.__slots__}


def store_all(s: SchedulerSide, link: FakeLink, req: Req, pos: int, chunks: range) -> None:
    st = s._state(req)
    for c in chunks:
        link.client.state[s._keys(st, c + 1, pos)[c][0]] = HIT


def test_plan_of_sliding_window_and_full_model() -> None:
    plan = plan_groups(sw_full_config())
    assert [(g.index, g.kind, g.sliding_window) for g in plan.groups] == [
        (0, SLIDING, W),
        (1, FULL, 0),
    ]
    assert not plan.plain and plan.group_ids == (0, 1)
    assert [g.stored_blocks(BPC, BS) for g in plan.groups] == [2, BPC]


def test_groups_never_share_keys() -> None:
    s, _ = sched(sw_full_config())
    st = s._state(Req("a", PROMPT))
    assert not set(s._keys(st, 5, 0)) & set(s._keys(st, 5, 1))


def test_hit_needs_all_full_chunks_and_only_the_window() -> None:
    s, link = sched(sw_full_config())
    req = Req("a", PROMPT)
    store_all(s, link, req, 1, range(5))
    store_all(s, link, req, 0, range(4, 5))  # the sliding group: only the window's chunk
    assert s.get_num_new_matched_tokens(req, 0) == (5 * C, True)  # async: two tables
    # The full group missing chunk 3: the hit ends there; the window before chunk 3's
    # end lies in chunk 2, which the sliding group lacks: the hit shrinks to what both
    # groups have, which is nothing before chunk 2's window either.
    del link.client.state[s._keys(s._state(req), 4, 1)[3][0]]
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    store_all(s, link, req, 0, range(2, 3))
    assert s.get_num_new_matched_tokens(req, 0) == (3 * C, True)


def test_loads_per_group_cover_the_window_only() -> None:
    s, link = sched(sw_full_config())
    req = Req("a", PROMPT)
    store_all(s, link, req, 1, range(5))
    store_all(s, link, req, 0, range(5))
    n, is_async = s.get_num_new_matched_tokens(req, 0)
    assert (n, is_async) == (5 * C, True)
    sw_table = [0] * 18 + [100, 101, 102]  # vLLM nulls the blocks behind the window
    full_table = list(range(200, 221))
    s.update_state_after_alloc(req, n, (sw_table, full_table))
    loads, saves = s.build_step([], lambda rid: None)  # not scheduled while loading
    ops = loads["a"]
    full = [op for op in ops if op.group == 1]
    sw = [op for op in ops if op.group == 0]
    assert [b for op in full for b in op.block_ids] == full_table[:20]
    # Tokens [301, 320): blocks 18 and 19, the tail the entry of chunk 4 keeps.
    assert [(op.index, op.block_ids, op.block_offset) for op in sw] == [(4, (100, 101), 0)]
    assert not saves


def test_saves_keep_the_window_tail_of_each_chunk() -> None:
    s, _ = sched(sw_full_config())
    req = Req("a", PROMPT)
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, 0)
    tables = (list(range(21)), list(range(100, 121)))
    _, saves = s.build_step([("a", 0, len(PROMPT))], lambda rid: tables)
    sw = [(op.index, op.block_ids) for op in saves["a"] if op.group == 0]
    assert sw == [(c, (4 * c + 2, 4 * c + 3)) for c in range(5)]
    full = [op.block_ids for op in saves["a"] if op.group == 1]
    assert full == [tuple(range(100 + 4 * c, 104 + 4 * c)) for c in range(5)]


def test_mamba_model_gets_no_hits() -> None:
    plan = plan_groups(mamba_config())
    assert plan.groups == () and "MambaSpec" in plan.why_off


# ---------------------------------------------------------------- connector + agent


def vllm_config(runtime_dir: Path) -> VllmConfig:
    cfg = VllmConfig(
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVNodeConnector",
            kv_connector_module_path="kvnode.connector",
            kv_role="kv_both",
            kv_connector_extra_config={
                "kvnode.runtime_dir": str(runtime_dir),
                "kvnode.chunk_tokens": C,
                "kvnode.model_id": "hma-test",
            },
        )
    )
    cfg.cache_config.block_size = BS
    cfg.model_config = SimpleNamespace(  # type: ignore[assignment]
        model="hma-test", revision=None, dtype=torch.float32
    )
    return cfg


def caches(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    names = SW_LAYERS + FULL_LAYERS
    return {n: torch.randn(NUM_BLOCKS, HEADS, BS, 2 * HEAD, generator=g) for n in names}


def blocks(*tables: list[int]) -> KVCacheBlocks:
    return KVCacheBlocks(tuple([KVCacheBlock(b) for b in t] for t in tables))


def step(new: list[tuple[str, int, int, tuple[list[int], ...]]]) -> Any:
    reqs = [SimpleNamespace(req_id=r, num_computed_tokens=c, block_ids=b) for r, c, _, b in new]
    return SimpleNamespace(
        scheduled_new_reqs=reqs,
        num_scheduled_tokens={r: n for r, _, n, _ in new},
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[]),
        kv_connector_block_state=None,
    )


def connected(*connectors: KVNodeConnector) -> None:
    deadline = time.monotonic() + 15
    for c in connectors:
        while not c._link.up:
            assert time.monotonic() < deadline, "the connector did not reach the agent"
            c._link.try_connect()
            time.sleep(0.05)


def test_connector_declares_hma() -> None:
    assert supports_hma(KVNodeConnector)
    ktc = KVTransferConfig(
        kv_connector="KVNodeConnector",
        kv_connector_module_path="kvnode.connector",
        kv_role="kv_both",
    )
    assert KVConnectorFactory.supports_hma_config(ktc)


def test_sliding_window_and_full_round_trip_through_an_agent(agent: Any) -> None:
    vcfg, kcfg = vllm_config(agent.runtime_dir), sw_full_config()
    src = caches(1)
    w1 = KVNodeConnector(vcfg, KVConnectorRole.WORKER, kcfg)
    w1.register_kv_caches(src)
    sched_c = KVNodeConnector(vcfg, KVConnectorRole.SCHEDULER, kcfg)
    sched_c.set_xfer_handshake_metadata({0: w1.get_handshake_metadata()})
    req = Req("a", PROMPT)
    # First request: nothing cached; its prefill saves 5 chunks of each group.
    assert sched_c.get_num_new_matched_tokens(req, 0) == (0, False)
    sched_c.update_state_after_alloc(req, blocks(), 0)
    connected(sched_c, w1)
    sw_src, full_src = list(range(1, 22)), list(range(30, 51))
    meta = sched_c.build_connector_meta(step([("a", 0, len(PROMPT), (sw_src, full_src))]))
    w1.bind_connector_metadata(meta)
    w1.wait_for_save()
    # Commits are answered after the step: stats count them once the answers are read
    # (a later call or heartbeat), so sum what the connector reports for a while.
    saved_chunks, deadline = 0, time.monotonic() + 10
    while saved_chunks < 10 and time.monotonic() < deadline:
        saved = w1.get_kv_connector_stats()
        saved_chunks += saved.data["save_chunks"] if saved is not None else 0
        time.sleep(0.05)
    assert saved_chunks == 10  # 5 chunks, 2 groups
    assert sched_c.request_finished_all_groups(req, (sw_src, full_src)) == (False, None)
    # Second request, fresh worker: an async hit; each group's blocks land in place.
    w2 = KVNodeConnector(vcfg, KVConnectorRole.WORKER, kcfg)
    dst = {n: torch.zeros_like(t) for n, t in src.items()}
    w2.register_kv_caches(dst)
    connected(w2)
    req2 = Req("b", PROMPT)
    assert sched_c.get_num_new_matched_tokens(req2, 0) == (5 * C, True)
    assert sched_c.get_loaded_kv_cache_group_ids(req2) == (0, 1)
    sw_dst, full_dst = [0] * 18 + [60, 61, 62], list(range(1, 22))
    sched_c.update_state_after_alloc(req2, blocks(sw_dst, full_dst), 5 * C)
    w2.bind_connector_metadata(sched_c.build_connector_meta(step([])))
    w2.start_load_kv(None)  # type: ignore[arg-type]
    res = w2.get_transfer_results(set())
    assert res.finished_recving == {"b"} and not res.failed_recving
    assert w2.get_block_ids_with_load_errors() == set()
    for n in FULL_LAYERS:
        assert torch.equal(dst[n][full_dst[:20]], src[n][full_src[:20]])
    for n in SW_LAYERS:
        # Blocks 18 and 19 are the window; block 20 (the last partial) is computed.
        assert torch.equal(dst[n][[60, 61]], src[n][sw_src[18:20]])
        assert not dst[n][62].any() and not dst[n][0].any()


def test_failed_async_load_is_reported_per_request(agent: Any) -> None:
    vcfg, kcfg = vllm_config(agent.runtime_dir), sw_full_config()
    w = KVNodeConnector(vcfg, KVConnectorRole.WORKER, kcfg)
    w.register_kv_caches(caches(2))
    sched_c = KVNodeConnector(vcfg, KVConnectorRole.SCHEDULER, kcfg)
    sched_c.set_xfer_handshake_metadata({0: w.get_handshake_metadata()})
    assert sched_c._sched is not None
    req = Req("c", PROMPT)
    connected(sched_c, w)
    # Offer a hit the agent does not have (a stale index would): the pin misses.
    sched_c._sched._state(req).plan = (0, 5 * C)
    sched_c.update_state_after_alloc(req, blocks([0] * 18 + [1, 2, 3], list(range(4, 25))), 5 * C)
    w.bind_connector_metadata(sched_c.build_connector_meta(step([])))
    w.start_load_kv(None)  # type: ignore[arg-type]
    res = w.get_transfer_results(set())
    assert res.finished_recving == {"c"} and res.failed_recving == {"c"}
    assert w.get_block_ids_with_load_errors() == set()  # vLLM raises on these with 2 groups


def test_mamba_and_attention_connector_stays_passive(agent: Any) -> None:
    vcfg, kcfg = vllm_config(agent.runtime_dir), mamba_config()
    w = KVNodeConnector(vcfg, KVConnectorRole.WORKER, kcfg)
    w.register_kv_caches(caches(3))
    assert w.get_handshake_metadata() is None
    sched_c = KVNodeConnector(vcfg, KVConnectorRole.SCHEDULER, kcfg)
    sched_c.set_xfer_handshake_metadata({0: None})  # type: ignore[dict-item]
    req = Req("m", PROMPT)
    assert sched_c.get_num_new_matched_tokens(req, 0) == (0, False)
    meta = sched_c.build_connector_meta(step([("m", 0, len(PROMPT), ([1], [2]))]))
    assert not meta.loads and not meta.saves  # type: ignore[attr-defined]
    assert sched_c.request_finished_all_groups(req, ([1], [2])) == (False, None)
