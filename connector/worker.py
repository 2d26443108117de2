"""Worker side of the connector: moves chunks between vLLM's paged KV cache and the
agent's arena.

A chunk's payload is, for each layer in a fixed order (sorted layer names), the bytes
of the chunk's blocks of that layer as ``kvnode.kernels.copy.gather`` writes them:

    [layer 0: block 0 .. block n-1][layer 1: block 0 .. block n-1] ...

Loads: pin -> copy -> checksum THE COPY -> release. The checksum is of the bytes that
went into vLLM's cache (or of the private staging buffer they go through), never of the
arena before a copy: bytes that change in the arena after the check would otherwise be
loaded unverified. A chunk that is missing, has the wrong size or fails its checksum is
reported to vLLM as load errors (vLLM recomputes those blocks); a chunk that failed its
checksum in an unchanged mapping is dropped at the agent.
Saves: reserve (EXISTS: someone has it, skip) -> copy into the slot -> commit with the
checksum of the source the slot was written from. Whole blocks only: the CPU backend's
block slab is not token-separable.

Every copy runs inside ``ArenaMapping.use(epoch)`` with the epoch read before the call
that granted the slots: a remap (agent restart) in between makes the slots stale, and
the chunks are recomputed (loads) or not committed (saves), with nothing dropped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvnode.connector.counters import Counters
from kvnode.connector.scheduler import ChunkOp
from kvnode.errors import AgentError, KVNodeError
from kvnode.ipc.checksum import checksum
from kvnode.ipc.protocol import Status
from kvnode.kernels import hostcopy
from kvnode.kernels.copy import gather, gather_layers, scatter, scatter_layers
from kvnode.kernels.hostmem import ArenaMapping, StaleMapping
from kvnode.kernels.layout import KVLayout, detect_layout, physical_blocks

log = logging.getLogger("kvnode.connector")
STORED_KEPT_MAX = 4096  # committed chunks kept for the connector's event hook


@dataclass(slots=True)
class WorkerStats(Counters):
    load_chunks: int = 0
    load_bytes: int = 0
    load_s: float = 0.0
    load_errors: int = 0
    load_misses: int = 0
    load_stale: int = 0  # chunks not loaded: the arena was remapped since their pin
    checksum_errors: int = 0
    save_chunks: int = 0
    save_bytes: int = 0
    save_s: float = 0.0
    save_exists: int = 0
    save_no_space: int = 0
    save_errors: int = 0
    save_stale: int = 0  # chunks not committed: the arena was remapped since their reserve
    save_wait_s: float = 0.0  # time the forward pass spent in wait_for_save
    save_layer_s: float = 0.0  # ... and in save_kv_layer (agent mode: handing saves over)
    # Time the forward pass spent on loads: in start_load_kv (worker mode copies there)
    # and in wait_for_layer_load (agent mode waits there for each layer's bytes).
    load_wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """What a worker's KV cache looks like, for the chunk namespace."""

    layout: str
    block_shape: tuple[int, ...]  # (num_layers, *shape of one block of one layer)
    dtype: str


@dataclass(frozen=True, slots=True)
class _Layer:
    name: str
    kv: torch.Tensor
    layout: KVLayout
    offset: int  # of this layer's region in a full chunk's payload
    blocks: Any  # CPU caches: numpy uint8 view [num_blocks, ...] of kv (None on a GPU)


