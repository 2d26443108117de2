"""Scheduler side of the connector: which prefix the agent can serve, and which chunks
each step must load or save.

No vLLM import here: requests are read through a few attributes (``request_id``,
``all_token_ids``, ``num_prompt_tokens``, ``kv_transfer_params``, ``lora_request``,
``cache_salt``, ``mm_features``, ``prompt_embeds``), so the logic is unit-testable with
plain objects and a fake agent.

Rules (docs/connector.md):
- only whole chunks are served, beyond what vLLM already computed, and never the
  chunk holding the last prompt token's position: vLLM must compute at least one token;
- a chunk is a hit only if every rank (TP x PP) has it;
- a lookup answering PENDING makes vLLM ask again next step, up to a deadline, after
  which the prefix already readable is used;
- an absent, slow or failing agent is a miss, never an exception;
- when the agent publishes its shared lookup index (``client.index_segment``), hits and
  plain misses are answered from it without a round trip. Its hits are hints: the
  worker's pin confirms each, and a failed pin is a load error vLLM recomputes. The
  agent is asked only from the first miss on, and only when a lower tier or a peer
  could have the chunk (``lower_tiers``): for promotion and PENDING, as before.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvnode.connector.config import ConnectorConfig
from kvnode.connector.counters import Counters
from kvnode.connector.groups import FULL, CacheGroup, GroupPlan
from kvnode.connector.keys import Namespace, chunk_keys
from kvnode.errors import ArenaError, KVNodeError
from kvnode.ipc.protocol import Lookup
from kvnode.ipc.shmindex import LOWER_LISTED, LOWER_NONE, ShmIndexReader, listing_name

log = logging.getLogger("kvnode.connector")

SKIP_PARAM = "kvnode.skip"
NULL_BLOCK_ID = 0  # vLLM's placeholder block for tokens out of a window
REQUESTS_TRACKED_MAX = 65536  # requests vLLM never reported finished are forgotten past this
INDEX_RETRY_S = 1.0  # an index segment that would not open is tried again after this


@dataclass(frozen=True, slots=True)
class ChunkOp:
    """One chunk to load or save: its key on every rank and the vLLM blocks it covers.

    ``block_offset`` is the index, inside the stored entry, of ``block_ids[0]``: a load
    that starts behind vLLM's own prefix-cache hit covers only the chunk's tail blocks.
    A sliding-window group's entry holds only the chunk's last blocks
    (``CacheGroup.stored_blocks``); offsets count from its first one.
    """

    index: int
    keys: tuple[bytes, ...]  # by rank index (pp_rank * tp_size + tp_rank)
    block_ids: tuple[int, ...]
    block_offset: int = 0
    group: int = 0  # vLLM's KV cache group id: whose block table block_ids index
    # Saves only (loads leave them empty, keeping the step's metadata small): the
    # previous chunk's key on every rank (b"" for a prompt's first chunk) and the
    # chunk's token ids, for the KV events the agent and vLLM publish.
    parents: tuple[bytes, ...] = ()
    tokens: tuple[int, ...] = ()


@dataclass(slots=True)
class _Req:
    request: Any
    extras: tuple[str, ...]
    skip: bool
    keys: list[list[tuple[bytes, ...]]] = field(default_factory=list)  # group, chunk, rank
    pending_since_s: float | None = None
    plan: tuple[int, int] | None = None  # (start, end) tokens offered by the last lookup
    load: tuple[int, int] | None = None  # (start, end) tokens to load in the next step
    saved_chunks: int = 0  # chunks [0, saved_chunks) are stored or known present
    load_blocks: tuple[list[int], ...] | None = None  # an async load's block tables
    saves_planned: bool = False  # some step's metadata carried saves of this request


@dataclass(slots=True)
class SchedulerStats(Counters):
    lookups: int = 0
    lookup_errors: int = 0
    lookup_s: float = 0.0
    index_lookups: int = 0  # answered from the shared index
    index_round_trips: int = 0  # of those, the agent asked from the first miss on
    index_listed_misses: int = 0  # of those, a miss the disk listing made certain
    index_errors: int = 0  # index closed, stale or busy: the agent answered instead
    query_tokens: int = 0
    hit_tokens: int = 0
    pending_waits: int = 0
    pending_timeouts: int = 0
    skipped_requests: int = 0
    save_chunks_planned: int = 0
    save_chunks_present: int = 0  # not planned: the shared index shows them stored
    load_chunks_planned: int = 0


def combine(states: Sequence[Sequence[int]]) -> list[int]:
    """Per chunk, the answer for all ranks together: HIT only if every rank hits,
    MISS if any rank misses, PENDING otherwise."""
    out: list[int] = []
    for per_rank in zip(*states, strict=True):
        if any(s == Lookup.MISS for s in per_rank):
            out.append(Lookup.MISS)
        elif all(s == Lookup.HIT for s in per_rank):
            out.append(Lookup.HIT)
        else:
            out.append(Lookup.PENDING)
    return out


def request_extras(request: Any) -> tuple[str, ...]:
    """Request-level namespace extras: what makes the same tokens give other KV."""
    extras: list[str] = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        name = getattr(lora, "lora_name", None) or getattr(lora, "name", "")
        extras.append(f"lora:{name}:{getattr(lora, 'lora_path', '') or ''}")
    salt = getattr(request, "cache_salt", None)
    if salt:
        extras.append(f"salt:{salt}")
    for feat in getattr(request, "mm_features", None) or ():
        ident = getattr(feat, "identifier", None) or getattr(feat, "mm_hash", None)
        extras.append(f"mm:{ident}")
    return tuple(extras)


def wants_skip(request: Any) -> bool:
    params = getattr(request, "kv_transfer_params", None) or {}
    if params.get(SKIP_PARAM):
        return True
    # Prompt embeddings have no token ids to key on.
    return getattr(request, "prompt_embeds", None) is not None


class _SharedReader:
    """One shared-memory table (the lookup index, the disk listing) kept open across
    calls: replaced when its name changes, remapped when the agent's generation does,
    and tried again at most every ``INDEX_RETRY_S`` when it cannot be opened."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.reader: ShmIndexReader | None = None
        self._retry_s = 0.0

    def get(self, name: str, generation: int, now: float) -> ShmIndexReader | None:
        """The reader of ``name`` written in ``generation`` (0: any); None when there
        is none to trust."""
        reader = self.reader
        if reader is not None and reader.name != name:
            self.close()
            reader = None
        if not name:
            return None
        if reader is None:
            if now < self._retry_s:
                return None
            try:
                reader = self.reader = ShmIndexReader(name)
            except (ArenaError, ValueError, OSError) as exc:
                self._retry_s = now + INDEX_RETRY_S
                log.debug("kvnode: %s not readable (%s)", self.what, exc)
                return None
        stale = bool(generation) and reader.generation != generation
        if stale and not (reader.reopen() and reader.generation == generation):
            return None  # the client has not seen that agent yet, or vice versa
        return reader

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


