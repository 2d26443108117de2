from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kvnode.agent.index import Index, State
from kvnode.ipc.protocol import Status

PAGE = 4096


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_reserve_commit_pin_release_cycle() -> None:
    idx = Index(64 * PAGE, PAGE, "lru")
    st_, e = idx.reserve(b"k", 3 * PAGE + 1, owner=7)
    assert st_ == Status.OK and e is not None and e.state is State.RESERVED
    assert idx.lookup(b"k") is None  # readers never see a reserved entry
    assert idx.pin(b"k") is None
    assert idx.reserve(b"k", 10, owner=8)[0] == Status.EXISTS
    assert idx.commit(b"k", owner=8) == Status.BAD_STATE  # not the owner
    assert idx.commit(b"k", owner=7, checksum=5) == Status.OK
    assert idx.pin(b"k") is e and e.pins == 1
    assert e.extents(PAGE) == [(e.pages[0][0] * PAGE, 3 * PAGE + 1)]
    idx.unpin(b"k")
    idx.check()


def test_pinned_and_reserved_entries_are_never_evicted() -> None:
    idx = Index(8 * PAGE, PAGE, "lru")
    idx.reserve(b"pinned", 4 * PAGE, 1)
    idx.commit(b"pinned", 1)
    idx.pin(b"pinned")
    idx.reserve(b"lease", 4 * PAGE, 2)  # reserved, not committed
    st_, _ = idx.reserve(b"new", PAGE, 3)
    assert st_ == Status.NO_SPACE  # fails cleanly instead of evicting either
    assert idx.entries[b"pinned"].state is State.COMMITTED
    idx.unpin(b"pinned")
    assert idx.reserve(b"new", PAGE, 3)[0] == Status.OK
    assert b"pinned" not in idx.entries
    idx.check()


def test_eviction_returns_victims_for_write_back() -> None:
    idx = Index(8 * PAGE, PAGE, "lru")
    idx.write_back = True
    for k in (b"a", b"b", b"c", b"d"):
        idx.reserve(k, 2 * PAGE, 1)
        idx.commit(k, 1)
    # Background headroom: write-back of just enough, nothing dropped.
    out = idx.evict_pages(2, must_free=False)
    assert [e.key for e in out.leaving] == [b"a"] and out.removed == [b"a"]
    assert idx.alloc.pages_free == 0 and idx.evicting_pages == 2
    assert idx.lookup(b"a") is None  # leaving: invisible
    # A store into the full arena: "a" is already on its way out, so one more victim
    # is freed without write-back rather than failing the store.
    kept: list = []
    assert idx.reserve(b"e", 2 * PAGE, 1, kept)[0] == Status.OK
    assert kept == [] and idx.counters.evict_unsaved == 1 and b"b" not in idx.entries
    idx.unhold(b"a")  # the caller's write-back is done
    assert idx.evicting_pages == 0 and idx.alloc.pages_free == 2
    idx.check()


def test_store_into_full_arena_does_not_defer_everything() -> None:
    idx = Index(16 * PAGE, PAGE, "lru")
    idx.write_back = True
    for i in range(8):
        idx.reserve(bytes([i]), 2 * PAGE, 1)
        idx.commit(bytes([i]), 1)
    kept: list = []
    assert idx.reserve(b"new", 2 * PAGE, 1, kept)[0] == Status.OK
    assert len(kept) == 1  # one kept for write-back, one dropped: not all eight
    assert len(idx.entries) == 8  # one leaving, six committed, one reserved
    for e in kept:
        idx.unhold(e.key)
    assert len(idx.entries) == 7
    idx.check()


def test_lru_eviction_goes_past_a_pinned_head() -> None:
    """Regression: with the LRU head pinned, eviction stopped after one victim and a
    3-page reserve answered NO_SPACE while 8 evictable entries held the arena."""
    idx = Index(10 * PAGE, PAGE, "lru")
    for i in range(10):
        idx.reserve(bytes([i]) * 16, PAGE, 1)
        idx.commit(bytes([i]) * 16, 1)
    idx.pin(bytes([0]) * 16)
    for i in range(1, 10):
        idx.lookup(bytes([i]) * 16)  # the pinned entry is least recently used again
    assert idx.reserve(b"n" * 16, 3 * PAGE, 2)[0] == Status.OK
    assert bytes([0]) * 16 in idx.entries
    idx.check()


