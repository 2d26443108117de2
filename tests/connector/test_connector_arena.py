"""The worker's arena through agent restarts, with real agent processes and a real
client: the client owns the mapping and its hooks (populate, register for DMA) follow
every remap; a restart under a load recomputes and drops nothing.

The registration here is recorded, not cudaHostRegister (no GPU on this host): the GPU
variant is tests/connector/test_connector_gpu.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvnode.connector.link import AgentLink, default_client_factory
from kvnode.connector.scheduler import ChunkOp
from kvnode.connector.worker import WorkerSide
from kvnode.errors import KVNodeError
from kvnode.ipc.client import AgentClient, Lookup
from kvnode.kernels.hostmem import ArenaMapping, populate
from tests.conftest import AgentProcess

NUM_BLOCKS, BS, HEADS, HEAD, LAYERS, BPC = 96, 16, 2, 64, 2, 2
DEADLINE_S = 15.0


class Recorder:
    """Registration hooks that log what they see: the buffer must still be mapped when
    it is unregistered, and the new one mapped when it is registered."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, bool]] = []  # (what, buffer id, mapped)
        self.buffers: list[Any] = []

    def register(self, buf: Any) -> Any:
        self.buffers.append(buf)
        self.events.append(("register", id(buf), not buf.closed))
        return buf

    def unregister(self, buf: Any) -> None:
        self.events.append(("unregister", id(buf), not buf.closed))


def caches(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.self_attn.attn": torch.randn(
            NUM_BLOCKS, HEADS, BS, 2 * HEAD, generator=g
        )
        for i in range(LAYERS)
    }


def payload(kv: dict[str, torch.Tensor], blocks: tuple[int, ...]) -> bytes:
    """A chunk's bytes as the connector lays them out, built by hand."""
    return b"".join(
        kv[n][list(blocks)].contiguous().view(torch.uint8).numpy().tobytes() for n in sorted(kv)
    )


def key(round_: int, i: int) -> bytes:
    return bytes([round_, i]) * 8


def make_link(rd: Path, arena: ArenaMapping) -> AgentLink:
    link = AgentLink(
        default_client_factory(str(rd), "vllm-worker", 2.0, arena.on_map, arena.on_unmap),
        retry_interval_s=0.05,
        retry_max_s=0.2,
        background=False,
    )
    until(link.try_connect, "the link did not connect")
    return link


