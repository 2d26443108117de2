"""The worker's CPU cache on huge pages (connector/hugepages.py): real memory, real
madvise, contents unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvnode.connector.hugepages import HUGE, Collapse, aligned


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
    c = Collapse([(addr, n)]).start()
    assert c.done.wait(60)
    if not c.collapsed:
        pytest.skip(f"this kernel gives no huge pages here ({c.why})")
    assert c.collapsed + c.failed == sum(m for _, m in aligned([(addr, n)]))
    assert _huge_kib_in(addr, addr + n) * 1024 >= c.collapsed
    assert torch.equal(kv, want)  # the kernel copied the pages, not changed them
    kv.add_(1)  # still this process's private, writable memory
    assert torch.equal(kv, want + 1)


def test_collapse_of_memory_that_is_not_mapped_is_counted_not_raised() -> None:
    c = Collapse([(HUGE, 4 * HUGE)]).start()  # the first pages of the address space
    assert c.done.wait(10)
    assert c.collapsed == 0 and c.failed == 4 * HUGE and c.why