def test_drop_waits_for_pins_and_copies() -> None:
    idx = Index(8 * PAGE, PAGE, "lru")
    idx.reserve(b"k", 2 * PAGE, 1)
    idx.commit(b"k", 1, checksum=9)
    idx.pin(b"k")
    idx.hold(b"k")  # a lower tier is copying it
    assert idx.drop(b"k")
    assert idx.lookup(b"k") is None and idx.pin(b"k") is None  # gone for readers
    assert idx.alloc.pages_free == 6  # but its pages stay while they are read
    idx.unpin(b"k")
    assert idx.alloc.pages_free == 6
    idx.unhold(b"k")
    assert idx.alloc.pages_free == 8 and b"k" not in idx.entries
    assert idx.take_changes() == [(True, b"k"), (False, b"k")]
    idx.check()


@settings(max_examples=200, deadline=None)
@given(
    policy=st.sampled_from(["lru", "s3fifo", "prefix"]),
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=16),
    pinned=st.sets(st.integers(0, 15), max_size=6),
    touches=st.lists(st.integers(0, 15), max_size=20),
    want=st.integers(1, 8),
)
def test_reserve_fails_only_when_unpinned_pages_cannot_cover_it(
    policy: str, sizes: list[int], pinned: set[int], touches: list[int], want: int
) -> None:
    idx = Index(24 * PAGE, PAGE, policy)
    keys = []
    for i, n in enumerate(sizes):
        k = bytes([i]) * 16
        if idx.reserve(k, n * PAGE, 1)[0] == Status.OK:
            idx.commit(k, 1)
            keys.append(k)
    for i in touches:
        if i < len(keys):
            idx.lookup(keys[i])
    for i in pinned:
        if i < len(keys):
            idx.pin(keys[i])
    evictable = sum(e.page_count() for e in idx.entries.values() if not e.pins)
    can_cover = idx.alloc.pages_free + evictable >= want
    st_, _ = idx.reserve(b"w" * 16, want * PAGE, 2)
    assert (st_ == Status.OK) == can_cover, (st_, can_cover)
    if st_ == Status.NO_SPACE:
        assert all(e.pins for e in idx.entries.values()), "evictable entries were left"
    idx.check()


def test_leases_expire() -> None:
    clock = FakeClock()
    idx = Index(8 * PAGE, PAGE, "lru", clock=clock, reserve_ttl_s=5)
    idx.reserve(b"k", PAGE, 4)
    clock.t = 4
    assert idx.expire_leases() == []
    clock.t = 6
    assert [e.key for e in idx.expire_leases()] == [b"k"]
    assert idx.bytes_used == 0
    idx.check()


KEYS = [bytes([i]) * 16 for i in range(12)]
NS_SMALL, NS_FREE = b"s" * 16, b"f" * 16  # a quarter of the arena; no limit


