"""Calls sent without waiting for their reply (``wait=False``): release, abort and drop.
The agent still applies them in order; their replies are read by later calls, errors
are counted, and they never confuse the reply of the call that follows."""

from __future__ import annotations

from pathlib import Path

from kvnode.ipc.client import AgentClient, Lookup, Status
from tests.conftest import AgentProcess

KEYS = [bytes([i]) * 16 for i in range(8)]


def _stored(c: AgentClient, keys: list[bytes]) -> None:
    for k in keys:
        assert c.put(k, k * 4) == Status.OK


def test_posted_release_and_drop_take_effect_before_the_next_call(client: AgentClient) -> None:
    _stored(client, KEYS)
    pins = client.pin(KEYS)
    assert all(s == Status.OK for s, _ in pins)
    assert client.stats()["arena"]["pinned"] == len(KEYS)
    client.release(KEYS, wait=False)
    # The same connection is ordered: the next call sees the release done.
    assert client.stats()["arena"]["pinned"] == 0
    client.drop(KEYS[:4], wait=False)
    assert client.lookup(KEYS) == [Lookup.MISS] * 4 + [Lookup.HIT] * 4
    assert client.posted_errors == 0


def test_posted_abort_frees_the_reservation(client: AgentClient) -> None:
    res = client.reserve([KEYS[0]], [4096])
    assert res[0][0] == Status.OK
    client.abort([KEYS[0]], wait=False)
    assert client.stats()["arena"]["reserved"] == 0
    assert client.reserve([KEYS[0]], [4096])[0][0] == Status.OK  # free to take again


def test_refused_posted_calls_are_counted_and_do_not_answer_the_next_call(
    runtime_dir: Path,
) -> None:
    agent = AgentProcess(runtime_dir, args=["--set", "agent.batch_keys_max=4"]).start()
    c = AgentClient(runtime_dir, name="posted", timeout_s=2.0)
    try:
        _stored(c, KEYS[:4])
        for _ in range(3):
            c.release(KEYS, wait=False)  # 8 keys > batch_keys_max: refused
        # Each reply to a posted call is read and set aside, never taken for this one.
        assert c.lookup(KEYS[:4]) == [Lookup.HIT] * 4
        assert c.posted_errors == 3
        assert c.get(KEYS[0]) == KEYS[0] * 4
    finally:
        c.close()
        agent.stop()


def test_a_client_that_only_posts_keeps_its_books_bounded(client: AgentClient) -> None:
    _stored(client, KEYS[:1])
    for _ in range(3000):
        client.pin(KEYS[:1])
        client.release(KEYS[:1], wait=False)
    assert len(client._posted) <= 1024
    assert client.stats()["arena"]["pinned"] == 0
    assert client.posted_errors == 0


def test_posted_call_after_an_agent_restart_reregisters_at_the_next_call(
    runtime_dir: Path,
) -> None:
    agent = AgentProcess(runtime_dir).start()
    c = AgentClient(runtime_dir, name="posted", timeout_s=2.0, retry_interval_s=0.05)
    try:
        _stored(c, KEYS[:2])
        c.pin(KEYS[:2])
        gen = c.generation
        agent.stop()
        agent = AgentProcess(runtime_dir).start()
        c.release(KEYS[:2], wait=False)  # pins of the old generation: answered "stale"
        assert c.lookup(KEYS[:2]) == [Lookup.MISS] * 2  # registered again, fresh arena
        assert c.generation != gen
        assert c.put(KEYS[0], b"after") == Status.OK and c.get(KEYS[0]) == b"after"
    finally:
        c.close()
        agent.stop()


def test_commit_async_answers_through_its_callback(client: AgentClient) -> None:
    answers: list[object] = []
    res = client.reserve(KEYS[:3], [4096] * 3)
    assert all(s == Status.OK for s, _ in res)
    for (_, slot), k in zip(res, KEYS[:3]):
        assert slot is not None
        client.write(slot, k * 256)
    # One of ours, and one nobody reserved: answered per key, not refused whole.
    client.commit_async([KEYS[0], KEYS[1], KEYS[7]], on_done=answers.append)
    assert answers == []  # nothing read yet
    assert client.lookup(KEYS[:2]) == [Lookup.HIT] * 2  # applied before this call
    assert answers == [[Status.OK, Status.OK, Status.NOT_FOUND]]
    client.commit_async([KEYS[2]], on_done=answers.append)
    assert client.flush(2.0) is True
    assert answers[-1] == [Status.OK]


def test_commit_async_without_an_answer_reports_none(runtime_dir: Path) -> None:
    agent = AgentProcess(runtime_dir).start()
    c = AgentClient(runtime_dir, name="posted", timeout_s=1.0, retry_interval_s=0.05)
    answers: list[object] = []
    try:
        [(st, slot)] = c.reserve(KEYS[:1], [4096])
        assert st == Status.OK and slot is not None
        agent.proc.send_signal(19)  # SIGSTOP: the agent takes it but never answers
        c.commit_async(KEYS[:1], on_done=answers.append)
        assert c.flush(0.3) is False and answers == []
        agent.kill()
        agent.stop()
        c.close()  # the connection goes: the answer never will come
        assert answers == [None]
    finally:
        c.close()
        agent.stop()


def test_close_waits_briefly_for_answers_someone_waits_for(client: AgentClient) -> None:
    answers: list[object] = []
    [(st, slot)] = client.reserve(KEYS[:1], [4096])
    assert st == Status.OK and slot is not None
    client.commit_async(KEYS[:1], on_done=answers.append)
    client.close()
    assert answers == [[Status.OK]]
