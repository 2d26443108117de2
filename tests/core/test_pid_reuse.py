"""The pid-reuse guard with real processes: a process at the client's pid that started
after the agent saw the connection is not the client (its pid was reused), and the
client counts as gone; the process that made the connection passes."""

from __future__ import annotations

import subprocess
import sys
import time

from kvnode.agent.registry import ClientRegistry
from kvnode.ipc.process import boot_clock_s, pid_namespace, start_time_s


def _child() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_process_started_after_the_connection_is_not_the_client() -> None:
    reg = ClientRegistry(generation=1, pid_ns=pid_namespace())
    seen_before = boot_clock_s()
    time.sleep(0.05)  # more than a clock tick: the child starts strictly later
    p = _child()
    try:
        assert start_time_s(p.pid) > seen_before
        reused = reg.register(b"a", -1, "reused", p.pid, reg.pid_ns, 0.0, seen_before)
        assert reused in reg.exited()  # gone at once: that pid is someone else now
        seen_after = boot_clock_s()
        ok = reg.register(b"b", -1, "ok", p.pid, reg.pid_ns, 0.0, seen_after)
        assert ok.pidfd >= 0 and ok not in reg.exited()
        p.kill()
        p.wait()
        deadline = time.monotonic() + 5
        while ok not in reg.exited():  # and its exit is seen through the pidfd
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        p.kill()
        p.wait()
        reg.close()


def test_start_time_reads_names_with_spaces_and_parentheses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    exe = tmp_path / "a b) (c"
    exe.symlink_to(sys.executable)
    p = subprocess.Popen([str(exe), "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 5
        while start_time_s(p.pid) == 0.0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert 0 < start_time_s(p.pid) <= boot_clock_s()
        assert start_time_s(2**22 + 5) == 0.0  # no such process
    finally:
        p.kill()
        p.wait()