def until(check: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def client_of(link: AgentLink) -> AgentClient:
    client: AgentClient = link.call(lambda c: c)
    return client


def reach(c: AgentClient) -> bool:
    """One call that succeeds once the client has registered (and remapped) again."""
    try:
        c.lookup([b"\0" * 16], promote=False)
        return True
    except KVNodeError:
        return False


@pytest.fixture
def agent_dir(runtime_dir: Path) -> Iterator[list[AgentProcess]]:
    agents = [AgentProcess(runtime_dir).start()]
    yield agents
    agents[-1].stop()


def restart(agents: list[AgentProcess]) -> None:
    agents[-1].stop()
    agents.append(AgentProcess(agents[-1].runtime_dir).start())


def test_hooks_follow_two_agent_restarts(agent_dir: list[AgentProcess]) -> None:
    rec = Recorder()
    arena = ArenaMapping(register=rec.register, unregister=rec.unregister, prepare=populate)
    link = make_link(agent_dir[0].runtime_dir, arena)
    kv = caches(1)
    w = WorkerSide(link, 0, NUM_BLOCKS, BS, BPC, arena=arena)
    w.register(kv)
    reader = AgentClient(agent_dir[0].runtime_dir, name="reader", timeout_s=2.0)
    try:
        for round_ in range(3):
            if round_:
                seen = len(rec.events)
                restart(agent_dir)
                # Nobody calls: the client notices and remaps on its own (heartbeat).
                until(lambda n=seen: len(rec.events) >= n + 2, "the client did not remap")
                old, new = rec.buffers[-2], rec.buffers[-1]
                assert rec.events[seen:] == [
                    ("unregister", id(old), True),  # before its unmap
                    ("register", id(new), True),  # after the new mapping
                ]
                assert old.closed, "the old arena is still mapped"
            assert client_of(link).buffer is rec.buffers[-1], "registered != mapped"
            ops = [ChunkOp(i, (key(round_, i),), (2 * i + 1, 2 * i + 2)) for i in range(8)]
            w.save({"r": ops})
            assert w.take_stats(wait=True)["save_chunks"] == 8
            until(lambda: reach(reader), "the reader did not reach the agent")
            for o in ops:
                assert reader.get(o.keys[0]) == payload(kv, o.block_ids), f"round {round_}"
        assert [e[0] for e in rec.events] == ["register"] + ["unregister", "register"] * 2
    finally:
        reader.close()
        link.close()
    assert rec.events[-1][0] == "unregister" and rec.buffers[-1].closed


def test_restart_during_a_load_drops_nothing_and_recomputes(
    agent_dir: list[AgentProcess],
) -> None:
    rd = agent_dir[0].runtime_dir
    n = 40
    src_kv, dst_kv = caches(1), caches(2)
    ops = [ChunkOp(i, (key(9, i),), (2 * i + 1, 2 * i + 2)) for i in range(n)]
    writer = AgentClient(rd, name="writer", timeout_s=2.0)
    for o in ops:
        writer.put(o.keys[0], payload(src_kv, o.block_ids))
    writer.close()

    arena = ArenaMapping()
    link = make_link(rd, arena)
    w = WorkerSide(link, 0, NUM_BLOCKS, BS, BPC, arena=arena)
    w.register(dst_kv)
    client = client_of(link)
    real_pin = client.pin

    def pin_then_restart(keys: list[bytes]) -> Any:
        answers = real_pin(keys)  # slots of the old agent's arena
        restart(agent_dir)
        # The new agent holds the same entries, written in another order (other slots).
        with AgentClient(rd, name="writer", timeout_s=2.0) as again:
            for o in reversed(ops):
                again.put(o.keys[0], payload(src_kv, o.block_ids))
        until(lambda: reach(client), "the worker's client did not remap")
        return answers

    client.pin = pin_then_restart  # type: ignore[method-assign]
    moved = [ChunkOp(o.index, o.keys, (2 * o.index + 11, 2 * o.index + 12)) for o in ops]
    w.load({"q": moved})
    client.pin = real_pin  # type: ignore[method-assign]
    # Recomputed, not loaded: every block of the request is a load error.
    assert w.take_load_errors() == {b for o in moved for b in o.block_ids}
    with AgentClient(rd, name="check", timeout_s=2.0) as check:
        counters = check.stats()["counters"]
        assert counters["drops"] == 0, "good entries were dropped after the restart"
        assert check.lookup([o.keys[0] for o in ops], promote=False) == [Lookup.HIT] * n
    # The next step loads them from the new agent, byte for byte.
    w.load({"q": moved})
    assert w.take_load_errors() == set()
    for o, m in zip(ops, moved, strict=True):
        for name in src_kv:
            assert torch.equal(dst_kv[name][list(m.block_ids)], src_kv[name][list(o.block_ids)])
    link.close()


def test_a_chunks_rank_entries_live_and_die_together(agent_dir: list[AgentProcess]) -> None:
    """Two TP ranks save one chunk each under their own key; the agent files them as
    one group, so dropping (or evicting) one rank's entry takes the other too."""
    rd = agent_dir[0].runtime_dir
    workers, links = [], []
    for rank in range(2):
        arena = ArenaMapping()
        link = make_link(rd, arena)
        w = WorkerSide(link, rank, NUM_BLOCKS, BS, BPC, arena=arena)
        w.register(caches(10 + rank))
        workers.append(w)
        links.append(link)
    reader = AgentClient(rd, name="reader", timeout_s=2.0)
    try:
        ops = [ChunkOp(i, (key(7, i), key(8, i)), (2 * i + 1, 2 * i + 2)) for i in range(3)]
        for w in workers:
            w.save({"r": ops})
        every = [k for o in ops for k in o.keys]
        assert reader.lookup(every, promote=False) == [1] * 6
        reader.drop([ops[0].keys[1]])  # rank 1's entry of chunk 0 failed its checksum
        assert reader.lookup(every, promote=False) == [0, 0, 1, 1, 1, 1]
    finally:
        reader.close()
        for link in links:
            link.close()


def _held(rd: Path) -> tuple[int, int]:
    with AgentClient(rd, name="check", timeout_s=2.0, heartbeat=False) as check:
        arena = check.stats()["arena"]
        return int(arena["pinned"]), int(arena["reserved"])


def _fill(rd: Path, kv: dict[str, torch.Tensor], ops: list[ChunkOp]) -> None:
    with AgentClient(rd, name="writer", timeout_s=2.0, heartbeat=False) as w:
        for o in ops:
            assert w.put(o.keys[0], payload(kv, o.block_ids)) == 0


def test_a_load_after_an_unseen_restart_leaves_no_pins(agent_dir: list[AgentProcess]) -> None:
    """The agent restarts while the worker is idle and its client has not noticed (no
    heartbeat yet). The load's pin is answered "stale": it must not be sent again into
    the new generation, whose slots the worker would then refuse as stale and never
    release (the new agent showed pinned=n for as long as the worker lived)."""
    rd = agent_dir[0].runtime_dir
    src, dst = caches(1), caches(2)
    ops = [ChunkOp(i, (key(7, i),), (2 * i + 1, 2 * i + 2)) for i in range(6)]
    arena = ArenaMapping()
    link = make_link(rd, arena)
    try:
        client_of(link)._hb_stop.set()  # nobody tells the client of the restart early
        w = WorkerSide(link, 0, NUM_BLOCKS, BS, BPC, arena=arena)
        w.register(dst)
        restart(agent_dir)
        _fill(rd, src, ops)
        w.load({"q": ops})
        assert w.take_load_errors() == {b for o in ops for b in o.block_ids}  # recomputed
        assert _held(rd) == (0, 0), "pins were left in the new generation"
        w.load({"q": ops})  # the next step loads from the new agent
        assert w.take_load_errors() == set()
        assert _held(rd) == (0, 0)
    finally:
        link.close()


def test_slots_granted_by_a_registration_made_after_the_epoch_are_given_back(
    agent_dir: list[AgentProcess],
) -> None:
    """The client registers again (and remaps) between the worker reading the epoch
    and its pin or reserve: the slots are the new registration's, refused as stale by
    the worker, and must be released and aborted there, not left held."""
    rd = agent_dir[0].runtime_dir
    src, dst = caches(1), caches(2)
    ops = [ChunkOp(i, (key(8, i),), (2 * i + 1, 2 * i + 2)) for i in range(6)]
    _fill(rd, src, ops)
    arena = ArenaMapping()
    link = make_link(rd, arena)
    client = client_of(link)
    client._hb_stop.set()
    w = WorkerSide(link, 0, NUM_BLOCKS, BS, BPC, arena=arena)
    w.register(dst)
    real_pin, real_reserve = client.pin, client.reserve

    def remap_first(real: Any) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            restart(agent_dir)
            _fill(rd, src, ops)
            client._lost()
            client.connect()  # the new generation, mapped: the epoch moves on
            return real(*args, **kw)

        return call

    try:
        client.pin = remap_first(real_pin)  # type: ignore[method-assign]
        w.load({"q": ops})
        client.pin = real_pin  # type: ignore[method-assign]
        assert w.take_load_errors() == {b for o in ops for b in o.block_ids}
        assert client.flush()  # the release was sent without waiting: its answer is in
        assert _held(rd) == (0, 0), "pins of the new registration were kept"
        saves = [ChunkOp(i, (key(9, i),), (2 * i + 1, 2 * i + 2)) for i in range(6)]
        client.reserve = remap_first(real_reserve)  # type: ignore[method-assign]
        w.save({"s": saves})
        client.reserve = real_reserve  # type: ignore[method-assign]
        assert w.take_stats(wait=True)["save_stale"] == len(saves)
        assert client.flush()
        assert _held(rd) == (0, 0), "reservations of the new registration were kept"
    finally:
        link.close()


def test_a_lazy_mapping_is_readied_only_by_a_worker_mode_copy(
    agent_dir: list[AgentProcess],
) -> None:
    """Agent mode: the worker neither populates nor registers the arena while the
    agent moves its bytes; its first worker-mode copy (a fallback) readies the
    mapping once, every byte right; after an agent restart the new mapping waits
    again, and is unregistered while still mapped when it goes."""
    from kvnode.connector.agent_mode import AgentPath

    rec = Recorder()
    prepared: list[int] = []
    arena = ArenaMapping(
        register=rec.register, unregister=rec.unregister,
        prepare=lambda b: prepared.append(id(b)), lazy=True,
    )  # fmt: skip
    link = make_link(agent_dir[0].runtime_dir, arena)
    try:
        src = caches(3)
        w = WorkerSide(link, 0, NUM_BLOCKS, BS, BPC, arena=arena)
        w.register(src)
        path = AgentPath(link, w)
        assert path.ready()  # exported: the agent moves this worker's bytes
        ops = {"r": [ChunkOp(i, (key(60, i),), (2 * i, 2 * i + 1)) for i in range(3)]}
        path.track(ops)
        path.save(ops)
        path.wait_saves()
        assert path.finished(set(ops)) == {"r"}
        assert rec.events == [] and prepared == []  # agent mode never readied the mapping
        dst = caches(4)
        w2 = WorkerSide(link, 0, NUM_BLOCKS, BS, BPC, arena=arena)
        w2.register(dst)
        w2.load({"r": [ChunkOp(i, (key(60, i),), (40 + 2 * i, 41 + 2 * i)) for i in range(3)]})
        assert w2.take_load_errors() == set()
        for n in src:
            assert torch.equal(src[n][:6], dst[n][40:46]), n
        assert [e[0] for e in rec.events] == ["register"] and len(prepared) == 1
        w2.load({"r": [ChunkOp(0, (key(60, 0),), (50, 51))]})
        assert len(rec.events) == 1 and len(prepared) == 1  # once per mapping
        restart(agent_dir)
        until(lambda: reach(client_of(link)), "the link did not register again")
        assert [e[0] for e in rec.events] == ["register", "unregister"]
        assert all(mapped for _, _, mapped in rec.events)  # unregistered before the unmap
        assert len(prepared) == 1  # the new mapping waits for a worker-mode copy again
        arena.ready_now()  # a worker that learns it will copy readies it at once
        arena.ready_now()
        assert [e[0] for e in rec.events] == ["register", "unregister", "register"]
        assert len(prepared) == 2 and rec.buffers[-1] is client_of(link).buffer
        restart(agent_dir)  # eager from then on: the next mapping is readied as it is made
        until(lambda: len(rec.events) >= 5, "the client did not remap")
        assert [e[0] for e in rec.events][3:] == ["unregister", "register"]
        assert len(prepared) == 3
    finally:
        link.close()
