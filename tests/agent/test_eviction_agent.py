"""Eviction through a real agent process: orphans leave first and are counted, and the
default policy keeps a hot set through a one-time scan (trace replay as the connector
calls the agent)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from kvnode.ipc.client import AgentClient, Status
from tests.conftest import REPO, AgentProcess

sys.path.insert(0, str(REPO / "benchmarks"))
import trace_bench  # noqa: E402

PAGE = 4096
ARGS = ["--set", f"arena.page_bytes={PAGE}"]


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def _put(c: AgentClient, keys: list[bytes], parents: list[bytes]) -> None:
    res = c.reserve(keys, [PAGE] * len(keys))
    assert all(st == Status.OK for st, _ in res), res
    for _, slot in res:
        assert slot is not None
        c.write(slot, bytes(PAGE))
    assert c.commit(keys, parents=parents) == [Status.OK] * len(keys)


def test_orphans_are_evicted_first_and_counted(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "run", cpu_bytes=str(32 * PAGE), args=ARGS).start()
    try:
        c = AgentClient(agent.runtime_dir, name="orphans", timeout_s=5.0)
        old = [_key(100 + i) for i in range(8)]
        _put(c, old, [b""] * 8)
        chain = [_key(i) for i in range(1, 9)]
        _put(c, chain, [b"", *chain[:-1]])
        c.pin(chain[:1])  # the chain's head was read: it is the hot part
        c.release(chain[:1])
        c.drop(chain[:1])  # ... and then failed a checksum: the rest is unreachable
        filler = [_key(1000 + i) for i in range(17 + 7)]
        for k in filler:  # 17 free pages, then each new entry evicts one
            _put(c, [k], [b""])
        st = c.stats()["counters"]
        assert st["orphan_evictions"] == 7 and st["orphan_bytes"] == 7 * PAGE, st
        assert c.lookup(old) == [1] * 8  # older, but still reachable: kept
        c.close()
    finally:
        agent.stop()


def _scan_hot(policy: str, tmp_path: Path, trace: list[list[int]], hot: set[int]) -> float:
    agent = AgentProcess(
        tmp_path / policy,
        cpu_bytes=str(300 * PAGE),
        args=[*ARGS, "--set", f"arena.policy={policy}"],
    ).start()
    try:
        c = AgentClient(agent.runtime_dir, name="scan", timeout_s=10.0)
        out = trace_bench.replay(c, trace, PAGE, hot)
        c.close()
    finally:
        agent.stop()
    return out["hot_hit_ratio"]


@pytest.mark.parametrize("seed", [1])
def test_default_keeps_the_hot_set_through_a_scan(tmp_path: Path, seed: int) -> None:
    """50 hot prompts of 8 blocks (400 blocks) in a 300-entry arena under a scan of
    long unique prompts: LRU keeps losing them; S3-FIFO and the default keep most."""
    trace, hot = trace_bench.gen_scan_hot(random.Random(seed), 1500)
    ratios = {p: _scan_hot(p, tmp_path, trace, hot) for p in ("prefix", "s3fifo", "lru")}
    assert ratios["prefix"] >= 0.95 * ratios["s3fifo"], ratios
    assert ratios["prefix"] > 1.5 * ratios["lru"], ratios


NS_A, NS_B = b"\xaa" * 16, b"\xbb" * 16


def _put_ns(c: AgentClient, key: bytes, ns: bytes) -> Status:
    [(st, slot)] = c.reserve([key], [PAGE], namespace=ns)
    if st == Status.OK:
        assert slot is not None
        c.write(slot, bytes(PAGE))
        assert c.commit([key]) == [Status.OK]
    return st


@pytest.mark.parametrize("share", [0.25, None])
def test_a_tenants_scan_cannot_evict_anothers_hot_prefixes(tmp_path: Path, share: float) -> None:
    args = list(ARGS)
    if share is not None:
        args += ["--set", f"arena.namespace_shares={NS_A.hex()}={share}"]
    agent = AgentProcess(tmp_path / "run", cpu_bytes=str(64 * PAGE), args=args).start()
    try:
        c = AgentClient(agent.runtime_dir, name="tenants", timeout_s=5.0)
        hot = [_key(i) for i in range(24)]
        for k in hot:
            assert _put_ns(c, k, NS_B) == Status.OK
        c.pin(hot)
        c.release(hot)
        for i in range(400):  # tenant A floods: each chunk is stored and read once
            k = _key(10_000 + i)
            assert _put_ns(c, k, NS_A) == Status.OK
            c.pin([k])
            c.release([k])
        kept = sum(c.lookup(hot))
        ns = c.stats()["namespaces"]
        if share is None:  # the control: without a share the scan takes B's chunks
            assert kept < len(hot), ns
            return
        assert kept == len(hot), ns
        a = ns[NS_A.hex()]
        assert a["bytes"] <= 16 * PAGE and a["bytes_max"] == 16 * PAGE, a
        assert a["quota_evictions"] >= 400 - 16 and ns[NS_B.hex()]["hits"] == len(hot), ns
        assert a["hits"] == 400, a
        # A's own chunks all pinned: its next reserve is refused and counted, B's is not
        mine = [_key(10_000 + i) for i in range(400 - 16, 400)]
        assert [st for st, _ in c.pin(mine)] == [Status.OK] * 16
        assert _put_ns(c, _key(99_999), NS_A) == Status.NO_SPACE
        assert c.stats()["namespaces"][NS_A.hex()]["quota_refused"] == 1
        assert _put_ns(c, _key(99_998), NS_B) == Status.OK
        c.close()
    finally:
        agent.stop()


def test_a_namespace_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    from kvnode.errors import KVNodeError

    agent = AgentProcess(tmp_path / "run", cpu_bytes=str(32 * PAGE), args=ARGS).start()
    try:
        c = AgentClient(agent.runtime_dir, name="ns", timeout_s=5.0)
        with pytest.raises(KVNodeError, match="namespace"):
            c.reserve([_key(1)], [PAGE], namespace=b"short")
        assert _put_ns(c, _key(2), NS_A) == Status.OK  # the agent and the client go on
        assert c.stats()["namespaces"][NS_A.hex()]["entries"] == 1
        c.close()
    finally:
        agent.stop()
