"""Log lines any local client can cause at will are bounded: thousands of its
reservations expiring, refused operators' requests in a loop, drops of intact entries
that make the agent checksum them. The counters count every one; the log says it a few
times; the loop's checksum time for other clients' drops has a budget."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from kvnode.ipc import protocol as P
from kvnode.ipc.client import AgentClient
from tests.conftest import AgentProcess
from tests.ops.test_cache_admin import as_nobody, needs_root, shared_dir  # noqa: F401

NOBODY = 65534


def _lines(agent: AgentProcess, text: str) -> int:
    return sum(text in line for line in agent.log().splitlines())


def _wait(cond: Any, timeout_s: float = 15.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.05)


def test_a_thousand_expired_reservations_of_one_client_are_one_line(runtime_dir: Path) -> None:
    agent = AgentProcess(runtime_dir, args=["--set", "arena.reserve_ttl_s=0.5"]).start()
    c = AgentClient(runtime_dir, name="forgetful", timeout_s=5.0)  # alive: heartbeats
    try:
        keys = [os.urandom(16) for _ in range(1000)]
        for at in range(0, len(keys), 250):
            c.reserve(keys[at : at + 250], [4096] * 250)
        _wait(lambda: c.stats()["counters"]["expired_leases"] == 1000)
        time.sleep(0.3)  # the log is written
        # One line per housekeeping pass that found some (the four batches expire
        # within milliseconds of each other), naming the client and how many more.
        lines = _lines(agent, "WARNING kvnode.agent: reservation of")
        assert 1 <= lines <= 4, agent.log()[-2000:]
        assert _lines(agent, "more by client") == lines
    finally:
        c.close()
        agent.stop()


@needs_root
def test_refusals_and_drop_checks_of_an_ordinary_client_are_bounded(shared_dir: Path) -> None:  # noqa: F811
    """As another uid: 60 operators' requests refused, one log line about them (at most
    one more per 10 s); 40 drops naming 16 intact 1 MiB entries each (640 MiB to
    checksum) checksum at most the agent's budget, the rest counted unchecked."""
    run = shared_dir / "run"
    agent = AgentProcess(run, cpu_bytes="128MiB", args=["--set", f"agent.group={NOBODY}"]).start()
    admin = AgentClient(run, name="operator", timeout_s=5.0)
    try:
        keys = [bytes([i]) * 16 for i in range(1, 17)]
        for k in keys:
            assert admin.put(k, os.urandom(1 << 20)) == P.Status.OK

        def flood() -> dict[str, Any]:
            c = AgentClient(run, name="vllm-like", timeout_s=5.0, heartbeat=False)
            codes: dict[str, int] = {}
            t0 = time.monotonic()
            try:
                for i in range(100):
                    try:
                        if i < 60:
                            c.admin(int(P.AdminOp.LIST), limit=5)
                        else:
                            c.drop(keys)
                    except Exception as exc:
                        name = str(getattr(exc, "code", type(exc).__name__))
                        codes[name] = codes.get(name, 0) + 1
            finally:
                c.close()
            return {"codes": codes, "elapsed": time.monotonic() - t0}

        got = as_nobody(flood)
        assert got["codes"] == {str(int(P.ErrCode.NOT_PERMITTED)): 100}, got
        counters = admin.stats()["counters"]
        assert counters["refused_admin"] == 100
        assert _lines(agent, "refused an operator's request") <= 1 + got["elapsed"] / 10
        from kvnode.agent.handlers import CORRUPT_CHECK_BYTES_PER_S

        budget = CORRUPT_CHECK_BYTES_PER_S * (1 + got["elapsed"]) + (1 << 20)
        assert 0 < counters["corrupt_check_bytes"] <= budget, (counters, got)
        assert counters["corrupt_checks_skipped"] > 0
        assert counters["corrupt_dropped"] == 0
        assert admin.lookup(keys, promote=False) == [P.Lookup.HIT] * 16  # nothing dropped
    finally:
        admin.close()
        agent.stop()


def test_throttled_lines_say_how_many_were_held_back() -> None:
    from kvnode.agent.logs import Throttled

    now = [100.0]
    t = Throttled(10.0, clock=lambda: now[0])
    assert t.due() == 0  # the first goes out
    assert [t.due() for _ in range(5)] == [None] * 5
    now[0] += 9.9
    assert t.due() is None
    now[0] += 0.2
    assert t.due() == 6 and Throttled.note(6) == " (6 more since the last such line)"
    now[0] += 10.0
    assert t.due() == 0 and Throttled.note(0) == ""


def test_a_request_that_hits_a_bug_logs_its_traceback_once_per_interval(
    tmp_path: Path, caplog: Any
) -> None:
    """A client that found a bug (a handler raising) and sends the request in a loop
    gets an INTERNAL error each time, counted; the traceback is logged once, not once
    a request."""
    import logging

    from kvnode.agent.config import load_config
    from kvnode.agent.server import Agent

    agent = Agent(load_config(env={}, overrides={"agent.runtime_dir": str(tmp_path / "run")}))

    class Registry:
        def authenticate(self, *args: Any) -> Any:
            return object()

    def broken(c: Any, m: Any) -> Any:
        raise RuntimeError("a bug")

    agent.registry = Registry()  # type: ignore[assignment]
    handlers = type("H", (), {"table": {P.LookupReq: broken}})()
    agent.parts = type("Parts", (), {"handlers": handlers})()  # type: ignore[assignment]
    msg = P.LookupReq(1, 1, 1, [b"k" * 16])
    with caplog.at_level(logging.ERROR, logger="kvnode.agent"):
        replies = [agent._dispatch(b"id", msg) for _ in range(50)]
    assert all(r.code == P.ErrCode.INTERNAL for r in replies)
    assert agent.stats.counters["errors"] == 50
    assert sum("handling LookupReq failed" in r.getMessage() for r in caplog.records) == 1
