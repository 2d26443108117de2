from __future__ import annotations

from kvnode.agent.policy import LRUPolicy, S3FIFOPolicy


def _first(policy) -> bytes:
    return next(iter(policy.candidates()))


def test_lru_evicts_least_recently_used() -> None:
    p = LRUPolicy()
    for k in (b"a", b"b", b"c"):
        p.insert(k)
    p.touch(b"a")
    assert _first(p) == b"b"
    p.remove(b"b")
    assert _first(p) == b"c"


def test_s3fifo_resists_a_scan() -> None:
    """A hot set that was hit survives a stream of one-hit keys; under LRU it would not."""
    p = S3FIFOPolicy()
    hot = [f"hot{i}".encode() for i in range(20)]
    for k in hot:
        p.insert(k)
        p.touch(k)
    capacity = 40
    evicted: list[bytes] = []
    for i in range(500):
        k = f"scan{i}".encode()
        p.insert(k)
        while len(p) > capacity:
            victim = _first(p)
            p.remove(victim)
            evicted.append(victim)
        for h in hot[:5]:  # the hot set keeps being used
            p.touch(h)
    assert not set(hot[:5]) & set(evicted)
    assert len(evicted) == 500 + 20 - capacity


def test_s3fifo_ghost_hit_goes_to_main() -> None:
    p = S3FIFOPolicy()
    p.insert(b"x")
    p.remove(b"x")  # evicted from probation -> ghost
    p.insert(b"x")  # seen again: straight to main
    p.insert(b"y")
    assert _first(p) == b"y"  # probation entries go first
