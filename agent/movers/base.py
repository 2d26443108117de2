"""The device-neutral half of agent mode: exports, jobs, movers and their threads.

A worker exports its KV cache (``Export``: every layer's address, block stride and
block parts, plus the worker's progress page). A ``Job`` moves whole chunks between
arena extents and the export's blocks, layer by layer, in the export's layer order
(vLLM's forward order), reporting each layer into the worker's progress slot.

A ``Mover`` knows one kind of device: it checks it can reach an export (``attach``)
and moves one job's bytes (``run``). Each mover gets one ``CopyThread``, so the
agent's ZeroMQ loop never waits on a copy: the loop books the arena side (pins,
reservations) and hands the job over; the thread copies and checksums; the loop
settles the job (commit, unpin) when the thread hands it back. A load's outcome is
reported into the worker by the thread (the loop only unpins after); a save's by the
loop after the commit, so a worker told "saved" is never ahead of a lookup.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvnode.agent.movers.process import WorkerProcess
from kvnode.cores import name_thread
from kvnode.ipc import progress as PG

log = logging.getLogger("kvnode.agent")

JOBS_QUEUED_MAX = 256  # jobs waiting for one device's copy thread
# Of which one client's: another client always finds room in the queue.
JOBS_QUEUED_PER_CLIENT_MAX = JOBS_QUEUED_MAX // 4
# Parked layer-wise saves: first and longest poll wait, doubling while the worker
# computes. A layer of a prefill takes milliseconds to seconds: each poll is a thread
# wake-up and a system call taken from the cores the forward pass computes on.
PARKED_POLL_S = (100e-6, 20e-3)


class MoverError(Exception):
    """A copy that could not be done (worker memory gone, no permission, deadline).
    An operating error: the job fails, is counted, and nothing else stops."""


@dataclass(frozen=True, slots=True)
class Layer:
    """One exported layer (see ``protocol.LayerExport``)."""

    name: str
    base: int
    num_blocks: int
    block_stride: int
    block_nbytes: int
    parts: tuple[tuple[int, int], ...]  # (offset in the block, bytes), in payload order
    payload_offset: int  # of the layer's region in a full chunk's payload


@dataclass(slots=True, eq=False)
class Export:
    export_id: int
    client_id: int
    device: str
    pid: int  # the worker process (as the kernel named the connection's peer)
    layers: tuple[Layer, ...]  # in copy order (the worker's forward order)
    progress: int  # address of the worker's progress page
    slots: int
    slot_bytes: int
    chunk_nbytes: int
    blocks_per_chunk: int
    handles: tuple[bytes, ...] = ()  # device IPC handles (GPU movers)
    alive: bool = True  # False once the client is gone: jobs stop before their next layer
    state: object = None  # the mover's own per-export state (opened handles...)
    # Its pidfd and wake socket: closed once it is dropped and none of its jobs is in
    # flight (a dropped export's jobs still tell a live worker they failed).
    proc: WorkerProcess | None = None
    jobs: int = 0  # its jobs in flight (taken and not yet settled)

    def exited(self) -> bool:
        """Whether the worker process has exited: its pid may name another by now."""
        return self.proc is not None and self.proc.exited()

    @property
    def woken(self) -> bool:
        """Whether the agent holds the worker's wake socket (else it polls on a timer)."""
        return self.proc is not None and self.proc.wakes

    def wake(self) -> None:
        """Wake the worker to look at its progress page (it may be waiting on it)."""
        if self.proc is not None:
            self.proc.wake()

    def slot_address(self, slot: int) -> int:
        return self.progress + slot * self.slot_bytes


@dataclass(slots=True, eq=False)
class ChunkWork:
    """One chunk of a job: its arena extents and the export's blocks it covers."""

    key: bytes
    blocks: tuple[int, ...]
    extents: list[tuple[int, int]]  # arena (offset, length) of the whole entry
    block_offset: int = 0  # loads: the entry's block where ``blocks`` start
    checksum: int = 0  # loads: the writer's; saves: computed by the mover
    index: int = 0  # position in the job's request (its byte in the progress slot)
    status: int = PG.CHUNK_PENDING


