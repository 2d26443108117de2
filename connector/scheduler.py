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

from kvnode.connector.config import ConnectorConfig
from kvnode.connector.keys import Namespace, chunk_keys
from kvnode.errors import ArenaError, KVNodeError
from kvnode.ipc.protocol import Lookup
from kvnode.ipc.shmindex import ShmIndexReader

log = logging.getLogger("kvnode.connector")

SKIP_PARAM = "kvnode.skip"
REQUESTS_TRACKED_MAX = 65536  # requests vLLM never reported finished are forgotten past this
INDEX_RETRY_S = 1.0  # an index segment that would not open is tried again after this


@dataclass(frozen=True, slots=True)
class ChunkOp:
    """One chunk to load or save: its key on every rank and the vLLM blocks it covers.

    ``block_offset`` is the index, inside the chunk, of ``block_ids[0]``: a load that
    starts behind vLLM's own prefix-cache hit covers only the chunk's tail blocks.
    """

    index: int
    keys: tuple[bytes, ...]  # by rank index (pp_rank * tp_size + tp_rank)
    block_ids: tuple[int, ...]
    block_offset: int = 0


@dataclass(slots=True)
class _Req:
    request: Any
    extras: tuple[str, ...]
    skip: bool
    keys: list[tuple[bytes, ...]] = field(default_factory=list)  # per chunk, per rank
    pending_since_s: float | None = None
    plan: tuple[int, int] | None = None  # (start, end) tokens offered by the last lookup
    load: tuple[int, int] | None = None  # (start, end) tokens to load in the next step
    saved_chunks: int = 0  # chunks [0, saved_chunks) are stored or known present


