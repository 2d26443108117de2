"""The connector in real vLLM processes on the CPU, sharing one real agent.

Processes are few and each runs several checks: vLLM start-up dominates the time.
Every output is compared with a run without any connector (greedy decoding).
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from kvnode.connector.keys import Namespace, chunk_keys
from kvnode.connector.namespace import model_identity
from kvnode.ipc.protocol import Lookup, Status

pytestmark = pytest.mark.vllm

C = 256  # chunk tokens (the connector's default)
MAX_TOKENS = 8


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 1000) for _ in range(n)]


A = _tokens(1100, 1)  # 4 usable chunks
B = A[: 2 * C] + _tokens(500, 2)  # shares exactly A's first 2 chunks
E = _tokens(700, 3)  # 2 chunks; one gets corrupted in the arena
F = _tokens(900, 4)  # only ever asked after the agent is gone
F2 = _tokens(900, 5)
PROMPTS = {"A": A, "B": B, "E": E, "F": F, "F2": F2}


def _stall_bound(ref: dict[str, Any]) -> float:
    # A stall would be the worker's I/O timeout (1 s) or more per request; the slack
    # covers a shared 2-core machine's noise.
    return 2.0 * ref["elapsed_s"] + 1.0


def _namespace(model: str) -> Namespace:
    # What the connector derives for the tiny model (2 layers, 2 KV heads, head 64
    # bytes-wide pairs: the CPU slab [heads, block_size, 2*head_size]).
    return Namespace(
        model=model_identity(model),
        dtype="float32/float32",
        kv_layout="cpu",
        block_shape=(2, 2, 128, 64),
        block_size=128,
        chunk_tokens=C,
        tp_size=1,
        tp_rank=0,
        pp_rank=0,
    )


@pytest.fixture(scope="module")
def reference(spawn_runner: Any) -> dict[str, Any]:
    r = spawn_runner(None, "reference")
    outs = r.generate(list(PROMPTS.values()), MAX_TOKENS)
    r.close()
    return dict(zip(PROMPTS, outs, strict=True))


def _corrupt(agent: Any, key: bytes) -> None:
    c = agent.client()
    try:
        [(status, slot)] = c.pin([key])
        assert status == Status.OK, "the chunk to corrupt is not in the arena"
        view = c.views(slot)[0]
        view[1000:1064] = bytes((b ^ 0xFF) for b in view[1000:1064])
        c.release([key])
    finally:
        c.close()


def test_processes_share_the_agent_cache(
    reference: dict[str, Any], make_agent: Any, spawn_runner: Any, tiny_model: str
) -> None:
    agent = make_agent()
    # Worker mode end to end (the workers copy; agent mode: test_vllm_agent_mode.py).
    extra = {"kvnode.runtime_dir": str(agent.runtime_dir), "kvnode.transfer": "worker"}

    first = spawn_runner(extra, "first")
    outs = first.generate([A, E], MAX_TOKENS)
    assert [o["tokens"] for o in outs] == [reference["A"]["tokens"], reference["E"]["tokens"]]
    assert all(o["cached"] == 0 for o in outs)
    first.close()

    keys_e = chunk_keys(_namespace(tiny_model), E, C)
    _corrupt(agent, keys_e[1])
    drops_before = agent.stats()["counters"]["drops"]

    second = spawn_runner(extra, "second")
    # 2. partial prefix: B shares A's first two chunks only.
    [b] = second.generate([B], MAX_TOKENS)
    assert b["cached"] == 2 * C
    assert b["tokens"] == reference["B"]["tokens"]
    # 1. a separate process is served A; the first 2 chunks are now in vLLM's own
    # prefix cache (from B), kvnode serves the next 2.
    [a] = second.generate([A], MAX_TOKENS)
    assert a["cached"] == 4 * C
    assert a["tokens"] == reference["A"]["tokens"]
    # 4. a corrupted chunk is detected, dropped at the agent, and recomputed.
    [e] = second.generate([E], MAX_TOKENS)
    assert e["tokens"] == reference["E"]["tokens"]
    assert agent.stats()["counters"]["drops"] > drops_before
    c = agent.client()
    try:
        assert c.lookup(keys_e, promote=False) == [Lookup.HIT, Lookup.MISS]
    finally:
        c.close()

    # 3b. the agent dies between two requests: same tokens, nothing cached, no stall.
    agent.kill()
    [f] = second.generate([F], MAX_TOKENS)
    assert f["tokens"] == reference["F"]["tokens"]
    assert f["cached"] == 0
    # The first request after the loss pays at most the lookup timeout: compare it
    # with a request of the same length just after it (same machine load).
    [f2] = second.generate([F2], MAX_TOKENS)
    assert f2["tokens"] == reference["F2"]["tokens"]
    assert f["elapsed_s"] < f2["elapsed_s"] + 0.5, (f, f2)
    [a2] = second.generate([A[:-1] + [7]], MAX_TOKENS)  # vLLM's own cache still works
    assert a2["cached"] >= 4 * C - 128


def test_no_agent_running(
    reference: dict[str, Any], spawn_runner: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    empty = tmp_path_factory.mktemp("nobody-home")
    lone = spawn_runner({"kvnode.runtime_dir": str(empty)}, "lone")
    outs = lone.generate([A, E], MAX_TOKENS)
    for name, o in zip("AE", outs, strict=True):
        assert o["tokens"] == reference[name]["tokens"]
        assert o["cached"] == 0
        assert o["elapsed_s"] < _stall_bound(reference[name]), (o, reference[name])


def test_served_from_disk_after_agent_restart(
    reference: dict[str, Any],
    make_agent: Any,
    spawn_runner: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    disk = tmp_path_factory.mktemp("kvnode-disk")
    env = {
        "KVNODE_DISK_PATH": str(disk),
        "KVNODE_DISK_BYTES": "256MiB",
        "KVNODE_DISK_WRITE_POLICY": "write_through",
    }
    agent = make_agent(env=env)
    assert "disk" in agent.stats()["tiers"], "the agent did not start its disk tier"
    extra = {"kvnode.runtime_dir": str(agent.runtime_dir), "kvnode.prefetch_deadline_ms": 5000}

    writer = spawn_runner(extra, "disk-writer")
    [a] = writer.generate([A], MAX_TOKENS)
    assert a["tokens"] == reference["A"]["tokens"]
    writer.close()
    deadline = time.monotonic() + 30
    while agent.stats()["tiers"]["disk"]["entries"] < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    agent.stop()

    # A new agent: an empty arena, the same disk.
    again = make_agent(runtime_dir=agent.runtime_dir, env=env)
    assert again.stats()["arena"]["entries"] == 0
    reader = spawn_runner(extra, "disk-reader")
    [a] = reader.generate([A], MAX_TOKENS)
    assert a["tokens"] == reference["A"]["tokens"]
    assert a["cached"] == 4 * C
    assert again.stats()["tiers"]["disk"]["hits"] >= 1


def test_fresh_node_served_from_s3(
    reference: dict[str, Any], make_agent: Any, spawn_runner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node 1 writes through to S3 (moto on loopback); node 2, a new agent with an empty
    arena and no disk, serves a fresh vLLM process from the same bucket."""
    from tests.tiers.conftest import S3Endpoint

    # moto takes any credentials; the standard chain finds these in the environment.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")

    endpoint = S3Endpoint()
    endpoint.start()
    try:
        env = {
            "KVNODE_S3_BUCKET": endpoint.new_bucket(),
            "KVNODE_S3_ENDPOINT_URL": endpoint.url,
            "KVNODE_S3_REGION": "us-east-1",
            "KVNODE_S3_WRITE_POLICY": "write_through",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }
        node1 = make_agent(env=env)
        assert "s3" in node1.stats()["tiers"], "the agent did not start its S3 tier"
        writer = spawn_runner({"kvnode.runtime_dir": str(node1.runtime_dir)}, "s3-writer")
        [a] = writer.generate([A], MAX_TOKENS)
        assert a["tokens"] == reference["A"]["tokens"]
        writer.close()
        deadline = time.monotonic() + 30
        while node1.stats()["tiers"]["s3"]["writes"] < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert node1.stats()["tiers"]["s3"]["writes"] >= 4

        node2 = make_agent(env=env)  # another node: its own runtime dir, empty arena
        assert node2.stats()["arena"]["entries"] == 0
        extra = {"kvnode.runtime_dir": str(node2.runtime_dir), "kvnode.prefetch_deadline_ms": 5000}
        reader = spawn_runner(extra, "s3-reader")
        [a] = reader.generate([A], MAX_TOKENS)
        reader.close()
        assert a["tokens"] == reference["A"]["tokens"]
        assert a["cached"] == 4 * C
        assert node2.stats()["tiers"]["s3"]["hits"] >= 1
    finally:
        endpoint.stop()
