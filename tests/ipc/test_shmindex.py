"""The shared lookup index: a writer checked against a model (hypothesis), probe
chains, rebuilds, restarts of the writer, staleness, permissions."""

from __future__ import annotations

import os
import stat
import time
import uuid
from collections.abc import Iterator

import numpy as np
import posix_ipc
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvnode.errors import ArenaError
from kvnode.ipc import shmindex as S
from kvnode.ipc.shmindex import ShmIndexReader, ShmIndexWriter, capacity_for, fingerprint


def shm_name() -> str:
    return f"/kvnode-test-idx-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def name() -> Iterator[str]:
    n = shm_name()
    yield n
    S._unlink(n)


def keys_with_home(home: int, capacity: int, count: int, seed: int = 0) -> list[bytes]:
    """Keys whose probe chains all start at ``home``: the longest chains possible."""
    rng = np.random.default_rng(seed)
    shift = S._home_shift(capacity)
    out: list[bytes] = []
    while len(out) < count:
        k = rng.bytes(16)
        if S._home(fingerprint(k), shift) == home:
            out.append(k)
    return out


def colliding(key: bytes) -> bytes:
    """Another key with the same fingerprint (the low 64 bits are unchanged)."""
    return key[:8] + bytes(b ^ 0x5A for b in key[8:])


def check_table(w: ShmIndexWriter) -> None:
    """Every slot even (not mid-write); every live key findable: no empty slot between
    its home and its slot; tombstone count and key map agree with the table."""
    seqs, fps = w._tables[w._active]
    assert not (seqs & np.uint64(1)).any()
    assert int((fps == S.TOMB).sum()) == w.tombstones
    assert int((fps > S.TOMB).sum()) == w.count
    for fp, slot in w._where.items():
        assert int(fps[slot]) == fp
        home = S._home(fp, w._shift)
        dist = (slot - home) % w.capacity
        assert dist <= w.probe_max
        for d in range(dist):
            assert int(fps[(home + d) % w.capacity]) != S.EMPTY


def test_capacity_keeps_load_at_most_half() -> None:
    for pages in (1, 100, 4096, 262144, 300000):
        cap = capacity_for(pages)
        assert cap & (cap - 1) == 0 and cap >= 2 * pages and cap >= S.CAPACITY_MIN


def test_insert_remove_and_read(name: str) -> None:
    w = ShmIndexWriter(name, 1024, generation=77)
    r = ShmIndexReader(name)
    try:
        keys = [os.urandom(16) for _ in range(600)]
        for k in keys[:300]:
            assert w.insert(k)
        got = r.contains_many(keys)
        assert got[:300].all() and not got[300:].any()
        for k in keys[:100]:
            assert w.remove(k)
        assert not w.remove(keys[0])  # not there any more
        got = r.contains_many(keys)
        assert got[100:300].all() and not got[:100].any() and not got[300:].any()
        assert r.contains_many([]).shape == (0,)
        assert r.generation == 77 and not r.lower_tiers
        w.set_lower_tiers(True)
        assert r.lower_tiers
        check_table(w)
    finally:
        r.close()
        w.close()


def test_bad_keys_are_refused(name: str) -> None:
    w = ShmIndexWriter(name, 64)
    r = ShmIndexReader(name)
    try:
        with pytest.raises(ValueError):
            r.contains_many([b"short"])
    finally:
        r.close()
        w.close()


def test_long_chains_are_read_past_the_first_window(name: str) -> None:
    cap = 256
    w = ShmIndexWriter(name, cap)
    r = ShmIndexReader(name)
    try:
        same_home = keys_with_home(cap - 5, cap, 3 * S.WINDOW_SLOTS)  # wraps past the end
        for k in same_home:
            w.insert(k)
        assert w.probe_max == len(same_home) - 1
        absent = keys_with_home(cap - 5, cap, 4, seed=1)
        got = r.contains_many(same_home + absent)
        assert got[: len(same_home)].all() and not got[len(same_home) :].any()
        for k in same_home[2:20:3]:  # tombstones in the middle of the chain
            w.remove(k)
        left = [k for i, k in enumerate(same_home) if not (2 <= i < 20 and (i - 2) % 3 == 0)]
        got = r.contains_many(same_home)
        assert got.tolist() == [k in left for k in same_home]
        check_table(w)
    finally:
        r.close()
        w.close()