@dataclass(slots=True, eq=False)
class Job:
    export: Export
    load: bool
    slot: int
    seq: int
    chunks: list[ChunkWork]  # the chunks the mover moves (others are answered already)
    outcomes: bytearray  # per chunk of the request: its CHUNK_* code
    deadline: float  # monotonic: no byte is written into the worker after it
    parents: list[bytes] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    failed: str = ""  # why the whole job failed ("" when it did not)
    moved_bytes: int = 0
    copy_s: float = 0.0  # time its mover spent on it (not the time it waited parked)
    layerwise: bool = False  # a save copied as the worker's forward pass computes
    layer: int = 0  # layer-wise saves: the next layer (export order) to copy
    computed: int = 0  # layer-wise saves: layers the worker has marked computed
    state: Any = None  # the mover's own state of a job it parked

    def fail(self, why: str) -> None:
        self.failed = self.failed or why
        for c in self.chunks:
            if c.status in (PG.CHUNK_PENDING, PG.CHUNK_OK):
                c.status = PG.CHUNK_FAILED


class Mover(ABC):
    """Moves bytes between the arena and one kind of device's exported caches."""

    device: str = ""
    layerwise_saves = False  # copies a save's layers as the worker marks them computed

    @abstractmethod
    def attach(self, export: Export, probe: int, nonce: bytes) -> str:
        """Check the agent reaches the export: "" when it does, else one line saying
        why not (the worker then copies itself)."""

    @abstractmethod
    def run(self, job: Job) -> bool:
        """Move the job's bytes, layer by layer, reporting into its progress slot;
        set each chunk's status (and a save's checksums). Raises nothing: a failure
        is recorded on the job (``job.fail``). False: a layer-wise save stopped at a
        layer the worker has not computed yet (run it again once ``ready``)."""

    def ready(self, job: Job) -> bool:
        """Whether a parked layer-wise save can go on (its next layer is computed)."""
        return True

    def ready_many(self, jobs: list[Job]) -> list[bool]:
        """``ready`` of each parked save, in order (a mover reads the marks of one
        export's jobs in one go)."""
        return [self.ready(job) for job in jobs]

    @abstractmethod
    def report(self, job: Job) -> None:
        """Write the job's final outcome (chunk codes, result, done) into its slot.
        Best effort: a worker that is gone cannot be told."""

    def device_stats(self) -> dict[str, object]:
        """What the mover holds on its device (GPU movers: staging memory)."""
        return {}

    def detach(self, export: Export) -> None:
        """The export is gone (client gone or exported again): release its state."""
        return

    def exports_changed(self) -> None:
        """A worker exported to this mover or its export went (placement reads the
        node's bindings again)."""
        return

    def close(self) -> None:
        return


def report(mover: Mover, job: Job) -> None:
    try:
        mover.report(job)
    except Exception:
        log.exception("reporting a job's outcome failed")
    job.export.wake()


class FairQueue:
    """The jobs waiting for one copy thread, taken from their clients in turn: a
    client that queues many jobs (or costly ones) delays another client's job by at
    most one of its own, never by all of them. At most ``total`` jobs wait, of which
    ``per_client`` one client's. ``get`` returns None once closed and empty."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total, self.per_client = total, per_client
        self._cv = threading.Condition(threading.Lock())
        self._by_client: dict[int, deque[Job]] = {}
        self._turns: deque[int] = deque()  # clients with jobs waiting, in turn order
        self._n = 0
        self._closed = False

    def put(self, job: Job) -> bool:
        """Queue ``job``; False when the queue or its client's share of it is full."""
        owner = job.export.client_id
        with self._cv:
            waiting = self._by_client.get(owner)
            if self._closed or self._n >= self.total:
                return False
            if waiting is not None and len(waiting) >= self.per_client:
                return False
            if waiting is None:
                waiting = self._by_client[owner] = deque()
                self._turns.append(owner)
            waiting.append(job)
            self._n += 1
            self._cv.notify()
        return True

    def get(self, timeout: float | None = None) -> Job | None:
        """The next client's oldest job, waiting up to ``timeout`` (None: for ever);
        raises ``queue.Empty`` when none came, returns None once closed and empty."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._n > 0 or self._closed, timeout):
                raise queue.Empty
            if not self._n:
                return None
            owner = self._turns.popleft()
            waiting = self._by_client[owner]
            job = waiting.popleft()
            self._n -= 1
            if waiting:
                self._turns.append(owner)  # its next job after the other clients' turns
            else:
                del self._by_client[owner]
            return job

    def close(self) -> None:
        """The jobs queued still come out (their runs fail them: their exports are
        dead by then), then None."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def __len__(self) -> int:
        return self._n


