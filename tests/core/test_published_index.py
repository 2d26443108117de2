"""The agent publishes the arena's keys for lookups without a round trip: a real agent
process, a real reader in this process."""

from __future__ import annotations

import os
import time

from kvnode.ipc.client import AgentClient, Status
from kvnode.ipc.shmindex import ShmIndexReader
from tests.conftest import AgentProcess


def _until(pred, timeout_s: float = 2.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_commits_and_drops_reach_the_shared_index(client: AgentClient) -> None:
    name = client.index_segment
    assert name, "the agent publishes its index by default"
    reader = ShmIndexReader(name)
    try:
        assert not reader.lower_tiers  # arena only: a miss is definitive
        keys = [os.urandom(16) for _ in range(64)]
        for k in keys[:32]:
            assert client.put(k, b"x" * 5000) == Status.OK
        assert _until(lambda: bool(reader.contains_many(keys)[:32].all()))
        assert not reader.contains_many(keys)[32:].any()
        client.drop(keys[:8])
        assert _until(lambda: not reader.contains_many(keys)[:8].any())
        assert reader.contains_many(keys)[8:32].all()
    finally:
        reader.close()


def test_index_follows_an_agent_restart(agent: AgentProcess) -> None:
    c = AgentClient(agent.runtime_dir, name="t", timeout_s=2.0, retry_interval_s=0.05)
    try:
        c.connect()
        first = c.index_segment
        ka, kb = os.urandom(16), os.urandom(16)
        assert c.put(ka, b"1" * 100) == Status.OK
        agent.stop()
        agent.start()
        assert c.put(kb, b"2" * 100) == Status.OK  # re-registers, remaps
        reader = ShmIndexReader(c.index_segment)
        try:
            assert c.index_segment == first  # same name, new segment and generation
            assert _until(lambda: bool(reader.contains_many([kb])[0]))
            assert not reader.contains_many([ka])[0]  # the old arena is gone
        finally:
            reader.close()
    finally:
        c.close()
