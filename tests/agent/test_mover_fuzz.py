"""Agent mode against a hostile worker: exports and jobs that are mostly well formed
with one field wrong, or random, sent to a real agent by a real client process whose
exported memory has a hole in it (a page that cannot be read or written, as when a
worker unmaps its cache mid-job). The agent answers every request (a reply or an error
reply, never silence), stays up, leaks no pin or reservation once the client is gone,
and moves a clean worker's chunks byte for byte afterwards."""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import random
import time
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from kvnode.agent.movers.base import FairQueue
from kvnode.agent.movers.exports import EXPORTS_PER_CLIENT_MAX
from kvnode.errors import KVNodeError
from kvnode.ipc import progress as PG
from kvnode.ipc import protocol as P
from kvnode.ipc.client import AgentClient
from tests.agent.test_movers import _cache, _load, _ops, _path, _save, big_agent_stats
from tests.conftest import AgentProcess

EXPORTS, JOBS = 300, 1500
PAGE = mmap.PAGESIZE
SCRATCH = 64 * PAGE  # what the hostile exports name; the agent may write anywhere in it
HOLE = 40 * PAGE  # one page of it that cannot be read or written
UNMAPPED = (8, 1 << 46)  # user addresses nothing is mapped at


@dataclass
class Accepted:
    export_id: int
    blocks: int  # the fewest blocks of any layer
    bpc: int
    slots: int


class Scratch:
    """Anonymous memory with one page made unreadable and unwritable."""

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, SCRATCH)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(self.base + HOLE, PAGE, 0) == 0  # PROT_NONE


