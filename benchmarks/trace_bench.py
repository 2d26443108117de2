"""Hit ratio of the eviction policies on prefix-cache traces, through a real agent.

A trace is JSON lines in Mooncake's format (``timestamp``, ``input_length``,
``output_length``, ``hash_ids``: one id per block, prefix-chained, so two requests share
a block id only when they share the whole prefix up to it). Each block is one entry of
``--entry-bytes``; capacities are in blocks. For every capacity and every policy a
``kvnode agent`` process is started with an arena of exactly that many entries and the
trace is replayed as the connector does it: look the chain up, pin and release the
leading hits, reserve, write and commit the rest (each commit with its parent). The
hit ratio is leading-hit blocks over all blocks.

References computed in the same run, on the same trace: offline LRU, ARC (Megiddo and
Modha), Belady (evicts the block used furthest in the future, and does not keep a block
that is never used again) and the unbounded cache. ``--disk BYTES`` adds a disk tier
under the arena (write-back) and reports hits per tier; the reference is then LRU of
arena + disk blocks.

``--workload`` replays a generated trace instead of a file (``system-prompts``, ``rag``,
``agentic``, ``scan-hot``), the same format, seeded; ``scan-hot`` also reports the hit
ratio of its hot set. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from ipc_bench import Agent  # noqa: E402  (the benchmark's agent subprocess)

from kvnode.ipc.client import AgentClient, Status  # noqa: E402
from kvnode.ipc.protocol import Lookup  # noqa: E402

TRACE_NAME = "mooncake_conversation_trace.jsonl"
# Where the trace is kept beside a checkout (or a worktree of one); --trace names any other.
DEFAULT_TRACE = next(
    (p for p in (REPO.parent / "shared" / "data" / TRACE_NAME,
                 REPO.parent.parent / "shared" / "data" / TRACE_NAME) if p.exists()),
    REPO.parent / "shared" / "data" / TRACE_NAME,
)  # fmt: skip
POLICIES = ("prefix", "s3fifo", "lru")
PENDING_WAIT_S = 2.0  # how long a replayed request waits for a promotion from disk

Trace = list[list[int]]


# -- traces ------------------------------------------------------------------------------
def load_trace(path: Path, limit: int | None) -> Trace:
    out: Trace = []
    with open(path) as f:
        for line in f:
            if line.strip():
                out.append([int(x) for x in json.loads(line)["hash_ids"]])
            if limit is not None and len(out) >= limit:
                break
    return out


class _Chains:
    """Block ids of prefix-chained content: one id per (parent id, block content)."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, Any], int] = {}

    def chain(self, blocks: Iterable[Any]) -> list[int]:
        out, parent = [], -1
        for b in blocks:
            parent = self._ids.setdefault((parent, b), len(self._ids))
            out.append(parent)
        return out


def _zipf(rng: random.Random, n: int, s: float = 1.0) -> int:
    weights = getattr(_zipf, "_w", {}).get((n, s))
    if weights is None:
        weights = [1 / (i + 1) ** s for i in range(n)]
        _zipf._w = {**getattr(_zipf, "_w", {}), (n, s): weights}  # type: ignore[attr-defined]
    return rng.choices(range(n), weights)[0]


def gen_system_prompts(rng: random.Random, n: int) -> tuple[Trace, set[int]]:
    """Long shared system prompts (Zipf), a unique question each, some follow-ups."""
    ch, out, open_convs = _Chains(), [], []
    for i in range(n):
        if open_convs and rng.random() < 0.3:
            blocks = open_convs.pop(rng.randrange(len(open_convs)))
        else:
            blocks = [("sys", _zipf(rng, 40))] * 1
            blocks = [("sys", blocks[0][1], j) for j in range(24)]
        blocks = blocks + [("q", i, j) for j in range(rng.randint(2, 8))]
        out.append(ch.chain(blocks))
        if rng.random() < 0.5:
            open_convs.append(blocks)
            del open_convs[:-200]
    return out, set()


def gen_rag(rng: random.Random, n: int) -> tuple[Trace, set[int]]:
    """A system prompt, then one to three retrieved documents (Zipf over 2,000), then
    the question: documents are shared only where they come first after the prompt."""
    ch, out = _Chains(), []
    for i in range(n):
        blocks: list[Any] = [("sys", j) for j in range(4)]
        for _ in range(rng.randint(1, 3)):
            d = _zipf(rng, 2000, 0.9)
            blocks += [("doc", d, j) for j in range(6)]
        blocks += [("q", i, j) for j in range(rng.randint(1, 3))]
        out.append(ch.chain(blocks))
    return out, set()