class CopyThread:
    """One device's copy thread: runs jobs as they come, each client's in order and
    the clients in turn (``FairQueue``), hands each back through ``on_done`` (called
    on this thread; it must only queue and wake the loop).

    A layer-wise save that reaches a layer its worker has not computed is parked:
    the thread takes the jobs queued behind it (a load another worker's forward pass
    waits for must never wait for this one's) and goes back to it once the layer is
    marked, polling with a backoff of ``PARKED_POLL_S``: each poll asks the mover
    about every parked job at once (``ready_many``: one system call per export on the
    CPU, however many jobs a client parks), and the jobs it finds able to go on are
    run one after another before the next poll."""

    def __init__(self, mover: Mover, on_done: Callable[[Job], None]) -> None:
        self.mover = mover
        self._on_done = on_done
        self._queue = FairQueue(JOBS_QUEUED_MAX, JOBS_QUEUED_PER_CLIENT_MAX)
        self._parked: list[Job] = []
        self._going: deque[Job] = deque()  # parked jobs the last poll found able to go on
        self._thread = threading.Thread(
            target=self._run, name=f"kvnode-mover-{mover.device}", daemon=True
        )
        self._thread.start()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue, or its client's share of it, is full
        (the caller fails the job)."""
        return self._queue.put(job)

    def depth(self) -> int:
        return len(self._queue) + len(self._parked) + len(self._going)

    def _next(self) -> Job | None:
        """A queued job first, else a parked one that can go on (or must end: its
        worker gone or its deadline passed, which its run then reports); None when
        the thread is to stop."""
        wait = PARKED_POLL_S[0]
        while True:
            try:
                return self._queue.get(timeout=0)
            except queue.Empty:
                pass
            if not self._going and self._parked:
                self._poll_parked()
            if self._going:
                return self._going.popleft()
            if not self._parked:
                return self._queue.get()
            try:
                return self._queue.get(timeout=wait)
            except queue.Empty:
                wait = min(2 * wait, PARKED_POLL_S[1])

    def _poll_parked(self) -> None:
        """Move the parked jobs that can go on (their layer marked) or must end (their
        worker gone or their deadline passed, which their run then reports) to
        ``_going``."""
        now = time.monotonic()
        waiting: list[Job] = []
        for job in self._parked:
            if not job.export.alive or now > job.deadline:
                self._going.append(job)
            else:
                waiting.append(job)
        try:
            ready = self.mover.ready_many(waiting)
            if len(ready) != len(waiting):
                raise RuntimeError(f"{len(ready)} answers for {len(waiting)} parked jobs")
        except Exception:
            log.exception("mover %s failed to poll its parked jobs", self.mover.device)
            ready = [True] * len(waiting)  # their runs fail them (none is lost)
        self._parked = []
        for job, go in zip(waiting, ready):
            (self._going if go else self._parked).append(job)

    def _run(self) -> None:
        name_thread(f"kvnode-copy-{self.mover.device.split(':', 1)[0]}")
        while True:
            job = self._next()
            if job is None:
                for parked in [*self._going, *self._parked]:  # the agent stops: no more copies
                    parked.fail("the agent is stopping")
                    self._on_done(parked)
                return
            t0 = time.perf_counter()
            try:
                finished = self.mover.run(job)
            except Exception as exc:  # a bug in a mover must not kill the thread
                log.exception("mover %s failed a job", self.mover.device)
                job.fail(f"internal error: {exc}")
                finished = True
            job.copy_s += time.perf_counter() - t0
            if not finished and not job.failed:
                self._parked.append(job)
                continue
            if job.load:  # a save is reported by the loop, once its entries are committed
                report(self.mover, job)
            self._on_done(job)

    def close(self, timeout_s: float = 5.0) -> None:
        self._queue.close()
        self._thread.join(timeout_s)
