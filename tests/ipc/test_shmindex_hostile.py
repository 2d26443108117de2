"""The shared lookup index against a same-user process that writes into it: every word
read from the segment is bounded before use, so a corrupt header or table makes the
reader say "ask the agent" (ArenaError) and the writer carry on, never allocate without
bound, loop for ever or raise anything else."""

from __future__ import annotations

import mmap
import os
import uuid
from collections.abc import Iterator

import numpy as np
import posix_ipc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvnode.errors import ArenaError
from kvnode.ipc import shmindex as S
from kvnode.ipc.shmindex import ShmIndexReader, ShmIndexWriter, fingerprint


@pytest.fixture
def name() -> Iterator[str]:
    n = f"/kvnode-test-hostile-{uuid.uuid4().hex[:12]}"
    yield n
    S._unlink(n)


def hostile_view(name: str) -> tuple[mmap.mmap, memoryview]:
    """What any process of the agent's user can do: map the segment read-write."""
    shm = posix_ipc.SharedMemory(name, 0)
    try:
        buf = mmap.mmap(shm.fd, shm.size, mmap.MAP_SHARED)
    finally:
        shm.close_fd()
    return buf, memoryview(buf).cast("Q")


def test_huge_probe_length_is_refused_not_allocated(name: str) -> None:
    w = ShmIndexWriter(name, 1024)
    keys = [os.urandom(16) for _ in range(100)]
    for k in keys:
        w.insert(k)
    r = ShmIndexReader(name)
    buf, words = hostile_view(name)
    try:
        assert r.contains_many(keys).all()
        words[S._PROBE_MAX] = 1 << 40  # 8 TiB of offsets per key if believed
        with pytest.raises(ArenaError, match="probe length"):
            r.contains_many(keys)
        words[S._PROBE_MAX] = S.PROBE_LIMIT + 1  # within the table, past what is laid out
        with pytest.raises(ArenaError):
            r.contains_many(keys)
    finally:
        words.release()
        buf.close()
        r.close()
        w.close()


def test_header_out_of_range_is_not_a_usable_index(name: str) -> None:
    w = ShmIndexWriter(name, 1024)
    buf, words = hostile_view(name)
    try:
        words[S._PID] = (1 << 64) - 1  # os.kill() of this would raise OverflowError
        r = ShmIndexReader(name)
        with pytest.raises(ArenaError):
            r.contains_many([os.urandom(16)])
        r.close()
        for cap in (0, 3, 1 << 50, 1 << 20):  # not a power of two, too big, past the end
            words[S._CAPACITY] = cap
            with pytest.raises(ArenaError, match="layout"):
                ShmIndexReader(name)
    finally:
        words.release()
        buf.close()
        w.close()


def test_table_filled_by_another_process_neither_hangs_the_writer_nor_the_reader(
    name: str,
) -> None:
    w = ShmIndexWriter(name, 4096)
    r = ShmIndexReader(name)
    buf, words = hostile_view(name)
    tables = np.frombuffer(buf, "<u8", offset=S.HEADER_BYTES).reshape(2, 2, 4096)
    try:
        tables[0, 1] = 7  # every slot another key's: no free slot anywhere
        key = os.urandom(16)
        assert w.insert(key) is False  # none within reach: not published, no endless probe
        assert w.probe_refusals == 1
        tables[0, 1] = S.TOMB  # every slot a tombstone: no probe chain ever ends
        words[S._PROBE_MAX] = S.PROBE_LIMIT
        assert r.contains_many([key, os.urandom(16)]).tolist() == [False, False]
        assert w.remove(key) is False
    finally:
        del tables
        words.release()
        buf.close()
        r.close()
        w.close()


def test_writer_does_not_publish_chains_past_the_probe_limit(name: str) -> None:
    """Keys are chosen by clients: many with one home would make every reader probe
    far. Past PROBE_LIMIT the writer leaves a key out (a lost hit) instead."""
    cap = 4096
    shift = S._home_shift(cap)
    base = int.from_bytes(os.urandom(8), "little") | 2
    # fingerprints with the same home: multiples of 2**64 / GOLDEN spacing are hard to
    # make; search instead, cheaply, over sequential low words
    same: list[bytes] = []
    target = S._home(fingerprint(base.to_bytes(8, "little") + bytes(8)), shift)
    i = 0
    while len(same) < S.PROBE_LIMIT + 40:
        k = (base + i).to_bytes(8, "little", signed=False) if base + i < 1 << 64 else bytes(8)
        i += 1
        if S._home(fingerprint(k + bytes(8)), shift) == target:
            same.append(k + bytes(8))
    w = ShmIndexWriter(name, cap)
    r = ShmIndexReader(name)
    try:
        published = [k for k in same if w.insert(k)]
        assert len(published) == S.PROBE_LIMIT + 1 and w.probe_refusals == 39
        assert w.probe_max == S.PROBE_LIMIT
        assert r.contains_many(published).all()
        w._rebuild()  # a rebuild keeps the limit too
        assert w.probe_max <= S.PROBE_LIMIT and r.contains_many(published).all()
        w.replace_all(same)
        assert w.probe_max <= S.PROBE_LIMIT and w.probe_refusals == 39 * 2
        assert r.contains_many(same).sum() == S.PROBE_LIMIT + 1
    finally:
        r.close()
        w.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 15), st.integers(0, (1 << 64) - 1)), max_size=6))
def test_any_header_words_give_an_answer_or_arena_error(writes: list[tuple[int, int]]) -> None:
    n = f"/kvnode-test-hostile-{uuid.uuid4().hex[:12]}"
    w = ShmIndexWriter(n, 256)
    try:
        keys = [os.urandom(16) for _ in range(50)]
        for k in keys:
            w.insert(k)
        buf, words = hostile_view(n)
        try:
            for word, value in writes:
                words[word] = value
            try:
                r = ShmIndexReader(n)
            except ArenaError:
                return
            try:
                got = r.contains_many(keys)
                assert got.dtype == bool and got.shape == (50,)
            except ArenaError:
                pass
            finally:
                r.close()
        finally:
            words.release()
            buf.close()
    finally:
        w.close()


def test_fence_is_callable_from_many_threads() -> None:
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(2000):
                S.fence()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("seq", [(1 << 64) - 1, (1 << 64) - 2, (1 << 64) - 3])
def test_a_header_seq_at_the_top_of_its_range_wraps_for_the_writer(seq: int) -> None:
    """Found by the property test above: a header seq scribbled to 2**64-1 made the
    writer's next flip and its close raise (the word cannot hold seq + 1)."""
    n = f"/kvnode-test-hostile-{uuid.uuid4().hex[:12]}"
    w = ShmIndexWriter(n, 256)
    keys = [os.urandom(16) for _ in range(50)]
    try:
        buf, words = hostile_view(n)
        try:
            words[4] = seq  # _HSEQ
            for k in keys:
                w.insert(k)
            w.replace_all(keys[:10])  # a rebuild: the header seqlock turns over
            r = ShmIndexReader(n)
            try:
                assert r.contains_many(keys[:10]).all()
            finally:
                r.close()
            assert words[4] % 2 == 0  # even again: readers see a stable header
        finally:
            words.release()
            buf.close()
    finally:
        w.close()
