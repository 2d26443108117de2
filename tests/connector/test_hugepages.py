"""The worker's CPU cache on huge pages (connector/hugepages.py): real memory, real
madvise, contents unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvnode.connector.hugepages import HUGE, Collapse, aligned
from kvnode.cores import node_cpus


def test_aligned_keeps_inside_each_allocation_and_merges_overlaps() -> None:
    base = 100 * HUGE
    got = aligned([(base + 5, 4 * HUGE), (base + 2 * HUGE, 3 * HUGE), (base + 50 * HUGE, 100)])
    # [base+5, base+4H+5) -> [base+H, base+4H); the second reaches base+5H; the third
    # holds no whole huge page.
    assert got == [(base + HUGE, 4 * HUGE)]
    assert aligned([(HUGE, HUGE)]) == [(HUGE, HUGE)]
    assert aligned([]) == []


def _huge_kib_in(lo: int, hi: int) -> int:
    """AnonHugePages (KiB) of this process's mappings that overlap [lo, hi)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start < hi and end > lo
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1])
    return total


def test_collapse_backs_a_cache_with_huge_pages_and_keeps_its_bytes() -> None:
    kv = torch.randn(16 * HUGE // 4)  # 64 MiB, on small pages as torch allocates it
    want = kv.clone()
    addr, n = kv.untyped_storage().data_ptr(), kv.untyped_storage().nbytes()
    c = Collapse([(addr, n)], shared=True).start()
    assert c.done.wait(60)
    if not c.collapsed:
        pytest.skip(f"this kernel gives no huge pages here ({c.why})")
    assert c.collapsed + c.failed == sum(m for _, m in aligned([(addr, n)]))
    assert _huge_kib_in(addr, addr + n) * 1024 >= c.collapsed
    assert torch.equal(kv, want)  # the kernel copied the pages, not changed them
    kv.add_(1)  # still this process's private, writable memory
    assert torch.equal(kv, want + 1)


def test_collapse_of_memory_that_is_not_mapped_is_counted_not_raised() -> None:
    c = Collapse([(HUGE, 4 * HUGE)], shared=True).start()  # the first pages of the address space
    assert c.done.wait(10)
    assert c.collapsed == 0 and c.failed == 4 * HUGE and c.why


def test_stripes_take_the_first_step_of_every_range_first() -> None:
    from kvnode.connector.hugepages import stripes

    a, b = 100 * HUGE, 300 * HUGE
    got = stripes([(a, 5 * HUGE), (b, 2 * HUGE)], 2 * HUGE)
    assert got == [
        (a, 2 * HUGE), (b, 2 * HUGE),  # the lowest blocks of both layers first
        (a + 2 * HUGE, 2 * HUGE),
        (a + 4 * HUGE, HUGE),
    ]  # fmt: skip
    assert sum(n for _, n in got) == 7 * HUGE
    assert stripes([], HUGE) == []


def test_the_collapse_yields_to_the_agents_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the agent copies for the worker (``busy``), one step of the collapse at
    most every ``BUSY_STEP_EVERY_S`` (each step holds the mmap lock the copies need);
    once it does not, the rest at once. Real madvise is left out: the calls are
    recorded (what the kernel does with them is the test above)."""
    from kvnode.connector import hugepages as hp

    calls: list[tuple[float, int, int]] = []

    def record(addr: int, n: int, advice: int) -> int:
        calls.append((time.monotonic(), addr, advice))
        return 0

    monkeypatch.setattr(hp, "_madvise", record)
    busy = [True]
    base = 100 * HUGE
    ranges = [(base, 8 * HUGE), (base + 64 * HUGE, 8 * HUGE)]
    c = Collapse(ranges, busy=lambda: busy[0], step=HUGE, shared=True)
    t0 = time.monotonic()
    c.start()
    time.sleep(0.6)
    steps = [t for t, _, adv in calls if adv == hp.MADV_COLLAPSE]
    # 0.6 s at one step per 0.25 s: the first at once, then at 0.25 and 0.5 s
    assert 2 <= len(steps) <= 3, steps
    assert all(b - a >= hp.BUSY_STEP_EVERY_S * 0.95 for a, b in zip(steps, steps[1:]))
    assert not c.done.is_set()
    busy[0] = False  # the copies end: the remaining 13 steps without waiting
    assert c.done.wait(5)
    assert time.monotonic() - t0 < 1.5
    assert c.collapsed == 16 * HUGE and c.yielded_s > 0.3
    order = [addr for _, addr, adv in calls if adv == hp.MADV_COLLAPSE]
    assert order[:2] == [base, base + 64 * HUGE]  # striped: both ranges' first step


def test_a_collapse_told_nothing_about_copies_runs_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvnode.connector import hugepages as hp

    monkeypatch.setattr(hp, "_madvise", lambda addr, n, advice: 0)
    c = Collapse([(100 * HUGE, 32 * HUGE)], step=HUGE, shared=True).start()
    assert c.done.wait(2) and c.collapsed == 32 * HUGE and c.yielded_s < 0.1


_PLACED = """
import ctypes, mmap, os, sys
from kvnode.connector.hugepages import Collapse
buf = mmap.mmap(-1, 8 << 20)
buf.write(b"x" * (8 << 20))
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
c = Collapse([(addr, 8 << 20)], shared=sys.argv[1] == "always").start()
assert c.done.wait(30)
print("cores=" + ",".join(map(str, sorted(c.cores))))
print("main=" + ",".join(map(str, sorted(os.sched_getaffinity(0)))))
whole = sum(n for _, n in c.ranges)  # the huge pages inside the mapping
assert whole >= 2 << 20
print(f"tried={int(c.collapsed + c.failed == whole)} skipped={int(c.skipped == whole)}")
"""


@pytest.mark.parametrize(
    ("bind", "mode"), [(True, "auto"), (False, "auto"), (False, "always"), (True, "always")]
)
def test_the_collapse_runs_off_the_cores_vllm_is_bound_to(bind: bool, mode: str) -> None:
    """A worker process bound to one core (as vLLM binds its compute threads): the
    collapse thread moves to the node's other cores and collapses there, the
    process's own threads stay where they were. A process whose threads may run on
    every core leaves the cache on small pages, unless told ``always``."""
    node = sorted(node_cpus())
    if len(node) < 2 or len(os.sched_getaffinity(0)) < len(node):
        pytest.skip("needs a process free on 2 or more cores of the node")
    pre = (lambda: os.sched_setaffinity(0, {node[0]})) if bind else None
    out = subprocess.run(
        [sys.executable, "-c", _PLACED, mode],
        preexec_fn=pre,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    said = dict(word.split("=", 1) for word in out.stdout.split())
    others = ",".join(map(str, node[1:]))
    every = ",".join(map(str, node))
    moved = {"cores": others, "main": str(node[0]), "tried": "1", "skipped": "0"}
    if bind:
        assert said == moved
    elif mode == "auto":
        assert said == {"cores": "", "main": every, "tried": "0", "skipped": "1"}
    else:
        assert said == {"cores": "", "main": every, "tried": "1", "skipped": "0"}


def _beside(neighbour: str) -> dict[str, str]:
    """The collapse in a process bound to the node's first core, while ``neighbour``
    (code that prints a line once set up) runs bound to every other core."""
    node = sorted(node_cpus())
    if len(node) < 2 or len(os.sched_getaffinity(0)) < len(node):
        pytest.skip("needs a process free on 2 or more cores of the node")
    other = subprocess.Popen(
        [sys.executable, "-c", neighbour + "; print('ready', flush=True); time.sleep(60)"],
        preexec_fn=lambda: os.sched_setaffinity(0, set(node[1:])),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "ready"
        out = subprocess.run(
            [sys.executable, "-c", _PLACED, "auto"],
            preexec_fn=lambda: os.sched_setaffinity(0, {node[0]}),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        other.kill()
        other.wait()
    assert out.returncode == 0, out.stderr
    return dict(word.split("=", 1) for word in out.stdout.split())


def test_the_collapse_keeps_off_the_cores_another_rank_is_bound_to() -> None:
    """Two ranks of one vLLM, each bound to its own cores, on a node with no core left
    over: the collapse of one must not run on the other's cores (its forward passes,
    which the first rank's wait for); it does not run at all."""
    said = _beside("import time")
    first = str(min(node_cpus()))
    assert said == {"cores": "", "main": first, "tried": "0", "skipped": "1"}


def test_the_collapse_still_runs_beside_the_agents_placed_copy_threads() -> None:
    """The agent's copy threads, placed off vLLM's cores, are bound too: they are
    kvnode's own (named so), not another rank's compute threads, so the collapse
    still runs on those cores. Counted as compute threads, each would leave the
    other no core at all."""
    said = _beside(
        "import time; from kvnode.cores import name_thread; name_thread('kvnode-copy-cpu')"
    )
    node = sorted(node_cpus())
    others = ",".join(map(str, node[1:]))
    assert said == {"cores": others, "main": str(node[0]), "tried": "1", "skipped": "0"}
