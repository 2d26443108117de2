"""The node's cores (connector/cores.py): Linux's core list form and the cgroup's
cpuset, read from a directory tree laid out as /proc and /sys are."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvnode.connector.cores import node_cpus, parse_cpu_list


def test_core_lists_parse_as_linux_writes_them() -> None:
    assert parse_cpu_list("0-2,5,7-8,12\n") == {0, 1, 2, 5, 7, 8, 12}
    assert parse_cpu_list(" 3 ") == {3}
    for bad in ("", "x", "3-1", "0-3,,4", "-1", "0-99999999", "1-", "0-3|4"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


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