class SchedulerSide:
    """Lookups and step planning. ``link.call(fn)`` runs ``fn(client)`` or raises."""

    def __init__(
        self,
        cfg: ConnectorConfig,
        link: Any,
        block_size: int,
        load: bool = True,
        save: bool = True,
        clock: Callable[[], float] = time.monotonic,
        plan: GroupPlan | None = None,
    ) -> None:
        cfg.check_block_size(block_size)
        plan = plan or GroupPlan((CacheGroup(0, FULL, 0, ()),), 1)
        self.groups = plan.groups
        # Several block tables: vLLM cannot map block-level load errors back to requests,
        # so loads are asynchronous and a failed one is reported per request.
        self.async_loads = plan.num_vllm_groups > 1
        self.cfg = cfg
        self.link = link
        self.block_size = block_size
        self.chunk_tokens = cfg.chunk_tokens
        self.blocks_per_chunk = cfg.chunk_tokens // block_size
        self.load_enabled = load and cfg.load
        self.save_enabled = save and cfg.save
        self.clock = clock
        self.namespaces: list[Namespace] = []  # by rank index; empty until workers report
        self.group_ns: list[list[Namespace]] = []  # by position in self.groups, then rank
        self.stats = SchedulerStats()
        self._reqs: OrderedDict[str, _Req] = OrderedDict()
        self._index = _SharedReader("lookup index")
        self._listing = _SharedReader("disk listing")  # the disk tier's keys, when listed
        self._index_warned_s = 0.0

    def take_stats(self, wait: bool = False) -> dict[str, float]:
        return self.stats.take()

    # ------------------------------------------------------------------ setup
    def set_namespaces(
        self,
        namespaces: Sequence[Namespace],
        group_ns: Sequence[Sequence[Namespace]] | None = None,
    ) -> None:
        if group_ns is not None and len(group_ns) != len(self.groups):
            raise ValueError(f"{len(group_ns)} group namespaces for {len(self.groups)} groups")
        self.namespaces = list(namespaces)
        self.group_ns = [list(g) for g in group_ns] if group_ns else [self.namespaces]

    @property
    def active(self) -> bool:
        return bool(self.namespaces)

    def _state(self, request: Any) -> _Req:
        rid = request.request_id
        st = self._reqs.get(rid)
        if st is None:
            skip = wants_skip(request)
            st = _Req(request=request, extras=() if skip else request_extras(request), skip=skip)
            if skip:
                self.stats.skipped_requests += 1
            self._reqs[rid] = st
            while len(self._reqs) > REQUESTS_TRACKED_MAX:
                self._reqs.popitem(last=False)
        else:
            st.request = request
        return st

    def _keys(self, st: _Req, n_chunks: int, pos: int = 0) -> list[tuple[bytes, ...]]:
        """Keys of chunks [0, n_chunks) of the group at ``pos`` on every rank (computed
        once, extended as the request grows: keys are chained, so a prefix's keys never
        change)."""
        if not st.keys or len(st.keys[0]) < n_chunks:
            tokens = list(st.request.all_token_ids[: n_chunks * self.chunk_tokens])
            st.keys = [self._group_keys(st, tokens, ranks) for ranks in self.group_ns]
        return st.keys[pos][:n_chunks]

    def _group_keys(
        self, st: _Req, tokens: list[int], ranks: list[Namespace]
    ) -> list[tuple[bytes, ...]]:
        per_rank = [
            chunk_keys(ns.with_extras(st.extras) if st.extras else ns, tokens, self.chunk_tokens)
            for ns in ranks
        ]
        return list(zip(*per_rank, strict=True))

    # ------------------------------------------------------------------ lookup
    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if not self.active:
            return 0, False
        st = self._state(request)  # also when loads are off: saves are planned from it
        st.plan = None
        st.load = None
        if st.skip or not self.load_enabled:
            return 0, False
        C = self.chunk_tokens
        # Never the chunk holding the last token: vLLM must compute at least one.
        usable = (request.num_tokens - 1) // C
        first = num_computed_tokens // C
        if usable <= first:
            return 0, False
        self.stats.query_tokens += usable * C - num_computed_tokens
        match = self._match(st, first, usable)
        if match is None:
            return 0, False
        hit_end, pending = match
        if pending:
            now = self.clock()
            if st.pending_since_s is None:
                st.pending_since_s = now
            if (now - st.pending_since_s) * 1000.0 < self.cfg.prefetch_deadline_ms:
                self.stats.pending_waits += 1
                return None, False
            self.stats.pending_timeouts += 1
        end = hit_end * C
        if end <= num_computed_tokens:
            return 0, False
        st.plan = (num_computed_tokens, end)
        self.stats.hit_tokens += end - num_computed_tokens
        return end - num_computed_tokens, self.async_loads

    def _match(self, st: _Req, first: int, usable: int) -> tuple[int, bool] | None:
        """(chunk where the hit ends, whether a PENDING chunk ends it) for chunks
        [first, usable): every full-attention group has each chunk of the hit, every
        sliding-window group the chunks its window reads before the hit's end. None
        when the agent cannot answer."""
        end, pending = usable, False
        for pos, group in enumerate(self.groups):
            if group.kind == FULL:
                run = self._run(st, pos, first, end)
                if run is None:
                    return None
                end, pending = _narrow(end, pending, run)
        if end > first and not self._windows_hit(st, first, end):
            for pos, group in enumerate(self.groups):
                if group.kind != FULL:
                    lo = self._window_start(group, first, first + 1)
                    run = self._run(st, pos, lo, end)
                    if run is None:
                        return None
                    end, pending = _narrow(end, pending, run)
        return max(end, first), pending

    def _window_start(self, group: CacheGroup, first: int, end: int) -> int:
        """The first chunk a hit ending at chunk ``end`` needs from ``group``."""
        return max(first, group.first_needed_token(end * self.chunk_tokens) // self.chunk_tokens)

    def _windows_hit(self, st: _Req, first: int, end: int) -> bool:
        """Whether every sliding-window group has the chunks its window reads before
        ``end``: the common case asks for those chunks only."""
        for pos, group in enumerate(self.groups):
            if group.kind != FULL:
                run = self._run(st, pos, self._window_start(group, first, end), end)
                if run is None or run[0] < end:
                    return False
        return True

    def _run(self, st: _Req, pos: int, lo: int, hi: int) -> tuple[int, bool] | None:
        """Of the group's chunks [lo, hi): where its run of hits from ``lo`` ends, and
        whether a PENDING chunk ends it. None when the agent cannot answer."""
        if hi <= lo:
            return hi, False
        states = self._lookup(self._keys(st, hi, pos)[lo:])
        if states is None:
            return None
        hits = 0
        while hits < len(states) and states[hits] == Lookup.HIT:
            hits += 1
        return lo + hits, hits < len(states) and states[hits] == Lookup.PENDING

    def _lookup(self, keys: list[tuple[bytes, ...]]) -> list[int] | None:
        """Per chunk, the answer for all ranks; None when the agent cannot answer."""
        t0 = time.perf_counter()
        self.stats.lookups += 1
        try:
            try:
                reader = self.link.call(self._index_for)
            except KVNodeError as exc:
                self.stats.lookup_errors += 1
                log.debug("kvnode lookup failed: %s", exc)
                return None
            if reader is not None:
                try:
                    states = self._index_states(reader, keys)
                except Exception:
                    # Shared memory any process of the agent's user may write: whatever
                    # goes wrong reading it is a miss, never an error inside vLLM.
                    self._index_failed()
                    return [Lookup.MISS] * len(keys)
                if states is not None:
                    return states
            return self._agent_states(keys)
        finally:
            self.stats.lookup_s += time.perf_counter() - t0

    def _index_failed(self) -> None:
        """A reader raised what the index's own checks did not turn into ArenaError:
        count it, log it (at most every INDEX_RETRY_S), and map the segment afresh."""
        self.stats.index_errors += 1
        now = self.clock()
        if now >= self._index_warned_s:
            self._index_warned_s = now + INDEX_RETRY_S
            log.warning("kvnode: shared lookup index unreadable; a miss", exc_info=True)
        self._index.close()
        self._listing.close()

    def _index_for(self, client: Any) -> ShmIndexReader | None:
        """The reader of the index the client's agent publishes, (re)opened for the
        agent's current generation; None when there is none to trust."""
        name = getattr(client, "index_segment", "") or ""
        return self._index.get(name, getattr(client, "generation", 0), self.clock())

    def _index_states(
        self, reader: ShmIndexReader, keys: list[tuple[bytes, ...]]
    ) -> list[int] | None:
        """Leading hits from the index; the first miss ends the prefix unless a lower
        tier could have it, in which case the agent answers from there on."""
        n = len(keys)
        flat = [k for per_rank in zip(*keys, strict=True) for k in per_rank] if keys else []
        try:
            present = reader.contains_many(flat)
            lower = reader.lower_mode
        except ArenaError as exc:
            self.stats.index_errors += 1
            log.debug("kvnode: lookup index unusable (%s); asking the agent", exc)
            return None
        self.stats.index_lookups += 1
        by_rank = present.reshape(len(self.namespaces), n)
        every_rank = by_rank.all(axis=0)
        hits = n if every_rank.all() else int(every_rank.argmin())
        states: list[int] = [Lookup.HIT] * hits
        if hits == n or lower == LOWER_NONE:
            return states + [Lookup.MISS] * (n - hits)
        if lower == LOWER_LISTED and not self._listed(reader, keys[hits], by_rank[:, hits]):
            # The first missing chunk is on neither the arena nor the disk: the prefix
            # ends there for certain, and nothing the agent could say would extend it.
            self.stats.index_listed_misses += 1
            return states + [Lookup.MISS] * (n - hits)
        self.stats.index_round_trips += 1
        rest = self._agent_states(keys[hits:])
        return states + (rest if rest is not None else [Lookup.MISS] * (n - hits))

    def _listed(self, reader: ShmIndexReader, chunk: tuple[bytes, ...], in_arena: Any) -> bool:
        """Whether every rank's entry of ``chunk`` is in the arena or listed on disk
        (True, "ask the agent", also when the listing cannot be read)."""
        listing = self._listing_for(reader)
        if listing is None:
            return True
        want = [k for k, here in zip(chunk, in_arena.tolist(), strict=True) if not here]
        try:
            listed = bool(listing.contains_many(want).all())
        except ArenaError as exc:
            log.debug("kvnode: disk listing unusable (%s); asking the agent", exc)
            return True
        # contains_many may have remapped the name to a newer agent's listing
        return listed or listing.generation != reader.generation

    def _listing_for(self, reader: ShmIndexReader) -> ShmIndexReader | None:
        """The reader of the disk listing next to ``reader``'s index, of the same
        agent generation; None when there is none to trust."""
        return self._listing.get(listing_name(reader.name), reader.generation, self.clock())

    def _agent_states(self, keys: list[tuple[bytes, ...]]) -> list[int] | None:
        """One batched lookup round trip for all ranks; None when it fails."""
        n_ranks = len(self.namespaces)
        flat = [k for per_rank in zip(*keys, strict=True) for k in per_rank] if keys else []
        try:
            answer: list[int] = []
            step = self.cfg.keys_per_call_max
            for i in range(0, len(flat), step):
                part = flat[i : i + step]
                answer.extend(self.link.call(lambda c, part=part: c.lookup(part)))
        except KVNodeError as exc:
            self.stats.lookup_errors += 1
            log.debug("kvnode lookup failed: %s", exc)
            return None
        if len(answer) != len(flat):
            self.stats.lookup_errors += 1
            return None
        n = len(keys)
        return combine([answer[r * n : (r + 1) * n] for r in range(n_ranks)])

    def update_state_after_alloc(
        self,
        request: Any,
        num_external_tokens: int,
        block_ids: tuple[list[int], ...] | None = None,
    ) -> None:
        """``block_ids``: the request's block table per vLLM group, for an async load
        (the request is not scheduled in the step that loads it)."""
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        st.pending_since_s = None
        if num_external_tokens <= 0 or st.plan is None:
            st.load = None
            return
        start, end = st.plan
        end = min(end, start + num_external_tokens)
        st.load = (start, end)
        st.load_blocks = block_ids if self.async_loads else None
        st.saved_chunks = max(st.saved_chunks, end // self.chunk_tokens)
        st.plan = None

    # ------------------------------------------------------------------ steps
    def build_step(
        self,
        scheduled: Iterable[tuple[str, int, int]],
        block_ids_of: Callable[[str], Sequence[Sequence[int]] | None],
    ) -> tuple[dict[str, list[ChunkOp]], dict[str, list[ChunkOp]]]:
        """``scheduled``: (req_id, tokens computed before this step, tokens scheduled);
        ``block_ids_of``: a request's block table per vLLM group (or the one table of a
        single-group model). Returns (loads, saves) by request id."""
        loads = self._async_loads()
        saves: dict[str, list[ChunkOp]] = {}
        budget = self.cfg.chunks_per_step_max
        for req_id, computed, scheduled_n in scheduled:
            st = self._reqs.get(req_id)
            if st is None or st.skip or not self.namespaces:
                continue
            need_save = (
                self.save_enabled and self._save_end(st, computed + scheduled_n) > st.saved_chunks
            )
            if st.load is None and not need_save:
                continue
            got = block_ids_of(req_id)
            if got is None:
                continue
            tables = _tables(got)
            if st.load is not None:
                self._plan_load(loads, req_id, st, tables)
            if need_save and budget > 0:
                ops = self._save_ops(st, tables, computed + scheduled_n, budget)
                if ops:
                    saves[req_id] = ops
                    st.saves_planned = True
                    budget -= len({op.index for op in ops})
                    self.stats.save_chunks_planned += len(ops)
        return loads, saves

    def _async_loads(self) -> dict[str, list[ChunkOp]]:
        """Loads granted with their own block tables: vLLM does not schedule a request
        while its asynchronous load runs."""
        loads: dict[str, list[ChunkOp]] = {}
        if not self.async_loads:
            return loads
        for req_id, st in self._reqs.items():
            if st.load is not None and st.load_blocks is not None and not st.skip:
                self._plan_load(loads, req_id, st, [list(t) for t in st.load_blocks])
                st.load_blocks = None
        return loads

    def _plan_load(
        self, loads: dict[str, list[ChunkOp]], req_id: str, st: _Req, tables: list[list[int]]
    ) -> None:
        ops = self._load_ops(st, tables)
        st.load = None
        if ops:
            loads[req_id] = ops
            self.stats.load_chunks_planned += len(ops)

    def _load_ops(self, st: _Req, tables: list[list[int]]) -> list[ChunkOp]:
        assert st.load is not None
        start, end = st.load
        ops: list[ChunkOp] = []
        for pos, group in enumerate(self.groups):
            table = tables[group.index] if group.index < len(tables) else []
            ops.extend(self._group_load_ops(st, pos, group, table, start, end))
        return ops

    def _group_load_ops(
        self, st: _Req, pos: int, group: CacheGroup, table: list[int], start: int, end: int
    ) -> list[ChunkOp]:
        """The blocks of [start, end) the group needs, from the entries that hold them:
        a sliding-window group only those its window reads before ``end``."""
        bs, bpc = self.block_size, self.blocks_per_chunk
        stored = group.stored_blocks(bpc, bs)
        lo = max(start // bs, group.first_needed_token(end) // bs)
        hi = min(-(-end // bs), len(table))
        keys = self._keys(st, -(-hi // bpc), pos)
        ops: list[ChunkOp] = []
        for c in range(lo // bpc, -(-hi // bpc)):
            first_stored = (c + 1) * bpc - stored
            b0, b1 = max(lo, first_stored), min(hi, (c + 1) * bpc)
            if b1 > b0:
                ops.append(ChunkOp(c, keys[c], tuple(table[b0:b1]), b0 - first_stored, group.index))
        return ops

    def _save_end(self, st: _Req, computed_after: int) -> int:
        """Chunks whose KV is complete in vLLM's blocks after this step."""
        req = st.request
        limit = req.num_tokens if self.cfg.save_decode else req.num_prompt_tokens
        # A position's KV is right only if its input was a real token, not a draft.
        return min(computed_after, limit, req.num_tokens) // self.chunk_tokens

    def _save_ops(
        self, st: _Req, tables: list[list[int]], computed_after: int, budget: int
    ) -> list[ChunkOp]:
        """Each new chunk, in every group: the blocks a later hit reads from it."""
        bpc = self.blocks_per_chunk
        end = self._save_end(st, computed_after)
        for group in self.groups:
            table = tables[group.index] if group.index < len(tables) else []
            end = min(end, len(table) // bpc)
        end = min(end, st.saved_chunks + budget)
        if end <= st.saved_chunks:
            return []
        ops: list[ChunkOp] = []
        tokens = self._chunk_tokens(st, st.saved_chunks, end)
        group_keys = [self._keys(st, end, pos) for pos in range(len(self.groups))]
        present = self._stored_already(group_keys, st.saved_chunks, end)
        for pos, group in enumerate(self.groups):
            keys = group_keys[pos]
            table, stored = tables[group.index], group.stored_blocks(bpc, self.block_size)
            first = tuple(b"" for _ in keys[0]) if keys else ()
            for c in range(st.saved_chunks, end):
                if c in present:
                    continue
                blocks = tuple(table[(c + 1) * bpc - stored : (c + 1) * bpc])
                # vLLM's null block (id 0) stands for blocks it freed behind a window:
                # nothing to save there (the window argument says it never happens).
                if group.kind == FULL or NULL_BLOCK_ID not in blocks:
                    parents = keys[c - 1] if c > 0 else first
                    toks = tokens[c - st.saved_chunks]
                    ops.append(ChunkOp(c, keys[c], blocks, 0, group.index, parents, toks))
        st.saved_chunks = end
        return ops

    def _stored_already(
        self, group_keys: list[list[tuple[bytes, ...]]], lo: int, hi: int
    ) -> set[int]:
        """Chunks of [lo, hi) the shared index shows stored for every group and rank:
        a request served by vLLM's own prefix cache would otherwise store them again
        (a reserve answered EXISTS: one round trip on the worker per step). A stale
        answer costs one missed save, which a later request makes up for."""
        if hi <= lo:
            return set()
        try:
            reader = self.link.call(self._index_for)
        except KVNodeError:
            return set()
        if reader is None:
            return set()
        flat = [k for keys in group_keys for c in range(lo, hi) for k in keys[c]]
        try:
            here = reader.contains_many(flat)
        except ArenaError:
            return set()
        except Exception:
            self._index_failed()  # see _lookup: the chunks are saved as if not stored
            return set()
        per_chunk = here.reshape(len(group_keys), hi - lo, -1).all(axis=(0, 2))
        skip = {lo + i for i in np.flatnonzero(per_chunk).tolist()}
        self.stats.save_chunks_present += len(skip)
        return skip

    def _chunk_tokens(self, st: _Req, lo: int, hi: int) -> list[tuple[int, ...]]:
        """Token ids of chunks [lo, hi), one tuple per chunk."""
        C = self.chunk_tokens
        ids = list(st.request.all_token_ids[lo * C : hi * C])
        return [tuple(ids[i * C : (i + 1) * C]) for i in range(hi - lo)]

    def request_finished(self, request_id: str) -> bool:
        """Forget the request; True when some step's metadata carried its saves."""
        st = self._reqs.pop(request_id, None)
        return st is not None and st.saves_planned

    def close(self) -> None:
        self._index.close()
        self._listing.close()


def _narrow(end: int, pending: bool, run: tuple[int, bool]) -> tuple[int, bool]:
    """The hit end after one more group's run: the shorter wins, with its PENDING."""
    run_end, run_pending = run
    if run_end < end:
        return run_end, run_pending
    return end, pending or (run_end == end and run_pending)


def _tables(got: Sequence[Sequence[int]] | Sequence[int]) -> list[list[int]]:
    """Per-group block tables from vLLM's tuple of lists, or one table given flat."""
    if got and not isinstance(got[0], int):
        return [list(t) for t in got]  # type: ignore[arg-type]
    return [list(got)]  # type: ignore[arg-type]