class IndexMachine(RuleBasedStateMachine):
    """Random reserve/commit/pin/release/abort/drop, with namespaces and parents:
    invariants hold at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.idx = Index(24 * PAGE, PAGE, "prefix")
        self.pins: dict[bytes, int] = {}
        self.reserved: dict[bytes, int] = {}

    @initialize(policy=st.sampled_from(["prefix", "s3fifo", "lru"]))
    def start(self, policy: str) -> None:
        from kvnode.agent.tenants import Tenants

        tenants = Tenants(24 * PAGE, 1.0, {NS_SMALL: 0.25})
        self.idx = Index(24 * PAGE, PAGE, policy, tenants=tenants)

    @rule(
        key=st.sampled_from(KEYS),
        size=st.integers(1, 6 * PAGE),
        owner=st.integers(1, 3),
        ns=st.sampled_from([None, NS_SMALL, NS_FREE]),
    )
    def reserve(self, key: bytes, size: int, owner: int, ns: bytes | None) -> None:
        before = {k: e for k, e in self.idx.entries.items()}
        st_, e = self.idx.reserve(key, size, owner, ns=ns)
        if st_ == Status.OK:
            self.reserved[key] = owner
            if ns == NS_SMALL:
                assert self.idx.tenants.of(ns).bytes <= 6 * PAGE
        for k in before:  # whatever was evicted was neither pinned nor reserved
            if k not in self.idx.entries:
                assert self.pins.get(k, 0) == 0 and k not in self.reserved

    @precondition(lambda self: self.reserved)
    @rule(data=st.data(), parent=st.sampled_from([b"", *KEYS]))
    def commit(self, data: st.DataObject, parent: bytes) -> None:
        key = data.draw(st.sampled_from(sorted(self.reserved)))
        owner = self.reserved.pop(key)
        assert self.idx.commit_many([key], owner, [0], [parent]) == [Status.OK]

    @precondition(lambda self: self.reserved)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.reserved)))
        assert self.idx.abort(key, self.reserved.pop(key))

    @rule(key=st.sampled_from(KEYS))
    def pin(self, key: bytes) -> None:
        if self.idx.pin(key) is not None:
            self.pins[key] = self.pins.get(key, 0) + 1

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.pins)))
        self.idx.unpin(key)
        self.pins[key] -= 1
        if not self.pins[key]:
            del self.pins[key]

    @rule(key=st.sampled_from(KEYS))
    def drop(self, key: bytes) -> None:
        was = self.idx.lookup(key) is not None
        assert self.idx.drop(key) == was
        assert self.idx.lookup(key) is None  # gone for readers at once

    @invariant()
    def books_balance(self) -> None:
        self.idx.check()
        for k, n in self.pins.items():
            assert self.idx.entries[k].pins == n
        for k in self.reserved:
            assert self.idx.entries[k].state is State.RESERVED


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


def test_a_group_is_evicted_and_dropped_whole() -> None:
    """A chunk's per-rank entries live and die together: evicting one rank's entry
    must not leave the others filling the arena as orphans."""
    idx = Index(8 * PAGE, PAGE, "lru")
    g1, g2 = b"1" * 16, b"2" * 16
    for rank in range(2):
        for g in (g1, g2):
            k = g[:15] + bytes([rank])
            assert idx.reserve(k, 2 * PAGE, 1, group=g)[0] == Status.OK
            idx.commit(k, 1)
    # Full: a 2-page reserve evicts the least recent group, both of its ranks.
    assert idx.reserve(b"n" * 16, 2 * PAGE, 1)[0] == Status.OK
    assert not any(k[:15] == g1[:15] for k in idx.entries), "an orphan rank entry stayed"
    assert idx.alloc.pages_free == 2
    # A pinned member keeps its whole group in.
    idx.commit(b"n" * 16, 1)
    idx.pin(g2[:15] + b"\x01")
    assert idx.reserve(b"m" * 16, 6 * PAGE, 1)[0] == Status.NO_SPACE
    assert len([k for k in idx.entries if k[:15] == g2[:15]]) == 2
    # A drop (a checksum failure of one rank) takes the group.
    assert idx.drop(g2[:15] + b"\x00")
    assert idx.lookup(g2[:15] + b"\x00") is None and idx.lookup(g2[:15] + b"\x01") is None
    idx.unpin(g2[:15] + b"\x01")
    assert not any(k[:15] == g2[:15] for k in idx.entries) and not idx.groups
    idx.check()


def test_a_group_held_in_is_judged_once_per_eviction_not_at_each_member(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One group over the whole arena with one member still reserved: no member may
    leave. A reserve that has to evict looks at the group once, not once per member
    (each look lists every member: a client that grew one group over a large arena
    stalled every reserve for seconds, the square of the group's size)."""
    n = 512
    idx = Index(n * PAGE, PAGE, "lru")
    g = b"g" * 16
    keys = [i.to_bytes(16, "big") for i in range(n)]
    for k in keys:
        assert idx.reserve(k, 1, 1, group=g)[0] == Status.OK
    for k in keys[:-1]:
        idx.commit(k, 1)
    looks = 0
    members = Index._members

    def counted(self: Index, e: Any) -> Any:
        nonlocal looks
        looks += 1
        return members(self, e)

    monkeypatch.setattr(Index, "_members", counted)
    assert idx.reserve(b"n" * 16, 1, 2)[0] == Status.NO_SPACE
    assert looks <= 2, looks
    assert len(idx.groups[g]) == n
    idx.check()


