"""Where the agent's CPU copy threads run (agent/movers/placement.py): off the cores
vLLM's bound compute threads run on. Real threads and real affinity; then a real
agent moving a real worker's chunks, the worker bound to one core as vLLM binds."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kvnode.agent.config import load_config
from kvnode.agent.movers.placement import CorePlacement
from kvnode.cores import bound_cores, format_cpu_list, name_thread, node_cpus, node_threads
from kvnode.errors import ConfigError
from tests.agent.test_movers import big_agent_stats
from tests.conftest import AgentProcess

NODE = frozenset(node_cpus())
FREE_ON_NODE = len(NODE) >= 2 and len(os.sched_getaffinity(0)) >= len(NODE)
needs_cores = pytest.mark.skipif(
    not FREE_ON_NODE, reason="needs a process free on 2 or more cores of the node"
)


def _on_thread(fn: Any) -> Any:
    """``fn()`` on a fresh thread (a copy thread, as far as affinity goes)."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(10)
    return out[0]


def test_placement_by_what_the_scan_finds() -> None:
    """``auto``: the cores no bound thread runs on, and a job uses no more threads
    than those; nothing bound, or every core bound: no placement, every thread."""
    found: list[set[int]] = [{0, 1}]
    p = CorePlacement(
        "auto",
        node=lambda: frozenset(range(8)),
        scan=lambda node: found[0],
        rescan_s=3600,
        allowed=frozenset(range(1, 8)),  # the agent's own affinity leaves out core 0
    )
    try:
        p.refresh()
        assert p.cores == frozenset(range(2, 8))
        assert p.team(2) == 2 and p.team(16) == 6 and p.team(1) == 1
        assert p.stats() == {"copy_cores_mode": "auto", "copy_cores": "2-7"}
        # One thread a core: a job's threads never share one while another is free.
        assert [p.target(k) for k in (0, 1, 5, 6)] == [{2}, {3}, {7}, {2}]
        found[0] = set()  # vLLM's threads may run anywhere
        assert p.refresh() == frozenset() and p.team(2) == 2
        found[0] = set(range(8))  # it binds every core
        assert p.refresh() == frozenset() and p.team(3) == 3
        # No core free: the agent's own cores, still one thread a core.
        assert p.stats() == {"copy_cores_mode": "auto", "copy_cores": "1-7"}
        assert [p.target(k) for k in (0, 1, 7)] == [{1}, {2}, {1}]
    finally:
        p.close()


def test_placement_by_setting() -> None:
    p = CorePlacement("all")
    assert p.cores == frozenset() and p.team(2) == 2 and p._thread is None
    assert p.stats()["copy_cores"] == "any"  # left to the kernel
    assert p.target(0) == p.target(1) == p.allowed
    mine = min(os.sched_getaffinity(0))
    q = CorePlacement(str(mine))
    assert q.cores == {mine} and q.team(2) == 1 and q._thread is None
    assert q.stats()["copy_cores"] == str(mine)
    assert q.target(0) == q.target(1) == {mine}
    for bad in ("", "some", "0-", "2-1"):
        with pytest.raises(ValueError, match="core list"):
            CorePlacement(bad)


@needs_cores
def test_a_copy_thread_moves_to_its_cores_and_back_when_they_go() -> None:
    """Real threads: ``apply`` moves the calling thread to its core once the cores
    change, and to one of the agent's own cores when no placement is left."""
    first = min(NODE)
    bound = [{first}]
    p = CorePlacement("auto", node=lambda: NODE, scan=lambda node: set(bound[0]))
    try:
        p.refresh()
        want = sorted(NODE - {first})
        p.apply(0)  # this thread too, as the copy thread is
        assert os.sched_getaffinity(0) == {want[0]}
        second = _on_thread(lambda: (p.apply(1), os.sched_getaffinity(0))[1])
        assert second == {want[1 % len(want)]}
        bound[0] = set()
        p.refresh()
        p.apply(0)
        assert os.sched_getaffinity(0) == {min(p.allowed)}
        assert _on_thread(lambda: (p.apply(1), os.sched_getaffinity(0))[1]) == {
            sorted(p.allowed)[1]
        }
    finally:
        os.sched_setaffinity(0, p.allowed)
        p.close()


def test_the_copy_cores_setting_is_checked_at_start(tmp_path: Path) -> None:
    cfg = load_config(str(_empty(tmp_path)), env={"KVNODE_AGENT_CPU_COPY_CORES": "2-3,6"})
    assert cfg.agent.cpu_copy_cores == "2-3,6"
    assert load_config(str(_empty(tmp_path)), env={}).agent.cpu_copy_cores == "auto"
    with pytest.raises(ConfigError, match="cpu_copy_cores"):
        load_config(str(_empty(tmp_path)), env={"KVNODE_AGENT_CPU_COPY_CORES": "half"})


def _empty(tmp_path: Path) -> Path:
    f = tmp_path / "agent.toml"
    f.write_text("")
    return f


