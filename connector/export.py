"""What a worker tells the agent about its KV cache in agent mode (``ExportReq``),
and the consent the agent needs to reach it.

Layers go in vLLM's forward order (the order the agent copies them, so layer i's
attention runs while layer i+1 is copied); each keeps its payload offset of the
chunk format every mode shares (sorted layer names), so chunks saved in agent mode
load in worker mode and the other way round.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvnode.ipc import protocol as P

PR_SET_PTRACER = 0x59616D61  # prctl option: who may ptrace (and cross-memory attach) us


class NotExportable(Exception):
    """This cache cannot be exported (one line says why): the worker copies itself."""


def forward_order(names: Sequence[str]) -> list[str]:
    """Layer names by their layer number (``model.layers.10`` after ``.9``), then name."""

    def key(name: str) -> tuple[int, str]:
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        return (int(m.group(1)) if m else 1 << 30, name)

    return sorted(names, key=key)


def block_parts(blocks: np.ndarray) -> tuple[int, list[tuple[int, int]]]:
    """(block stride, contiguous pieces of one block in payload order) of a uint8
    view ``[num_blocks, ...]`` of a layer (``kernels.layout.physical_blocks``)."""
    inner_shape, inner_strides = blocks.shape[1:], blocks.strides[1:]
    # The longest suffix of dims that is dense in memory is one piece.
    dense = 1
    k = len(inner_shape)
    while k > 0 and inner_strides[k - 1] == dense:
        dense *= inner_shape[k - 1]
        k -= 1
    outer = list(zip(inner_shape[:k], inner_strides[:k]))
    count = int(np.prod([s for s, _ in outer])) if outer else 1
    if count > P.BLOCK_PARTS_MAX:
        raise NotExportable(f"a block is {count} separate pieces (at most {P.BLOCK_PARTS_MAX})")
    offsets = [0]
    for size, stride in outer:
        offsets = [o + i * stride for o in offsets for i in range(size)]
    if any(o < 0 for o in offsets) or blocks.strides[0] < 0:
        raise NotExportable("negative strides")
    return int(blocks.strides[0]), [(int(o), dense) for o in offsets]


def layer_exports(layers: Sequence[Any]) -> list[P.LayerExport]:
    """``LayerExport``s of a ``WorkerSide``'s layers (host memory, or one GPU's: their
    IPC handles travel beside, ``kvnode.kernels.gpuexport``), in forward order."""
    by_name = {layer.name: layer for layer in layers}
    out: list[P.LayerExport] = []
    for name in forward_order(list(by_name)):
        layer = by_name[name]
        kv = layer.kv
        if layer.blocks is not None:
            base, stride, parts = int(layer.blocks.ctypes.data), *block_parts(layer.blocks)
        elif kv.device.type == "cuda":
            base, stride, parts = device_parts(kv, layer.layout)
        else:
            raise NotExportable(f"layer {name} is on {kv.device}")
        out.append(
            P.LayerExport(
                name=name[: P.NAME_CHARS_MAX],
                base=base,
                num_blocks=int(layer.layout.num_blocks),
                block_stride=stride,
                block_nbytes=int(layer.layout.block_nbytes),
                parts=parts,
                payload_offset=int(layer.offset),
                layout=layer.layout.name,
                dtype=str(kv.dtype).removeprefix("torch."),
                shape=[int(d) for d in kv.shape],
                strides=[int(s) for s in kv.stride()],
            )
        )
    return out


def device_parts(kv: Any, layout: Any) -> tuple[int, int, list[tuple[int, int]]]:
    """(base, block stride, parts) of a GPU layer: the one-launch kernel's segments,
    which the agent checks again against the tensor it opens."""
    from kvnode.kernels.plan import NotCoverable, segments

    try:
        seg = segments(kv, layout)
    except NotCoverable as exc:
        raise NotExportable(f"a block of this layout is not one kernel row: {exc}") from exc
    parts = [(s * seg.seg_stride, seg.seg_bytes) for s in range(seg.n_seg)]
    if len(parts) > P.BLOCK_PARTS_MAX:
        raise NotExportable(f"a block is {len(parts)} separate pieces")
    return seg.base, seg.block_stride, parts


def ptrace_scope() -> int | None:
    try:
        return int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip())
    except (OSError, ValueError):
        return None


def consent(agent_pid: int) -> None:
    """Let ``agent_pid`` attach to this process where Yama asks for consent
    (``ptrace_scope`` 1); elsewhere the kernel's uid and capability rules decide."""
    if ptrace_scope() != 1 or agent_pid <= 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PTRACER, ctypes.c_ulong(agent_pid), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise NotExportable(f"prctl(PR_SET_PTRACER) failed: {os.strerror(err)}")