def test_states_answers_committed_only_on_both_paths() -> None:
    """``states`` has a fast path for keys none of which the index holds; both paths
    answer 1 only for committed entries, never for reserved or leaving ones."""
    idx = Index(16 * PAGE, PAGE, "lru")
    idx.reserve(b"committed", PAGE, 1)
    idx.commit(b"committed", 1)
    idx.reserve(b"reserved", PAGE, 1)
    absent = [bytes([i]) * 16 for i in range(8)]
    assert idx.states(absent) == [0] * 8  # the all-absent path
    assert idx.states([]) == []
    mixed = [absent[0], b"committed", b"reserved", absent[1], b"committed"]
    assert idx.states(mixed) == [0, 1, 0, 0, 1]
    assert idx.states([b"reserved"]) == [0]  # present in the index, but not readable
    idx.drop(b"committed")
    assert idx.states(mixed) == [0, 0, 0, 0, 0]
    idx.check()


def test_take_changes_in_steps_keeps_order_and_the_rest() -> None:
    idx = Index(16 * PAGE, PAGE, "lru")
    keys = [bytes([i]) * 16 for i in range(5)]
    for k in keys:
        idx.reserve(k, PAGE, 1)
        idx.commit(k, 1)
    idx.drop(keys[0])
    want = [(True, k) for k in keys] + [(False, keys[0])]
    got = idx.take_changes(2) + idx.take_changes(3)
    assert idx.changes == [(False, keys[0])]
    got += idx.take_changes(10)
    assert got == want and idx.take_changes() == [] and idx.take_changes(1) == []


def test_reserve_many_carves_one_run_and_answers_like_reserve() -> None:
    idx = Index(16 * PAGE, PAGE, "lru")
    idx.reserve(b"k1" * 8, PAGE, 1)
    keys = [b"k0" * 8, b"k1" * 8, b"k2" * 8]
    out = idx.reserve_many(keys, 2 * PAGE + 1, owner=2, groups=[b"g" * 16] * 3)
    assert out is not None
    assert [o for o, _ in out] == [Status.OK, Status.EXISTS, Status.OK]
    e0, e2 = out[0][1], out[2][1]
    assert e0 is not None and e2 is not None and out[1][1] is None
    assert e0.pages[0][0] + 3 == e2.pages[0][0]  # side by side, 3 pages each
    assert idx.groups[b"g" * 16] == {keys[0], keys[2]}
    assert idx.reserve_many([b"x" * 16, b"x" * 16], PAGE, 2) is None  # duplicate keys
    assert idx.reserve_many([b"y" * 16, b"z" * 16], 8 * PAGE, 2) is None  # no run fits
    idx.check()
    assert idx.commit(keys[0], 2) == Status.OK and idx.commit(keys[2], 2) == Status.OK
    idx.drop(keys[0])
    idx.check()


