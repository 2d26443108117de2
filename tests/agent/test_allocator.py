from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvnode.agent.allocator import AllocatorInvariantError, PageAllocator


def test_contiguous_when_possible() -> None:
    a = PageAllocator(100)
    assert a.alloc(10) == [(0, 10)]
    assert a.alloc(90) == [(10, 90)]
    assert a.alloc(1) is None
    a.check([(0, 10), (10, 90)])


def test_fragmented_free_space_still_satisfies_allocation() -> None:
    a = PageAllocator(10)
    held = [a.alloc(1) for _ in range(10)]
    for ext in held[::2]:  # free every other page: no run longer than 1
        a.free(ext)
    assert a.largest_free_run() == 1
    got = a.alloc(5)
    assert got is not None and sum(c for _, c in got) == 5
    a.check(got + [e for ext in held[1::2] for e in ext])


def test_double_free_is_refused() -> None:
    a = PageAllocator(8)
    ext = a.alloc(2)
    assert ext is not None
    a.free(ext)
    with pytest.raises(AllocatorInvariantError):
        a.free(ext)


def test_check_detects_lost_pages() -> None:
    a = PageAllocator(8)
    a.alloc(2)
    with pytest.raises(AllocatorInvariantError):
        a.check([])  # the 2 used pages are not reported: books do not tile the arena


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(1, 40)), min_size=1, max_size=300),
    st.integers(0, 2**32),
)
def test_churn_never_overlaps_and_never_fails_with_enough_free(
    ops: list[tuple[bool, int]], seed: int
) -> None:
    rng = random.Random(seed)
    a = PageAllocator(256)
    live: list[list[tuple[int, int]]] = []
    for is_alloc, n in ops:
        if is_alloc or not live:
            enough = a.pages_free >= n
            got = a.alloc(n)
            assert (got is not None) == enough  # fragmentation never causes a failure
            if got is not None:
                assert sum(c for _, c in got) == n
                live.append(got)
        else:
            a.free(live.pop(rng.randrange(len(live))))
        a.check([e for ext in live for e in ext])
    assert a.pages_free == 256 - sum(c for ext in live for _, c in ext)
