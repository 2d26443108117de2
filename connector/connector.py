"""``KVNodeConnector``: vLLM's ``KVConnectorBase_V1`` on top of the kvnode agent.

Enable with::

    KVTransferConfig(kv_connector="KVNodeConnector", kv_connector_module_path="kvnode.connector",
                     kv_role="kv_both", kv_connector_extra_config={"kvnode.runtime_dir": DIR})

vLLM builds one instance per role and process. The scheduler-side instance asks the
agent for prefix hits (``scheduler.py``); each worker's instance copies chunks between
its paged KV cache and the agent's arena (``worker.py``). Loads are synchronous (done in
``start_load_kv`` before the forward pass), saves happen in ``wait_for_save`` after the
forward pass, so no block is ever held past its request.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvnode.connector.agent_mode import AgentPath
from kvnode.connector.config import ConnectorConfig
from kvnode.connector.group_worker import GroupWorkers, build_group_workers
from kvnode.connector.groups import plan_groups
from kvnode.connector.link import AgentLink, default_client_factory
from kvnode.connector.metadata import (
    KVNodeConnectorMetadata,
    KVNodeEvents,
    KVNodeHandshake,
    stored_event,
)
from kvnode.connector.namespace import group_namespaces, model_identity, rank_namespaces
from kvnode.connector.scheduler import SchedulerSide
from kvnode.connector.stats import KVNodeStats
from kvnode.connector.worker import WorkerSide, WorkerStats
from kvnode.cores import cores_left, format_cpu_list
from kvnode.kernels.hostmem import ArenaMapping

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvnode.connector")
LOG_INTERVAL_S = 60.0
EVENTS_QUEUED_MAX = 100_000  # stored-chunk events waiting for vLLM's take_events
# transfer "auto" on the CPU backend: agent mode where vLLM binds its compute threads
# to cores and leaves some (VLLM_CPU_OMP_THREADS_BIND, or a process started on a core
# list), since the agent's copy threads run there (agent.cpu_copy_cores = auto); worker
# mode where vLLM's threads may run on every core. Measured on 2 cores with vLLM on
# core 0 (benchmarks/vllm_ttft.py --vllm-cpus 0, two pairs back to back): a hit's
# forward pass waited 6.0-7.0 ms for its loads in agent mode against 9.4-9.8 ms in
# worker mode (vs_apc 1.081-1.100 against 1.107-1.110), and no save waited (0.4% of
# the copy against 100%). With vLLM's threads on every core the agent's copies share
# its cores and the two modes measured the same (vs_apc 1.191 against 1.213, 1.06
# against 1.01 on a slower machine: docs/connector.md), so worker mode stays there.
# Decided at register_kv_caches, after vLLM bound its threads (_transfer_mode).


def _share_vllm_logging() -> None:
    """kvnode's connector logs go where vLLM's go, in its format."""
    ours, theirs = logging.getLogger("kvnode"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for h in theirs.handlers:
            ours.addHandler(h)
        ours.setLevel(theirs.level or logging.INFO)
        ours.propagate = False


_share_vllm_logging()


class KVNodeConnector(KVConnectorBase_V1, SupportsHMA):
    _cache_hit_source = CacheHitSource.HOST

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        if getattr(ktc, "kv_load_failure_policy", "recompute") != "recompute":
            # A chunk that fails to load is a cache miss, never a failed request
            # (vLLM's default policy is "fail"). The scheduler reads this after
            # building its connector, so setting it here takes effect.
            log.info("kvnode: kv_load_failure_policy set to 'recompute'")
            ktc.kv_load_failure_policy = "recompute"
        self.cfg = ConnectorConfig.from_sources(ktc.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self.cfg.check_block_size(self.block_size)
        par = vllm_config.parallel_config
        self.tp_size = par.tensor_parallel_size
        self.pp_size = par.pipeline_parallel_size
        self._load = bool(ktc.is_kv_consumer)
        self._save = bool(ktc.is_kv_producer)
        self._sched: SchedulerSide | None = None
        self._worker: WorkerSide | GroupWorkers | None = None
        self._handshake: KVNodeHandshake | None = None
        self._arena: ArenaMapping | None = None
        self._agent: AgentPath | None = None  # agent mode (the agent moves the bytes)
        self._delay_frees = False  # scheduler: some worker may save through the agent
        self._totals: dict[str, float] = {}
        self._failures_seen = 0
        self._last_log_s = time.monotonic()
        # vLLM's own KV event stream carries the chunks this connector stored, when
        # vLLM's KV events are on (otherwise the workers do not report them).
        kec = getattr(vllm_config, "kv_events_config", None)
        self._events_on = bool(kec is not None and kec.enable_kv_cache_events)
        self._events: deque[KVCacheEvent] = deque()
        self.events_dropped = 0
        self._saved_step = False
        # Which KV cache groups are cached (connector/groups.py): with the hybrid
        # manager on, one entry per chunk and group; a group kvnode cannot restore
        # (Mamba state...) turns it off for the model.
        self._plan = plan_groups(kv_cache_config)
        self._supported = bool(self._plan.groups)
        if not self._supported:
            log.warning(
                "kvnode: %s, which kvnode cannot restore; the connector stays off for "
                "this model (no hits, no saves)",
                self._plan.why_off,
            )
        elif (why := _unsupported_parallelism(par)) is not None:
            # Chunk keys name TP and PP ranks only: KV split over context-parallel ranks
            # would be saved under keys that do not say which part it is.
            log.warning("kvnode: %s is not supported; the connector stays off", why)
            self._supported = False
        if role == KVConnectorRole.SCHEDULER:
            self._link = AgentLink(
                default_client_factory(
                    self.cfg.runtime_dir, "vllm-scheduler", self.cfg.lookup_timeout_ms / 1000.0
                ),
                retry_interval_s=self.cfg.reconnect_interval_ms / 1000.0,
                retry_max_s=self.cfg.reconnect_max_ms / 1000.0,
            )
            self._sched = SchedulerSide(
                self.cfg,
                self._link,
                self.block_size,
                load=self._load,
                save=self._save,
                plan=self._plan if self._supported else None,
            )
            mc = vllm_config.model_config
            self._model_id = self.cfg.model_id or model_identity(mc.model, mc.revision)
            self._model_dtype = str(mc.dtype).removeprefix("torch.")
        else:
            # The client owns the arena mapping; these hooks follow each (re)mapping
            # (populate, register for DMA), agent restarts included. A worker whose
            # bytes the agent is to move readies it only if it falls back to copying.
            self._arena = ArenaMapping(lazy=self._agent_moves(vllm_config))
            self._link = AgentLink(
                default_client_factory(
                    self.cfg.runtime_dir,
                    "vllm-worker",
                    self.cfg.io_timeout_ms / 1000.0,
                    on_map=self._arena.on_map,
                    on_unmap=self._arena.on_unmap,
                ),
                retry_interval_s=self.cfg.reconnect_interval_ms / 1000.0,
                retry_max_s=self.cfg.reconnect_max_ms / 1000.0,
            )
            self._num_blocks = kv_cache_config.num_blocks
        log.info(
            "kvnode connector (%s): chunk_tokens=%d block_size=%d load=%s save=%s runtime_dir=%s",
            role.name.lower(),
            self.cfg.chunk_tokens,
            self.block_size,
            self._load and self.cfg.load,
            self._save and self.cfg.save,
            self.cfg.runtime_dir or "(default)",
        )

    # ================================================================ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if not self._supported:
            return  # no handshake: the scheduler side never turns on
        assert self._arena is not None, "register_kv_caches on the scheduler side"
        tp_rank, pp_rank = _ranks(self.tp_size, self.pp_size)
        if not self._plan.plain:
            self._register_groups(kv_caches, pp_rank * self.tp_size + tp_rank)
            return
        self._worker = WorkerSide(
            self._link,
            rank_index=pp_rank * self.tp_size + tp_rank,
            num_blocks=self._num_blocks,
            block_size=self.block_size,
            blocks_per_chunk=self.cfg.chunk_tokens // self.block_size,
            arena=self._arena,
            keys_per_call_max=self.cfg.keys_per_call_max,
            keep_stored=self._events_on,
        )
        cache = self._worker.register(kv_caches)
        transfer = self._transfer_mode(self._worker)
        if transfer == "agent":
            self._agent = AgentPath(self._link, self._worker, hugepages=self.cfg.hugepages)
            if not self._agent.ready():  # export now if the agent is there (not in a step)
                # Refused (or no agent yet): this worker copies, so ready the arena
                # here rather than in its first step.
                self._arena.ready_now()
        elif self._arena is not None and self._arena.lazy:  # auto chose worker mode
            self._arena.ready_now()
        self._handshake = KVNodeHandshake(
            cache.layout, cache.block_shape, cache.dtype, transfer=transfer
        )
        log.info(
            "kvnode worker rank tp=%d pp=%d: %d layers, layout %s, %d bytes per chunk, transfer %s",
            tp_rank,
            pp_rank,
            len(kv_caches),
            self._handshake.layout,
            self._worker.chunk_nbytes,
            transfer if transfer == "worker" else "agent (where the export succeeds)",
        )

    def _agent_moves(self, vllm_config: VllmConfig) -> bool:
        """Whether this worker is to export, as far as it is known before its KV cache
        is: by the config and vLLM's device."""
        device = getattr(getattr(vllm_config, "device_config", None), "device_type", "")
        return self._agent_wanted(str(device) == "cpu")

    def _agent_wanted(self, on_cpu: bool) -> bool:
        """Who may move this worker's bytes, as far as the config and the device say.
        Agent mode runs on the CPU backend (cross-memory attach); on GPUs only when
        asked for by name (``auto`` keeps the worker copying until a GPU run has
        verified agent mode there)."""
        want = self.cfg.transfer
        return want == "agent" or (want == "auto" and on_cpu)

    def _transfer_mode(self, worker: WorkerSide) -> str:
        if not self._agent_wanted(worker.on_cpu):
            return "worker"
        if self.cfg.transfer == "auto":
            left = cores_left()  # the cores vLLM's bound compute threads leave
            if not left:
                log.info(
                    "kvnode: transfer auto: worker mode (vLLM's threads may run on every "
                    "core, or bind them all: no core is left for the agent's copies)"
                )
                return "worker"
            log.info(
                "kvnode: transfer auto: agent mode (vLLM's threads leave cores %s to the "
                "agent's copies)",
                format_cpu_list(left),
            )
        if not worker.on_cpu:  # asked for by name: GPU agent mode awaits a GPU run
            log.warning("kvnode: agent mode on a GPU has not been verified on one yet")
        return "agent"

    def _register_groups(self, kv_caches: dict[str, torch.Tensor], rank_index: int) -> None:
        """Several KV cache groups: a worker per group, each group's layout reported."""
        arena = self._arena
        assert arena is not None, "register_kv_caches on the scheduler side"

        def make(blocks_per_chunk: int) -> WorkerSide:
            return WorkerSide(
                self._link,
                rank_index=rank_index,
                num_blocks=self._num_blocks,
                block_size=self.block_size,
                blocks_per_chunk=blocks_per_chunk,
                arena=arena,
                keys_per_call_max=self.cfg.keys_per_call_max,
                keep_stored=self._events_on,
            )

        if self.cfg.transfer == "agent":
            log.warning(
                "kvnode: agent mode does not cover models with several KV cache groups; "
                "the workers copy themselves (worker mode)"
            )
        arena.ready_now()  # several groups: these workers copy themselves (no export)
        bpc = self.cfg.chunk_tokens // self.block_size
        workers, parts = build_group_workers(self._plan, kv_caches, make, bpc, self.block_size)
        self._worker = workers
        self._handshake = KVNodeHandshake(*parts[0], groups=parts)
        log.info(
            "kvnode worker rank %d: KV cache groups %s, layouts %s, %d bytes per chunk",
            rank_index,
            [g.tag() for g in self._plan.groups],
            [p[0] for p in parts],
            workers.chunk_nbytes,
        )

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self._handshake

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if self._worker is None or not isinstance(meta, KVNodeConnectorMetadata):
            return
        if meta.agent_down:
            self._link.mark_down("the scheduler side lost the agent")
            return
        if not meta.loads:
            return
        t0 = time.perf_counter()
        if self._agent is not None and self._agent.ready():
            self._agent.load(meta.loads)  # layer by layer, waited for in wait_for_layer_load
        else:
            self._worker.load(meta.loads)
        self._add_time("load_wait_s", t0)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._agent is not None and self._agent.loading():
            t0 = time.perf_counter()
            self._agent.wait_for_layer(layer_name)
            self._add_time("load_wait_s", t0)

    def _add_time(self, counter: str, t0: float) -> None:
        """The forward pass's time since ``t0`` added to the worker's ``counter``."""
        stats = getattr(self._worker, "stats", None)
        if isinstance(stats, WorkerStats):
            setattr(stats, counter, getattr(stats, counter) + time.perf_counter() - t0)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """Agent mode on the CPU: the step's saves go to the agent at the first layer
        and each layer is marked computed as vLLM names it, so the agent copies layer
        i while layer i+1 computes. Elsewhere whole chunks are saved after the
        forward pass, in ``wait_for_save``."""
        agent = self._agent
        meta = self._connector_metadata
        if (
            agent is None
            or not agent.worker.on_cpu
            or not isinstance(meta, KVNodeConnectorMetadata)
        ):
            return
        if meta.agent_down or not meta.saves:
            return
        t0 = time.perf_counter()
        agent.save_layer(layer_name, meta.saves)
        self._add_time("save_layer_s", t0)

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if self._worker is None or not isinstance(meta, KVNodeConnectorMetadata):
            return
        # Every rank sees the same metadata: all of them report events for this step.
        self._saved_step = bool(meta.saves)
        agent = self._agent
        if agent is not None:
            agent.finish_loads()  # load errors are collected after this call
            agent.track(meta.saves)
        if meta.agent_down or not meta.saves:
            if agent is not None:
                agent.end_layers()
            return
        t0 = time.perf_counter()
        if agent is not None and agent.end_layers():
            pass  # handed over layer by layer during the forward pass
        elif agent is not None and agent.ready():
            agent.save(meta.saves)  # returns once handed over; blocks held until done
        else:
            self._worker.save(meta.saves)  # copies now
        self._add_time("save_wait_s", t0)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Preempted requests' blocks go back to vLLM before this step's forward
        pass: saves still reading blocks must end first."""
        meta = kv_connector_metadata
        if self._agent is not None and isinstance(meta, KVNodeConnectorMetadata) and meta.preempted:
            self._agent.wait_saves()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose saves the agent has finished copying (their blocks may go)."""
        if self._agent is None:
            return None, None
        return self._agent.finished(finished_req_ids) or None, None

    def get_kv_connector_kv_cache_events(self) -> KVNodeEvents | None:
        """The chunks this worker committed in the step, as vLLM ``BlockStored`` events.
        Every worker answers in the same steps (those whose metadata had saves), even
        with nothing committed, so vLLM's merge counts every rank."""
        if not (self._events_on and self._saved_step) or self._worker is None:
            return None
        self._saved_step = False
        if self._agent is not None:
            # Every rank reports a chunk in the same step (vLLM keeps the events all
            # ranks report): with KV events on, the step's saves are waited for here.
            self._agent.wait_saves()
        return KVNodeEvents([stored_event(op) for op in self._worker.take_stored()])

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors = self._worker.take_load_errors() if self._worker is not None else set()
        if self._agent is not None:
            self._agent.finish_loads()
            errors |= self._agent.take_load_errors()
        return errors

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Several KV cache groups: loads are asynchronous, and each one's outcome is
        reported per request (vLLM recomputes a failed one)."""
        if not isinstance(self._worker, GroupWorkers):
            return super().get_transfer_results(finished_req_ids)
        done, failed = self._worker.take_results()
        return KVConnectorTransferResults(finished_recving=done, failed_recving=failed)

    # ================================================================ scheduler side
    def set_xfer_handshake_metadata_pp_aware(
        self, metadata: dict[tuple[int, int], KVConnectorHandshakeMetadata]
    ) -> None:
        if self._sched is None or not self._supported:
            return  # off (already said why): no second warning about missing layouts
        ns = rank_namespaces(
            self._model_id,
            self._model_dtype,
            self.block_size,
            self.cfg.chunk_tokens,
            self.tp_size,
            self.pp_size,
            metadata,
        )
        gns = group_namespaces(ns, self._plan, metadata) if ns is not None else None
        if ns is None or gns is None:
            log.warning("kvnode: not every worker reported its KV layout; connector stays off")
            return
        self._sched.set_namespaces(ns, gns)
        # Saves through the agent outlive the step: vLLM keeps such a request's blocks
        # until every worker names it finished (request_finished answers True).
        self._delay_frees = any(
            getattr(m, "transfer", "worker") == "agent" for m in metadata.values()
        )
        log.info("kvnode: namespace %s (%d rank(s))", ns[0], len(ns))

    def set_xfer_handshake_metadata(
        self, metadata: dict[int, KVConnectorHandshakeMetadata]
    ) -> None:
        self.set_xfer_handshake_metadata_pp_aware({(0, r): m for r, m in metadata.items()})

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if self._sched is None:
            return 0, False
        try:
            return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)
        except Exception:
            # A bug here must not take vLLM down: serve the request without the cache.
            log.exception("kvnode: lookup failed; serving without the cache")
            return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if self._sched is None:
            return
        # An async load (several KV cache groups) runs before vLLM schedules the
        # request: its block tables are known only here.
        tables = blocks.get_block_ids() if self._sched.async_loads and num_external_tokens else None
        self._sched.update_state_after_alloc(request, num_external_tokens, tables)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVNodeConnectorMetadata()
        if self._sched is None or not self._sched.active:
            return meta
        scheduled: list[tuple[str, int, int]] = []
        n_sched = scheduler_output.num_scheduled_tokens
        new_blocks: dict[str, tuple[list[int], ...]] = {}
        for nr in scheduler_output.scheduled_new_reqs:
            scheduled.append((nr.req_id, nr.num_computed_tokens, n_sched.get(nr.req_id, 0)))
            if nr.block_ids:
                new_blocks[nr.req_id] = nr.block_ids
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            scheduled.append((rid, cached.num_computed_tokens[i], n_sched.get(rid, 0)))
        state = getattr(scheduler_output, "kv_connector_block_state", None)

        def block_ids_of(rid: str) -> tuple[list[int], ...] | None:
            if state is not None:
                groups = state.get_block_ids(rid)
                if groups:
                    return groups  # one block table per KV cache group
            return new_blocks.get(rid)

        meta.loads, meta.saves = self._sched.build_step(scheduled, block_ids_of)
        # Only a fresh loss is news to the workers; a link that never came up (the
        # agent absent from the start) leaves them to their own reconnects.
        meta.preempted = bool(getattr(scheduler_output, "preempted_req_ids", None))
        meta.agent_down = self._link.failures > self._failures_seen
        self._failures_seen = self._link.failures
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        had_saves = self._sched is not None and self._sched.request_finished(request.request_id)
        # Worker mode: saves end within their step, nothing to hold. Agent mode: the
        # blocks stay until the workers report the agent copied them (get_finished).
        return self._delay_frees and had_saves, None

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's hybrid-manager form of ``request_finished``: every group's blocks are
        saved within the step that completed them, so none is held past the request."""
        return self.request_finished(request, block_ids[0] if block_ids else [])

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        """Every group vLLM transfers: a hit is offered only when all of them can be
        restored (connector/groups.py)."""
        return self._plan.group_ids

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        got = connector_output.kv_cache_events
        if not isinstance(got, KVNodeEvents):
            return
        # A chunk is stored when every rank committed its part.
        for ev in got.common_events():
            if len(self._events) >= EVENTS_QUEUED_MAX:
                self.events_dropped += 1
                continue
            self._events.append(ev)

    def take_events(self) -> Iterable[KVCacheEvent]:
        """vLLM publishes these with its own KV events (``kv_events_config``)."""
        out = list(self._events)
        self._events.clear()
        return out

    # ================================================================ both
    def get_kv_connector_stats(self) -> KVNodeStats | None:
        side = self._sched if self._sched is not None else self._worker
        if side is None:
            return None
        data = side.take_stats()
        if not any(data.values()):
            return None
        self._account(data)
        return KVNodeStats(data=data)

    def _account(self, data: dict[str, float]) -> None:
        """Running totals, logged every ``LOG_INTERVAL_S`` while there is activity and at
        shutdown: vLLM logs connector stats only when its own stats logging is on."""
        for k, v in data.items():
            self._totals[k] = self._totals.get(k, 0) + v
        now = time.monotonic()
        if now - self._last_log_s >= LOG_INTERVAL_S:
            self._last_log_s = now
            self._log_totals()

    def _log_totals(self) -> None:
        if any(self._totals.values()):
            shown = KVNodeStats(data=dict(self._totals)).reduce()
            log.info("kvnode %s totals: %s", self.role.name.lower(), _fmt(shown))

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVNodeStats | None:
        return KVNodeStats(data=dict(data)) if data is not None else KVNodeStats()

    def shutdown(self) -> None:
        self._log_totals()
        if self._agent is not None:
            self._agent.close()
        self._link.close()


