"""KV events from the connector: saved chunks carry their parent key and token ids to
the agent's commit (the agent's events), and vLLM's own event stream carries the chunks
the connector stored (``take_events``), checked with vLLM's types, its worker-output
merge, and a real agent whose replayed events are decoded with vLLM's classes."""

from __future__ import annotations

import copy
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import KVEventsConfig, KVTransferConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_events import BlockStored, KVEventBatch  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, KVConnectorOutput  # noqa: E402

from kvnode.connector import KVNodeConnector  # noqa: E402
from kvnode.connector.keys import chunk_keys  # noqa: E402
from kvnode.connector.metadata import KVNodeEvents, stored_event  # noqa: E402
from kvnode.connector.scheduler import ChunkOp  # noqa: E402
from tests.conftest import AgentProcess  # noqa: E402
from tests.connector.test_connector_hma import connected  # noqa: E402
from tests.connector.test_connector_scheduler import HIT, C, Req, side, tokens  # noqa: E402
from tests.connector.test_connector_worker import ArenaClient, Link, caches  # noqa: E402
from tests.connector.test_connector_worker import worker as make_worker  # noqa: E402
from tests.kv_events import replay_events

# ---------------------------------------------------------------- scheduler plans


def test_save_ops_carry_parents_and_tokens_loads_carry_none() -> None:
    s, link, _ = side(tp_size=2)
    toks = tokens(800)
    req = Req("a", toks)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, 0)
    blocks = list(range(10, 17))
    keys = [chunk_keys(ns, toks, C) for ns in s.namespaces]  # by rank
    # Chunked prefill: chunk 0 completes in step 1, chunks 1 and 2 in step 2.
    _, saves = s.build_step([("a", 0, 300)], lambda rid: blocks)
    [op0] = saves["a"]
    assert op0.parents == (b"", b"") and op0.tokens == tuple(toks[:C])
    _, saves = s.build_step([("a", 300, 500)], lambda rid: blocks)
    op1, op2 = saves["a"]
    # A step's first chunk names the previous step's chunk as its parent, per rank.
    assert op1.parents == (keys[0][0], keys[1][0])
    assert op2.parents == (keys[0][1], keys[1][1])
    assert op2.tokens == tuple(toks[2 * C : 3 * C])
    # A second request served the first two chunks: its loads carry no tokens.
    for ks in keys:
        for k in ks[:2]:
            link.client.state[k] = HIT
    req2 = Req("b", toks[: 2 * C + 10])
    assert s.get_num_new_matched_tokens(req2, 0) == (2 * C, False)
    s.update_state_after_alloc(req2, 2 * C)
    loads, saves = s.build_step([("b", 2 * C, 10)], lambda rid: blocks)
    assert [op.tokens for op in loads["b"]] == [(), ()] and not saves
    assert all(op.parents == () for op in loads["b"])


# ---------------------------------------------------------------- worker commits


def _op(i: int, blocks: tuple[int, ...], parent: bytes) -> ChunkOp:
    return ChunkOp(i, (bytes([i + 1]) * 16,), blocks, 0, 0, (parent,), tuple(range(i, i + 8)))


def test_worker_commits_parents_and_tokens_and_keeps_what_it_stored() -> None:
    link = Link(ArenaClient())
    w = make_worker(link, caches(1))
    w.keep_stored = True
    ops = [_op(0, (3, 7), b""), _op(1, (8, 9), bytes([1]) * 16)]
    w.save({"r": ops})
    [(keys, parents, toks)] = link.client.commits
    assert keys == [op.keys[0] for op in ops]
    assert parents == [b"", bytes([1]) * 16]
    assert [list(t) for t in toks] == [list(range(8)), list(range(1, 9))]
    assert w.take_stored() == ops and w.take_stored() == []
    # Already stored (EXISTS): nothing committed, nothing reported.
    w.save({"r": ops[:1]})
    assert len(link.client.commits) == 1 and w.take_stored() == []


def test_worker_keeps_nothing_unless_asked() -> None:
    link = Link(ArenaClient())
    w = make_worker(link, caches(2))
    w.save({"r": [_op(0, (3, 7), b"")]})
    assert w.take_stats(wait=True)["save_chunks"] == 1 and w.take_stored() == []


# ---------------------------------------------------------------- vLLM's types


def test_stored_event_is_vllms_block_stored() -> None:
    op = ChunkOp(3, (b"k" * 16, b"r" * 16), (1, 2), 0, 1, (b"p" * 16, b"q" * 16), (5, 6, 7))
    ev = stored_event(op)
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == [b"k" * 16] and ev.parent_block_hash == b"p" * 16
    assert ev.token_ids == [5, 6, 7] and ev.block_size == 3
    assert ev.medium == "CPU" and ev.group_idx == 1 and ev.lora_id is None
    first = stored_event(ChunkOp(0, (b"k" * 16,), (1,), 0, 0, (b"",), (1,)))
    assert first.parent_block_hash is None
    # What vLLM's publisher sends decodes back to the same event.
    wire = msgspec.msgpack.encode(KVEventBatch(ts=1.0, events=[ev, first]))
    assert msgspec.msgpack.Decoder(KVEventBatch).decode(wire).events == [ev, first]


def _runner_output(events: KVNodeEvents | None) -> Any:
    out = copy.copy(EMPTY_MODEL_RUNNER_OUTPUT)
    out.kv_connector_output = KVConnectorOutput(kv_cache_events=events)
    return out