def gen_agentic(rng: random.Random, n: int) -> tuple[Trace, set[int]]:
    """Tool loops: 64 sessions open at a time, each step resends the whole context plus
    a tool result; a session ends after 5-40 steps and a new one starts."""
    ch, out = _Chains(), []
    sessions: list[list[Any]] = []
    sid = 0
    while len(out) < n:
        while len(sessions) < 64:
            sessions.append([("sys", j) for j in range(8)] + [("task", sid, 0)])
            sessions[-1].append(("steps", rng.randint(5, 40)))
            sid += 1
        s = sessions[rng.randrange(len(sessions))]
        steps = s.pop()
        s += [("tool", sid, len(s), j) for j in range(rng.randint(1, 4))]
        out.append(ch.chain(s))
        if steps[1] > 1:
            s.append(("steps", steps[1] - 1))
        else:
            sessions.remove(s)
        sid += 1
    return out, set()


def gen_scan_hot(rng: random.Random, n: int) -> tuple[Trace, set[int]]:
    """A hot set of 50 prompts of 8 blocks, asked again and again, under a one-time
    scan of long unique prompts (three of every four requests)."""
    ch, out = _Chains(), []
    hot = [[("hot", h, j) for j in range(8)] for h in range(50)]
    hot_ids: set[int] = set()
    for i in range(n):
        if rng.random() < 0.25:
            ids = ch.chain(hot[rng.randrange(50)])
            hot_ids.update(ids)
        else:
            ids = ch.chain([("scan", i, j) for j in range(32)])
        out.append(ids)
    return out, hot_ids


WORKLOADS = {
    "system-prompts": gen_system_prompts,
    "rag": gen_rag,
    "agentic": gen_agentic,
    "scan-hot": gen_scan_hot,
}


# -- offline references ------------------------------------------------------------------
def _leading(present: Any, ids: list[int]) -> int:
    n = 0
    for b in ids:
        if b not in present:
            break
        n += 1
    return n


def sim_unbounded(trace: Trace) -> float:
    seen: set[int] = set()
    hits = total = 0
    for ids in trace:
        hits += _leading(seen, ids)
        total += len(ids)
        seen.update(ids)
    return hits / total


def sim_lru(trace: Trace, cap: int) -> float:
    c: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    for ids in trace:
        n = _leading(c, ids)
        hits += n
        total += len(ids)
        for b in ids[:n]:
            c.move_to_end(b)
        for b in ids[n:]:
            if b in c:
                continue
            if len(c) >= cap:
                c.popitem(last=False)
            c[b] = None
    return hits / total


class _ARC:
    def __init__(self, c: int) -> None:
        self.c, self.p = c, 0.0
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, k: int) -> bool:
        return k in self.t1 or k in self.t2

    def _replace(self, in_b2: bool) -> None:
        if self.t1 and (len(self.t1) > self.p or (in_b2 and len(self.t1) == self.p)):
            k, _ = self.t1.popitem(last=False)
            self.b1[k] = None
        else:
            k, _ = self.t2.popitem(last=False)
            self.b2[k] = None

    def hit(self, k: int) -> None:
        if k in self.t1:
            del self.t1[k]
        self.t2[k] = None
        self.t2.move_to_end(k)

    def miss(self, k: int) -> None:
        c, t1, t2, b1, b2 = self.c, self.t1, self.t2, self.b1, self.b2
        if k in b1:
            self.p = min(c, self.p + max(len(b2) / max(len(b1), 1), 1))
            self._replace(False)
            del b1[k]
            t2[k] = None
            return
        if k in b2:
            self.p = max(0, self.p - max(len(b1) / max(len(b2), 1), 1))
            self._replace(True)
            del b2[k]
            t2[k] = None
            return
        l1 = len(t1) + len(b1)
        if l1 == c:
            if len(t1) < c:
                b1.popitem(last=False)
                self._replace(False)
            else:
                t1.popitem(last=False)
        elif l1 < c and l1 + len(t2) + len(b2) >= c:
            if l1 + len(t2) + len(b2) >= 2 * c:
                b2.popitem(last=False)
            self._replace(False)
        t1[k] = None


def sim_arc(trace: Trace, cap: int) -> float:
    a = _ARC(cap)
    hits = total = 0
    for ids in trace:
        n = _leading(a, ids)
        hits += n
        total += len(ids)
        for b in ids[:n]:
            a.hit(b)
        for b in ids[n:]:
            if b not in a:
                a.miss(b)
    return hits / total