def _unsupported_parallelism(par: Any) -> str | None:
    """What the chunk keys cannot describe: context parallelism splits one request's KV
    over ranks the namespace does not name (vLLM 0.32's ParallelConfig fields)."""
    for field in ("prefill_context_parallel_size", "decode_context_parallel_size"):
        size = int(getattr(par, field, 1) or 1)
        if size > 1:
            return f"{field}={size}"
    return None


def _fmt(d: dict[str, int | float]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items() if v)


def _ranks(tp_size: int, pp_size: int) -> tuple[int, int]:
    """This worker's (TP rank, PP rank). Chunk keys include them, so a wrong answer
    would save one rank's KV under another's keys: with more than one rank, a rank that
    cannot be told stops the connector, never defaults to 0."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        tp_rank, pp_rank = get_tensor_model_parallel_rank(), get_pp_group().rank_in_group
    except Exception as exc:
        if tp_size * pp_size > 1:
            raise RuntimeError(
                f"kvnode: cannot tell this worker's rank (tensor_parallel_size={tp_size}, "
                f"pipeline_parallel_size={pp_size}): {exc!r}"
            ) from exc
        return 0, 0  # one rank: vLLM's groups may be uninitialised, rank 0 is right
    if not (0 <= tp_rank < tp_size and 0 <= pp_rank < pp_size):
        raise RuntimeError(
            f"kvnode: worker rank tp={tp_rank} pp={pp_rank} outside "
            f"tensor_parallel_size={tp_size}, pipeline_parallel_size={pp_size}"
        )
    return int(tp_rank), int(pp_rank)
