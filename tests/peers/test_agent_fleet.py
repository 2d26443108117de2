"""Two real agent processes joined by CURVE peer links, real clients, and a real
subscriber of the KV events decoded with vLLM's own types."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.auth

from kvnode.ipc.client import AgentClient, Lookup, Status
from tests.conftest import AgentProcess
from tests.kv_events import replay_events
from tests.peers.conftest import fleet_keys, free_port

kv_events = pytest.importorskip("vllm.distributed.kv_events", reason="vLLM not installed")


def test_a_miss_is_fetched_from_a_peer_and_events_are_published(tmp_path: Path) -> None:
    secret, auth = fleet_keys(tmp_path)
    pa, pb, pev = free_port(), free_port(), free_port()
    common = [
        "--set", f"peers.curve_secret_key={secret}",
        "--set", f"peers.curve_authorized_dir={auth}",
        "--set", "peers.deadline_ms=200",
    ]  # fmt: skip
    a = AgentProcess(tmp_path / "a", args=[*common, "--set", f"peers.listen=tcp://127.0.0.1:{pa}",
                                           "--set", f"events.endpoint=tcp://127.0.0.1:{pev}"])  # fmt: skip
    b = AgentProcess(tmp_path / "b", args=[*common, "--set", f"peers.listen=tcp://127.0.0.1:{pb}",
                                           "--set", f"peers.seeds=tcp://127.0.0.1:{pa}"])  # fmt: skip
    # A collector that binds; the agent's publisher connects to it (a non-wildcard tcp
    # endpoint), as vLLM's publisher does.
    # tcp events are on the fleet certificate: the collector presents it too.
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 3000)
    sub.curve_publickey, sub.curve_secretkey = zmq.auth.load_certificate(secret)
    sub.curve_server = True
    sub.bind(f"tcp://127.0.0.1:{pev}")
    a.start()
    b.start()
    # A socket handles its new connections when its thread calls into it: poll, so the
    # subscription reaches the agent's PUB before anything is published.
    sub.poll(500)
    ca = AgentClient(a.runtime_dir, name="on-a", timeout_s=2.0)
    cb = AgentClient(b.runtime_dir, name="on-b", timeout_s=2.0)
    try:
        keys = [os.urandom(16) for _ in range(3)]
        datas = [os.urandom(200_000 + i) for i in range(3)]
        for i, (k, d) in enumerate(zip(keys, datas)):
            ((st, slot),) = ca.reserve([k], [len(d)])
            assert st == Status.OK and slot is not None
            ca.write(slot, d)
            parent = keys[i - 1] if i else b""
            from kvnode.ipc.checksum import checksum

            assert ca.commit([k], [checksum(d)], [parent], [[i, i + 1]]) == [Status.OK]
        # B misses locally: the peer has them, so they are PENDING, then hits.
        first = cb.lookup(keys)
        assert all(s in (Lookup.PENDING, Lookup.HIT) for s in first), first
        deadline = time.monotonic() + 5
        while cb.lookup(keys) != [Lookup.HIT] * 3:
            assert time.monotonic() < deadline, cb.stats().get("peers")
            time.sleep(0.02)
        for k, d in zip(keys, datas):
            assert cb.get(k) == d
        # A key no peer has: asked once (PENDING), a miss once the peers answered.
        nobody = [os.urandom(16)]
        deadline = time.monotonic() + 2
        while cb.lookup(nobody) != [Lookup.MISS]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Events: BlockStored with the chunk key as hash, its parent and tokens.
        decoder = msgspec.msgpack.Decoder(kv_events.KVEventBatch)
        stored = []
        while len(stored) < 3:
            topic, seq, payload = sub.recv_multipart()
            assert len(seq) == 8
            for ev in decoder.decode(payload).events:
                if isinstance(ev, kv_events.BlockStored):
                    stored.append(ev)
        assert [ev.block_hashes[0] for ev in stored] == keys
        assert stored[1].parent_block_hash == keys[0] and stored[0].parent_block_hash is None
        assert stored[2].token_ids == [2, 3] and stored[0].medium == "CPU"
        sa = ca.stats()
        assert sa["peers_server"]["refused"] == 0
    finally:
        sub.close()
        ca.close()
        cb.close()
        a.stop()
        b.stop()


def _events(sub: zmq.Socket, want: int, timeout_s: float = 5.0) -> list[object]:
    decoder = msgspec.msgpack.Decoder(kv_events.KVEventBatch)
    out: list[object] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < want and time.monotonic() < deadline:
        if sub.poll(100):
            _, _, payload = sub.recv_multipart()
            out.extend(decoder.decode(payload).events)
    return out


def test_disk_tier_events_carry_tokens_across_a_restart(tmp_path: Path) -> None:
    """Write-through to disk is announced as medium STORAGE with the chunk's tokens;
    the tokens live in the file header, so a restarted agent announces what its disk
    holds, tokens and parent included."""
    from kvnode.ipc.checksum import checksum

    pev, prep = free_port(), free_port()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind(f"tcp://127.0.0.1:{pev}")
    args = [
        "--set", f"events.endpoint=tcp://127.0.0.1:{pev}",
        "--set", f"events.replay_endpoint=tcp://127.0.0.1:{prep}",
        "--set", "events.insecure=true",
        "--set", f"disk.path={tmp_path / 'disk'}",
        "--set", "disk.write_policy=write_through",
    ]  # fmt: skip
    a = AgentProcess(tmp_path / "a", args=args).start()
    sub.poll(500)
    keys = [os.urandom(16) for _ in range(2)]
    try:
        with AgentClient(a.runtime_dir, name="w", timeout_s=2.0) as c:
            for i, k in enumerate(keys):
                d = os.urandom(100_000)
                ((st, slot),) = c.reserve([k], [len(d)])
                assert slot is not None
                c.write(slot, d)
                parent = keys[0] if i else b""
                assert c.commit([k], [checksum(d)], [parent], [[7, i, 2**32 - 1]]) == [Status.OK]
        evs = _events(sub, 5)  # cleared, 2 x CPU, 2 x STORAGE
        storage = {
            e.block_hashes[0]: e
            for e in evs
            if isinstance(e, kv_events.BlockStored) and e.medium == "STORAGE"
        }  # the disk's I/O threads finish in any order
        assert set(storage) == set(keys), evs
        assert storage[keys[1]].token_ids == [7, 1, 2**32 - 1]
        assert storage[keys[1]].parent_block_hash == keys[0]
        assert storage[keys[1]].ownership == "disk"
        a.stop()
        a = AgentProcess(tmp_path / "a", args=args).start()
        sub.poll(500)
        # What a restarted agent announced before this subscriber (re)connected is
        # asked for again on the replay socket, from sequence 0, as a router does.
        found: dict[bytes, object] = {}
        deadline = time.monotonic() + 8
        while set(found) != set(keys) and time.monotonic() < deadline:
            evs = replay_events(f"tcp://127.0.0.1:{prep}")
            assert isinstance(evs[0], kv_events.AllBlocksCleared), evs
            found = {e.block_hashes[0]: e for e in evs if isinstance(e, kv_events.BlockStored)}
            time.sleep(0.1)
        assert set(found) == set(keys)
        assert found[keys[1]].token_ids == [7, 1, 2**32 - 1]
        assert found[keys[1]].parent_block_hash == keys[0] and found[keys[1]].medium == "STORAGE"
    finally:
        sub.close()
        a.stop()