def _export(
    rng: random.Random, s: Scratch, probe: Any, nonce: bytes, mutate: bool = True,
    device: str = "cpu",
) -> tuple[Any, Accepted]:  # fmt: skip
    """A consistent CPU export of 1-4 layers inside the scratch memory (some spanning
    the hole between their first and last block, which the agent's probe does not
    see), then, one time in three, one field made wrong."""
    nl, bpc = rng.randrange(1, 5), rng.randrange(1, 5)
    bn = rng.choice([64, 256, 1024])
    stride = rng.choice([bn, 2 * bn, PAGE])
    nb = rng.randrange(bpc, 33)
    layers, payload = [], 0
    for i in range(nl):
        parts = [(0, bn)] if rng.random() < 0.5 else [(0, bn // 2), (bn, bn // 2)]
        span = (nb - 1) * stride + 2 * bn
        base = s.base + rng.randrange(0, SCRATCH - span, 16)
        layers.append([f"model.layers.{i}.self_attn.attn", base, nb, stride, bn, parts, payload])
        payload += bpc * bn
    fields: dict[str, Any] = {
        "device": device, "progress": s.base + rng.randrange(0, 8) * PAGE, "slots": 4,
        "slot_bytes": PG.slot_bytes(nl), "chunk": payload, "probe": probe, "nonce": nonce,
    }  # fmt: skip
    if mutate and rng.random() < 0.33:
        what = rng.randrange(9)
        layer = rng.choice(layers)
        if what == 0:
            layer[1] = rng.choice(UNMAPPED)  # a layer nowhere
        elif what == 1:
            layer[1] = s.base + HOLE  # a layer's first block in the hole
        elif what == 2:
            layer[6] += 1  # its payload overlaps the next layer's or leaves the chunk
        elif what == 3:
            layer[5] = [(0, bn), (0, bn)]  # parts do not add up to block_nbytes
        elif what == 4:
            fields["chunk"] += rng.choice([-1, 1, bn])
        elif what == 5:
            fields["progress"] = rng.choice([*UNMAPPED, s.base + HOLE])  # never reported
        elif what == 6:
            fields["slot_bytes"] = 8
        elif what == 7:
            fields["nonce"] = os.urandom(P.PROBE_BYTES)  # not what the probe holds
        else:
            fields["device"] = rng.choice(["cpu:1", "tpu", "cuda:nothing"])
    exports = [P.LayerExport(*x) for x in layers]  # type: ignore[arg-type]
    f = fields
    make = lambda r, cid, g: P.ExportReq(  # noqa: E731
        r, cid, g, f["device"], exports, f["progress"], f["slots"], f["slot_bytes"],
        f["chunk"], f["probe"], f["nonce"],
    )  # fmt: skip
    return make, Accepted(0, nb, bpc, 4)


def _job(rng: random.Random, ex: Accepted, keys: list[bytes]) -> tuple[Any, list[bytes]]:
    """A job the export could have sent, then, one time in four, one field wrong.
    Keys repeat within a job and name chunks of other exports' sizes."""
    load = rng.random() < 0.5
    n = rng.randrange(1, 9)
    ks = [rng.choice(keys) if keys and rng.random() < 0.6 else os.urandom(16) for _ in range(n)]
    if n > 1 and rng.random() < 0.3:
        ks[1] = ks[0]
    blocks, offsets = [], []
    for _ in range(n):
        if load:
            off = rng.randrange(ex.bpc)
            blocks.append(
                [rng.randrange(ex.blocks) for _ in range(rng.randrange(1, ex.bpc - off + 1))]
            )
            offsets.append(off)
        else:
            blocks.append([rng.randrange(ex.blocks) for _ in range(ex.bpc)])
    if not load or rng.random() < 0.5:
        offsets = []
    slot, seq, eid = rng.randrange(ex.slots), rng.randrange(1, 256), ex.export_id
    layerwise = not load and rng.random() < 0.2
    parents = [os.urandom(16) for _ in range(n)] if rng.random() < 0.3 else []
    if rng.random() < 0.25:
        what = rng.randrange(6)
        if what == 0:
            blocks[0] = [ex.blocks]  # beyond the cache
        elif what == 1:
            blocks.append([0])  # lists that disagree
        elif what == 2:
            slot = ex.slots  # beyond its slots
        elif what == 3:
            layerwise = True  # layer-wise loads do not exist
        elif what == 4:
            blocks[0] = []
        else:
            offsets = [ex.bpc] * n
    make = lambda r, cid, g: P.JobReq(r, cid, g, eid, load, slot, seq, ks, blocks,  # noqa: E731
                                      offsets, [], parents, [], layerwise)  # fmt: skip
    return make, [] if load else ks


def _answer(c: AgentClient, make: Any) -> Any:
    """One request: its reply, or the error reply's exception (never a timeout)."""
    try:
        return c._call(make, timeout_s=10.0, retry=False)
    except KVNodeError as exc:
        assert "timed out" not in str(exc).lower(), exc
        return exc


def test_hostile_exports_and_jobs_stop_nothing_and_leak_nothing(big_agent: AgentProcess) -> None:
    agent = big_agent
    rng = random.Random(20261206)
    rd = str(agent.runtime_dir)
    src = _cache(3)
    _w, path = _path(rd, src)
    _save(path, _ops(6, 0, tag=7))  # chunks of the clean worker's size, in the arena
    keys = [bytes([7, i]) * 8 for i in range(6)]
    s = Scratch()
    probe = ctypes.create_string_buffer(P.PROBE_BYTES)
    accepted: list[Accepted] = []
    c = AgentClient(agent.runtime_dir, name="hostile", timeout_s=10.0, heartbeat=False)
    c.connect()
    client_id = c.client_id
    try:
        for e in range(EXPORTS):
            nonce = os.urandom(P.PROBE_BYTES)
            ctypes.memmove(probe, nonce, P.PROBE_BYTES)
            make, ex = _export(rng, s, ctypes.addressof(probe), nonce)
            try:
                eid, _gen, why, _ = c.export(make)
            except KVNodeError as exc:
                assert "timed out" not in str(exc).lower(), exc
                eid, why = 0, str(exc)
            if eid:
                ex.export_id = eid
                accepted = [*accepted, ex][-EXPORTS_PER_CLIENT_MAX:]  # older ones displaced
            else:
                assert why, "a refused export says why"
            for _ in range(JOBS // EXPORTS if accepted else 0):
                make, saved = _job(rng, rng.choice(accepted), keys)
                if isinstance(_answer(c, make), P.StatusRep) and saved:
                    keys = (keys + saved)[-64:]  # later loads name what this one saved
            if e % 50 == 0:
                assert agent.proc is not None and agent.proc.poll() is None, agent.log()
        assert c.client_id == client_id, "a well-formed job made the client register again"
        mid = big_agent_stats(agent)["transfers"]["agent"]
    finally:
        c.close()
    assert agent.proc is not None and agent.proc.poll() is None, agent.log()
    assert mid["jobs"] >= JOBS // 2, mid  # most jobs reached the copy threads
    assert mid["jobs_failed"] >= 1, mid  # the hole: a job failed, counted, nothing stopped
    assert mid["exports_refused"] >= EXPORTS // 10 and mid["exports"] >= EXPORTS // 2, mid
    assert "Traceback" not in agent.log(), agent.log()[-4000:]
    # Once the hostile client is gone its exports die and its jobs end (parked
    # layer-wise saves included): nothing pinned or reserved stays behind.
    deadline = time.monotonic() + 45
    while True:
        st = big_agent_stats(agent)
        t = st["transfers"]["agent"]
        if st["arena"]["pinned"] == 0 and st["arena"]["reserved"] == 0 and t["jobs_inflight"] == 0:
            break
        assert time.monotonic() < deadline, (st["arena"], t)
        time.sleep(0.2)
    # Fresh workers still save and load byte for byte through the same agent.
    src2 = _cache(4)
    dst = {k: v.clone().zero_() for k, v in src2.items()}
    _w2, p2 = _path(rd, src2)
    _w3, p3 = _path(rd, dst)
    _save(p2, _ops(4, 16, tag=9))
    assert _load(p3, _ops(4, 40, tag=9)) == set()
    for k in src2:
        assert bool((src2[k][16:32] == dst[k][40:56]).all()), k


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_device_names_cannot_multiply_copy_threads(big_agent: AgentProcess) -> None:
    """A device is a real one of this node: "cpu", or "cuda:<uuid>" of a GPU the agent
    sees. Any other name is refused with the reason, and starts no copy thread (a
    client naming a thousand devices must not get a thousand threads)."""
    agent = big_agent
    rng = random.Random(7)
    s = Scratch()
    probe = ctypes.create_string_buffer(P.PROBE_BYTES)
    assert agent.proc is not None
    c = AgentClient(agent.runtime_dir, name="devices", timeout_s=10.0, heartbeat=False)
    c.connect()
    try:

        def export(device: str) -> tuple[int, str]:
            nonce = os.urandom(P.PROBE_BYTES)
            ctypes.memmove(probe, nonce, P.PROBE_BYTES)
            make, _ = _export(rng, s, ctypes.addressof(probe), nonce, False, device)
            eid, _gen, why, _ = c.export(make)
            return eid, why

        assert export("cpu")[0]  # the one CPU device: its copy thread starts once
        before = _threads(agent.proc.pid)
        names = [f"cpu:{i}" for i in range(40)] + [
            f"cuda:{os.urandom(16).hex()}" for _ in range(40)
        ]
        names += ["cuda", "cuda:", "cuda:0", "CPU", " cpu", "cpu\x00", "tpu:0"]
        for name in names:
            eid, why = export(name)
            assert eid == 0, name
            assert why, name
        assert _threads(agent.proc.pid) <= before + 2, (before, _threads(agent.proc.pid))
        assert export("cpu")[0]
        devices = big_agent_stats(agent)["transfers"]["agent"]["devices"]
        assert set(devices) == {"cpu"}, devices
    finally:
        c.close()
    assert agent.proc.poll() is None, agent.log()


def test_a_gpu_device_is_named_by_a_uuid_the_agent_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvnode.agent.movers import service

    seen = frozenset({"7f2b0000-1111-2222-3333-444455556666"})
    monkeypatch.setattr(service, "_visible_gpus", lambda: (seen, ""))
    assert service._gpu_check("cuda:7f2b0000-1111-2222-3333-444455556666") == ""
    assert service._gpu_check("cuda:GPU-7F2B0000-1111-2222-3333-444455556666") == ""
    assert "not visible" in service._gpu_check("cuda:00000000-1111-2222-3333-444455556666")
    assert "names no GPU" in service._gpu_check("cuda:")
    monkeypatch.setattr(service, "_visible_gpus", lambda: (frozenset(), "no CUDA runtime"))
    assert service._gpu_check("cuda:7f2b0000-1111-2222-3333-444455556666") == "no CUDA runtime"
    assert service._cpu_check("cpu") == "" and service._cpu_check("cpu:0")


def _small_export(rd: str, seed: int) -> tuple[Any, Any]:
    """A worker exporting one layer of 8 KiB chunks (4 blocks each)."""
    w, path = _path(rd, _cache(seed, layers=1, head=8))
    assert path.ready()
    return w, path


def _parked_save(path: Any, slot: int, chunks: int, bpc: int = 4) -> Any:
    """A layer-wise save of ``chunks`` new keys whose layers are never marked: the
    agent parks it until its worker goes or its deadline passes."""
    keys = [os.urandom(16) for _ in range(chunks)]
    blocks = [list(range(bpc * k, bpc * (k + 1))) for k in range(chunks)]
    eid = path.export_id
    return lambda r, cid, g: P.JobReq(r, cid, g, eid, False, slot, 1, keys, blocks,
                                      [], [], [], [], True)  # fmt: skip


def test_one_client_cannot_take_every_job_the_agent_runs(big_agent: AgentProcess) -> None:
    """Layer-wise saves whose layers are never marked computed stay in flight until
    their deadline. One client may hold at most ``JOB_SLOTS_MAX`` jobs: the next is
    refused with the reason, another worker's jobs still run, and once the flooding
    client is gone every job ends and nothing stays reserved (the 256 MiB arena has
    room for its reservations, a page each: bytes are bounded by namespace quotas)."""
    agent = big_agent
    rd = str(agent.runtime_dir)
    _w, flood = _small_export(rd, 5)

    def job(i: int) -> Any:
        return _parked_save(flood, i % flood.slots, 1)

    for i in range(P.JOB_SLOTS_MAX):
        rep = flood.link.call(lambda cl, i=i: _answer(cl, job(i)))
        assert isinstance(rep, P.StatusRep), (i, rep)
    refused = flood.link.call(lambda cl: _answer(cl, job(0)))
    assert isinstance(refused, KVNodeError) and "in flight" in str(refused), refused
    t = big_agent_stats(agent)["transfers"]["agent"]
    assert t["jobs_inflight"] == P.JOB_SLOTS_MAX and t["jobs_refused"] >= 1, t
    # Another worker is not held up by them.
    src = _cache(6)
    _w2, other = _path(rd, src)
    _save(other, _ops(2, 0, tag=3))
    dst = {k: v.clone().zero_() for k, v in src.items()}
    _w3, p3 = _path(rd, dst)
    assert _load(p3, _ops(2, 8, tag=3)) == set()
    flood.link.close()  # the flooding client goes: its parked saves end, unsaved
    deadline = time.monotonic() + 20
    while True:
        s = big_agent_stats(agent)
        t = s["transfers"]["agent"]
        if t["jobs_inflight"] == 0 and s["arena"]["reserved"] == 0:
            break
        assert time.monotonic() < deadline, (t, s["arena"])
        time.sleep(0.1)


def test_agent_mode_chunks_count_against_the_clients_shares(tmp_path: Any) -> None:
    """The agent reserves and pins for a client's jobs as itself; those chunks count
    against the client's ``agent.client_leases_max`` and ``agent.client_pins_max`` as
    its own reservations and pins do. Parked saves of 3 x 8 chunks against a share of
    20: the last 4 are answered no-space (counted), 20 stay reserved. A load of 8 by a
    client holding 16 pins of its own against 20: 4 load, 4 are misses."""
    sets = ["agent.client_leases_max=20", "agent.client_pins_max=20"]
    agent = AgentProcess(tmp_path / "run", cpu_bytes="256MiB",
                         args=[x for s in sets for x in ("--set", s)]).start()  # fmt: skip
    try:
        rd = str(agent.runtime_dir)
        _w, flood = _small_export(rd, 40)
        saves = [_parked_save(flood, i, 8) for i in range(3)]
        codes = [flood.link.call(lambda cl, j=j: _answer(cl, j)).status for j in saves]
        assert codes[:2] == [[int(P.Status.OK)] * 8] * 2, codes
        assert codes[2] == [int(P.Status.OK)] * 4 + [int(P.Status.NO_SPACE)] * 4, codes
        s = big_agent_stats(agent)
        assert s["transfers"]["agent"]["refused_share"] == 4
        assert s["arena"]["reserved"] == 20, s["arena"]
        flood.link.close()  # its parked saves end, unsaved: the share is free again

        src = _cache(6)
        _w2, saver = _path(rd, src)
        _save(saver, _ops(8, 0, tag=9))
        mine = [os.urandom(16) for _ in range(16)]
        dst = {k: v.clone().zero_() for k, v in src.items()}
        _w3, loader = _path(rd, dst)
        for k in mine:  # 16 pins of the loading client's own
            loader.link.call(lambda cl, k=k: cl.put(k, b"x" * 4096))
        got = loader.link.call(lambda cl: cl.pin(mine))
        assert all(slot is not None for _, slot in got)
        errors = _load(loader, _ops(8, 8, tag=9))
        assert len(errors) > 0, "all 8 loaded past the client's pin share"
        t = big_agent_stats(agent)["transfers"]["agent"]
        assert t["refused_share"] == 8 and t["load_chunks"] == 4, t
    finally:
        agent.stop()


def test_a_job_naming_an_export_the_client_lacks_leaves_its_registration_and_export(
    big_agent: AgentProcess,
) -> None:
    """A job naming an export id the agent does not hold for the client (one pushed
    out by a newer export, or one built before the worker exported again) is refused
    as that (``UNKNOWN_EXPORT``), not as an unknown client: the client does not
    register again, so its valid export, and the jobs on it, live on."""
    agent = big_agent
    rd = str(agent.runtime_dir)
    src = _cache(11)
    _w, path = _path(rd, src)
    assert path.ready()
    eid = path.export_id
    client_id = path.link.call(lambda c: c.client_id)
    keys, blocks = [os.urandom(16)], [[0, 1, 2, 3]]
    make = lambda r, cid, g: P.JobReq(r, cid, g, eid + 1000, False, 0, 1, keys, blocks)  # noqa: E731
    got: list[Any] = []
    path.link.call(lambda c: c.job(make, got.append))  # posted, as a worker's jobs are
    assert path.link.call(lambda c: c.flush(10.0)) and len(got) == 1
    assert isinstance(got[0], P.Error) and got[0].code == P.ErrCode.UNKNOWN_EXPORT, got
    sent = path.link.call(lambda c: _answer(c, make))  # and as a call
    assert isinstance(sent, KVNodeError) and "no such export" in str(sent), sent
    path.link.call(lambda c: c.lookup([os.urandom(16)]))  # the next call registers no one
    assert path.link.call(lambda c: c.client_id) == client_id
    t = big_agent_stats(agent)["transfers"]["agent"]
    assert t["exports_dropped"] == 0 and t["exporting_workers"] == 1, t
    assert path.ready() and path.export_id == eid  # the same export still moves the bytes
    _save(path, _ops(2, 0, tag=11))
    dst = {k: v.clone().zero_() for k, v in src.items()}
    _w2, loader = _path(rd, dst)
    assert _load(loader, _ops(2, 8, tag=11)) == set()
    for k in src:
        assert torch.equal(dst[k][8:16], src[k][0:8])


def test_a_worker_whose_export_was_pushed_out_exports_again(big_agent: AgentProcess) -> None:
    """Its client made ``EXPORTS_PER_CLIENT_MAX`` newer exports, so the agent dropped
    the worker's: its next job is refused as naming no export of the client, and the
    step after exports again and saves through the agent."""
    agent = big_agent
    rd = str(agent.runtime_dir)
    w, path = _path(rd, _cache(12))
    assert path.ready()
    old = path.export_id
    for _ in range(EXPORTS_PER_CLIENT_MAX):  # the same worker exporting again and again
        path.export_id = 0
        assert path.ready() and path.export_id != old
    path.export_id = old  # the worker still names the first one
    assert path.ready() and path.export_id == old
    _save(path, _ops(1, 0, tag=12))  # refused: it ends, unsaved
    assert w.stats.save_chunks == 0
    assert path.ready() and path.export_id not in (0, old)
    _save(path, _ops(1, 4, tag=13))
    assert w.stats.save_chunks == 1


@pytest.mark.parametrize("fault", ["same name", "same region", "gap"])
def test_exports_whose_layers_do_not_tile_the_chunk_are_refused(
    big_agent: AgentProcess, fault: str
) -> None:
    """Two layers of one name, two layers over the same payload region, or a region
    past a gap: a save through such an export would checksum bytes its copies never
    wrote, and every load of its chunks would fail the check. Refused, with the
    reason; the same export laid out right is taken."""
    s = Scratch()
    c = AgentClient(str(big_agent.runtime_dir), name="tiles", timeout_s=10.0, heartbeat=False)
    c.connect()
    try:
        bn, bpc, nb = 1024, 2, 8
        probe = ctypes.create_string_buffer(P.PROBE_BYTES)

        def export(names: list[str], offsets: list[int], chunk: int) -> tuple[int, str]:
            nonce = os.urandom(P.PROBE_BYTES)
            ctypes.memmove(probe, nonce, P.PROBE_BYTES)
            layers = [
                P.LayerExport(name, s.base + i * nb * bn, nb, bn, bn, [(0, bn)], off)
                for i, (name, off) in enumerate(zip(names, offsets))
            ]
            make = lambda r, cid, g: P.ExportReq(  # noqa: E731
                r, cid, g, "cpu", layers, s.base + 32 * PAGE, 4, PG.slot_bytes(len(layers)),
                chunk, ctypes.addressof(probe), nonce,
            )  # fmt: skip
            eid, _gen, why, _wakes = c.export(make)
            return eid, why

        region = bpc * bn
        names = ["model.layers.0.attn", "model.layers.1.attn", "model.layers.2.attn"]
        offsets = [0, region, 2 * region]
        chunk = 3 * region
        if fault == "same name":
            names[2] = names[1]
        elif fault == "same region":
            offsets[2] = offsets[1]
        else:  # a gap [r, 1.5r), then two regions over each other, all inside the chunk
            offsets = [0, 2 * region, region + region // 2]
        eid, why = export(names, offsets, chunk)
        assert eid == 0 and why, (fault, eid)
        assert ("same name" in why) if fault == "same name" else ("tile" in why), why
        eid, why = export(
            ["model.layers.0.attn", "model.layers.1.attn", "model.layers.2.attn"],
            [0, region, 2 * region], chunk,
        )  # fmt: skip
        assert eid and not why, why
    finally:
        c.close()


def _job_of(client: int, n: int) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(export=SimpleNamespace(client_id=client), n=n)


def test_the_copy_queue_takes_the_clients_in_turn() -> None:
    """Each client's jobs in order, the clients in turn; a client's share of the queue
    and the whole queue are bounded; once closed, what is queued still comes out."""
    q = FairQueue(total=6, per_client=4)
    for i in range(5):
        assert q.put(_job_of(1, i)) == (i < 4)  # past its share
    assert q.put(_job_of(2, 0)) and q.put(_job_of(3, 0))
    assert not q.put(_job_of(4, 0))  # the queue is full
    order = [(j.export.client_id, j.n) for j in (q.get(0) for _ in range(6))]
    assert order == [(1, 0), (2, 0), (3, 0), (1, 1), (1, 2), (1, 3)], order
    with pytest.raises(queue.Empty):
        q.get(0.01)
    assert q.put(_job_of(5, 0))
    q.close()
    assert not q.put(_job_of(6, 0))
    got = q.get(0)
    assert got is not None and got.export.client_id == 5
    assert q.get(0) is None and q.get() is None


def test_one_clients_queued_jobs_hold_up_anothers_by_at_most_one(big_agent: AgentProcess) -> None:
    """A client queues a dozen heavy loads (its stored 6 MiB chunk written 32 times
    each); another client's one-chunk load, handed over after them, is served in its
    turn: done while most of the first client's jobs still wait, not after them all."""
    agent = big_agent
    rd = str(agent.runtime_dir)
    big = _cache(21, blocks=16, head=1024)  # 256 KiB per layer-block: 6 MiB chunks
    _wh, hog = _path(rd, big)
    _save(hog, _ops(1, 0, tag=21))
    key, eid = _ops(1, 0, tag=21)["r"][0].keys[0], hog.export_id
    src = _cache(22)
    _wv, saver = _path(rd, src)
    _save(saver, _ops(1, 0, tag=22))
    dst = {k: v.clone().zero_() for k, v in src.items()}
    _wl, victim = _path(rd, dst)
    assert victim.ready()
    jobs, dup = 12, 32
    slots = range(1, 1 + jobs)
    for slot in slots:
        hog.page[slot] = 0
        make = lambda r, cid, g, slot=slot: P.JobReq(  # noqa: E731
            r, cid, g, eid, True, slot, 1, [key] * dup, [[4, 5, 6, 7]] * dup, [0] * dup
        )
        hog.link.call(lambda c, m=make: c.job(m))
    assert hog.link.call(lambda c: c.flush(10.0))  # every one queued (answered)
    assert _load(victim, _ops(1, 8, tag=22)) == set()
    done = sum(1 for slot in slots if hog.page[slot, PG.DONE] == 1)
    assert done <= 3, f"the other client's load waited for {done} of {jobs} jobs"
    for k in src:
        assert torch.equal(dst[k][8:12], src[k][0:4])
    deadline = time.monotonic() + 60
    while sum(1 for slot in slots if hog.page[slot, PG.DONE] == 1) < jobs:
        assert time.monotonic() < deadline, "the queued jobs never all ended"
        time.sleep(0.01)