def test_tombstones_trigger_a_rebuild_readers_follow(name: str) -> None:
    cap = 128
    w = ShmIndexWriter(name, cap)
    r = ShmIndexReader(name)
    try:
        keep = [os.urandom(16) for _ in range(40)]
        for k in keep:
            w.insert(k)
        for _ in range(20):
            churn = [os.urandom(16) for _ in range(40)]
            for k in churn:
                w.insert(k)
            for k in churn:
                w.remove(k)
            assert r.contains_many(keep).all()
            assert not r.contains_many(churn).any()
            check_table(w)
        assert w.rebuilds > 0
    finally:
        r.close()
        w.close()


def test_full_table_refuses_instead_of_degrading(name: str) -> None:
    w = ShmIndexWriter(name, 64)
    try:
        added = [k for k in (os.urandom(16) for _ in range(64)) if w.insert(k)]
        assert len(added) == int(64 * S.FILL_MAX) and w.full_refusals == 64 - len(added)
        check_table(w)
    finally:
        w.close()


def test_fingerprint_collisions_share_a_slot(name: str) -> None:
    w = ShmIndexWriter(name, 64)
    r = ShmIndexReader(name)
    try:
        a = os.urandom(16)
        b = colliding(a)
        assert fingerprint(a) == fingerprint(b)
        w.insert(a)
        w.insert(b)
        w.remove(a)
        assert r.contains_many([b]).all()  # b is still there
        w.remove(b)
        assert not r.contains_many([a, b]).any()
        check_table(w)
    finally:
        r.close()
        w.close()


def test_closed_index_is_refused_and_a_new_writer_is_followed(name: str) -> None:
    w1 = ShmIndexWriter(name, 64, generation=1)
    r = ShmIndexReader(name)
    k = os.urandom(16)
    w1.insert(k)
    assert r.contains_many([k]).all()
    w1.close(unlink=True)
    with pytest.raises(ArenaError):
        r.contains_many([k])
    w2 = ShmIndexWriter(name, 128, generation=2)
    r._next_reopen_s = 0.0  # the retry interval is not under test here
    try:
        assert not r.contains_many([k]).any()
        assert r.generation == 2 and r.capacity == 128 and r.reopens == 1
    finally:
        r.close()
        w2.close()


def test_a_crashed_writers_segment_is_retired_by_the_next(name: str) -> None:
    w1 = ShmIndexWriter(name, 64, generation=1)
    r = ShmIndexReader(name)
    k = os.urandom(16)
    w1.insert(k)
    # w1 "crashes": never closed. A new writer replaces it under the same name.
    w2 = ShmIndexWriter(name, 64, generation=2)
    try:
        assert not r.contains_many([k]).any()  # reader moved to w2's segment
        assert r.generation == 2
    finally:
        r.close()
        w2.close()
        w1.close(unlink=False)  # its segment is already gone; only its mapping is left


def test_a_silent_writer_goes_stale(name: str) -> None:
    w = ShmIndexWriter(name, 64)
    r = ShmIndexReader(name, stale_s=0.05)
    try:
        time.sleep(0.1)
        with pytest.raises(ArenaError):
            r.contains_many([os.urandom(16)])
        w.touch()
        r._next_reopen_s = 0.0
        assert not r.contains_many([os.urandom(16)]).any()
    finally:
        r.close()
        w.close()


def test_owner_only_permissions(name: str) -> None:
    w = ShmIndexWriter(name, 64)
    try:
        mode = stat.S_IMODE(os.stat(f"/dev/shm{name}").st_mode)
        assert mode == 0o600
    finally:
        w.close()
    assert not os.path.exists(f"/dev/shm{name}")


def test_mutations_after_close_are_no_ops(name: str) -> None:
    w = ShmIndexWriter(name, 64)
    w.close()
    assert not w.insert(os.urandom(16))
    assert not w.remove(os.urandom(16))
    w.set_lower_tiers(True)
    w.touch()
    w.close()


# ---------------------------------------------------------------- writer vs model
_BASE = [bytes([i]) * 16 for i in range(1, 40)]
POOL = _BASE + [colliding(k) for k in _BASE[:6]]  # some keys share a fingerprint