def test_commit_many_and_pin_many_answer_per_key() -> None:
    idx = Index(16 * PAGE, PAGE, "lru")
    for k, owner in ((b"a" * 16, 1), (b"b" * 16, 2), (b"c" * 16, 1)):
        idx.reserve(k, PAGE, owner)
    keys = [b"a" * 16, b"b" * 16, b"z" * 16, b"c" * 16]
    assert idx.commit_many(keys, 1, [5, 6, 7, 8]) == [
        Status.OK, Status.BAD_STATE, Status.NOT_FOUND, Status.OK,
    ]  # fmt: skip
    assert idx.commit_many([b"a" * 16], 1, [9]) == [Status.BAD_STATE]  # committed already
    assert idx.changes == [(True, b"a" * 16), (True, b"c" * 16)] and idx.reserved == 1
    pinned = idx.pin_many(keys + [b"a" * 16])
    assert [e.key if e else None for e in pinned] == [
        b"a" * 16, None, None, b"c" * 16, b"a" * 16,
    ]  # fmt: skip
    assert idx.entries[b"a" * 16].pins == 2 and idx.entries[b"a" * 16].checksum == 5
    assert idx.pinned == 2
    idx.unpin(b"a" * 16, 2)
    idx.unpin(b"c" * 16)
    assert idx.pinned == 0
    idx.check()


def test_a_namespace_at_its_share_evicts_its_own_entries_only() -> None:
    from kvnode.agent.index import Outcome
    from kvnode.agent.tenants import Tenants

    a, b = b"a" * 16, b"b" * 16
    idx = Index(16 * PAGE, PAGE, "prefix", tenants=Tenants(16 * PAGE, 1.0, {a: 0.25}))
    idx.write_back = True  # victims are held for a lower tier: the share counts them gone
    for i in range(4):
        assert idx.reserve(bytes([i]) * 16, PAGE, 1, ns=a)[0] is Outcome.OK
    for i in range(8):
        assert idx.reserve(bytes([100 + i]) * 16, PAGE, 1, ns=b)[0] is Outcome.OK
    idx.commit_many([bytes([i]) * 16 for i in range(4)], 1, [0] * 4)
    idx.commit_many([bytes([100 + i]) * 16 for i in range(8)], 1, [0] * 8)
    leaving: list = []
    st, _ = idx.reserve(b"x" * 16, PAGE, 1, leaving, ns=a)
    assert st is Outcome.OK and [e.ns for e in leaving] == [a]  # one of a's, none of b's
    assert idx.tenants.of(a).bytes == 4 * PAGE and idx.tenants.of(a).quota_evictions == 1
    idx.unhold(leaving[0].key)
    assert idx.tenants.of(a).bytes == 4 * PAGE and idx.tenants.of(b).bytes == 8 * PAGE
    # every entry of a reserved or pinned: refused, counted; b is not limited
    assert idx.reserve(b"y" * 16, PAGE, 1, ns=a)[0] is Outcome.OK  # took a committed one
    for e in list(idx.entries.values()):
        if e.ns == a and e.state is State.COMMITTED:
            idx.pin(e.key)
    assert idx.reserve(b"z" * 16, PAGE, 1, ns=a)[0] is Outcome.NO_SPACE
    assert idx.tenants.of(a).quota_refused == 1 and idx.counters.quota_refused == 1
    assert idx.reserve(b"w" * 16, PAGE, 1, ns=b)[0] is Outcome.OK
    idx.check()


def test_a_clean_victim_is_taken_before_one_would_leave_unsaved() -> None:
    from kvnode.agent.index import Outcome

    idx = Index(4 * PAGE, PAGE, "lru")
    idx.write_back = True
    keys = [bytes([i]) * 16 for i in range(4)]
    for k in keys:
        assert idx.reserve(k, PAGE, 1)[0] is Outcome.OK
    idx.commit_many(keys, 1, [0] * 4)
    idx.entries[keys[2]].saved = True  # on the disk already (write-behind)
    leaving: list = []
    assert idx.reserve(b"n" * 16, PAGE, 1, leaving)[0] is Outcome.OK
    # the oldest is held for its copy; the page comes from the clean one, not from
    # the next dirty one freed unsaved
    assert [e.key for e in leaving] == [keys[0]] and keys[2] not in idx.entries
    assert keys[1] in idx.entries and idx.counters.evict_unsaved == 0
    idx.unhold(keys[0])
    idx.check()
