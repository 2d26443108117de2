"""Agent mode on the worker: the agent moves the bytes, the worker hands over jobs.

The worker exports its cache once per agent generation (``connector/export.py``)
and then only describes work: a load job before the forward pass, a save job after
it. Each job has a slot in the worker's progress page (``ipc/progress.py``), which
the agent writes with the same mover that moves the bytes; the worker reads it
without a system call:

- loads: ``wait_for_layer(i)`` waits for layer i's byte only, so attention on layer i
  runs while layer i+1 is copied; chunk outcomes (missing, failed checksum) become
  vLLM load errors, recomputed from the first bad block;
- saves: on the CPU they are handed over at the forward pass's first
  ``save_kv_layer``, and the worker marks each layer computed in the job's slot as
  vLLM names it, so the agent copies layer i while layer i+1 computes
  (``wait_for_save`` marks every layer and returns); elsewhere ``wait_for_save``
  hands them over whole. The request's blocks stay with it (``request_finished``
  answered True) until the agent reports the copy done, and ``finished`` names it
  to vLLM only then.

Never a stuck request, never a block freed while the agent may still touch it: a job
ends when the agent reports it, when the agent refuses it, when the agent process
exits (watched through a pidfd: agent mode needs the agent in this pid namespace),
or past its deadline plus a margin (the agent writes nothing after the deadline).
"""

from __future__ import annotations

import functools
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvnode.connector.export import NotExportable, consent, forward_order, layer_exports
from kvnode.connector.hugepages import Collapse
from kvnode.connector.scheduler import ChunkOp
from kvnode.errors import KVNodeError
from kvnode.ipc import progress as PG
from kvnode.ipc import protocol as P
from kvnode.ipc.process import pid_namespace

log = logging.getLogger("kvnode.connector")

SLOTS = 256  # jobs in flight per worker (slots of the progress page)
JOB_DEADLINE_S = 30.0  # the agent's deadline for a job (agent/movers/service.py)
DEADLINE_MARGIN_S = 5.0  # beyond it the worker gives a job up as failed
TRACKED_REQUESTS_MAX = 65536
_SLEEP_MIN_S, _SLEEP_MAX_S = 20e-6, 1e-3
# Waiting on the wake socket: between wake-ups, the replies are read (a refused job
# is never written to the page) first after this, then at doubling intervals.
_WOKEN_POLL_S = (1e-3, 8e-3)


@dataclass(slots=True, eq=False)
class _Job:
    slot: int
    seq: int
    load: bool
    ops: list[tuple[str, ChunkOp]]
    give_up_at: float
    refused: bool = False
    outcome: int = -1  # -1 pending, else PG.RESULT_OK / RESULT_FAILED
    codes: bytes = b""
    t0: float = field(default_factory=time.perf_counter)