# ---------------------------------------------------------------- a real agent
def _bound_worker(rd: str, core: int, free: list[int], q: Any, go: Any) -> None:
    """A worker bound to ``core`` as vLLM binds its compute thread, with a background
    thread of its own (named as kvnode names its huge-page collapse) placed on the
    ``free`` cores, as the collapse places itself. It saves chunks through the agent
    and loads them back, again on each ``go``."""
    os.sched_setaffinity(0, {core})
    import torch

    torch.set_num_threads(1)
    from tests.agent.test_movers import _cache, _load, _ops, _path, _save

    stop = threading.Event()

    def collapse_like() -> None:
        name_thread("kvnode-collapse")
        os.sched_setaffinity(0, set(free))
        stop.wait(120)

    side = threading.Thread(target=collapse_like, daemon=True)
    side.start()
    kv = _cache(5)
    _, path = _path(rd, kv)
    _save(path, _ops(4, 0))
    while go.get() == "load":
        q.put(sorted(_load(path, _ops(4, 0))))
    stop.set()


def _stop(go: Any, worker: Any, agent: AgentProcess) -> None:
    """Tell the worker to stop, then end it and the agent."""
    go.put("stop")
    worker.join(30)
    if worker.is_alive():
        worker.kill()
    agent.stop()


def _copy_threads(pid: int) -> dict[int, frozenset[int]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            if name.startswith("kvnode-copy"):
                out[int(tid)] = frozenset(os.sched_getaffinity(int(tid)))
        except OSError:
            continue
    return out


@needs_cores
def test_the_agents_copy_threads_keep_off_a_bound_workers_core(tmp_path: Path) -> None:
    """A worker bound to one core moves its chunks through a real agent: the agent's
    copy threads run on the node's other cores, and every load is whole. The worker's
    own background thread bound to those other cores is kvnode's, not a compute
    thread: counted as one, no core would be left and the copies would run anywhere
    (found in review: the collapse and the copy threads left each other none)."""
    core = min(NODE)
    agent = AgentProcess(tmp_path / "run", cpu_bytes="256MiB").start()
    ctx = mp.get_context("spawn")
    q, go = ctx.Queue(), ctx.Queue()
    free = sorted(NODE - {core})
    worker = ctx.Process(target=_bound_worker, args=(str(agent.runtime_dir), core, free, q, go))
    worker.start()
    try:
        # Bound threads of other processes on this node (none on a quiet machine).
        others = bound_cores(NODE, node_threads(skip_pids=(agent.proc.pid, worker.pid)))
        others |= {core}  # the worker's, once it has bound
        want = NODE - others
        if not want:
            pytest.skip(
                f"other processes are bound to every other core ({format_cpu_list(others)})"
            )
        deadline = time.monotonic() + 30
        seen: Any = None
        while time.monotonic() < deadline:
            go.put("load")
            assert q.get(timeout=30) == []  # every chunk loaded
            cpu = big_agent_stats(agent)["transfers"]["agent"]["devices"].get("cpu", {})
            seen = (cpu.get("copy_cores"), _copy_threads(agent.proc.pid))
            if seen[0] == format_cpu_list(want) and seen[1]:
                break
            time.sleep(0.1)
        assert seen[0] == format_cpu_list(want), seen
        assert seen[1] and all(len(m) == 1 and m <= want for m in seen[1].values()), seen
    finally:
        _stop(go, worker, agent)


def _free_worker(rd: str, q: Any, go: Any) -> None:
    """A worker on every core (nothing bound): saves chunks through the agent, then
    loads them back on each ``go``."""
    import torch

    torch.set_num_threads(1)
    from tests.agent.test_movers import _cache, _load, _ops, _path, _save

    kv = _cache(9)
    _, path = _path(rd, kv)
    _save(path, _ops(8, 0))
    while go.get() == "load":
        q.put(sorted(_load(path, _ops(8, 0))))


@needs_cores
def test_a_jobs_copy_threads_run_on_cores_of_their_own(tmp_path: Path) -> None:
    """Nothing bound on the node: a job's two copy threads each run on a core of
    their own. Left to the kernel, they shared one core while the other was free in
    27 of 48 samples of agent_copy_bench.py (the kernel wakes a helper on the core of
    the thread that woke it); this failed then (both threads on every core)."""
    agent = AgentProcess(tmp_path / "run", cpu_bytes="256MiB").start()
    ctx = mp.get_context("spawn")
    q, go = ctx.Queue(), ctx.Queue()
    worker = ctx.Process(target=_free_worker, args=(str(agent.runtime_dir), q, go))
    worker.start()
    try:
        others = bound_cores(NODE, node_threads(skip_pids=(agent.proc.pid, worker.pid)))
        if others:
            pytest.skip(f"other processes bind threads to cores {format_cpu_list(others)}")
        deadline = time.monotonic() + 30
        masks: dict[int, frozenset[int]] = {}
        while time.monotonic() < deadline:
            go.put("load")
            assert q.get(timeout=30) == []  # every chunk loaded
            masks = _copy_threads(agent.proc.pid)
            if len(masks) >= 2:
                break
        assert len(masks) >= 2, masks  # the copy thread and its helper both ran
        assert all(len(m) == 1 for m in masks.values()), masks
        assert len(set(masks.values())) == len(masks), masks  # no core twice
    finally:
        _stop(go, worker, agent)
