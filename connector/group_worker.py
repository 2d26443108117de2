"""Worker side for several KV cache groups: one ``WorkerSide`` per cached group, each
with its own layers, layouts and chunk payload (a sliding-window group's entry holds
only the blocks ``CacheGroup.stored_blocks`` names).

vLLM cannot map block-level load errors back to requests when there are several block
tables (it raises), so with several groups a request's load succeeds or fails as a
whole: a failed one is reported in ``failed_recving`` and vLLM recomputes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from kvnode.connector.groups import GroupPlan
from kvnode.connector.scheduler import ChunkOp
from kvnode.connector.worker import WorkerSide

GroupHandshake = tuple[str, tuple[int, ...], str]  # (layout, block_shape, dtype)


class _SummedStats:
    def __init__(self, workers: list[WorkerSide]) -> None:
        self._workers = workers

    def take(self, wait: bool = False) -> dict[str, float]:
        out: dict[str, float] = {}
        for w in self._workers:
            for k, v in w.take_stats(wait).items():
                out[k] = out.get(k, 0) + v
        return out


class GroupWorkers:
    """The ``WorkerSide`` interface the connector uses, over one worker per group."""

    def __init__(self, workers: Mapping[int, WorkerSide]) -> None:
        self.workers = dict(workers)  # vLLM group id -> its worker
        self.stats = _SummedStats(list(self.workers.values()))
        self.chunk_nbytes = sum(w.chunk_nbytes for w in self.workers.values())
        self._finished: set[str] = set()
        self._failed: set[str] = set()

    def take_stats(self, wait: bool = False) -> dict[str, float]:
        return self.stats.take(wait)

    def load(self, loads: dict[str, list[ChunkOp]]) -> None:
        for gid, worker in self.workers.items():
            part = _of_group(loads, gid)
            if not part:
                continue
            worker.load(part)
            errors = worker.take_load_errors()
            for rid, ops in part.items():
                if any(b in errors for op in ops for b in op.block_ids):
                    self._failed.add(rid)
        self._finished.update(loads)

    def save(self, saves: dict[str, list[ChunkOp]]) -> None:
        for gid, worker in self.workers.items():
            part = _of_group(saves, gid)
            if part:
                worker.save(part)

    def take_stored(self) -> list[ChunkOp]:
        """Every group's chunks committed since the last call (``op.group`` says whose)."""
        return [op for w in self.workers.values() for op in w.take_stored()]

    def take_load_errors(self) -> set[int]:
        return set()  # reported per request (take_results)

    def take_results(self) -> tuple[set[str], set[str]]:
        """(requests whose async load ran, those of them that failed)."""
        done, failed = self._finished, self._failed
        self._finished, self._failed = set(), set()
        return done, failed


def build_group_workers(
    plan: GroupPlan,
    kv_caches: Mapping[str, torch.Tensor],
    make_worker: Callable[[int], WorkerSide],
    blocks_per_chunk: int,
    block_size: int,
) -> tuple[GroupWorkers, tuple[GroupHandshake, ...]]:
    """A worker per cached group, registered with that group's layers; ``make_worker``
    builds one for a chunk entry of so many blocks."""
    workers: dict[int, WorkerSide] = {}
    parts: list[GroupHandshake] = []
    for group in plan.groups:
        missing = [n for n in group.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(
                f"kvnode: KV cache group {group.index} layers not registered: {missing}"
            )
        worker = make_worker(group.stored_blocks(blocks_per_chunk, block_size))
        cache = worker.register({n: kv_caches[n] for n in group.layer_names})
        workers[group.index] = worker
        parts.append((cache.layout, cache.block_shape, cache.dtype))
    return GroupWorkers(workers), tuple(parts)


def _of_group(ops_by_req: dict[str, list[ChunkOp]], gid: int) -> dict[str, list[ChunkOp]]:
    out: dict[str, list[ChunkOp]] = {}
    for rid, ops in ops_by_req.items():
        mine = [op for op in ops if op.group == gid]
        if mine:
            out[rid] = mine
    return out
