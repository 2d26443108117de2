"""Worker-side copies with real CPU tensors and the real kernels, against an in-memory
arena: save then load round-trips, partial-chunk loads, checksum failures, misses, a
writer that changes the arena during a load, and one host copy path (numpy)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvnode.connector.scheduler import ChunkOp
from kvnode.connector.worker import WorkerSide
from kvnode.errors import AgentUnavailable
from kvnode.ipc.checksum import checksum
from kvnode.ipc.protocol import Slot, Status
from kvnode.kernels.hostmem import ArenaMapping

NUM_BLOCKS, BS, HEADS, HEAD = 16, 4, 2, 8
BPC = 2  # blocks per chunk


class ArenaClient:
    """Committed entries in one bytearray; ``split`` makes slots of two extents. Like
    the real client it tells its ``arena`` hooks of the mapping."""

    def __init__(self, split: bool = False) -> None:
        self.buffer = bytearray(1 << 20)
        self.arena = ArenaMapping(prepare=lambda buf: None)
        self.arena.on_map(self.buffer)
        self.top = 0
        self.entries: dict[bytes, list[Any]] = {}  # key -> [slot, committed]
        self.split = split
        self.pinned: list[bytes] = []
        self.dropped: list[bytes] = []
        self.commits: list[tuple[list[bytes], Any, Any]] = []  # (keys, parents, tokens)
        self.unanswered: list[tuple[Any, list[int]]] = []  # commit_async answers not read

    def _alloc(self, n: int) -> list[tuple[int, int]]:
        if not self.split:
            off, self.top = self.top, self.top + n
            return [(off, n)]
        half = n // 2
        a, self.top = self.top, self.top + half + 64  # a gap: not contiguous
        b, self.top = self.top, self.top + n - half
        return [(a, half), (b, n - half)]

    def reserve(self, keys: list[bytes], sizes: list[int]) -> list[tuple[int, Any]]:
        out: list[tuple[int, Any]] = []
        for k, n in zip(keys, sizes, strict=True):
            if k in self.entries:
                out.append((Status.EXISTS, None))
                continue
            self.entries[k] = [Slot(n, self._alloc(n)), False]
            out.append((Status.OK, self.entries[k][0]))
        return out

    def views(self, slot: Slot) -> list[memoryview]:
        mv = memoryview(self.buffer)
        return [mv[o : o + n] for o, n in slot.extents]

    def commit(
        self,
        keys: list[bytes],
        checksums: list[int],
        parents: list[bytes] | None = None,
        tokens: list[Any] | None = None,
    ) -> list[int]:
        self.commits.append((list(keys), parents, tokens))
        for k, c in zip(keys, checksums, strict=True):
            self.entries[k][1] = True
            self.entries[k][0].checksum = c
        return [Status.OK] * len(keys)

    def commit_async(
        self,
        keys: list[bytes],
        checksums: list[int],
        parents: list[bytes] | None = None,
        tokens: list[Any] | None = None,
        on_done: Any = None,
    ) -> None:
        # Applied at once, as the agent does; the answer is read later (flush).
        statuses = self.commit(keys, checksums, parents, tokens)
        self.unanswered.append((on_done, statuses))

    def flush(self, timeout_s: float | None = None) -> bool:
        while self.unanswered:
            on_done, statuses = self.unanswered.pop(0)
            on_done(statuses)
        return True

    def abort(self, keys: list[bytes]) -> None:
        for k in keys:
            self.entries.pop(k, None)

    def pin(self, keys: list[bytes]) -> list[tuple[int, Any]]:
        out: list[tuple[int, Any]] = []
        for k in keys:
            e = self.entries.get(k)
            if e is not None and e[1]:
                self.pinned.append(k)
                out.append((Status.OK, e[0]))
            else:
                out.append((Status.NOT_FOUND, None))
        return out

    def release(self, keys: list[bytes], wait: bool = True) -> None:
        for k in keys:
            self.pinned.remove(k)

    def drop(self, keys: list[bytes], wait: bool = True) -> None:
        self.dropped.extend(keys)
        for k in keys:
            self.entries.pop(k, None)


class Link:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.down = False

    def call(self, fn: Any) -> Any:
        if self.down:
            raise AgentUnavailable("down")
        return fn(self.client)


def caches(seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # The CPU backend's layout: [num_blocks, heads, block_size, 2 * head_size].
    return {
        f"model.layers.{i}.self_attn.attn": torch.randn(
            NUM_BLOCKS, HEADS, BS, 2 * HEAD, generator=g
        ).to(device)
        for i in range(3)
    }


def worker(link: Link, kv: dict[str, torch.Tensor]) -> WorkerSide:
    w = WorkerSide(link, 0, NUM_BLOCKS, BS, BPC, arena=link.client.arena)
    hs = w.register(kv)
    assert hs.layout == "cpu" and hs.block_shape == (3, HEADS, BS, 2 * HEAD)
    return w


def op(i: int, blocks: tuple[int, ...], offset: int = 0) -> ChunkOp:
    return ChunkOp(i, (bytes([i]) * 16,), blocks, offset)


def _roundtrip(split: bool, device: str = "cpu") -> None:
    link = Link(ArenaClient(split=split))
    src_kv, dst_kv = caches(1, device), caches(2, device)
    src, dst = worker(link, src_kv), worker(link, dst_kv)
    src.save({"r": [op(0, (3, 7)), op(1, (8, 9))]})
    assert src.take_stats(wait=True)["save_chunks"] == 2
    # Saving again: the agent has them (EXISTS), nothing is written.
    src.save({"r": [op(0, (3, 7))]})
    assert src.stats.save_exists == 1
    # Load into other blocks; the second chunk only from its second block on.
    dst.load({"q": [op(0, (1, 2)), op(1, (5,), 1)]})
    assert dst.take_load_errors() == set()
    assert link.client.pinned == []
    for name in src_kv:
        assert torch.equal(dst_kv[name][1], src_kv[name][3])
        assert torch.equal(dst_kv[name][2], src_kv[name][7])
        assert torch.equal(dst_kv[name][5], src_kv[name][9])


def test_save_load_roundtrip() -> None:
    _roundtrip(split=False)


def test_save_load_roundtrip_multi_extent_slots() -> None:
    _roundtrip(split=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU")
@pytest.mark.parametrize("split", [False, True])
def test_save_load_roundtrip_gpu_caches(split: bool) -> None:
    # A GPU cache takes the kernels' path (device <-> host) instead of numpy memcpy.
    _roundtrip(split=split, device="cuda")


def test_corrupt_chunk_is_an_error_and_dropped() -> None:
    link = Link(ArenaClient())
    src_kv, dst_kv = caches(1), caches(2)
    before = {k: v.clone() for k, v in dst_kv.items()}
    src, dst = worker(link, src_kv), worker(link, dst_kv)
    src.save({"r": [op(0, (3, 7)), op(1, (8, 9)), op(2, (10, 11))]})
    slot = link.client.entries[op(1, ()).keys[0]][0]
    off = slot.extents[0][0]
    link.client.buffer[off + 10] ^= 0xFF
    dst.load({"q": [op(0, (1, 2)), op(1, (4, 5)), op(2, (6, 12))]})
    # Chunk 1 failed; chunk 2 after it is not loaded and reported too.
    assert dst.take_load_errors() == {4, 5, 6, 12}
    assert dst.stats.checksum_errors == 1 and dst.stats.load_chunks == 1
    assert link.client.dropped == [op(1, ()).keys[0]]
    assert link.client.pinned == []
    for name in dst_kv:
        assert torch.equal(dst_kv[name][1], src_kv[name][3])
        assert torch.equal(dst_kv[name][6], before[name][6])


def test_missing_chunk_and_dead_agent_are_load_errors() -> None:
    link = Link(ArenaClient())
    dst = worker(link, caches(2))
    dst.load({"q": [op(0, (1, 2))], "p": [op(5, (3, 4))]})
    assert dst.take_load_errors() == {1, 2, 3, 4}
    link.down = True
    dst.load({"q": [op(0, (1, 2))]})
    assert dst.take_load_errors() == {1, 2}
    dst.save({"q": [op(0, (1, 2))]})  # a save to a dead agent is dropped, not raised
    assert dst.stats.save_errors == 1


def _entry_bytes(link: Link, key: bytes) -> list[memoryview]:
    slot = link.client.entries[key][0]
    return [memoryview(link.client.buffer)[o : o + n] for o, n in slot.extents]


def _scribble(views: list[memoryview]) -> None:
    """A writer that rewrites an entry in place (e.g. a slot reused after its pin was
    reclaimed): every byte changes."""
    for v in views:
        v[:] = bytes(b ^ 0x5A for b in v)


@pytest.mark.parametrize("split", [False, True])
def test_writer_between_copy_and_checksum_is_never_loaded(
    split: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The arena changes right after the worker's checksum has read its input: what
    vLLM gets must be exactly what the checksum covered (the original bytes)."""
    import kvnode.connector.worker as worker_mod

    link = Link(ArenaClient(split=split))
    src_kv, dst_kv = caches(1), caches(2)
    src, dst = worker(link, src_kv), worker(link, dst_kv)
    src.save({"r": [op(0, (3, 7))]})
    target = _entry_bytes(link, op(0, ()).keys[0])

    def checksum_then_writer(parts: Any) -> int:
        value = checksum(parts)
        _scribble(target)
        return value

    monkeypatch.setattr(worker_mod, "checksum", checksum_then_writer)
    dst.load({"q": [op(0, (1, 2))]})
    errors = dst.take_load_errors()
    if errors:  # rejected: fine, vLLM recomputes
        assert errors == {1, 2}
        return
    for name in src_kv:
        assert torch.equal(dst_kv[name][1], src_kv[name][3]), "changed bytes were loaded"
        assert torch.equal(dst_kv[name][2], src_kv[name][7]), "changed bytes were loaded"