class AgentPath:
    """One worker's agent mode. ``worker`` is its ``WorkerSide`` (layers, stats);
    ``link`` the worker's ``AgentLink``."""

    def __init__(self, link: Any, worker: Any, slots: int = SLOTS, hugepages: str = "auto") -> None:
        self.link = link
        self.worker = worker
        self.stats = worker.stats
        order = forward_order([layer.name for layer in worker.layers])
        self.num_layers = len(order)
        self.layer_pos = {name: i for i, name in enumerate(order)}
        self.slot_bytes = PG.slot_bytes(self.num_layers)
        self.slots = slots
        self.page = np.zeros((slots, self.slot_bytes), dtype=np.uint8)
        self.probe = np.zeros(P.PROBE_BYTES, dtype=np.uint8)
        self.export_id = 0
        self.generation = 0
        self._client_id = 0  # the registration the export was made under
        self._export_gone = -1  # an export the agent answered it does not hold
        self._refused: str | None = None  # the last refusal, logged once
        self._refused_generation = -1
        self._free = deque(range(slots))
        self._seq = [0] * slots
        self._loads: list[_Job] = []  # this step's
        self._saves: dict[int, _Job] = {}  # by slot
        self._save_reqs: dict[str, int] = {}  # request -> save jobs not yet ended
        self._finishing: set[str] = set()  # finished in vLLM, saves still running
        self._errors: set[int] = set()
        self._agent_pidfd = -1
        # A datagram socket pair: the agent sends a byte on one end after each
        # progress write (a loaded layer, a job's end); waits sleep in poll on the
        # other instead of on a timer.
        self._wake, self._wake_end = _socket_pair()
        self._wakes = False  # the agent serving now holds its end
        self._replies: deque[tuple[int, int, bool]] = deque()  # (slot, seq, refused)
        self._lock = threading.Lock()
        self._order = order
        self._gpu: Any = None  # GPU caches: kvnode.kernels.gpuexport.GpuExport
        self._layer_step: list[_Job] | None = None  # this step's layer-wise saves
        self._layer_handed = False  # this step's saves went to the agent layer-wise
        # A CPU cache on huge pages: the agent's cross-memory attach copies at
        # memcpy's rate over them (connector/hugepages.py); in the background.
        # ``hugepages``: kvnode.hugepages (auto: only off vLLM's compute cores).
        self.hugepages: Collapse | None = None
        if worker.on_cpu and hugepages != "never":
            self.hugepages = Collapse(
                _storage_ranges(worker.layers), busy=self.copying, shared=hugepages == "always"
            ).start()

    # ------------------------------------------------------------------ export
    def ready(self) -> bool:
        """Whether this step's work goes to the agent: exported to the agent that
        serves now (exporting again after a restart)."""
        if self.export_id and not self._agent_gone():
            try:
                gen, client_id = self.link.call(lambda c: (c.generation, c.client_id))
            except KVNodeError:
                return False
            gone = self._export_gone == self.export_id
            if gen == self.generation and client_id == self._client_id and not gone:
                return True
            if gen == self.generation:
                self._registered_again(gone)
            else:
                self._lost_agent()
        else:
            self._lost_agent()
        try:
            return bool(self.link.call(self._export))
        except KVNodeError as exc:
            log.debug("kvnode: export failed (%s)", exc)
            return False

    def _export(self, client: Any) -> bool:
        client.connect()  # registers again if the agent it registered with has exited
        gen = client.generation
        if self._agent_pidfd >= 0 and gen != self.generation:
            # That agent exited after ``ready`` looked: its jobs have ended (once its
            # pidfd is given up nothing else would end them before their deadline).
            self._lost_agent()
        if gen == self._refused_generation:
            return False  # refused by this agent already: worker mode until it changes
        try:
            agent_pid, agent_ns = client.agent_pid
            if not agent_pid or agent_ns != pid_namespace():
                raise NotExportable(
                    "the agent runs in another pid namespace (agent mode needs one: "
                    "hostPID or a shared process namespace)"
                )
            consent(agent_pid)
            layers = layer_exports(self.worker.layers)
            device, handles = self._device_handles()
        except NotExportable as exc:
            return self._refuse(gen, str(exc))
        try:
            pidfd = os.pidfd_open(agent_pid)
        except OSError:
            return False  # that agent has exited: the client registers with the next
        nonce = os.urandom(P.PROBE_BYTES)
        self.probe[:] = np.frombuffer(nonce, dtype=np.uint8)
        req = lambda r, c, g: P.ExportReq(  # noqa: E731
            r, c, g, device, layers, int(self.page.ctypes.data), self.slots, self.slot_bytes,
            int(self.worker.chunk_nbytes), int(self.probe.ctypes.data), nonce, handles,
            self._wake_end.fileno() if self._wake_end is not None else -1,
        )  # fmt: skip
        try:
            export_id, gen, why, wakes = client.export(req)
        except BaseException:
            os.close(pidfd)
            raise
        if export_id and bytes(self.probe) != nonce[::-1]:
            export_id, why = 0, "the agent's probe write did not arrive"
        if not export_id:
            os.close(pidfd)
            return self._refuse(gen, why)
        if self._agent_pidfd >= 0:  # the same agent's, held since the last export
            os.close(self._agent_pidfd)
        self._agent_pidfd = pidfd
        self._wakes = wakes and self._wake is not None
        self.export_id, self.generation = export_id, gen
        self._client_id = client.client_id
        self._export_gone = -1
        self._refused = None
        log.info("kvnode: KV cache exported (%d layers): the agent moves the bytes", len(layers))
        return True

    def _device_handles(self) -> tuple[str, list[bytes]]:
        """The export's device and, on a GPU, its IPC and event handles (made once:
        a new agent generation opens the same ones)."""
        if self.worker.on_cpu:
            return "cpu", []
        if self._gpu is None:
            from kvnode.kernels.gpuexport import GpuExport
            from kvnode.kernels.ipchandle import ExportRefused

            by_name = {layer.name: layer.kv for layer in self.worker.layers}
            try:
                self._gpu = GpuExport([by_name[name] for name in self._order])
            except ExportRefused as exc:
                raise NotExportable(str(exc)) from exc
        return self._gpu.name, self._gpu.wire_handles()

    def _refuse(self, gen: int, why: str) -> bool:
        self._refused_generation = gen
        if why != self._refused:
            self._refused = why
            log.warning("kvnode: agent mode not available (%s); the worker copies itself", why)
        return False

    def _agent_gone(self) -> bool:
        fd = self._agent_pidfd
        if fd < 0:
            return True
        return _readable([fd], 0.0) is not None

    def _registered_again(self, export_gone: bool = False) -> None:
        """The same agent dropped this worker's registration (silent past its heartbeat
        timeout, or the connection reset) and the link registered again, or it answered
        a job that it holds no such export (``export_gone``): the export is gone, so
        export again. Its jobs in flight are not ended here: the agent tells a live
        worker how each ended (it may still be writing one's last layer), and their
        slots stay taken until it has."""
        self.export_id = 0
        if export_gone:
            log.info("kvnode: the agent no longer holds this worker's export; exporting again")
        else:
            log.info("kvnode: the agent registered this worker again; exporting again")

    def _lost_agent(self) -> None:
        """The agent this export was made to is gone or replaced: every job of it
        has ended (it writes nothing any more)."""
        if self._agent_pidfd >= 0:
            os.close(self._agent_pidfd)
            self._agent_pidfd = -1
        self.export_id = 0
        self._wakes = False
        for job in self._loads + list(self._saves.values()):
            if job.outcome < 0:
                job.outcome = PG.RESULT_FAILED

    # ------------------------------------------------------------------ jobs
    def _submit(
        self, load: bool, items: list[tuple[str, ChunkOp]], layerwise: bool = False
    ) -> list[_Job]:
        """Hand ``items`` over as jobs of at most ``JOB_CHUNKS_MAX`` chunks; a job that
        cannot be handed over is failed at once."""
        jobs: list[_Job] = []
        if self._gpu is not None:  # the agent's copies start after this stream's work
            self._gpu.record_ready()
        for i in range(0, len(items), P.JOB_CHUNKS_MAX):
            part = items[i : i + P.JOB_CHUNKS_MAX]
            if not self._free:
                self._reap_saves()
            slot = self._free.popleft() if self._free else -1
            seq = 0
            if slot >= 0:
                seq = self._seq[slot] = self._seq[slot] % 255 + 1
                self.page[slot] = 0
            # The agent writes nothing after ``deadline`` (it gets it with the job);
            # this worker gives the job up a margin later.
            deadline = time.monotonic_ns() + int(JOB_DEADLINE_S * 1e9)
            job = _Job(slot, seq, load, part, deadline / 1e9 + DEADLINE_MARGIN_S)
            jobs.append(job)
            if slot < 0:
                job.outcome = PG.RESULT_FAILED
                continue
            make = self._request(load, [op for _, op in part], slot, seq, deadline, layerwise)
            on_reply = functools.partial(self._replied, slot, seq, self.export_id)
            try:
                self.link.call(lambda c, m=make, cb=on_reply: c.job(m, cb))
            except KVNodeError as exc:
                log.debug("kvnode: job not handed over (%s)", exc)
                job.outcome = PG.RESULT_FAILED
        return jobs

    def _request(
        self,
        load: bool,
        ops: list[ChunkOp],
        slot: int,
        seq: int,
        deadline_ns: int,
        layerwise: bool = False,
    ) -> Callable[[int, int, int], P.JobReq]:
        """The job's request, built for whichever registration sends it."""
        rank, eid = self.worker.rank, self.export_id
        keys = [op.keys[rank] for op in ops]
        blocks = [list(op.block_ids) for op in ops]
        if load:
            offsets = [op.block_offset for op in ops]
            return lambda r, c, g: P.JobReq(
                r, c, g, eid, True, slot, seq, keys, blocks, offsets, deadline_ns=deadline_ns
            )
        groups = [op.keys[0] for op in ops] if len(ops[0].keys) > 1 else []
        parents = [op.parents[rank] if op.parents else b"" for op in ops]
        tokens = [list(op.tokens) for op in ops]
        return lambda r, c, g: P.JobReq(
            r, c, g, eid, False, slot, seq, keys, blocks, [], groups, parents, tokens, layerwise,
            deadline_ns,
        )  # fmt: skip

    def _replied(self, slot: int, seq: int, export_id: int, rep: Any) -> None:
        """On whichever thread reads the reply: only an error matters (the job was
        never queued, nothing will be written for it). No reply (None: the connection
        went first) says nothing: the agent may have queued the job, so it stays
        pending until the agent reports it, the agent exits, or its deadline passes
        (the agent writes nothing after it). The agent no longer holding the export
        the job named (``UNKNOWN_EXPORT``) makes the next step export again, if it is
        still this worker's export."""
        if isinstance(rep, P.Error):
            self._replies.append((slot, seq, True))
        if isinstance(rep, P.Error) and rep.code == P.ErrCode.UNKNOWN_EXPORT:
            self._export_gone = export_id

    def _poll(self, job: _Job) -> bool:
        """Whether the job has ended (reading its slot; no system call)."""
        if job.outcome >= 0:
            return True
        row = self.page[job.slot]
        if row[PG.DONE] == job.seq:
            job.outcome = int(row[PG.RESULT])
            return True
        while self._replies:
            slot, seq, refused = self._replies.popleft()
            for other in self._loads + list(self._saves.values()):
                if other.slot == slot and other.seq == seq and other.outcome < 0 and refused:
                    other.refused = True
                    other.outcome = PG.RESULT_FAILED
        if job.outcome >= 0:
            return True
        if time.monotonic() > job.give_up_at:
            log.warning("kvnode: a transfer job passed its deadline; treating it as failed")
            job.outcome = PG.RESULT_FAILED
            return True
        return False

    def _wait(self, done: Any) -> None:
        """Sleep-wait until ``done()``; an agent that exits ends every job."""
        if self._wakes:
            self._wait_woken(done)
            return
        sleep = _SLEEP_MIN_S
        polls = 0
        while not done():
            polls += 1
            if polls % 16 == 0:
                self._poll_replies()
                if self._agent_gone():
                    self._lost_agent()
                    continue
            time.sleep(sleep)
            sleep = min(sleep * 2, _SLEEP_MAX_S)

    def _wait_woken(self, done: Any) -> None:
        """``_wait`` in poll on the wake socket and the agent's pidfd (its exit ends
        every job at once): the agent's wake-up, not a timer, ends each sleep. The
        socket is drained before ``done()`` is asked again, so a wake-up that comes
        after the question is never lost; one left over from an earlier wait only
        makes one more question. While no wake-up comes, the replies are read now and
        then (a job the agent refused is never written to the page)."""
        timeout = _WOKEN_POLL_S[0]
        wake = self._wake
        assert wake is not None
        while not done():
            fds = [wake.fileno()]
            if self._agent_pidfd >= 0:
                fds.append(self._agent_pidfd)
            ready = _readable(fds, timeout)
            if ready == fds[0]:
                _drain(wake)
                continue
            if ready is None:
                timeout = min(2 * timeout, _WOKEN_POLL_S[1])
                self._poll_replies()
            if self._agent_gone():
                self._lost_agent()

    def _poll_replies(self) -> None:
        """Read the agent's replies that have come (a refused job's error)."""
        try:
            self.link.call(lambda c: c.poll_replies())
        except KVNodeError:
            pass

    def copying(self) -> bool:
        """Whether the agent may be copying for this worker now: a job handed over
        and not reported done (read on the huge-page collapse's thread, without
        changing anything)."""
        page = self.page
        for job in [*self._loads, *self._saves.values()]:
            if job.outcome < 0 and job.slot >= 0 and page[job.slot, PG.DONE] != job.seq:
                return True
        return False

    def _end(self, job: _Job) -> None:
        """The job has ended: keep its chunk codes, give its slot back."""
        n = len(job.ops)
        if job.outcome == PG.RESULT_OK:
            start = PG.chunk_byte(self.num_layers, 0)
            job.codes = bytes(self.page[job.slot, start : start + n])
        else:
            job.codes = bytes([PG.CHUNK_FAILED]) * n
        if job.slot >= 0:
            self._free.append(job.slot)

    # ------------------------------------------------------------------ loads
    def load(self, loads: dict[str, list[ChunkOp]]) -> None:
        items = [(rid, op) for rid, ops in loads.items() for op in ops]
        if items:
            self._loads = self._submit(True, items)

    def loading(self) -> bool:
        """Whether this step has load jobs (``wait_for_layer`` has anything to wait for)."""
        return bool(self._loads)

    def wait_for_layer(self, name: str) -> None:
        if not self._loads:
            return
        i = self.layer_pos.get(name)
        if i is None:
            return
        at = PG.layer_byte(i)

        def layer_done() -> bool:
            return all(self._poll_layer(job, at) for job in self._loads)

        self._wait(layer_done)
        if self._gpu is not None:  # the GPU, not this thread, waits for the copy itself
            self._gpu.wait_layer(i)

    def _poll_layer(self, job: _Job, at: int) -> bool:
        if job.outcome < 0 and self.page[job.slot, at] == job.seq:
            return True
        return self._poll(job)

    def finish_loads(self) -> None:
        """Wait for the step's load jobs to end and turn their outcomes into vLLM
        load errors (the chunk and the request's later chunks)."""
        jobs = self._loads
        if not jobs:
            return
        # Still this step's loads while they are waited for: a refusal read now is
        # matched to them (``_poll`` looks among them), not dropped.
        self._wait(lambda: all(self._poll(j) for j in jobs))
        self._loads = []
        failed_from: dict[str, int] = {}
        nbytes_per_block = self.worker.layer_nbytes
        for job in jobs:
            self._end(job)
            for (rid, op), code in zip(job.ops, job.codes):
                if code == PG.CHUNK_OK:
                    self.stats.load_chunks += 1
                    self.stats.load_bytes += len(op.block_ids) * nbytes_per_block
                    continue
                if code == PG.CHUNK_MISSING:
                    self.stats.load_misses += 1
                elif code == PG.CHUNK_BAD:
                    self.stats.checksum_errors += 1
                failed_from[rid] = min(failed_from.get(rid, op.index), op.index)
            self.stats.load_s += time.perf_counter() - job.t0
        for job in jobs:
            for rid, op in job.ops:
                if rid in failed_from and op.index >= failed_from[rid]:
                    self._errors.update(op.block_ids)
        self.stats.load_errors += len(failed_from)

    def take_load_errors(self) -> set[int]:
        out, self._errors = self._errors, set()
        return out

    # ------------------------------------------------------------------ saves
    def track(self, saves: dict[str, list[ChunkOp]]) -> None:
        """Requests with saves this step: vLLM holds their blocks until ``finished``
        names them (every rank names the same ones)."""
        for rid in saves:
            self._save_reqs.setdefault(rid, 0)
        while len(self._save_reqs) > TRACKED_REQUESTS_MAX:
            self._save_reqs.pop(next(iter(self._save_reqs)))

    def save(self, saves: dict[str, list[ChunkOp]], layerwise: bool = False) -> list[_Job]:
        """Hand the step's saves over (``layerwise``: before the forward pass has
        written them; ``save_layer`` then marks each layer computed)."""
        items = [(rid, op) for rid, ops in saves.items() for op in ops]
        if not items:
            return []
        jobs = self._submit(False, items, layerwise)
        for job in jobs:
            for rid in {rid for rid, _ in job.ops}:
                self._save_reqs[rid] = self._save_reqs.get(rid, 0) + 1
            if job.slot >= 0:
                self._saves[job.slot] = job
            else:
                self._ended_save(job)
        return jobs

    def save_layer(self, name: str, saves: dict[str, list[ChunkOp]]) -> None:
        """``save_kv_layer``: the forward pass has written layer ``name``. The step's
        saves go to the agent at its first layer, so the agent copies layer i while
        layer i+1 computes; each layer is marked in the jobs' slots as it is done."""
        i = self.layer_pos.get(name)
        if i is None:
            return
        if self._layer_step is None:  # the step's first layer
            self.begin_layers(saves)
        at = PG.computed_byte(self.num_layers, i)
        for job in self._layer_step or ():
            self.page[job.slot, at] = job.seq

    def begin_layers(self, saves: dict[str, list[ChunkOp]]) -> None:
        """Hand the step's saves over before any layer is computed (the agent waits
        for each layer's mark). Not ready: they are saved whole in ``wait_for_save``
        (in worker mode when the agent cannot take them)."""
        self._layer_step, self._layer_handed = [], False
        if not saves or not self.ready():
            return
        self.track(saves)
        self._layer_step = [j for j in self.save(saves, layerwise=True) if j.slot >= 0]
        self._layer_handed = True

    def end_layers(self) -> bool:
        """``wait_for_save``: every layer is computed now (a layer vLLM never named
        included). True when this step's saves went over layer by layer."""
        jobs, self._layer_step = self._layer_step, None
        if jobs is None or not self._layer_handed:
            return False
        lo = PG.computed_byte(self.num_layers, 0)
        for job in jobs:
            self.page[job.slot, lo : lo + self.num_layers] = job.seq
        return True

    def _reap_saves(self) -> None:
        if self._saves and self._agent_gone():
            self._lost_agent()
        for slot, job in list(self._saves.items()):
            if self._poll(job):
                del self._saves[slot]
                self._end(job)
                self._ended_save(job)

    def _ended_save(self, job: _Job) -> None:
        codes = job.codes or bytes([PG.CHUNK_FAILED]) * len(job.ops)
        st = self.stats
        for code in codes:
            if code == PG.CHUNK_OK:
                st.save_chunks += 1
                st.save_bytes += self.worker.chunk_nbytes
            elif code == PG.CHUNK_EXISTS:
                st.save_exists += 1
            elif code == PG.CHUNK_NO_SPACE:
                st.save_no_space += 1
            else:
                st.save_errors += 1
        st.save_s += time.perf_counter() - job.t0
        # vLLM's KV events (when on): the chunks this rank stored
        self.worker.note_stored(op for (_, op), code in zip(job.ops, codes) if code == PG.CHUNK_OK)
        for rid in {rid for rid, _ in job.ops}:
            if rid in self._save_reqs:
                self._save_reqs[rid] -= 1

    def wait_saves(self) -> None:
        """Every save in flight ended (vLLM is about to reuse preempted blocks, or the
        step's stored chunks are reported)."""
        self._wait(lambda: all(self._poll(j) for j in self._saves.values()))
        self._reap_saves()

    def finished(self, finished_req_ids: Iterable[str]) -> set[str]:
        """Requests vLLM finished whose saves have all ended: their blocks may go."""
        self._reap_saves()
        for rid in finished_req_ids:
            if rid in self._save_reqs:
                self._finishing.add(rid)
        out = {rid for rid in self._finishing if self._save_reqs.get(rid, 0) <= 0}
        for rid in out:
            self._finishing.discard(rid)
            self._save_reqs.pop(rid, None)
        return out

    def close(self) -> None:
        if self.hugepages is not None:
            self.hugepages.stop()
        if self._saves:
            self.wait_saves()
        if self._agent_pidfd >= 0:
            os.close(self._agent_pidfd)
            self._agent_pidfd = -1
        self._wakes = False
        for sock in (self._wake, self._wake_end):
            if sock is not None:
                sock.close()
        self._wake = self._wake_end = None


def _socket_pair() -> tuple[socket.socket | None, socket.socket | None]:
    """(the end waits poll, the end the agent takes), non-blocking, made in this
    process (the agent checks the pair's credentials are the worker's); (None,
    None) where there is none (the waits then poll the page on a timer)."""
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    except OSError:
        return None, None
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def _readable(fds: list[int], timeout_s: float) -> int | None:
    """The first of ``fds`` readable within ``timeout_s`` (poll, not select: a vLLM
    process may hold descriptors past select's 1,024), else None."""
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    ready = {fd for fd, _ in p.poll(timeout_s * 1e3)}
    return next((fd for fd in fds if fd in ready), None)


def _drain(sock: socket.socket) -> None:
    """Read every wake-up byte queued (each only says "look again")."""
    try:
        while sock.recv(64):
            pass
    except OSError:  # BlockingIOError: drained
        pass


def _storage_ranges(layers: Iterable[Any]) -> list[tuple[int, int]]:
    """(address, bytes) of the allocations under the layers' caches (layers that
    share one allocation name it once)."""
    out = set()
    for layer in layers:
        storage = layer.kv.untyped_storage()
        out.add((int(storage.data_ptr()), int(storage.nbytes())))
    return sorted(out)
