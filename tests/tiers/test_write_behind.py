"""Write-behind: chunks committed while the disk has room and bandwidth reach it before
they are evicted, so a burst of stores later finds them clean instead of dropping them
unsaved. What is lost anyway is counted (``evict_unsaved``) and logged."""

from __future__ import annotations

import logging

from kvnode.agent.index import Outcome as Status
from kvnode.agent.tiers.disk import DiskStore
from kvnode.ipc.protocol import Lookup
from tests.tiers.test_manager import Harness, MiB, blob, key


def _disk(tmp_path) -> DiskStore:  # noqa: ANN001
    return DiskStore(str(tmp_path / "disk"), 64 * MiB, name="disk")


def test_chunks_stored_while_the_disk_was_idle_reach_it_before_a_burst(arena, tmp_path):
    disk = _disk(tmp_path)
    h = Harness(arena, {"disk": disk})
    first = [key(i) for i in range(8)]
    data = blob(1)
    for k in first:  # fills the 8 MiB arena
        assert h.put(k, data) is Status.OK
    h.settle()  # the loop is idle: the disk has room and time
    assert all(disk.size_of(k) == MiB for k in first)
    for i in range(8, 16):  # a burst: no loop pass between the stores
        assert h.put(key(i), blob(i)) is Status.OK
    assert h.index.counters.evict_unsaved == 0
    assert not any(k in h.index.entries for k in first)
    h.settle()
    assert h.lookup(first[0]) is Lookup.PENDING  # it comes back from the disk
    h.settle()
    assert h.lookup(first[0]) is Lookup.HIT and h.read(first[0]) == data


def test_what_the_disk_never_saw_is_counted_and_logged(arena, tmp_path, caplog):
    disk = _disk(tmp_path)
    h = Harness(arena, {"disk": disk})
    with caplog.at_level(logging.WARNING, logger="kvnode.tiers"):
        for i in range(24):  # a burst three arenas long, no loop pass at all
            assert h.put(key(i), blob(i)) is Status.OK
        h.settle()
    unsaved = h.index.counters.evict_unsaved
    assert unsaved > 0
    lines = [r.getMessage() for r in caplog.records if "before the lower tiers" in r.getMessage()]
    assert len(lines) == 1 and f"{unsaved} " in lines[0], lines  # one line per interval


def test_a_chunk_s3_admits_later_still_gets_its_copy_at_eviction(arena, tmp_path):
    from kvnode.agent.tiers.memory import MemoryStore

    disk, s3 = _disk(tmp_path), MemoryStore(64 * MiB, name="s3")
    h = Harness(arena, {"disk": disk, "s3": s3}, **{"s3.admit_min_hits": "2"})
    data = blob(1)
    assert h.put(key(0), data) is Status.OK
    h.settle()  # write-behind: on disk; S3 does not take it yet (no hits)
    assert disk.size_of(key(0)) == MiB and s3.size_of(key(0)) is None
    for _ in range(2):
        assert h.lookup(key(0)) is Lookup.HIT  # now S3 wants it
    h.evict_all()
    h.settle()
    assert s3.size_of(key(0)) == MiB