def sim_belady(trace: Trace, cap: int) -> float:
    never = len(trace)
    nxt: list[list[int]] = [[] for _ in trace]
    last: dict[int, int] = {}
    for t in range(len(trace) - 1, -1, -1):
        nxt[t] = [last.get(b, never) for b in trace[t]]
        for b in trace[t]:
            last[b] = t
    cache: dict[int, int] = {}  # block -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, block), stale entries skipped
    hits = total = 0
    for t, ids in enumerate(trace):
        n = _leading(cache, ids)
        hits += n
        total += len(ids)
        for j, b in enumerate(ids):
            use = nxt[t][j]
            if b in cache:
                cache[b] = use
                heapq.heappush(heap, (-use, b))
                continue
            if use == never:
                continue  # never used again: not worth a slot
            while len(cache) >= cap:
                far, victim = heap[0]
                if cache.get(victim) != -far:
                    heapq.heappop(heap)
                    continue
                if -far <= use:
                    break  # everything cached is needed sooner: bypass
                heapq.heappop(heap)
                del cache[victim]
            if len(cache) < cap:
                cache[b] = use
                heapq.heappush(heap, (-use, b))
    return hits / total


# -- the real agent ------------------------------------------------------------------------
def _key(block: int, tenant: int = 0) -> bytes:
    return (tenant << 64 | block).to_bytes(16, "little")


def replay(
    c: AgentClient, trace: Trace, entry_bytes: int, hot: set[int] | None = None
) -> dict[str, float]:
    """The connector's calls for each request; returns hit ratios (arena, lower tier)."""
    hits = lower = total = hot_hits = hot_total = 0
    payload = bytes(entry_bytes)
    for ids in trace:
        keys = [_key(b) for b in ids]
        total += len(keys)
        first = states = c.lookup(keys)
        deadline = time.monotonic() + PENDING_WAIT_S
        while True:
            n = _leading_found(states)
            if Lookup.PENDING not in states[:n] or time.monotonic() > deadline:
                n = next((i for i in range(n) if states[i] == Lookup.PENDING), n)
                break
            time.sleep(0.001)  # a promotion from disk is under way: ask again
            states = c.lookup(keys[:n])
        got = pin_prefix(c, keys[:n])
        lower += sum(1 for s in first[:got] if s == Lookup.PENDING)
        hits += got
        if hot is not None:
            hot_total += sum(1 for b in ids if b in hot)
            hot_hits += sum(1 for b in ids[:got] if b in hot)
        rest, parents = keys[got:], [keys[got - 1] if got else b""] + keys[got:-1]
        if not rest:
            continue
        store_missing(c, rest, parents, entry_bytes, payload)
    c.flush()
    out = {"hit_ratio": hits / total, "arena_hit_ratio": round((hits - lower) / total, 4)}
    if lower:
        out["lower_hit_ratio"] = round(lower / total, 4)
    if hot is not None and hot_total:
        out["hot_hit_ratio"] = hot_hits / hot_total
    return out


def pin_prefix(c: Any, keys: list[bytes]) -> int:
    """Pin ``keys`` (as a connector would before loading) and let them go: how many
    from the first the agent still had (one may be evicted between lookup and pin)."""
    if not keys:
        return 0
    got = 0
    for st, _ in c.pin(keys):
        if st != Status.OK:
            break
        got += 1
    c.release(keys, wait=False)
    return got


def store_missing(
    c: Any, keys: list[bytes], parents: list[bytes], entry_bytes: int, payload: Any
) -> None:
    """Save what was computed, as the connector does after a prefill: reserve, write
    and commit (without waiting) the keys the agent gave room for."""
    want, want_parents = [], []
    for k, p, (st, slot) in zip(keys, parents, c.reserve(keys, [entry_bytes] * len(keys))):
        if st == Status.OK and slot is not None:
            c.write(slot, payload)
            want.append(k)
            want_parents.append(p)
    if want:
        c.commit_async(want, parents=want_parents)


def _leading_found(states: list[int]) -> int:
    n = 0
    for s in states:
        if s == Lookup.MISS:
            break
        n += 1
    return n


def replay_index(trace: Trace, policy: str, cap: int, entry_bytes: int) -> float:
    """The same calls on the agent's ``Index`` in this process (no sockets): the
    policies' figures in seconds, for generated workloads and quick comparisons."""
    from kvnode.agent.index import Index, Outcome

    idx = Index(cap * entry_bytes, entry_bytes, policy)
    hits = total = 0
    for ids in trace:
        keys = [_key(b) for b in ids]
        total += len(keys)
        n = 0
        for k in keys:
            if idx.lookup(k) is None:  # the agent's lookup touches hits too
                break
            n += 1
        for e in idx.pin_many(keys[:n]):
            assert e is not None
            idx.unpin(e.key)
        hits += n
        parents = [keys[n - 1] if n else b"", *keys[n:-1]]
        fresh, fresh_parents = [], []
        for k, p in zip(keys[n:], parents):
            if idx.reserve(k, entry_bytes, 1)[0] is Outcome.OK:
                fresh.append(k)
                fresh_parents.append(p)
        idx.commit_many(fresh, 1, [0] * len(fresh), fresh_parents)
    return hits / total