@dataclass(slots=True)
class SchedulerStats:
    lookups: int = 0
    lookup_errors: int = 0
    lookup_s: float = 0.0
    index_lookups: int = 0  # answered from the shared index
    index_round_trips: int = 0  # of those, the agent asked from the first miss on
    index_errors: int = 0  # index closed, stale or busy: the agent answered instead
    query_tokens: int = 0
    hit_tokens: int = 0
    pending_waits: int = 0
    pending_timeouts: int = 0
    skipped_requests: int = 0
    save_chunks_planned: int = 0
    load_chunks_planned: int = 0

    def take(self) -> dict[str, float]:
        out = {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]
        for k in self.__slots__:  # type: ignore[attr-defined]
            setattr(self, k, type(getattr(self, k))())
        return out


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
    ) -> None:
        cfg.check_block_size(block_size)
        self.cfg = cfg
        self.link = link
        self.block_size = block_size
        self.chunk_tokens = cfg.chunk_tokens
        self.blocks_per_chunk = cfg.chunk_tokens // block_size
        self.load_enabled = load and cfg.load
        self.save_enabled = save and cfg.save
        self.clock = clock
        self.namespaces: list[Namespace] = []  # by rank index; empty until workers report
        self.stats = SchedulerStats()
        self._reqs: OrderedDict[str, _Req] = OrderedDict()
        self._index: ShmIndexReader | None = None
        self._index_retry_s = 0.0

    # ------------------------------------------------------------------ setup
    def set_namespaces(self, namespaces: Sequence[Namespace]) -> None:
        self.namespaces = list(namespaces)

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

    def _keys(self, st: _Req, n_chunks: int) -> list[tuple[bytes, ...]]:
        """Keys of chunks [0, n_chunks) on every rank (computed once, extended as the
        request grows: keys are chained, so a prefix's keys never change)."""
        if len(st.keys) < n_chunks:
            tokens = list(st.request.all_token_ids[: n_chunks * self.chunk_tokens])
            per_rank = [
                chunk_keys(
                    ns.with_extras(st.extras) if st.extras else ns, tokens, self.chunk_tokens
                )
                for ns in self.namespaces
            ]
            st.keys = list(zip(*per_rank, strict=True))
        return st.keys[:n_chunks]

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
        keys = self._keys(st, usable)[first:]
        self.stats.query_tokens += usable * C - num_computed_tokens
        states = self._lookup(keys)
        if states is None:
            return 0, False
        hits = 0
        while hits < len(states) and states[hits] == Lookup.HIT:
            hits += 1
        if hits < len(states) and states[hits] == Lookup.PENDING:
            now = self.clock()
            if st.pending_since_s is None:
                st.pending_since_s = now
            if (now - st.pending_since_s) * 1000.0 < self.cfg.prefetch_deadline_ms:
                self.stats.pending_waits += 1
                return None, False
            self.stats.pending_timeouts += 1
        end = (first + hits) * C
        if end <= num_computed_tokens:
            return 0, False
        st.plan = (num_computed_tokens, end)
        self.stats.hit_tokens += end - num_computed_tokens
        return end - num_computed_tokens, False

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
                states = self._index_states(reader, keys)
                if states is not None:
                    return states
            return self._agent_states(keys)
        finally:
            self.stats.lookup_s += time.perf_counter() - t0

    def _index_for(self, client: Any) -> ShmIndexReader | None:
        """The reader of the index the client's agent publishes, (re)opened for the
        agent's current generation; None when there is none to trust."""
        name = getattr(client, "index_segment", "") or ""
        reader = self._index
        if reader is not None and reader.name != name:
            reader.close()
            self._index = reader = None
        if not name:
            return None
        if reader is None:
            now = self.clock()
            if now < self._index_retry_s:
                return None
            try:
                reader = self._index = ShmIndexReader(name)
            except ArenaError as exc:
                self._index_retry_s = now + INDEX_RETRY_S
                log.debug("kvnode: lookup index not readable (%s)", exc)
                return None
        generation = getattr(client, "generation", 0)
        stale = bool(generation) and reader.generation != generation
        if stale and not (reader.reopen() and reader.generation == generation):
            return None  # the client has not seen that agent yet, or vice versa
        return reader

    def _index_states(
        self, reader: ShmIndexReader, keys: list[tuple[bytes, ...]]
    ) -> list[int] | None:
        """Leading hits from the index; the first miss ends the prefix unless a lower
        tier could have it, in which case the agent answers from there on."""
        n = len(keys)
        flat = [k for per_rank in zip(*keys, strict=True) for k in per_rank] if keys else []
        try:
            present = reader.contains_many(flat)
            lower_tiers = reader.lower_tiers
        except ArenaError as exc:
            self.stats.index_errors += 1
            log.debug("kvnode: lookup index unusable (%s); asking the agent", exc)
            return None
        self.stats.index_lookups += 1
        every_rank = present.reshape(len(self.namespaces), n).all(axis=0)
        hits = n if every_rank.all() else int(every_rank.argmin())
        states: list[int] = [Lookup.HIT] * hits
        if hits == n or not lower_tiers:
            return states + [Lookup.MISS] * (n - hits)
        self.stats.index_round_trips += 1
        rest = self._agent_states(keys[hits:])
        return states + (rest if rest is not None else [Lookup.MISS] * (n - hits))

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

    def update_state_after_alloc(self, request: Any, num_external_tokens: int) -> None:
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
        st.saved_chunks = max(st.saved_chunks, end // self.chunk_tokens)
        st.plan = None

    # ------------------------------------------------------------------ steps
    def build_step(
        self,
        scheduled: Iterable[tuple[str, int, int]],
        block_ids_of: Callable[[str], list[int] | None],
    ) -> tuple[dict[str, list[ChunkOp]], dict[str, list[ChunkOp]]]:
        """``scheduled``: (req_id, tokens computed before this step, tokens scheduled).
        Returns (loads, saves) by request id."""
        loads: dict[str, list[ChunkOp]] = {}
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
            blocks = block_ids_of(req_id)
            if blocks is None:
                continue
            if st.load is not None:
                ops = self._load_ops(st, blocks)
                st.load = None
                if ops:
                    loads[req_id] = ops
                    self.stats.load_chunks_planned += len(ops)
            if need_save and budget > 0:
                ops = self._save_ops(st, blocks, computed + scheduled_n, budget)
                if ops:
                    saves[req_id] = ops
                    budget -= len(ops)
                    self.stats.save_chunks_planned += len(ops)
        return loads, saves

    def _load_ops(self, st: _Req, blocks: list[int]) -> list[ChunkOp]:
        assert st.load is not None
        start, end = st.load
        bs, bpc, C = self.block_size, self.blocks_per_chunk, self.chunk_tokens
        keys = self._keys(st, -(-end // C))
        ops: list[ChunkOp] = []
        for c in range(start // C, -(-end // C)):
            b0 = max(c * bpc, start // bs)
            b1 = min((c + 1) * bpc, -(-end // bs), len(blocks))
            if b1 <= b0:
                break
            ops.append(ChunkOp(c, keys[c], tuple(blocks[b0:b1]), b0 - c * bpc))
        return ops

    def _save_end(self, st: _Req, computed_after: int) -> int:
        """Chunks whose KV is complete in vLLM's blocks after this step."""
        req = st.request
        limit = req.num_tokens if self.cfg.save_decode else req.num_prompt_tokens
        # A position's KV is right only if its input was a real token, not a draft.
        return min(computed_after, limit, req.num_tokens) // self.chunk_tokens

    def _save_ops(
        self, st: _Req, blocks: list[int], computed_after: int, budget: int
    ) -> list[ChunkOp]:
        bpc = self.blocks_per_chunk
        end = min(self._save_end(st, computed_after), len(blocks) // bpc)
        end = min(end, st.saved_chunks + budget)
        if end <= st.saved_chunks:
            return []
        keys = self._keys(st, end)
        ops = [
            ChunkOp(c, keys[c], tuple(blocks[c * bpc : (c + 1) * bpc]))
            for c in range(st.saved_chunks, end)
        ]
        st.saved_chunks = end
        return ops

    def request_finished(self, request_id: str) -> None:
        self._reqs.pop(request_id, None)

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None