def test_writer_during_the_copy_is_a_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The arena changes while the chunk is being copied (after its first layer): the
    checksum of the copy fails, the load is an error, vLLM recomputes."""
    from kvnode.kernels import hostcopy

    link = Link(ArenaClient())
    src_kv, dst_kv = caches(1), caches(2)
    src, dst = worker(link, src_kv), worker(link, dst_kv)
    src.save({"r": [op(0, (3, 7))]})
    target = _entry_bytes(link, op(0, ()).keys[0])
    real = hostcopy.blocks_in
    calls = []

    def copy_then_writer(*args: Any, **kw: Any) -> None:
        real(*args, **kw)
        calls.append(1)
        if len(calls) == 1:
            _scribble(target)

    monkeypatch.setattr(hostcopy, "blocks_in", copy_then_writer)
    dst.load({"q": [op(0, (1, 2))]})
    assert len(calls) == 3, "one copy per layer"
    assert dst.take_load_errors() == {1, 2}
    assert dst.stats.checksum_errors == 1 and dst.stats.load_errors == 1
    assert dst.stats.load_chunks == 0


@pytest.mark.parametrize("split", [False, True])
def test_cpu_copies_never_use_torch_copy(split: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """One host copy path (kvnode.kernels.hostcopy, numpy memcpy): torch's copy_ stalls
    beside vLLM's OpenMP team, so no CPU save or load may go through it, whatever the
    slot's extents."""

    def refuse(*args: Any, **kw: Any) -> None:
        raise AssertionError("torch copy_ on a CPU copy path")

    monkeypatch.setattr(torch.Tensor, "copy_", refuse)
    _roundtrip(split=split)


def test_commit_answers_are_counted_when_read() -> None:
    """Commits go out without waiting: a save counts them once their answer is read
    (at the next save or load, or when asked to wait), and an answer that never comes
    (the connection went) counts as an error, not as a stored chunk."""
    link = Link(ArenaClient())
    w = worker(link, caches(1))
    w.save({"r": [op(0, (3, 7)), op(1, (8, 9))]})
    assert w.stats.save_chunks == 0  # the answer has not been read yet
    link.client.flush()  # the client reads it (e.g. with the next call)...
    w.save({"r": [op(2, (10, 11))]})  # ...and the next save counts it
    assert w.stats.save_chunks == 2
    stats = w.take_stats(wait=True)
    assert stats["save_chunks"] == 3 and stats["save_errors"] == 0
    w.save({"r": [op(3, (12, 13))]})
    on_done, _ = link.client.unanswered.pop()
    on_done(None)  # refused, or the socket closed before the answer
    stats = w.take_stats()
    assert stats["save_chunks"] == 0 and stats["save_errors"] == 1
