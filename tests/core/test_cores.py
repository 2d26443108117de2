"""The node's cores (kvnode/cores.py): Linux's core list form and the cgroup's
cpuset, read from a directory tree laid out as /proc and /sys are."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from kvnode.cores import (
    bound_cores,
    check_cores_setting,
    format_cpu_list,
    name_thread,
    node_cpus,
    node_threads,
    parse_cpu_list,
)


def test_core_lists_parse_as_linux_writes_them() -> None:
    assert parse_cpu_list("0-2,5,7-8,12\n") == {0, 1, 2, 5, 7, 8, 12}
    assert parse_cpu_list(" 3 ") == {3}
    for bad in ("", "x", "3-1", "0-3,,4", "-1", "0-99999999", "1-", "0-3|4"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_core_lists_format_back_to_what_they_parse_from() -> None:
    assert format_cpu_list({0, 1, 2, 5, 7, 8, 12}) == "0-2,5,7-8,12"
    assert format_cpu_list([]) == ""
    rng = random.Random(3)
    for _ in range(200):
        cores = {rng.randrange(64) for _ in range(rng.randrange(1, 20))}
        assert parse_cpu_list(format_cpu_list(cores)) == cores


def test_a_cores_setting_is_a_word_or_a_core_list() -> None:
    for good in ("auto", "all", "3", "0-3,8"):
        assert check_cores_setting(good, ("auto", "all")) == ""
    for bad in ("", "any", "0-3;8", "-1"):
        assert "core list" in check_cores_setting(bad, ("auto", "all"))


def test_bound_threads_count_and_kvnodes_own_do_not() -> None:
    """Real threads of this process, bound with real affinity: one as vLLM binds a
    compute thread, one named as kvnode names its background threads. Only the first
    one's core counts; a thread free on every core counts for nothing."""
    node = frozenset(node_cpus())
    if len(node) < 2 or len(os.sched_getaffinity(0)) < len(node):
        pytest.skip("needs a process free on 2 or more cores of the node")
    first, last = min(node), max(node)
    tids: dict[str, int] = {}
    ready, done = threading.Barrier(4), threading.Event()

    def run(name: str, cores: set[int], own: bool) -> None:
        if own:
            name_thread(name)
        if cores:
            os.sched_setaffinity(0, cores)
        tids[name] = threading.get_native_id()
        ready.wait()
        done.wait(30)

    threads = [
        threading.Thread(target=run, args=("compute", {first}, False)),
        threading.Thread(target=run, args=("kvnode-copy-cpu", {last}, True)),
        threading.Thread(target=run, args=("free", set(), False)),
    ]
    for t in threads:
        t.start()
    try:
        ready.wait(10)
        paths = {n: f"/proc/self/task/{tid}" for n, tid in tids.items()}
        assert Path(paths["kvnode-copy-cpu"], "comm").read_text().strip() == "kvnode-copy-cpu"
        assert bound_cores(node, paths.values()) == {first}
        assert bound_cores(node, [paths["free"]]) == set()
        assert bound_cores(node, [paths["kvnode-copy-cpu"]]) == set()
        assert bound_cores(node, ["/proc/self/task/999999999"]) == set()  # gone: skipped
        scanned = node_threads()
        assert all(f"/proc/{os.getpid()}/task/{tid}" in scanned for tid in tids.values())
        assert not any(p.startswith(f"/proc/{os.getpid()}/") for p in node_threads([os.getpid()]))
    finally:
        done.set()
        for t in threads:
            t.join(10)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_node_cores_come_from_the_cgroup_cpuset_then_the_online_list(tmp_path: Path) -> None:
    _write(tmp_path / "sys/devices/system/cpu/online", "0-15\n")
    assert node_cpus(tmp_path) == frozenset(range(16))  # no cgroup file: online cores
    _write(tmp_path / "proc/self/cgroup", "0::/kubepods/pod1/ctr\n")
    assert node_cpus(tmp_path) == frozenset(range(16))  # no cpuset anywhere
    _write(tmp_path / "sys/fs/cgroup/kubepods/cpuset.cpus.effective", "0-7\n")
    assert node_cpus(tmp_path) == frozenset(range(8))  # a parent's
    _write(tmp_path / "sys/fs/cgroup/kubepods/pod1/ctr/cpuset.cpus.effective", "2-3,6\n")
    assert node_cpus(tmp_path) == {2, 3, 6}  # the process's own group first
    _write(tmp_path / "sys/fs/cgroup/kubepods/pod1/ctr/cpuset.cpus.effective", "\n")
    assert node_cpus(tmp_path) == frozenset(range(8))  # empty: the parent's
    _write(tmp_path / "proc/self/cgroup", "0::/../../etc\n")  # never leaves the hierarchy
    assert node_cpus(tmp_path) == frozenset(range(16))
    _write(tmp_path / "sys/fs/cgroup/cpuset.cpus.effective", "garbage")
    assert node_cpus(tmp_path) == frozenset(range(16))  # unreadable: the online list
    (tmp_path / "sys/devices/system/cpu/online").unlink()
    assert node_cpus(tmp_path) == frozenset()  # nothing known: nothing to move to


def test_this_machine_has_cores() -> None:
    assert node_cpus()
