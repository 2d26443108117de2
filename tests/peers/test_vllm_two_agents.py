"""Two real agents on loopback joined by CURVE peer links, real vLLM processes on the CPU:

1. a vLLM process on agent 2 is served a prefix that a vLLM process stored through agent
   1 (agent 2 fetches the chunks from its peer): cached tokens reported, the same greedy
   tokens as a run without the connector;
2. agent 1 killed while agent 2 fetches from it: the chunks are misses (none readable
   half-written, no reservation left behind), and agent 2 goes on serving vLLM with the
   same tokens.

Few vLLM processes (start-up dominates): one reference without the connector, one
writer on agent 1, one reader on agent 2 used for every check.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvnode.ipc.checksum import checksum
from kvnode.ipc.client import AgentClient, Lookup, Status
from tests.conftest import AgentProcess
from tests.peers.conftest import fleet_keys, free_port

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vllm"))
from vllm_harness import Runner  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
C = 256  # chunk tokens (the connector's default)
MAX_TOKENS = 8
BIG_CHUNKS, BIG_BYTES = 24, 16 << 20  # agent 1 holds these for the mid-transfer kill


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 1000) for _ in range(n)]


P = _tokens(1100, 21)  # 4 usable chunks, stored through agent 1
Q = _tokens(900, 22)  # asked on agent 2 after agent 1 is gone
PROMPTS = {"P": P, "Q": Q}


@pytest.fixture(scope="module")
def two_agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    d = tmp_path_factory.mktemp("two-agents")
    secret, auth = fleet_keys(d)
    pa, pb = free_port(), free_port()
    common = [
        "--set", f"peers.curve_secret_key={secret}",
        "--set", f"peers.curve_authorized_dir={auth}",
        "--set", "peers.deadline_ms=200",  # a loaded 2-core machine answers slowly
    ]  # fmt: skip
    one = AgentProcess(d / "one", cpu_bytes="768MiB",
                       args=[*common, "--set", f"peers.listen=tcp://127.0.0.1:{pa}"])  # fmt: skip
    two = AgentProcess(d / "two", cpu_bytes="768MiB",
                       args=[*common, "--set", f"peers.listen=tcp://127.0.0.1:{pb}",
                             "--set", f"peers.seeds=tcp://127.0.0.1:{pa}"])  # fmt: skip
    one.start()
    two.start()
    try:
        yield one, two
    finally:
        two.stop()
        one.stop()


def _runner(model: str, agent: Any | None, name: str, logs: Path) -> Runner:
    extra = None
    if agent is not None:
        # Chunks fetched from a peer answer PENDING first: wait for them.
        extra = {"kvnode.runtime_dir": str(agent.runtime_dir), "kvnode.prefetch_deadline_ms": 5000}
    return Runner(model, extra, logs / f"{name}.log")


def test_served_from_a_peer_then_peer_killed_mid_transfer(
    two_agents: tuple[Any, Any], tiny_model: str, tmp_path: Path
) -> None:
    one, two = two_agents
    ref = _runner(tiny_model, None, "reference", tmp_path)
    want = dict(zip(PROMPTS, ref.generate(list(PROMPTS.values()), MAX_TOKENS), strict=True))
    ref.close()

    writer = _runner(tiny_model, one, "writer-on-one", tmp_path)
    [w] = writer.generate([P], MAX_TOKENS)
    writer.close()
    assert w["tokens"] == want["P"]["tokens"] and w["cached"] == 0
    assert _entries(one) == 4

    # 1. agent 2 has nothing; it fetches P's chunks from agent 1 for its vLLM process.
    assert _entries(two) == 0
    reader = _runner(tiny_model, two, "reader-on-two", tmp_path)
    try:
        [r] = reader.generate([P], MAX_TOKENS)
        assert r["cached"] == 4 * C
        assert r["tokens"] == want["P"]["tokens"]
        peer = _peer_stats(two)
        assert peer["fetched_keys"] >= 4 and peer["corrupt"] == 0, peer

        # 2. agent 1 dies while agent 2 fetches from it.
        _kill_mid_transfer(one, two)
        [q] = reader.generate([Q], MAX_TOKENS)
        assert q["tokens"] == want["Q"]["tokens"] and q["cached"] == 0
        [r2] = reader.generate([P], MAX_TOKENS)  # still served (vLLM's cache or agent 2)
        assert r2["tokens"] == want["P"]["tokens"] and r2["cached"] == 4 * C
    finally:
        reader.close()


def _entries(agent: Any) -> int:
    c = AgentClient(agent.runtime_dir, name="count", timeout_s=2.0)
    try:
        return int(c.stats()["arena"]["entries"])
    finally:
        c.close()


def _peer_stats(agent: Any) -> dict[str, Any]:
    c = AgentClient(agent.runtime_dir, name="peer-stats", timeout_s=2.0)
    try:
        links = c.stats()["peers"]["peers"]
    finally:
        c.close()
    [peer] = links.values()
    return dict(peer)


def _kill_mid_transfer(one: Any, two: Any) -> None:
    """Agent 1 holds big chunks; agent 2 is asked for them and starts fetching; agent 1
    is killed while the fetch is in flight. Every chunk is then a miss on agent 2, or a
    hit with exactly agent 1's bytes; no reservation is left."""
    ca = AgentClient(one.runtime_dir, name="big-writer", timeout_s=5.0)
    keys = [os.urandom(16) for _ in range(BIG_CHUNKS)]
    datas = [os.urandom(1 << 16) * (BIG_BYTES >> 16) for _ in range(BIG_CHUNKS)]
    try:
        for k, d in zip(keys, datas, strict=True):
            ((st, slot),) = ca.reserve([k], [len(d)])
            assert st == Status.OK and slot is not None
            ca.write(slot, d)
            assert ca.commit([k], [checksum(d)]) == [Status.OK]
    finally:
        ca.close()
    cb = AgentClient(two.runtime_dir, name="big-reader", timeout_s=5.0)
    try:
        assert Lookup.PENDING in cb.lookup(keys)
        deadline = time.monotonic() + 10
        while cb.stats()["peers"]["bytes_inflight"] == 0:  # the fetch's pages are reserved
            assert time.monotonic() < deadline, cb.stats()["peers"]
        assert one.proc is not None
        one.proc.send_signal(signal.SIGKILL)
        one.stop()
        # The fetch times out (peers.fetch_timeout_ms): its reservations are aborted.
        deadline = time.monotonic() + 15
        while (stats := cb.stats())["arena"]["reserved"] or stats["peers"]["bytes_inflight"]:
            assert time.monotonic() < deadline, stats["peers"]
            time.sleep(0.05)
        states = cb.lookup(keys, promote=False)
        for k, d, s in zip(keys, datas, states, strict=True):
            assert s in (Lookup.HIT, Lookup.MISS)
            if s == Lookup.HIT:
                assert cb.get(k) == d
        assert states.count(Lookup.MISS) > 0, "the fetch finished before the kill"
        assert _peer_stats(two)["corrupt"] == 0
    finally:
        cb.close()
