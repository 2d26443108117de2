"""What one client may hold, with a real agent: pins and reservations are bounded per
client and pins in time (counted refusals and expiries), and calls that grant pins or
slots are never sent again into an agent generation the caller did not see."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kvnode.errors import ClientUnknown
from kvnode.ipc.client import AgentClient, Status
from tests.conftest import AgentProcess


def _wait(pred, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.05)


def test_pin_and_reserve_are_not_resent_into_a_new_generation(runtime_dir: Path) -> None:
    a = AgentProcess(runtime_dir).start()
    pinner = AgentClient(runtime_dir, name="pinner", timeout_s=2.0, retry_interval_s=0.05,
                         heartbeat=False)  # fmt: skip
    reserver = AgentClient(runtime_dir, name="reserver", timeout_s=2.0, retry_interval_s=0.05,
                           heartbeat=False)  # fmt: skip
    fresh = AgentClient(runtime_dir, name="fresh", timeout_s=2.0, retry_interval_s=0.05)
    try:
        pinner.connect()
        reserver.connect()
        a.stop()
        a = AgentProcess(runtime_dir).start()
        key, other = os.urandom(16), os.urandom(16)
        assert fresh.put(key, b"x" * 5000) == Status.OK
        with pytest.raises(ClientUnknown):
            pinner.pin([key])  # its caller read the old mapping: no pin in the new one
        with pytest.raises(ClientUnknown):
            reserver.reserve([other], [5000])
        arena = fresh.stats()["arena"]
        assert (arena["pinned"], arena["reserved"]) == (0, 0)
        assert fresh.put(other, b"y" * 5000) == Status.OK  # not held by a stray reservation
        # Registered again by the refusal: the next calls work in the new generation.
        assert pinner.get(key) == b"x" * 5000
        assert fresh.stats()["arena"]["pinned"] == 0
    finally:
        for c in (pinner, reserver, fresh):
            c.close()
        a.stop()


def test_pins_and_reservations_per_client_are_bounded_and_counted(runtime_dir: Path) -> None:
    env = {"KVNODE_AGENT_CLIENT_PINS_MAX": "3", "KVNODE_AGENT_CLIENT_LEASES_MAX": "2"}
    a = AgentProcess(runtime_dir, env=env).start()
    c = AgentClient(runtime_dir, name="greedy", timeout_s=2.0)
    other = AgentClient(runtime_dir, name="other", timeout_s=2.0)
    try:
        keys = [os.urandom(16) for _ in range(5)]
        for k in keys:
            assert other.put(k, b"z" * 1000) == Status.OK
        got = [s for s, _ in c.pin(keys)]
        assert got == [Status.OK] * 3 + [Status.NO_SPACE] * 2
        assert [s for s, _ in c.pin(keys[:1])] == [Status.NO_SPACE]  # a repeat pin counts
        assert [s for s, _ in other.pin(keys)] == [Status.OK] * 3 + [Status.NO_SPACE] * 2
        c.release(keys[:1])
        assert [s for s, _ in c.pin(keys[4:])] == [Status.OK]
        new = [os.urandom(16) for _ in range(3)]
        got = [s for s, _ in c.reserve(new, [1000] * 3)]
        assert got == [Status.OK, Status.OK, Status.NO_SPACE]
        c.abort(new[:1])
        assert [s for s, _ in c.reserve(new[2:], [1000])] == [Status.OK]
        counters = c.stats()["counters"]
        assert counters["refused_pins"] == 1 + 2 + 2 and counters["refused_leases"] == 1
    finally:
        c.close()
        other.close()
        a.stop()


def test_a_pin_held_past_its_ttl_is_released_and_counted(runtime_dir: Path) -> None:
    env = {"KVNODE_AGENT_PIN_TTL_S": "0.5"}
    a = AgentProcess(runtime_dir, env=env).start()
    holder = AgentClient(runtime_dir, name="holder", timeout_s=2.0)
    try:
        key = os.urandom(16)
        assert holder.put(key, b"p" * 4000) == Status.OK
        assert holder.pin([key, key])[0][0] == Status.OK
        _wait(lambda: holder.stats()["arena"]["pinned"] == 0)
        assert holder.stats()["counters"]["expired_pins"] == 2
        holder.release([key])  # late: nothing of it is held any more, nothing happens
        assert holder.stats()["arena"]["pinned"] == 0
    finally:
        holder.close()
        a.stop()
