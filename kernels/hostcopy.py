"""The one host-to-host copy path: numpy memcpy on the calling thread.

Every copy between two host buffers (a CPU KV cache, a staging buffer, the arena's
extents) goes through here. numpy copies contiguous runs with one memcpy on the calling
thread. torch's ``copy_`` would split each copy over its OpenMP team, and beside vLLM's
CPU worker (which keeps 2+ threads and refuses ``torch.set_num_threads``) that team
waits at its barrier for a descheduled member: measured 4-10x slower (up to 30x on a
loaded 2-core machine).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

Runs = list[tuple[int, int, int]]  # (first block id, position in the buffer, count)


def as_array(buf: Any) -> np.ndarray:
    """A host tensor, numpy array or writable buffer as a numpy array over the same bytes."""
    if isinstance(buf, torch.Tensor):
        return buf.numpy()
    if isinstance(buf, np.ndarray):
        return buf
    return np.frombuffer(buf, dtype=np.uint8)


def runs_of(ids: Sequence[int]) -> Runs:
    """``(first block id, position in the buffer, count)`` per run of consecutive ids."""
    runs: Runs = []
    pos = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            runs.append((int(ids[pos]), pos, i - pos))
            pos = i
    return runs


def blocks_out(blocks: Any, ids: Sequence[int], out: Any, runs: Runs | None = None) -> None:
    """Blocks ``ids`` of ``blocks`` (``[num_blocks, ...]``) into ``out`` (``[len(ids), ...]``)."""
    src, dst = as_array(blocks), as_array(out)
    for first, pos, count in runs_of(ids) if runs is None else runs:
        np.copyto(dst[pos : pos + count], src[first : first + count])


def blocks_in(inp: Any, blocks: Any, ids: Sequence[int], runs: Runs | None = None) -> None:
    """Inverse of ``blocks_out``: ``inp`` (``[len(ids), ...]``) into blocks ``ids``."""
    src, dst = as_array(inp), as_array(blocks)
    for first, pos, count in runs_of(ids) if runs is None else runs:
        np.copyto(dst[first : first + count], src[pos : pos + count])


def block_parts(blocks: Any, ids: Sequence[int]) -> list[np.ndarray] | None:
    """The bytes of blocks ``ids`` in order, as one contiguous array per run (for a
    checksum over exactly these bytes); None if a run is not contiguous in memory."""
    arr = as_array(blocks)
    parts = [arr[first : first + count] for first, _, count in runs_of(ids)]
    return parts if all(p.flags.c_contiguous for p in parts) else None


def read_extents(views: Sequence[Any], out: Any) -> None:
    """The extents, in order, into the front of ``out`` (1-D uint8), up to its size."""
    dst = as_array(out).reshape(-1)
    pos = 0
    for v in views:
        n = min(len(v), dst.size - pos)
        if n <= 0:
            break
        np.copyto(dst[pos : pos + n], np.frombuffer(v, dtype=np.uint8, count=n))
        pos += n
    if pos != dst.size:
        raise ValueError(f"extents hold {pos} bytes, {dst.size} wanted")


def write_extents(src: Any, views: Sequence[Any]) -> None:
    """``src`` (1-D uint8) into the extents, in order; the extents must hold all of it."""
    data = as_array(src).reshape(-1)
    pos = 0
    for v in views:
        n = min(len(v), data.size - pos)
        if n <= 0:
            break
        np.copyto(np.frombuffer(v, dtype=np.uint8, count=n), data[pos : pos + n])
        pos += n
    if pos != data.size:
        raise ValueError(f"extents hold {pos} bytes, {data.size} to write")
