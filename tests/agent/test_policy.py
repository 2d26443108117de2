from __future__ import annotations

from kvnode.agent.policy import LRUPolicy, PrefixPolicy, S3FIFOPolicy


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


def _evict(p, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        victim = _first(p)
        p.remove(victim)
        out.append(victim)
    return out


def test_prefix_orphans_leave_first() -> None:
    """When a chunk leaves, its cached descendants are unreachable: they go next,
    before older chunks that can still be hit."""
    p = PrefixPolicy()
    p.insert_many([b"old"], [None])
    p.insert_many([b"a", b"b", b"c"], [None, b"a", b"b"])
    p.touch(b"a")  # a, and only a, was hit: b and c stay in the recency list
    p.remove(b"a")  # dropped (e.g. a bad checksum)
    assert sorted(_evict(p, 2)) == [b"b", b"c"]  # before "old"


def test_prefix_evicts_a_chain_from_its_tail() -> None:
    p = PrefixPolicy()
    p.insert_many([b"a", b"b", b"c"], [None, b"a", b"b"])
    assert _evict(p, 3) == [b"c", b"b", b"a"]


def test_prefix_resists_a_scan() -> None:
    """A hot set that keeps being hit survives a one-time scan many times the cache."""
    p = PrefixPolicy()
    hot = [f"hot{i}".encode() for i in range(20)]
    p.insert_many(hot, [None] + hot[:-1])
    capacity = 100
    evicted: list[bytes] = []
    for i in range(2000):
        k = f"scan{i}".encode()
        while len(p) >= capacity:
            evicted += _evict(p, 1)
        p.insert_many([k], [None])
        for h in hot:
            p.touch(h)
    assert not set(hot) & set(evicted)


def test_prefix_ghost_hit_returns_to_the_frequent_list() -> None:
    p = PrefixPolicy()
    p.insert_many([b"x", b"y"], [None, None])
    p.remove(b"x")  # left unhit: remembered as a ghost
    p.insert_many([b"x"], [None])  # back: it was worth keeping, so it joins t2
    p.insert_many([b"z"], [None])
    assert _evict(p, 1) == [b"y"]  # the unhit chunk, though x is older


def test_prefix_survives_parents_a_client_made_up() -> None:
    """Parents come from clients: a cycle, a chunk its own parent and a parent with
    many children leave the books consistent (and the orphan walk ends)."""
    p = PrefixPolicy()
    p.insert_many([b"a", b"b", b"self"], [b"b", b"a", b"self"])
    kids = [f"kid{i}".encode() for i in range(1000)]
    p.insert_many(kids, [b"self"] * len(kids))
    p.remove(b"a")  # b is reachable only through a (and a through b)
    assert _first(p) == b"b"
    p.remove(b"self")
    assert len(p) == 1 + len(kids) and set(_evict(p, len(p))) == {b"b", *kids}
    assert len(p) == 0 and not p._kids and not p._parent