def run_agent(
    trace: Trace, policy: str, cap: int, entry_bytes: int, disk_bytes: int, hot: set[int] | None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvnode-trace-") as tmp:
        rt = Path(tmp) / "rt"
        rt.mkdir(mode=0o700)
        settings = {"arena.policy": policy, "arena.page_bytes": str(entry_bytes)}
        if disk_bytes:
            settings["disk.path"] = str(Path(tmp) / "disk")
            settings["disk.bytes"] = str(disk_bytes)
            # Hit ratios do not depend on durability; a file sync per 4 KiB block would
            # make the replay take hours on a shared disk.
            settings["disk.fsync"] = "false"
        agent = Agent(rt, settings, cpu_bytes=cap * entry_bytes)
        try:
            agent.wait()
            c = AgentClient(rt, name="trace", timeout_s=30.0)
            try:
                t0 = time.perf_counter()
                out: dict[str, Any] = replay(c, trace, entry_bytes, hot)
                out["replay_s"] = round(time.perf_counter() - t0, 1)
                st = c.stats()
                out["evictions"] = st["counters"]["evictions"]
                out["orphan_evictions"] = st["counters"].get("orphan_evictions", 0)
                if disk_bytes:
                    disk = st["tiers"].get("disk", {})
                    out["disk_hits"] = disk.get("hits", 0)
                    out["disk_writes"] = disk.get("writes", 0)
                    out["disk_dropped"] = disk.get("dropped", 0)
                    out["evict_unsaved"] = st["counters"]["evict_unsaved"]
            finally:
                c.close()
        finally:
            agent.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), help="a generated trace instead")
    ap.add_argument("--requests", type=int, default=None, help="replay only the first N")
    ap.add_argument("--capacities", default="6000,20000,60000", help="arena sizes in blocks")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--entry-bytes", type=int, default=4096)
    ap.add_argument("--disk", type=int, default=0, help="bytes of a disk tier under the arena")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-agent", action="store_true", help="references only")
    ap.add_argument(
        "--in-process", action="store_true", help="policies on the agent's Index, no agent process"
    )
    args = ap.parse_args()

    hot: set[int] | None = None
    if args.workload:
        trace, hot_ids = WORKLOADS[args.workload](random.Random(args.seed), args.requests or 12000)
        hot = hot_ids or None
        source = f"generated:{args.workload}"
    else:
        trace = load_trace(args.trace, args.requests)
        source = args.trace.name
    caps = [int(x) for x in args.capacities.split(",")]
    policies = [p for p in args.policies.split(",") if p]
    disk_blocks = args.disk // args.entry_bytes
    result: dict[str, Any] = {
        "trace": source,
        "requests": len(trace),
        "blocks": sum(len(ids) for ids in trace),
        "unique_blocks": len({b for ids in trace for b in ids}),
        "entry_bytes": args.entry_bytes,
        "unbounded": round(sim_unbounded(trace), 4),
        "capacities": {},
    }
    for cap in caps:
        refs = {
            "lru": round(sim_lru(trace, cap), 4),
            "arc": round(sim_arc(trace, cap), 4),
            "belady": round(sim_belady(trace, cap), 4),
        }
        if disk_blocks:
            refs["lru_arena_plus_disk"] = round(sim_lru(trace, cap + disk_blocks), 4)
        row: dict[str, Any] = {"offline": refs}
        # against what the same memory gives a classic policy: arena + disk with a disk
        best = refs.get("lru_arena_plus_disk") or max(refs["lru"], refs["arc"])
        if args.in_process:
            for pol in policies:
                t0 = time.perf_counter()
                r = replay_index(trace, pol, cap, args.entry_bytes)
                us = (time.perf_counter() - t0) / result["blocks"] * 1e6
                row[pol] = {
                    "hit_ratio": round(r, 4),
                    "vs_best_classic": round(r / best, 3),
                    "index_us_per_block": round(us, 2),  # lookup, pin, reserve, commit
                }
        elif not args.no_agent:
            for pol in policies:
                r = run_agent(trace, pol, cap, args.entry_bytes, args.disk, hot)
                r["vs_best_classic"] = round(r["hit_ratio"] / best, 3) if best else None
                r["hit_ratio"] = round(r["hit_ratio"], 4)
                row[pol] = r
                print(f"# {cap} {pol} {r}", file=sys.stderr, flush=True)
        result["capacities"][str(cap)] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main()