class WriterModel(RuleBasedStateMachine):
    """Random inserts and removes on a small table (long chains, full table, rebuilds),
    compared after every step with a model of live fingerprints."""

    def __init__(self) -> None:
        super().__init__()
        self.name = shm_name()
        self.w = ShmIndexWriter(self.name, 64)
        self.r = ShmIndexReader(self.name, stale_s=3600)
        self.live: dict[int, int] = {}  # fingerprint -> live keys

    @rule(i=st.integers(0, len(POOL) - 1))
    def insert(self, i: int) -> None:
        fp = fingerprint(POOL[i])
        fits = fp in self.live or len(self.live) + 1 <= 64 * S.FILL_MAX
        assert self.w.insert(POOL[i]) == fits
        if fits:
            self.live[fp] = self.live.get(fp, 0) + 1

    @rule(i=st.integers(0, len(POOL) - 1))
    def remove(self, i: int) -> None:
        fp = fingerprint(POOL[i])
        assert self.w.remove(POOL[i]) == (fp in self.live)
        if fp in self.live:
            self.live[fp] -= 1
            if not self.live[fp]:
                del self.live[fp]

    @invariant()
    def reader_agrees_with_model(self) -> None:
        got = self.r.contains_many(POOL).tolist()
        assert got == [fingerprint(k) in self.live for k in POOL]
        assert self.w.count == len(self.live)
        check_table(self.w)

    def teardown(self) -> None:
        self.r.close()
        self.w.close()


TestWriterModel = WriterModel.TestCase
TestWriterModel.settings = settings(max_examples=60, stateful_step_count=80, deadline=None)


def test_keys_with_equal_halves_do_not_collide() -> None:
    """Regression: lo ^ hi gave every key with equal halves the same fingerprint."""
    keys = [bytes([i]) * 16 for i in range(3, 40)]
    assert len({fingerprint(k) for k in keys}) == len(keys)
    from kvnode.ipc.shmindex import fingerprints

    assert [int(f) for f in fingerprints(keys)] == [fingerprint(k) for k in keys]


def test_a_killed_writers_index_stops_answering_at_once() -> None:
    """A writer process killed mid-life cannot mark its index closed; a reader in the
    same pid namespace sees its process gone and stops trusting the index at once,
    not after the heartbeat's stale_s."""
    import signal
    import subprocess
    import sys

    name = f"/kvnode-test-killed-{os.getpid()}"
    code = (
        "import sys, time; from kvnode.ipc.shmindex import ShmIndexWriter; "
        f"w = ShmIndexWriter({name!r}, 64); w.insert(b'k' * 16); print('up', flush=True); "
        "time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        r = ShmIndexReader(name)
        assert r.contains_many([b"k" * 16])[0]
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not r.usable()
        r.close()
    finally:
        p.kill()
        p.wait()
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass


def test_replace_all_lists_exactly_the_keys_given(name: str) -> None:
    w = ShmIndexWriter(name, 256)
    r = ShmIndexReader(name)
    try:
        old = [os.urandom(16) for _ in range(50)]
        for k in old:
            assert w.insert(k)
        new = [os.urandom(16) for _ in range(60)] + old[:5]
        assert w.replace_all(new)
        assert r.contains_many(new).all() and not r.contains_many(old[5:]).any()
        assert w.count == 65 and w.rebuilds == 1
        w.remove(new[0])
        assert not r.contains_many([new[0]]).any() and r.contains_many(new[1:]).all()
        assert not w.replace_all([os.urandom(16) for _ in range(200)])  # > 3/4 full
        assert r.contains_many(new[1:]).all() and w.full_refusals == 1  # left as it was
        assert w.replace_all([]) and w.count == 0 and not r.contains_many(new).any()
    finally:
        r.close()
        w.close()


def test_lower_mode_is_read_as_written_and_unknown_values_mean_ask(name: str) -> None:
    w = ShmIndexWriter(name, 256)
    r = ShmIndexReader(name)
    try:
        assert r.lower_mode == S.LOWER_NONE and not r.lower_tiers
        w.set_lower_mode(S.LOWER_LISTED)
        assert r.lower_mode == S.LOWER_LISTED and r.lower_tiers  # older readers: ask
        w.set_lower_tiers(True)
        assert r.lower_mode == S.LOWER_ASK
        w._w[S._LOWER] = 7  # a newer writer's value this reader does not know
        assert r.lower_mode == S.LOWER_ASK
        with pytest.raises(ValueError):
            w.set_lower_mode(3)
        assert S.listing_name(name) != name
    finally:
        r.close()
        w.close()
