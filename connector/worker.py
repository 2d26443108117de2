"""Worker side of the connector: moves chunks between vLLM's paged KV cache and the
agent's arena.

A chunk's payload is, for each layer in a fixed order (sorted layer names), the bytes
of the chunk's blocks of that layer as ``kvnode.kernels.copy.gather`` writes them:

    [layer 0: block 0 .. block n-1][layer 1: block 0 .. block n-1] ...

Loads: pin -> verify size and xxh3-64 checksum -> scatter -> release. A chunk that is
missing, has the wrong size or fails its checksum is reported to vLLM as load errors
(vLLM recomputes those blocks) and a bad entry is dropped at the agent.
Saves: reserve (EXISTS: someone has it, skip) -> gather into the slot -> commit with the
checksum. Whole blocks only: the CPU backend's block slab is not token-separable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvnode.connector.scheduler import ChunkOp
from kvnode.errors import KVNodeError
from kvnode.ipc.protocol import Status
from kvnode.kernels.copy import gather, gather_layers, scatter, scatter_layers
from kvnode.kernels.layout import KVLayout, detect_layout, physical_blocks

log = logging.getLogger("kvnode.connector")


@dataclass(slots=True)
class WorkerStats:
    load_chunks: int = 0
    load_bytes: int = 0
    load_s: float = 0.0
    load_errors: int = 0
    load_misses: int = 0
    checksum_errors: int = 0
    save_chunks: int = 0
    save_bytes: int = 0
    save_s: float = 0.0
    save_exists: int = 0
    save_no_space: int = 0
    save_errors: int = 0

    def take(self) -> dict[str, float]:
        out = {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]
        for k in self.__slots__:  # type: ignore[attr-defined]
            setattr(self, k, type(getattr(self, k))())
        return out


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
        checksum: Callable[[Any], int] | None = None,
        keys_per_call_max: int = 4096,
    ) -> None:
        self.link = link
        self.rank = rank_index
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.bpc = blocks_per_chunk
        self.keys_per_call_max = keys_per_call_max
        if checksum is None:
            from kvnode.ipc.client import checksum as client_checksum

            checksum = client_checksum
        self.checksum: Callable[[Any], int] = checksum
        self.layers: list[_Layer] = []
        self.layer_nbytes = 0  # bytes of one block summed over layers
        self.chunk_nbytes = 0
        self.stats = WorkerStats()
        self._load_errors: set[int] = set()
        self._staging: torch.Tensor | None = None
        self.on_cpu = True

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

    # Host-to-host copies go through numpy: one memcpy per run of blocks on the calling
    # thread. torch's copy_ splits a copy over its OpenMP team (vLLM's CPU worker keeps
    # 2+ threads and forbids changing that), and on a busy host the team waits at its
    # barrier for a descheduled member: measured 10-30x slower on a loaded 2-core
    # machine. Device caches use kvnode.kernels.copy.
    def _gather(self, layer: _Layer, block_ids: Sequence[int], dst: torch.Tensor) -> None:
        if not self.on_cpu:
            gather(layer.kv, layer.layout, list(block_ids), dst)
            return
        blocks = layer.blocks
        out = dst.numpy().reshape(len(block_ids), *blocks.shape[1:])
        for first, pos, count in _runs(block_ids):
            np.copyto(out[pos : pos + count], blocks[first : first + count])

    def _scatter(self, src: torch.Tensor, layer: _Layer, block_ids: Sequence[int]) -> None:
        if not self.on_cpu:
            scatter(src, layer.kv, layer.layout, list(block_ids))
            return
        blocks = layer.blocks
        inp = src.numpy().reshape(len(block_ids), *blocks.shape[1:])
        for first, pos, count in _runs(block_ids):
            np.copyto(blocks[first : first + count], inp[pos : pos + count])

    def _whole_chunk_on_device(self, op: ChunkOp) -> bool:
        """A full chunk of a device cache with one layout: its payload is exactly what
        ``gather_layers`` writes (layer after layer), so it crosses in one host copy."""
        return (
            not self.on_cpu
            and self.shared_layout is not None
            and op.block_offset == 0
            and len(op.block_ids) == self.bpc
        )

    def _staging_buffer(self) -> torch.Tensor:
        if self._staging is None:
            self._staging = torch.empty(self.chunk_nbytes, dtype=torch.uint8)
        return self._staging

    # ------------------------------------------------------------------ loads
    def take_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def load(self, loads: dict[str, list[ChunkOp]]) -> None:
        if not loads or not self.layers:
            return
        t0 = time.perf_counter()
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

    def _load_with(
        self, client: Any, work: list[tuple[str, ChunkOp]], failed_from: dict[str, int]
    ) -> None:
        keys = [op.keys[self.rank] for _, op in work]
        pinned: list[bytes] = []
        bad: list[bytes] = []
        try:
            answers: list[tuple[int, Any]] = []
            for i in range(0, len(keys), self.keys_per_call_max):
                answers.extend(client.pin(keys[i : i + self.keys_per_call_max]))
            pinned = [k for k, (s, _) in zip(keys, answers, strict=True) if s == Status.OK]
            for (rid, op), key, (status, slot) in zip(work, keys, answers, strict=True):
                if rid in failed_from:
                    continue
                if status != Status.OK or slot is None:
                    self.stats.load_misses += 1
                    failed_from[rid] = op.index
                    continue
                if not self._load_one(client, op, slot):
                    failed_from[rid] = op.index
                    bad.append(key)
        finally:
            if pinned:
                client.release(pinned)
            if bad:
                try:
                    client.drop(bad)
                except KVNodeError as exc:
                    log.warning("kvnode: could not drop %d bad chunk(s): %s", len(bad), exc)

    def _load_one(self, client: Any, op: ChunkOp, slot: Any) -> bool:
        if slot.size != self.chunk_nbytes:
            log.warning(
                "kvnode: chunk %s has %d bytes, want %d",
                op.keys[self.rank].hex(),
                slot.size,
                self.chunk_nbytes,
            )
            return False
        payload = self._payload(client, slot, fill=True)
        if slot.checksum == 0 or self.checksum(payload.numpy()) != slot.checksum:
            log.warning(
                "kvnode: chunk %s failed its checksum; recomputing", op.keys[self.rank].hex()
            )
            self.stats.checksum_errors += 1
            return False
        n = len(op.block_ids)
        if self._whole_chunk_on_device(op):
            assert self.shared_layout is not None
            kvs = [layer.kv for layer in self.layers]
            scatter_layers(payload, kvs, self.shared_layout, list(op.block_ids))
        else:
            for layer in self.layers:
                nb = layer.layout.block_nbytes
                a = layer.offset + op.block_offset * nb
                self._scatter(payload[a : a + n * nb], layer, op.block_ids)
        self.stats.load_chunks += 1
        self.stats.load_bytes += n * self.layer_nbytes
        return True

    def _payload(self, client: Any, slot: Any, fill: bool) -> torch.Tensor:
        """The slot's bytes as one uint8 tensor: the arena itself when the slot is one
        extent; otherwise a staging copy (filled from the extents if ``fill``)."""
        views = client.views(slot)
        if len(views) == 1:
            return torch.frombuffer(views[0], dtype=torch.uint8, count=self.chunk_nbytes)
        staging = self._staging_buffer()
        if fill:
            for pos, t in _pieces(views, self.chunk_nbytes):
                staging[pos : pos + t.numel()].copy_(t)
        return staging

    # ------------------------------------------------------------------ saves
    def save(self, saves: dict[str, list[ChunkOp]]) -> None:
        if not saves or not self.layers:
            return
        t0 = time.perf_counter()
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
        keys = [op.keys[self.rank] for op in ops]
        answers = client.reserve(keys, [self.chunk_nbytes] * len(keys))
        held: list[bytes] = [k for k, (s, _) in zip(keys, answers, strict=True) if s == Status.OK]
        done: list[bytes] = []
        sums: list[int] = []
        try:
            for op, key, (status, slot) in zip(ops, keys, answers, strict=True):
                if status == Status.EXISTS:
                    self.stats.save_exists += 1
                    continue
                if status != Status.OK or slot is None:
                    self.stats.save_no_space += 1
                    continue
                sums.append(self._save_one(client, op, slot))
                done.append(key)
        except BaseException:
            client.abort(held)
            raise
        leftover = [k for k in held if k not in set(done)]
        if leftover:
            client.abort(leftover)
        if done:
            statuses = client.commit(done, sums)
            ok = sum(1 for s in statuses if s == Status.OK)
            self.stats.save_chunks += ok
            self.stats.save_bytes += ok * self.chunk_nbytes
            self.stats.save_errors += len(done) - ok

    def _save_one(self, client: Any, op: ChunkOp, slot: Any) -> int:
        if len(op.block_ids) != self.bpc or op.block_offset != 0:
            raise ValueError(f"saves are whole chunks, got {op}")
        views = client.views(slot)
        dst = self._payload(client, slot, fill=False)
        if self._whole_chunk_on_device(op):
            assert self.shared_layout is not None
            kvs = [layer.kv for layer in self.layers]
            gather_layers(kvs, self.shared_layout, list(op.block_ids), dst)
        else:
            for layer in self.layers:
                nb = layer.layout.block_nbytes
                self._gather(layer, op.block_ids, dst[layer.offset : layer.offset + self.bpc * nb])
        if len(views) > 1:
            for pos, t in _pieces(views, self.chunk_nbytes):
                t.copy_(dst[pos : pos + t.numel()])
        return self.checksum(dst.numpy())


def _pieces(views: list[memoryview], nbytes: int) -> list[tuple[int, torch.Tensor]]:
    """(payload offset, tensor over the arena) for each extent, up to ``nbytes``."""
    out: list[tuple[int, torch.Tensor]] = []
    pos = 0
    for v in views:
        n = min(len(v), nbytes - pos)
        if n <= 0:
            break
        out.append((pos, torch.frombuffer(v, dtype=torch.uint8, count=n)))
        pos += n
    return out


def _runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first block id, position in the chunk, count) per run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for pos, b in enumerate(block_ids):
        if runs and runs[-1][0] + runs[-1][2] == b:
            first, p, n = runs[-1]
            runs[-1] = (first, p, n + 1)
        else:
            runs.append((b, pos, 1))
    return runs
