"""The agent link: no waiting while down, rate-limited reconnects."""

from __future__ import annotations

from typing import Any

import pytest

from kvnode.connector.link import AgentLink
from kvnode.errors import AgentUnavailable


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeClient:
    def __init__(self, agent: dict[str, Any]) -> None:
        self.agent = agent

    def connect(self) -> None:
        self.agent["connects"] += 1
        if not self.agent["up"]:
            raise AgentUnavailable("no agent")

    def ping(self) -> str:
        if not self.agent["up"]:
            raise AgentUnavailable("gone")
        return "pong"

    def close(self) -> None:
        self.agent["closed"] += 1


def test_down_link_fails_fast_and_retries_with_backoff() -> None:
    agent = {"up": False, "connects": 0, "closed": 0}
    clock = Clock()
    link = AgentLink(lambda: FakeClient(agent), 1.0, 4.0, clock=clock, background=False)
    assert not link.try_connect()
    with pytest.raises(AgentUnavailable):
        link.call(lambda c: c.ping())
    # Not due yet: no connection attempt, however many calls are made.
    for _ in range(100):
        assert not link.try_connect()
    assert agent["connects"] == 1
    clock.t = 1.0
    assert not link.try_connect()  # second failure: backoff doubles to 2 s
    clock.t = 2.5
    assert not link.try_connect()
    assert agent["connects"] == 2
    agent["up"] = True
    clock.t = 3.0
    assert link.try_connect() and link.up
    assert link.call(lambda c: c.ping()) == "pong"
    # The agent dies: the failing call takes the link down, later calls fail at once.
    agent["up"] = False
    with pytest.raises(AgentUnavailable):
        link.call(lambda c: c.ping())
    assert not link.up and agent["closed"] == 1
    with pytest.raises(AgentUnavailable):
        link.call(lambda c: c.ping())
    link.close()


def test_connection_attempts_never_overlap_nor_outlive_close() -> None:
    """Two threads try at once while the agent is slow to answer: one connection is
    made, the other thread does not make a second one (it would leak a registered
    client at the agent). A link closed while an attempt is under way closes what
    that attempt connected instead of keeping it."""
    import threading

    agent = {"up": True, "connects": 0, "closed": 0}
    entered, release = threading.Semaphore(0), threading.Event()

    class SlowClient(FakeClient):
        def connect(self) -> None:
            entered.release()
            release.wait(10)
            super().connect()

    link = AgentLink(lambda: SlowClient(agent), 0.0, 0.0, background=False)
    results: list[bool] = []
    first = threading.Thread(target=lambda: results.append(link.try_connect()))
    first.start()
    assert entered.acquire(timeout=5)
    assert not link.try_connect()  # another attempt is under way: no second client
    release.set()
    first.join(5)
    assert results == [True] and link.up and agent["connects"] == 1 and agent["closed"] == 0

    release.clear()
    late = AgentLink(lambda: SlowClient(agent), 0.0, 0.0, background=False)
    t = threading.Thread(target=lambda: results.append(late.try_connect()))
    t.start()
    assert entered.acquire(timeout=5)
    late.close()  # the process shuts the connector down meanwhile
    release.set()
    t.join(5)
    assert results[-1] is False and not late.up
    assert agent["closed"] == 1  # what the attempt connected was closed, not kept
    link.close()
