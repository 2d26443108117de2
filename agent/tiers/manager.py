"""The tier manager: moves chunks between the arena and the disk and S3 tiers.

Runs in the agent's loop thread, which it never blocks: every byte moves in the
tiers' I/O threads (``pool.IOPool``), which report completed jobs into a queue and call
``wake()``; the loop collects them with ``poll()`` and only then touches the index.

The index is changed only through the cache (``Cache``: ``reserve_agent``, ``land``,
``release``, ``hold``/``unhold``), which also turns what the tiers store and delete
into KV events; this module moves bytes and keeps the tiers' own books.

- Demotion. Every copy out of the arena holds its entry (``Cache.hold``) until the
  copy is done, so neither eviction nor a drop frees pages a copy still reads.
  ``write_through``: a copy is queued when a chunk is committed (the entry stays
  readable meanwhile). ``write_back``: the index returns its victims as data and the
  agent hands them to ``on_evicted``, which queues their copies. A tier
  that still lacks a chunk at eviction (copy dropped, or not admitted yet) gets it
  then, whatever its policy. S3 admits only chunks with ``s3.admit_min_hits`` arena
  hits. Queues hold at most ``queue_max`` writes; when full or the tier is failing,
  the copy is dropped and counted: nothing waits.
- Promotion. ``on_lookup_miss`` finds a chunk below the arena (disk index, S3 known
  keys, else a ranged-GET probe of S3 unless recently missed), reserves arena pages as
  the agent (``AGENT_OWNER``), reads straight into them from an I/O thread, verifies
  the checksum and commits in ``poll()``. At most ``promote.inflight_max`` at once; a
  key is never promoted twice at the same time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from kvnode.agent.config import Config
from kvnode.agent.index import Entry, Outcome, State
from kvnode.agent.tiers.base import SlotBuffers, TierStore
from kvnode.agent.tiers.format import ChunkMeta
from kvnode.agent.tiers.pool import IOPool, Job
from kvnode.errors import KVNodeError, TierError
from kvnode.ipc.segment import Segment

if TYPE_CHECKING:
    from kvnode.agent.cache import Cache

log = logging.getLogger("kvnode.tiers")

CLOSE_JOIN_S = 5.0  # how long close() waits for running I/O (it may be writing into slots)
# Write-behind: committed chunks are copied to the write-back tiers while their queues
# have room, using at most this share of each queue (the rest is kept for copies that
# eviction hands over), so eviction finds them clean.
WRITE_BEHIND_QUEUE_SHARE = 0.5
DIRTY_MAX = 1 << 16  # committed chunks waiting for write-behind; the oldest are skipped
UNSAVED_LOG_INTERVAL_S = 60.0  # at most one warning per interval about unsaved evictions


@dataclass(slots=True, eq=False)
class Tier:
    name: str
    store: TierStore
    pool: IOPool
    write_policy: str  # "write_through" or "write_back"
    queue_max: int
    admit_min_hits: int = 0
    depth: int = 0  # write and delete jobs queued or running

    def usable(self) -> bool:
        return self.store.healthy()


def build_stores(cfg: Config) -> dict[str, TierStore]:
    """The stores the config turns on: disk when disk.path, S3 when s3.bucket."""
    stores: dict[str, TierStore] = {}
    if cfg.disk.path:
        from kvnode.agent.tiers.disk import DiskStore

        d = cfg.disk
        # The start-up scan runs in an I/O thread (TierManager); lookups meanwhile probe.
        stores["disk"] = DiskStore(d.path, d.bytes, o_direct=d.o_direct, fsync=d.fsync, scan=False)
    if cfg.s3.bucket:
        from kvnode.agent.tiers.s3 import S3Store, make_client

        s = cfg.s3
        client = make_client(s.endpoint_url, s.region, s.timeout_s, s.concurrency)
        stores["s3"] = S3Store(
            s.bucket,
            client,
            prefix=s.prefix,
            codec=s.codec,
            multipart_bytes=s.multipart_bytes,
            retries_max=s.retries_max,
            negative_ttl_s=s.negative_ttl_s,
            stuck_after_s=s.stuck_after_s,
        )
    return stores


class TierManager:
    def __init__(
        self,
        cfg: Config,
        arena: Segment,
        cache: Cache,
        wake: Callable[[], None],
        stores: dict[str, TierStore] | None = None,
    ) -> None:
        self.cache = cache
        self.index = cache.index  # read only: every change goes through the cache
        self.wake = wake
        self.page_bytes = self.index.page_bytes
        self._arena = memoryview(arena.buffer).cast("B")
        self.inflight_max = cfg.promote.inflight_max
        self._done: deque[Job] = deque()
        self._done_event = threading.Event()
        self.tiers: list[Tier] = []
        stores = build_stores(cfg) if stores is None else stores
        for name, store in stores.items():
            self.tiers.append(self._tier(cfg, name, store))
        self.promoting: dict[bytes, Tier] = {}  # key -> tier being read or probed
        self.promote_dropped = 0
        self.promote_no_space = 0
        self._writes: dict[bytes, int] = {}  # key -> write jobs in flight (all tiers)
        self._queued: set[tuple[str, bytes]] = set()  # (tier, key) writes in flight
        self._cancelled: set[bytes] = set()  # dropped while a write was in flight
        self._closing = False
        self._dirty: deque[bytes] = deque()  # committed, not yet offered to write-behind
        self.write_behind_skipped = 0  # dirty chunks past DIRTY_MAX: eviction copies them
        self._unsaved_logged = 0  # evict_unsaved when last logged
        self._unsaved_log_at = -UNSAVED_LOG_INTERVAL_S  # monotonic time of that log
        for t in self.tiers:
            scan_fn = t.store.startup_scan()
            if scan_fn is not None:
                t.pool.submit(Job("scan", t.name, b"", scan_fn), high=True)

    def _tier(self, cfg: Config, name: str, store: TierStore) -> Tier:
        if name == "disk":
            d = cfg.disk
            pool = IOPool(name, d.io_threads, self._job_done)
            return Tier(name, store, pool, d.write_policy, d.queue_max, 0)
        if name == "s3":
            s = cfg.s3
            pool = IOPool(name, s.concurrency, self._job_done)
            return Tier(name, store, pool, s.write_policy, s.queue_max, s.admit_min_hits)
        raise ValueError(f"unknown tier {name!r}")

    # -- I/O thread side --------------------------------------------------------------
    def _job_done(self, job: Job) -> None:
        self._done.append(job)
        self._done_event.set()
        try:
            self.wake()
        except Exception:  # a wake that fails only delays the next poll
            log.exception("tier manager: wake() failed")

    # -- helpers ----------------------------------------------------------------------
    def _slot(self, e: Entry) -> SlotBuffers:
        return SlotBuffers(self._arena, e.pages, self.page_bytes, e.size)

    @staticmethod
    def _guarded(t: Tier, fn: Callable[[], Any]) -> Callable[[], Any]:
        """A job that gives up without I/O when its tier went unhealthy while it was
        queued: a backlog behind a dead endpoint drains at once instead of timing out."""

        def run() -> Any:
            if not t.store.healthy():
                t.store.stats.inc("dropped")
                raise TierError(f"tier {t.name} unhealthy: job skipped")
            return fn()

        return run

    def _admitted(self, t: Tier, e: Entry) -> bool:
        return e.hits >= t.admit_min_hits

    def tier(self, name: str) -> Tier | None:
        return next((t for t in self.tiers if t.name == name), None)

    # -- promotion --------------------------------------------------------------------
    def on_lookup_miss(self, key: bytes) -> bool:
        """True: ``key`` is below the arena and its promotion is under way (PENDING).
        An unhealthy tier promises nothing: a promotion still running from it is not
        reported (its job finishes or fails on its own), and it is neither read nor
        probed, so a stuck endpoint costs a recompute, not a wait."""
        busy = self.promoting.get(key)
        if busy is not None:
            return busy.usable()
        if self._closing or not self.tiers:
            return False
        if len(self.promoting) >= self.inflight_max:
            self.promote_dropped += 1
            return False
        for t in self.tiers:
            size = t.store.size_of(key)
            if size is not None and t.usable():
                return self._start_read(key, t, size)
        for t in self.tiers:
            if t.usable() and t.store.may_probe(key):
                job = Job("probe", t.name, key, self._guarded(t, partial(t.store.probe, key)))
                if t.pool.submit(job, high=True):
                    self.promoting[key] = t
                    return True
            else:
                t.store.stats.inc("misses")
        return False

    def promoting_now(self, key: bytes) -> bool:
        """A promotion of ``key`` is under way (no side effects: for peers' questions)."""
        t = self.promoting.get(key)
        return t is not None and t.usable()

    def _start_read(self, key: bytes, t: Tier, size: int) -> bool:
        status, e = self.cache.reserve_agent(key, size)
        if status is not Outcome.OK or e is None:
            if status is not Outcome.EXISTS:
                self.promote_no_space += 1
            return False
        slot = self._slot(e)
        job = Job("read", t.name, key, self._guarded(t, partial(_read, t.store, key, slot)))
        if not t.pool.submit(job, high=True):
            self.cache.release(key)
            return False
        self.promoting[key] = t
        return True

    def _finish_read(self, job: Job, t: Tier) -> None:
        key = job.key
        if job.error is None and job.result is not None:
            checksum, meta = job.result
            # The writer's checksum as the tier kept it (0: unverified, stays so); the
            # cache offers the chunk to write-through tiers (from S3: the disk).
            if self.cache.land(key, checksum, meta):
                t.store.stats.inc("hits")
                return
        self.cache.release(key)
        if job.error is None:
            t.store.stats.inc("misses")  # gone since we indexed it

    def _finish_probe(self, job: Job, t: Tier) -> None:
        if job.error is None and job.result is not None and not self._closing:
            self._start_read(job.key, t, job.result)
        elif job.error is None:
            t.store.stats.inc("misses")

    # -- demotion ---------------------------------------------------------------------
    def on_commit(self, key: bytes, slot: Any = None) -> None:
        """Write-through hook, called after ``index.commit`` (``slot`` is not needed:
        the index entry is the truth)."""
        e = self.index.entries.get(key)
        if e is None or e.state is not State.COMMITTED:
            return
        back = False
        for t in self.tiers:
            if t.write_policy == "write_through" and self._admitted(t, e):
                self._enqueue_write(t, e)
            back = back or t.write_policy == "write_back"
        if back:
            if len(self._dirty) >= DIRTY_MAX:
                self._dirty.popleft()
                self.write_behind_skipped += 1
            self._dirty.append(key)

    def _write_behind(self) -> None:
        """Copy committed chunks to the write-back tiers while their queues have room
        (oldest first: they are evicted first), so eviction finds them clean."""
        back = [t for t in self.tiers if t.write_policy == "write_back"]
        if self._closing or not back:
            return
        entries, dirty = self.index.entries, self._dirty
        while dirty:
            if any(t.usable() and t.depth >= t.queue_max * WRITE_BEHIND_QUEUE_SHARE for t in back):
                return  # no bandwidth to spare now: try again at the next poll
            e = entries.get(dirty.popleft())
            if e is None or e.state is not State.COMMITTED or e.saved:
                continue
            for t in back:
                if t.usable() and self._admitted(t, e):
                    self._enqueue_write(t, e)
            self._mark_saved(e)

    def _mark_saved(self, e: Entry) -> None:
        """``e`` is clean once every write-back tier has it: a tier that does not admit
        it yet (``s3.admit_min_hits``) may by the time it is evicted, and eviction is
        where it gets its copy then."""
        saved = all(
            t.store.size_of(e.key) is not None for t in self.tiers if t.write_policy == "write_back"
        )
        self.cache.set_saved(e, saved)

    def on_evicted(self, leaving: list[Entry]) -> None:
        """Victims the index kept for write-back, each with one hold: queue their
        copies (each takes its own hold), then give back the eviction's hold, which
        frees the pages of any victim no tier took."""
        for e in leaving:
            if not self._closing:
                for t in self.tiers:
                    if self._admitted(t, e):
                        self._enqueue_write(t, e)
            self.cache.unhold(e.key)

    def _enqueue_write(self, t: Tier, e: Entry) -> None:
        key = e.key
        if (t.name, key) in self._queued or t.store.size_of(key) is not None:
            return
        if t.depth >= t.queue_max or not t.usable():
            t.store.stats.inc("dropped")
            return
        slot, csum, meta = self._slot(e), e.checksum, e.meta
        put = partial(t.store.put, key, slot, csum, meta=meta)
        job = Job("write", t.name, key, self._guarded(t, put))
        if self.cache.hold(key) is None:
            return
        if not t.pool.submit(job, high=False):
            self.cache.unhold(key)
            return
        t.depth += 1
        self._queued.add((t.name, key))
        self._writes[key] = self._writes.get(key, 0) + 1

    def _finish_write(self, job: Job, t: Tier) -> None:
        key = job.key
        t.depth -= 1
        self._queued.discard((t.name, key))
        e = self.index.entries[key]  # held until the unhold below
        if job.error is None and job.result:
            self.cache.tier_stored(key, t.name, e.meta)
            if e.state is State.COMMITTED and key not in self._cancelled:
                self._mark_saved(e)
        self.cache.unhold(key)
        left = self._writes[key] - 1
        if left:
            self._writes[key] = left
            return
        del self._writes[key]
        if key in self._cancelled:
            self._cancelled.discard(key)
            self.drop(key)

    # -- removal ----------------------------------------------------------------------
    def drop(self, key: bytes) -> None:
        """Remove ``key`` from this node's lower tiers (an operator's drop). S3 keeps
        it: the bucket is the fleet's, and only its lifecycle rules delete objects."""
        if key in self._writes:
            self._cancelled.add(key)  # the copy in flight may hold bad bytes
        for t in self.tiers:
            if t.name == "s3":
                continue
            if t.depth >= t.queue_max:
                t.store.stats.inc("dropped")
                continue
            job = Job("delete", t.name, key, partial(t.store.delete, key))
            if t.pool.submit(job, high=True):
                t.depth += 1

    # -- the loop's side ----------------------------------------------------------------
    def poll(self) -> int:
        """Finish completed jobs (loop thread only). Never blocks. Returns jobs done."""
        n = 0
        self._done_event.clear()
        while self._done:
            job = self._done.popleft()
            n += 1
            t = self.tier(job.tier)
            if t is None:  # programmer error
                raise RuntimeError(f"job for unknown tier {job.tier}")
            if job.error is not None and not isinstance(job.error, (KVNodeError, OSError)):
                log.error("tier %s: %s job failed", t.name, job.kind, exc_info=job.error)
                t.store.stats.inc("errors")
            if job.kind == "read":
                self.promoting.pop(job.key, None)
                self._finish_read(job, t)
            elif job.kind == "probe":
                self.promoting.pop(job.key, None)
                self._finish_probe(job, t)
            elif job.kind == "write":
                self._finish_write(job, t)
            elif job.kind == "scan":
                if job.error is not None:
                    log.error("tier %s: start-up scan failed: %s", t.name, job.error)
            else:
                t.depth -= 1
                if job.kind == "delete" and job.error is None:
                    self.cache.tier_removed(job.key, t.name)
        self._tier_changes()
        self._write_behind()
        self._log_unsaved()
        return n

    def _log_unsaved(self) -> None:
        """Evictions the lower tiers never saw, logged at most once an interval (the
        count is also ``evict_unsaved``, for alerts)."""
        unsaved = self.index.counters.evict_unsaved
        now = time.monotonic()
        if unsaved == self._unsaved_logged or now - self._unsaved_log_at < UNSAVED_LOG_INTERVAL_S:
            return
        log.warning(
            "%d chunks evicted before the lower tiers had them (%d in all): stores came "
            "faster than the disk could take them; raise disk.queue_max or "
            "arena.headroom_share, or give the disk more bandwidth",
            unsaved - self._unsaved_logged, unsaved,
        )  # fmt: skip
        self._unsaved_logged, self._unsaved_log_at = unsaved, now

    def _tier_changes(self) -> None:
        """What the tiers found at start and evicted on their own, as KV events."""
        entries = self.index.entries
        for t in self.tiers:
            found, gone = t.store.take_changes()
            for key in gone:  # the tier let it go: the arena's copy is the last one
                e = entries.get(key)
                if e is not None:
                    self.cache.set_saved(e, False)
            for key, meta in found:
                self.cache.tier_stored(key, t.name, meta)
            for key in gone:
                self.cache.tier_removed(key, t.name)

    def apply_limits(self, cfg: Config) -> list[str]:
        """SIGHUP: apply the tier limits that can change at runtime. Returns what changed."""
        notes = []
        for t in self.tiers:
            queue_max = cfg.disk.queue_max if t.name == "disk" else cfg.s3.queue_max
            if queue_max != t.queue_max:
                notes.append(f"{t.name}.queue_max {t.queue_max} -> {queue_max}")
                t.queue_max = queue_max
            if t.name == "s3" and cfg.s3.admit_min_hits != t.admit_min_hits:
                notes.append(f"s3.admit_min_hits {t.admit_min_hits} -> {cfg.s3.admit_min_hits}")
                t.admit_min_hits = cfg.s3.admit_min_hits
            if t.name == "disk" and cfg.disk.bytes != t.store.gauges().get("bytes_max"):
                old = t.store.set_capacity(cfg.disk.bytes)
                if old is not None:
                    notes.append(f"disk.bytes {old} -> {cfg.disk.bytes}")
        return notes

    def busy(self) -> bool:
        """Work in flight: the loop may poll sooner (completions also call wake())."""
        return bool(self.promoting or self._writes)

    def pending_writes(self) -> int:
        return sum(self._writes.values())

    def stats(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for t in self.tiers:
            s: dict[str, Any] = t.store.stats.snapshot()
            s.update(t.store.gauges())
            s["queue_depth"] = t.depth
            s["queue_max"] = t.queue_max
            s["write_policy"] = t.write_policy
            s["healthy"] = t.usable()
            s["promotions"] = sum(1 for p in self.promoting.values() if p is t)
            s["promote_dropped"] = self.promote_dropped
            s["promote_no_space"] = self.promote_no_space
            out[t.name] = s
        return out

    def flush(self, deadline_s: float) -> int:
        """Shutdown (the loop no longer serves): finish queued copies, then copy what is
        still only in the arena to the write-back tiers, newest first, so a restart
        finds the hot set on disk. Stops at ``deadline_s``. Returns copies unwritten."""
        self._closing = True
        end = time.monotonic() + deadline_s
        todo = [e for e in reversed(self.index.entries.values()) if e.state is State.COMMITTED]
        back = [t for t in self.tiers if t.write_policy == "write_back"]
        while time.monotonic() < end:
            self.poll()
            while todo and back and all(t.depth < t.queue_max for t in back):
                e = todo.pop(0)
                for t in back:
                    if self._admitted(t, e):
                        self._enqueue_write(t, e)
            if not self._writes and not self.promoting and not (todo and back):
                break
            self._done_event.wait(min(0.05, max(0.0, end - time.monotonic())))
        self.poll()
        left = self.pending_writes() + (len(todo) if back else 0)
        if left:
            log.warning("tiers: %d copies not written at shutdown", left)
        return left

    def close(self) -> None:
        """Stop the I/O threads: queued jobs are discarded, running ones finish first
        (they may be writing into arena slots, so the arena must outlive this call)."""
        self._closing = True
        deadline = time.monotonic() + CLOSE_JOIN_S
        for t in self.tiers:
            alive = t.pool.close(max(0.0, deadline - time.monotonic()))
            if alive:
                log.warning("tier %s: %d I/O threads still running at close", t.name, alive)
        self.poll()
        for t in self.tiers:
            t.store.close()
        try:
            self._arena.release()  # lets the agent unmap the arena
        except BufferError:
            pass  # a thread still runs (logged above): the mapping outlives us


def _read(store: TierStore, key: bytes, slot: SlotBuffers) -> tuple[int, ChunkMeta | None] | None:
    """A promotion's read (I/O thread): the checksum the writer gave (0: none) and the
    chunk's metadata from the tier's header, or None when the tier lost the key."""
    checksum = store.read_into(key, slot)
    return None if checksum is None else (checksum, slot.meta)
