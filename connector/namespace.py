"""The chunk namespace of a vLLM engine: what makes its KV bytes incompatible with
another engine's (model, dtypes, layout, block and chunk size, TP/PP rank).

The layout and block shape are known only to workers (from the tensors they are
handed); they reach the scheduler side in the connector's handshake, so both sides
name chunks the same way.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvnode.connector.groups import GroupPlan
from kvnode.connector.keys import Namespace
from kvnode.connector.metadata import KVNodeHandshake
from kvnode.ipc.checksum import checksum

_SAMPLE_BYTES = 1 << 20  # head and tail of each weight file go into a local model's id


def model_identity(model: str, revision: str | None = None) -> str:
    """A stable name for the weights. For a hub name: the name and revision. For a
    local directory: its path plus a digest of its config and the head and tail of its
    weight files, so a rebuilt model with other weights at the same path never reads
    KV computed by the old one. Set ``kvnode.model_id`` to share across paths/nodes."""
    path = Path(model)
    if not path.is_dir():
        return f"{model}@{revision or 'main'}"
    parts: list[bytes] = []
    for name in ("config.json",):
        f = path / name
        if f.is_file():
            parts.append(f.read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        size = f.stat().st_size
        parts.append(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            parts.append(fh.read(_SAMPLE_BYTES))
            if size > _SAMPLE_BYTES:
                fh.seek(max(_SAMPLE_BYTES, size - _SAMPLE_BYTES))
                parts.append(fh.read(_SAMPLE_BYTES))
    # The project's one checksum (xxh3-64) written as xxhash's hexdigest was, so model
    # ids, and the keys of entries already on disk or in S3, stay the same.
    return f"{os.path.realpath(path)}#{checksum(parts):016x}"


def rank_namespaces(
    model_id: str,
    model_dtype: str,
    block_size: int,
    chunk_tokens: int,
    tp_size: int,
    pp_size: int,
    handshakes: Mapping[tuple[int, int], Any],
) -> list[Namespace] | None:
    """One namespace per rank index ``pp_rank * tp_size + tp_rank``; None if a rank
    did not report its layout (then the connector stays off: keys would be guesses)."""
    out: list[Namespace] = []
    for pp in range(pp_size):
        for tp in range(tp_size):
            hs = handshakes.get((pp, tp))
            if not isinstance(hs, KVNodeHandshake):
                return None
            out.append(
                Namespace(
                    model=model_id,
                    dtype=f"{model_dtype}/{hs.dtype}",
                    kv_layout=hs.layout,
                    block_shape=tuple(hs.block_shape),
                    block_size=block_size,
                    chunk_tokens=chunk_tokens,
                    tp_size=tp_size,
                    tp_rank=tp,
                    pp_rank=pp,
                )
            )
    return out


def group_namespaces(
    ranks: Sequence[Namespace], plan: GroupPlan, handshakes: Mapping[tuple[int, int], Any]
) -> list[list[Namespace]] | None:
    """Namespaces by cached group, then by rank index. One plain full-attention group
    keeps the namespaces it always had (the keys already stored stay valid); otherwise
    each group's namespace names the group and its own layout and block shape, so two
    groups never share an entry. None if a rank did not describe every group."""
    if plan.plain:
        return [list(ranks)]
    tp_size = ranks[0].tp_size if ranks else 1
    out: list[list[Namespace]] = []
    for pos, group in enumerate(plan.groups):
        per_rank: list[Namespace] = []
        for ns in ranks:
            hs = handshakes.get((ns.pp_rank, ns.tp_rank))
            parts = getattr(hs, "groups", ())
            if len(parts) != len(plan.groups) or ns.tp_size != tp_size:
                return None
            layout, block_shape, dtype = parts[pos]
            per_rank.append(
                dataclasses.replace(
                    ns,
                    kv_layout=layout,
                    block_shape=tuple(block_shape),
                    dtype=f"{ns.dtype.split('/')[0]}/{dtype}",
                    group=group.tag(),
                )
            )
        out.append(per_rank)
    return out
