"""The agent's side of GPU agent mode: chunks between opened worker caches and the arena.

``DeviceCopier`` owns one device's copies: one stream (so the agent's loop and other
devices never wait on it), its staging buffer, and the launches of the one-launch
kernel (``kvnode.kernels.onelaunch``). Every layer of every chunk of a save is one
launch; a load is one launch per layer over every chunk, each followed by that layer's
interprocess event and the caller's ``on_layer`` (the worker waits for the layer's
progress mark, then makes its stream wait on the event: the GPU, not the host, orders
attention after the copy).

Routes between the device and the arena (host memory, registered once per process with
``cudaHostRegister``: the registration is portable, so it serves every device):
- ``staging``: the kernel packs into a device buffer, which crosses the bus with one
  DMA per arena extent;
- ``direct``: the kernel reads or writes the registered arena itself (entries of one
  extent only; others take the staging route).

A worker's ``ready`` event, recorded on its stream before it asked for the job, is
waited on first: a save reads blocks only after the forward pass that wrote them, a
load writes blocks only after vLLM zeroed them. With CPU tensors (tests on hosts
without a GPU, the kernel under Triton's interpreter) streams and events are skipped
and the same code moves the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from kvnode.kernels.layout import KVLayout
from kvnode.kernels.plan import Row

ROUTES = ("staging", "direct")
# Device memory one copier stages through (the agent's own GPU memory per device): a
# job needing more runs in batches of chunks, one after the other on the stream.
STAGING_BYTES_MAX = 256 << 20
# One chunk entry larger than this is refused (a 256-token chunk of an 80-layer model
# with 8 KV heads of 128 in bf16 is 80 MiB).
CHUNK_BYTES_MAX = 1 << 30

Extent = tuple[int, int]  # (offset in the arena, bytes)


class CopyError(ValueError):
    """A job this copier cannot do (bad extents, too large): the job fails, counted."""


@dataclass(frozen=True, slots=True)
class OpenedLayer:
    """One layer of an export, opened in the agent."""

    kv: torch.Tensor
    layout: KVLayout
    group: int
    payload_offset: int  # bytes of the layer's region in a full chunk entry


@dataclass(frozen=True, slots=True)
class ChunkCopy:
    """One chunk: ``blocks`` of the group's layers, the arena extents of its entry,
    and (loads) the entry's block where ``blocks`` start."""

    group: int
    blocks: tuple[int, ...]
    extents: tuple[Extent, ...]
    block_offset: int = 0