def test_vllms_merge_keeps_chunks_every_rank_stored() -> None:
    a, b = (stored_event(_op(i, (1, 2), b"")) for i in range(2))
    # Rank 1 could not store chunk b (arena full): only a is stored on every rank.
    merged = KVOutputAggregator(2).aggregate(
        [_runner_output(KVNodeEvents([a, b])), _runner_output(KVNodeEvents([a]))]
    )
    got = merged.kv_connector_output.kv_cache_events
    assert isinstance(got, KVNodeEvents) and got.get_number_of_workers() == 2
    assert got.common_events() == [a]
    assert got.aggregate().get_all_events() == [a]


# ---------------------------------------------------------------- with a real agent

BS = 16
NUM_BLOCKS = 32
LAYERS = ["model.layers.0.attn", "model.layers.1.attn"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vllm_config(runtime_dir: Path, events: bool) -> VllmConfig:
    cfg = VllmConfig(
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVNodeConnector",
            kv_connector_module_path="kvnode.connector",
            kv_role="kv_both",
            kv_connector_extra_config={
                "kvnode.runtime_dir": str(runtime_dir),
                "kvnode.chunk_tokens": 2 * BS,
                "kvnode.model_id": "events-test",
            },
        ),
        kv_events_config=KVEventsConfig(enable_kv_cache_events=events, publisher="null"),
    )
    cfg.cache_config.block_size = BS
    cfg.model_config = SimpleNamespace(  # type: ignore[assignment]
        model="events-test", revision=None, dtype=torch.float32
    )
    return cfg


def _kv_config() -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=8, dtype=torch.float32)
    groups = [KVCacheGroupSpec(LAYERS, spec)]
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=groups)


def _step(rid: str, n: int, blocks: list[int]) -> Any:
    new = SimpleNamespace(req_id=rid, num_computed_tokens=0, block_ids=(blocks,))
    return SimpleNamespace(
        scheduled_new_reqs=[new],
        num_scheduled_tokens={rid: n},
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[]),
        kv_connector_block_state=None,
    )


def _save_through(vcfg: VllmConfig, prompt: list[int]) -> tuple[KVNodeConnector, Any]:
    """A scheduler and a worker connector save the prompt's chunks in one step; returns
    the scheduler and the worker's KV cache events of that step."""
    kcfg = _kv_config()
    w = KVNodeConnector(vcfg, KVConnectorRole.WORKER, kcfg)
    g = torch.Generator().manual_seed(0)
    w.register_kv_caches({n: torch.randn(NUM_BLOCKS, 2, BS, 16, generator=g) for n in LAYERS})
    sched = KVNodeConnector(vcfg, KVConnectorRole.SCHEDULER, kcfg)
    sched.set_xfer_handshake_metadata({0: w.get_handshake_metadata()})
    req = Req("a", prompt)
    connected(sched, w)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # type: ignore[arg-type]
    sched.update_state_after_alloc(req, KVCacheBlocks(([],)), 0)  # type: ignore[arg-type]
    blocks = list(range(1, 1 + len(prompt) // BS + 1))
    w.bind_connector_metadata(sched.build_connector_meta(_step("a", len(prompt), blocks)))
    w.wait_for_save()
    events = w.get_kv_connector_kv_cache_events()
    w.clear_connector_metadata()
    w.shutdown()
    return sched, events


def test_take_events_and_agent_events_carry_parents_and_tokens(tmp_path: Path) -> None:
    replay = f"tcp://127.0.0.1:{_port()}"
    agent = AgentProcess(
        tmp_path / "run",
        args=["--set", f"events.endpoint=tcp://*:{_port()}",
              "--set", f"events.replay_endpoint={replay}",
              "--set", "events.insecure=true"],
    )  # fmt: skip
    agent.start()
    try:
        prompt = tokens(3 * 2 * BS + 5, seed=9)  # 3 chunks of 32 tokens
        sched, got = _save_through(_vllm_config(agent.runtime_dir, events=True), prompt)
        assert isinstance(got, KVNodeEvents)
        sched.update_connector_output(KVConnectorOutput(kv_cache_events=got))
        stored = list(sched.take_events())
        assert list(sched.take_events()) == []
        assert sched._sched is not None
        keys = chunk_keys(sched._sched.namespaces[0], prompt, 2 * BS)
        assert [ev.block_hashes for ev in stored] == [[k] for k in keys]
        assert [ev.parent_block_hash for ev in stored] == [None, keys[0], keys[1]]
        assert stored[2].token_ids == prompt[4 * BS : 6 * BS] and stored[0].block_size == 2 * BS
        assert all(ev.medium == "CPU" for ev in stored)
        sched.shutdown()
        # The agent got the same parents and tokens with the commits.
        deadline = time.monotonic() + 5
        while True:
            agent_stored = [e for e in replay_events(replay) if isinstance(e, BlockStored)]
            if len(agent_stored) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert [(e.block_hashes, e.parent_block_hash, e.token_ids) for e in agent_stored] == [
            (ev.block_hashes, ev.parent_block_hash, ev.token_ids) for ev in stored
        ]
    finally:
        agent.stop()


def test_no_events_reported_when_vllm_events_are_off(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "run").start()
    try:
        prompt = tokens(2 * 2 * BS + 5, seed=10)
        sched, got = _save_through(_vllm_config(agent.runtime_dir, events=False), prompt)
        assert got is None
        assert list(sched.take_events()) == []
        sched.shutdown()
    finally:
        agent.stop()