class WorkerSide:
    def __init__(
        self,
        link: Any,
        rank_index: int,
        num_blocks: int,
        block_size: int,
        blocks_per_chunk: int,
        *,
        arena: ArenaMapping,
        keys_per_call_max: int = 4096,
        keep_stored: bool = False,
    ) -> None:
        self.link = link
        self.keep_stored = keep_stored  # remember committed chunks for take_stored()
        self.arena = arena
        self.rank = rank_index
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.bpc = blocks_per_chunk
        self.keys_per_call_max = keys_per_call_max
        self.layers: list[_Layer] = []
        self.layer_nbytes = 0  # bytes of one block summed over layers
        self.chunk_nbytes = 0
        self.stats = WorkerStats()
        self._load_errors: set[int] = set()
        self._staging: torch.Tensor | None = None
        self.on_cpu = True
        self.shared_layout: KVLayout | None = None
        self._direct = False  # CPU cache whose block runs are contiguous: no staging
        # Chunks committed since the connector last took them (vLLM's KV events, when
        # ``keep_stored``); a connector that never takes them keeps only the latest.
        self._stored: deque[ChunkOp] = deque(maxlen=STORED_KEPT_MAX)
        # Commits are sent without waiting; their answers land here (from whichever
        # thread reads them) and are counted by this thread in _settle().
        self._answers: deque[tuple[list[ChunkOp], list[Status] | None]] = deque()

    # ------------------------------------------------------------------ setup
    def register(
        self, kv_caches: dict[str, torch.Tensor], backend: str | None = None
    ) -> CacheLayout:
        layers: list[_Layer] = []
        offset = 0
        shapes: set[tuple[int, ...]] = set()
        names: set[str] = set()
        dtypes: set[str] = set()
        for name in sorted(kv_caches):
            kv = kv_caches[name]
            layout = detect_layout(kv, self.num_blocks, self.block_size, backend)
            blocks = physical_blocks(kv, layout).numpy() if kv.device.type == "cpu" else None
            layers.append(_Layer(name, kv, layout, offset, blocks))
            offset += self.bpc * layout.block_nbytes
            shape = list(kv.shape)
            del shape[layout.block_dim]
            shapes.add(tuple(shape))
            names.add(layout.name)
            dtypes.add(str(kv.dtype).removeprefix("torch."))
        if not layers:
            raise ValueError("register_kv_caches got no layers")
        self.layers = layers
        self.on_cpu = all(layer.kv.device.type == "cpu" for layer in layers)
        self._direct = self.on_cpu and all(layer.blocks.flags.c_contiguous for layer in layers)
        # One layout for every layer: device caches move a whole chunk in one host copy.
        self.shared_layout = (
            layers[0].layout if len({layer.layout for layer in layers}) == 1 else None
        )
        self.chunk_nbytes = offset
        self.layer_nbytes = offset // self.bpc
        # Mixed layers (e.g. hybrid models) are named by the sorted set of parts.
        return CacheLayout(
            layout="+".join(sorted(names)),
            block_shape=(len(layers), *(d for s in sorted(shapes) for d in s)),
            dtype="+".join(sorted(dtypes)),
        )

    def _staging_buffer(self) -> torch.Tensor:
        """A private host buffer of one chunk: nobody else writes it between the copy
        and the checksum. Pinned on a GPU host, so its device copies are DMA."""
        if self._staging is None:
            pin = not self.on_cpu and torch.cuda.is_available()
            self._staging = torch.empty(self.chunk_nbytes, dtype=torch.uint8, pin_memory=pin)
        return self._staging

    def _views(self, arena: memoryview, slot: Any) -> list[memoryview]:
        return [arena[off : off + n] for off, n in slot.extents]

    def _direct_op(self, op: ChunkOp, views: list[memoryview]) -> bool:
        """A whole chunk of a CPU cache into or out of one extent: copied straight
        between the arena and the cache, and checksummed in the cache."""
        return self._direct and len(views) == 1 and op.block_offset == 0

    def _cache_parts(self, block_ids: Sequence[int]) -> list[np.ndarray]:
        """The cache's bytes of ``block_ids`` for every layer, in payload order."""
        parts: list[np.ndarray] = []
        for layer in self.layers:
            got = hostcopy.block_parts(layer.blocks, block_ids)
            assert got is not None, "register() checked the layers are contiguous"
            parts.extend(got)
        return parts

    # ------------------------------------------------------------------ loads
    def take_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def load(self, loads: dict[str, list[ChunkOp]]) -> None:
        if not loads or not self.layers:
            return
        t0 = time.perf_counter()
        self._settle()
        work = [(rid, op) for rid, ops in loads.items() for op in ops]
        failed_from: dict[str, int] = {}  # req_id -> index of its first failed chunk
        try:
            self.link.call(lambda c: self._load_with(c, work, failed_from))
        except KVNodeError as exc:
            log.warning("kvnode load failed (%s); vLLM recomputes", exc)
            for rid, op in work:
                failed_from[rid] = min(failed_from.get(rid, op.index), op.index)
        # A request's chunks after a failed one are reported too: they were not
        # loaded, and vLLM recomputes from the first bad block anyway.
        for rid, op in work:
            if rid in failed_from and op.index >= failed_from[rid]:
                self._load_errors.update(op.block_ids)
        if failed_from:
            self.stats.load_errors += len(failed_from)
        self.stats.load_s += time.perf_counter() - t0

    def _pin(self, client: Any, keys: list[bytes]) -> list[tuple[int, Any]]:
        answers: list[tuple[int, Any]] = []
        for i in range(0, len(keys), self.keys_per_call_max):
            answers.extend(client.pin(keys[i : i + self.keys_per_call_max]))
        return answers

    def _load_with(
        self, client: Any, work: list[tuple[str, ChunkOp]], failed_from: dict[str, int]
    ) -> None:
        keys = [op.keys[self.rank] for _, op in work]
        epoch = self.arena.epoch  # before the pins: their slots belong to this mapping
        answers = self._pin(client, keys)
        pinned = [k for k, (s, _) in zip(keys, answers, strict=True) if s == Status.OK]
        bad: list[bytes] = []
        try:
            with self.arena.use(epoch) as arena:
                bad = self._copy_in(arena, work, answers, failed_from)
        except StaleMapping as exc:
            # The arena was remapped since the epoch was read: the entries are not known
            # to be bad. Recompute; drop nothing.
            log.info("kvnode: %s; recomputing %d chunk(s)", exc, len(work))
            self.stats.load_stale += len(work)
            for rid, op in work:
                failed_from[rid] = min(failed_from.get(rid, op.index), op.index)
            return
        finally:
            # Released whatever the mapping: the pins may belong to the registration
            # the client holds now (it registered again between the epoch and the pin),
            # and a release is never resent, so pins of an earlier one are left alone.
            if pinned:
                self._quietly(client.release, pinned)
        if bad and self.arena.epoch == epoch:
            self._quietly(client.drop, bad)

    def _copy_in(
        self,
        arena: memoryview,
        work: list[tuple[str, ChunkOp]],
        answers: list[tuple[int, Any]],
        failed_from: dict[str, int],
    ) -> list[bytes]:
        """Copy and verify each pinned chunk; returns the keys of bad entries."""
        bad: list[bytes] = []
        for (rid, op), (status, slot) in zip(work, answers, strict=True):
            if rid in failed_from:
                continue
            if status != Status.OK or slot is None:
                self.stats.load_misses += 1
                failed_from[rid] = op.index
                continue
            if not self._load_one(arena, op, slot):
                failed_from[rid] = op.index
                bad.append(op.keys[self.rank])
        return bad

    def _load_one(self, arena: memoryview, op: ChunkOp, slot: Any) -> bool:
        key = op.keys[self.rank].hex()
        if slot.size != self.chunk_nbytes:
            log.warning("kvnode: chunk %s has %d bytes, want %d", key, slot.size, self.chunk_nbytes)
            return False
        views = self._views(arena, slot)
        if self._direct_op(op, views):
            got = self._load_direct(views[0], op)
        else:
            got = self._load_staged(views, op)
        if slot.checksum == 0 or got != slot.checksum:
            log.warning("kvnode: chunk %s failed its checksum; recomputing", key)
            self.stats.checksum_errors += 1
            return False
        self.stats.load_chunks += 1
        self.stats.load_bytes += len(op.block_ids) * self.layer_nbytes
        return True

    def _load_direct(self, extent: memoryview, op: ChunkOp) -> int:
        """Arena -> cache, then the checksum of what landed in the cache."""
        src = np.frombuffer(extent, dtype=np.uint8, count=self.chunk_nbytes)
        for layer in self.layers:
            region = src[layer.offset : layer.offset + self.bpc * layer.layout.block_nbytes]
            hostcopy.blocks_in(
                region.reshape(self.bpc, *layer.blocks.shape[1:]), layer.blocks, op.block_ids
            )
        return checksum(self._cache_parts(op.block_ids))

    def _load_staged(self, views: list[memoryview], op: ChunkOp) -> int:
        """Arena -> private staging, checksum of the staging, staging -> cache."""
        payload = self._staging_buffer()
        hostcopy.read_extents(views, payload)
        got = checksum(payload.numpy())
        n = len(op.block_ids)
        if op.block_offset == 0 and n == self.bpc and not self.on_cpu and self.shared_layout:
            kvs = [layer.kv for layer in self.layers]
            scatter_layers(payload, kvs, self.shared_layout, list(op.block_ids))
            return got
        for layer in self.layers:
            nb = layer.layout.block_nbytes
            a = layer.offset + op.block_offset * nb
            scatter(payload[a : a + n * nb], layer.kv, layer.layout, list(op.block_ids))
        return got

    def _quietly(self, fn: Any, keys: list[bytes]) -> None:
        """release/drop whose error reply must not undo the chunks already loaded.
        Sent without waiting for the reply: nothing in it changes what the load does
        next, and a load ends one round trip sooner (errors are logged by the client)."""
        if not keys:
            return
        try:
            fn(keys, wait=False)
        except AgentError as exc:
            log.warning("kvnode: %s of %d chunk(s) refused: %s", fn.__name__, len(keys), exc)
        except KVNodeError as exc:  # agent gone: it dropped the connection's pins itself
            log.info("kvnode: %s of %d chunk(s) not sent: %s", fn.__name__, len(keys), exc)

    # ------------------------------------------------------------------ saves
    def save(self, saves: dict[str, list[ChunkOp]]) -> None:
        if not saves or not self.layers:
            return
        t0 = time.perf_counter()
        self._settle()
        ops = [op for ops in saves.values() for op in ops]
        try:
            for i in range(0, len(ops), self.keys_per_call_max):
                part = ops[i : i + self.keys_per_call_max]
                self.link.call(lambda c, part=part: self._save_with(c, part))
        except KVNodeError as exc:
            self.stats.save_errors += 1
            log.debug("kvnode save failed: %s", exc)
        self.stats.save_s += time.perf_counter() - t0

    def _save_with(self, client: Any, ops: list[ChunkOp]) -> None:
        for op in ops:
            if len(op.block_ids) != self.bpc or op.block_offset != 0:
                raise ValueError(f"saves are whole chunks, got {op}")
        keys = [op.keys[self.rank] for op in ops]
        epoch = self.arena.epoch  # before the reserve: its slots belong to this mapping
        sizes = [self.chunk_nbytes] * len(keys)
        if ops and len(ops[0].keys) > 1:
            # One group per chunk across ranks (named by rank 0's key): the agent evicts
            # and drops a chunk's rank entries together, so none stays as an orphan.
            answers = client.reserve(keys, sizes, [op.keys[0] for op in ops])
        else:
            answers = client.reserve(keys, sizes)
        held = [k for k, (s, _) in zip(keys, answers, strict=True) if s == Status.OK]
        try:
            with self.arena.use(epoch) as arena:
                done, sums = self._copy_out(arena, ops, answers)
        except StaleMapping:
            # Remapped since the epoch was read: nothing is committed. The reservations
            # may be the current registration's (see _load_with): abort them.
            self.stats.save_stale += len(held)
            self._quietly(client.abort, held)
            return
        except BaseException:
            self._quietly(client.abort, held)
            raise
        if done and self.arena.epoch != epoch:
            self.stats.save_stale += len(done)
            done = []  # written into a mapping that is gone: never committed
        written = {op.keys[self.rank] for op in done}
        leftover = [k for k in held if k not in written]
        if leftover:
            self._quietly(client.abort, leftover)
        if done:
            self._commit(client, done, sums)

    def _commit(self, client: Any, done: list[ChunkOp], sums: list[int]) -> None:
        """Commit the written chunks with their parents and tokens (the agent's KV
        events), without waiting: the answer is counted (and the committed chunks kept
        for vLLM's own event stream) when it is read; see ``_settle``."""
        r = self.rank
        client.commit_async(
            [op.keys[r] for op in done],
            sums,
            parents=[op.parents[r] if op.parents else b"" for op in done],
            tokens=[op.tokens for op in done],
            on_done=lambda statuses: self._answers.append((done, statuses)),
        )

    def _settle(self, wait: bool = False) -> None:
        """Count the commit answers read so far; with ``wait``, first read those still
        on their way (bounded by the client's timeout)."""
        if wait:
            try:
                self.link.call(lambda c: c.flush())
            except KVNodeError:
                pass  # the link went down: its client answered the rest with None
        while self._answers:
            done, statuses = self._answers.popleft()
            if statuses is None:  # refused, or the connection went: unconfirmed
                self.stats.save_errors += len(done)
                continue
            ok = [op for op, s in zip(done, statuses, strict=True) if s == Status.OK]
            self.stats.save_chunks += len(ok)
            self.stats.save_bytes += len(ok) * self.chunk_nbytes
            self.stats.save_errors += len(done) - len(ok)
            if self.keep_stored:
                self._stored.extend(ok)

    def take_stats(self, wait: bool = False) -> dict[str, float]:
        """The figures since the last call. Commits whose answer has not been read yet
        count at a later call, unless ``wait``."""
        self._settle(wait)
        return self.stats.take()

    def note_stored(self, ops: Iterable[ChunkOp]) -> None:
        """Chunks stored for this worker by someone else (the agent, in agent mode)."""
        if self.keep_stored:
            self._stored.extend(ops)

    def take_stored(self) -> list[ChunkOp]:
        """Chunks committed since the last call (at most ``STORED_KEPT_MAX``): the
        step's commit answers are waited for, so its events go out with the step."""
        self._settle(wait=True)
        out = list(self._stored)
        self._stored.clear()
        return out

    def _copy_out(
        self, arena: memoryview, ops: list[ChunkOp], answers: list[Any]
    ) -> tuple[list[ChunkOp], list[int]]:
        done: list[ChunkOp] = []
        sums: list[int] = []
        for op, (status, slot) in zip(ops, answers, strict=True):
            if status == Status.EXISTS:
                self.stats.save_exists += 1
            elif status != Status.OK or slot is None:
                self.stats.save_no_space += 1
            else:
                sums.append(self._save_one(self._views(arena, slot), op))
                done.append(op)
        return done, sums

    def _save_one(self, views: list[memoryview], op: ChunkOp) -> int:
        """Write one chunk into its slot; returns the checksum of the source written."""
        if self._direct_op(op, views):
            dst = np.frombuffer(views[0], dtype=np.uint8, count=self.chunk_nbytes)
            for layer in self.layers:
                region = dst[layer.offset : layer.offset + self.bpc * layer.layout.block_nbytes]
                hostcopy.blocks_out(
                    layer.blocks, op.block_ids, region.reshape(self.bpc, *layer.blocks.shape[1:])
                )
            return checksum(self._cache_parts(op.block_ids))
        payload = self._staging_buffer()
        if not self.on_cpu and self.shared_layout is not None:
            kvs = [layer.kv for layer in self.layers]
            gather_layers(kvs, self.shared_layout, list(op.block_ids), payload)
        else:
            for layer in self.layers:
                part = payload[layer.offset : layer.offset + self.bpc * layer.layout.block_nbytes]
                gather(layer.kv, layer.layout, list(op.block_ids), part)
        hostcopy.write_extents(payload, views)
        return checksum(payload.numpy())