class DeviceCopier:
    """One device's copies. ``arena`` is a uint8 host tensor over the whole arena
    (registered for DMA on a GPU host); extents are offsets into it."""

    def __init__(
        self,
        device: torch.device,
        arena: torch.Tensor,
        route: str = "staging",
        staging_bytes_max: int = STAGING_BYTES_MAX,
    ) -> None:
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, not {route!r}")
        from kvnode.kernels import onelaunch  # triton: imported where copies run

        self._kernel = onelaunch
        self.device = device
        self.route = route
        self.arena = arena
        self.staging_bytes_max = staging_bytes_max
        self.stream: Any = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._staging: torch.Tensor | None = None

    def save(
        self, layers: Sequence[OpenedLayer], chunks: Sequence[ChunkCopy], ready: Any = None
    ) -> int:
        """Every chunk's blocks into its arena entry; returns once the bytes are in the
        arena (the caller checksums them). Returns the bytes moved."""
        moved = 0
        with self._on_stream(ready):
            for batch in self._batches(layers, chunks):
                direct, staged, staging = self._split(layers, batch)
                rows, ids = self._rows(layers, direct + [c for c, _ in staged], staging)
                self._launch(rows, ids, gather=True)
                moved += _bytes(rows, ids)
                for chunk, at in staged:
                    self._pieces(chunk, layers, at, to_arena=True)
            self._sync()
        return moved

    def load(
        self,
        layers: Sequence[OpenedLayer],
        chunks: Sequence[ChunkCopy],
        ready: Any = None,
        events: Sequence[Any] = (),
        on_layer: Callable[[int], None] = lambda i: None,
    ) -> int:
        """Arena entries into the chunks' blocks, layer by layer in ``layers`` order;
        after layer ``i`` is queued, ``events[i]`` (if any) is recorded and
        ``on_layer(i)`` called. Returns once every byte has landed. A job in several
        batches reports its layers during the last one (the earlier ones are queued
        before it on the same stream, so layer ``i`` is whole when its event fires)."""
        moved = 0
        with self._on_stream(ready):
            batches = self._batches(layers, chunks)
            for n, batch in enumerate(batches):
                last = n == len(batches) - 1
                direct, staged, staging = self._split(layers, batch)
                for chunk, at in staged:
                    self._pieces(chunk, layers, at, to_arena=False)
                order = direct + [c for c, _ in staged]
                for i, layer in enumerate(layers):
                    rows, ids = self._rows([layer], order, staging, layers)
                    self._launch(rows, ids, gather=False)
                    moved += _bytes(rows, ids)
                    if last:
                        self._layer_done(i, events, on_layer)
            self._sync()
        return moved

    def _layer_done(self, i: int, events: Sequence[Any], on_layer: Callable[[int], None]) -> None:
        if i < len(events) and events[i] is not None and self.stream is not None:
            events[i].record(self.stream)
        on_layer(i)

    @property
    def staging_bytes(self) -> int:
        """Device memory this copier holds for staging now."""
        return 0 if self._staging is None else self._staging.numel()

    # ------------------------------------------------------------------ planning
    def _batches(
        self, layers: Sequence[OpenedLayer], chunks: Sequence[ChunkCopy]
    ) -> list[list[ChunkCopy]]:
        """Every chunk checked (before any byte moves), then grouped so that each
        group's staging fits ``staging_bytes_max`` (a larger chunk goes alone)."""
        for c in chunks:
            self._check(c, layers)
        batches: list[list[ChunkCopy]] = [[]]
        size = 0
        for c in chunks:
            need = 0 if self._direct(c) else _entry_span(c, layers)
            if batches[-1] and size + need > self.staging_bytes_max:
                batches.append([])
                size = 0
            batches[-1].append(c)
            size += need
        return batches

    def _direct(self, c: ChunkCopy) -> bool:
        return self.route == "direct" and len(c.extents) == 1

    def _split(
        self, layers: Sequence[OpenedLayer], chunks: Sequence[ChunkCopy]
    ) -> tuple[list[ChunkCopy], list[tuple[ChunkCopy, int]], torch.Tensor | None]:
        """Chunks the kernel reaches in the arena itself, and the others with their
        offset in this job's staging buffer (allocated here)."""
        direct: list[ChunkCopy] = []
        staged: list[tuple[ChunkCopy, int]] = []
        pos = 0
        for c in chunks:
            if self._direct(c):
                direct.append(c)
            else:
                staged.append((c, pos))
                pos += _entry_span(c, layers)
        return direct, staged, self._staging_buffer(pos) if staged else None

    def _rows(
        self,
        layers: Sequence[OpenedLayer],
        chunks: Sequence[ChunkCopy],
        staging: torch.Tensor | None,
        all_layers: Sequence[OpenedLayer] | None = None,
    ) -> tuple[list[Row], list[list[int]]]:
        """A row per (layer, chunk of its group): the layer's region of the chunk, in
        the arena (direct) or in the staging buffer at the chunk's place."""
        every = layers if all_layers is None else all_layers
        rows: list[Row] = []
        ids: list[list[int]] = []
        pos = 0
        for c in chunks:
            if self._direct(c):
                base = self.arena.data_ptr() + c.extents[0][0]
            else:  # the staging buffer holds the entry from its first moved byte on
                assert staging is not None
                base = staging.data_ptr() + pos - self._region_start(c, every)
                pos += _entry_span(c, every)
            for layer in layers:
                if layer.group == c.group:
                    start = layer.payload_offset + c.block_offset * layer.layout.block_nbytes
                    rows.append(Row(layer.kv, layer.layout, len(ids), base + start))
            ids.append(list(c.blocks))
        return rows, ids

    def _region_start(self, c: ChunkCopy, layers: Sequence[OpenedLayer]) -> int:
        """Byte of the entry where the moved part starts (0 unless block_offset)."""
        return min(
            lay.payload_offset + c.block_offset * lay.layout.block_nbytes
            for lay in layers
            if lay.group == c.group
        )

    def _check(self, c: ChunkCopy, layers: Sequence[OpenedLayer]) -> None:
        mine = [lay for lay in layers if lay.group == c.group]
        if not mine:
            raise CopyError(f"no exported layer of group {c.group}")
        for lay in mine:
            if any(not 0 <= b < lay.layout.num_blocks for b in c.blocks):
                raise CopyError(f"block ids outside [0, {lay.layout.num_blocks})")
        if len(set(c.blocks)) != len(c.blocks):
            raise CopyError("duplicate block ids")
        end = max(
            lay.payload_offset + (c.block_offset + len(c.blocks)) * lay.layout.block_nbytes
            for lay in mine
        )
        if any(o < 0 or n < 0 or o + n > self.arena.numel() for o, n in c.extents):
            raise CopyError(f"extents {c.extents} outside the arena of {self.arena.numel()}")
        if end > sum(n for _, n in c.extents):
            raise CopyError(f"extents {c.extents} do not hold {end} bytes")
        if end > CHUNK_BYTES_MAX:
            raise CopyError(f"a chunk of {end} bytes (at most {CHUNK_BYTES_MAX})")

    # ------------------------------------------------------------------ moving
    def _pieces(self, c: ChunkCopy, layers: Sequence[OpenedLayer], at: int, to_arena: bool) -> None:
        """The moved part of the entry between the staging buffer (from ``at``) and its
        arena extents: one DMA per extent piece."""
        assert self._staging is not None
        skip = self._region_start(c, layers)
        left = _entry_span(c, layers)
        for offset, nbytes in c.extents:
            if skip >= nbytes:
                skip -= nbytes
                continue
            n = min(nbytes - skip, left)
            host = self.arena[offset + skip : offset + skip + n]
            dev = self._staging[at : at + n]
            if to_arena:
                host.copy_(dev, non_blocking=True)
            else:
                dev.copy_(host, non_blocking=True)
            at, left, skip = at + n, left - n, 0
            if left == 0:
                break

    def _launch(self, rows: list[Row], ids: list[list[int]], gather: bool) -> None:
        if rows:
            self._kernel.launch(self._kernel.plan(rows, ids), self.device, gather=gather)

    def _staging_buffer(self, nbytes: int) -> torch.Tensor:
        # One buffer per copier, grown as needed: jobs on one stream run one at a time.
        if self._staging is None or self._staging.numel() < nbytes:
            self._staging = None
            self._staging = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._staging

    def _on_stream(self, ready: Any) -> Any:
        if self.stream is None:
            return nullcontext()
        if ready is not None:
            self.stream.wait_event(ready)
        return torch.cuda.stream(self.stream)

    def _sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def _entry_span(c: ChunkCopy, layers: Sequence[OpenedLayer]) -> int:
    """Bytes of the entry from the first to the last byte the chunk moves."""
    mine = [lay for lay in layers if lay.group == c.group]
    start = min(lay.payload_offset + c.block_offset * lay.layout.block_nbytes for lay in mine)
    end = max(
        lay.payload_offset + (c.block_offset + len(c.blocks)) * lay.layout.block_nbytes
        for lay in mine
    )
    return end - start


def _bytes(rows: Sequence[Row], ids: Sequence[Sequence[int]]) -> int:
    return sum(len(ids[r.ids_row]) * r.layout.block_nbytes for r in rows)
