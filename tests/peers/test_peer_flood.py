"""A peer that floods fetch requests without reading and then disconnects must not
stop the serving agent (libzmq's "!_io_error" abort, stream_engine_base.cpp, fired by
a ZMTP heartbeat on such a connection). A real agent process, real TCP connections."""

from __future__ import annotations

import os
import time
from pathlib import Path

import zmq

from kvnode.agent.peers import wire as W
from kvnode.ipc.client import AgentClient
from tests.conftest import AgentProcess
from tests.peers.conftest import free_port

CONNECTIONS = 4
REQUESTS = 3000  # per connection: well past what libzmq reads ahead for one peer
HEARTBEAT_WAIT_S = 2.5  # past the heartbeat interval peer links used to have (1 s)


def test_a_peer_that_floods_and_leaves_does_not_stop_the_agent(tmp_path: Path) -> None:
    port = free_port()
    agent = AgentProcess(tmp_path / "a", args=[
        "--set", f"peers.listen=tcp://127.0.0.1:{port}", "--set", "peers.insecure=true",
    ]).start()  # fmt: skip
    client = AgentClient(agent.runtime_dir, name="writer", timeout_s=5.0)
    ctx = zmq.Context()
    try:
        keys = [os.urandom(16) for _ in range(32)]
        for k in keys:
            client.put(k, os.urandom(64 << 10))
        socks = []
        for _ in range(CONNECTIONS):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, REQUESTS * 2)
            s.setsockopt(zmq.RCVHWM, 1)  # reads nothing and takes nothing in
            s.connect(f"tcp://127.0.0.1:{port}")
            socks.append(s)
        for rid in range(1, REQUESTS + 1):
            for s in socks:
                s.send(W.encode(W.FetchReq(rid, keys)), zmq.NOBLOCK)
        time.sleep(0.2)
        for s in socks:
            s.close(0)  # all at once
        time.sleep(HEARTBEAT_WAIT_S)
        assert agent.proc.poll() is None, agent.log_path.read_text()[-2000:]
        served = client.stats()["peers_server"]
        assert served["fetch_requests"] > 0 and served["served_keys"] > 0
        again = os.urandom(16)
        client.put(again, b"y" * 4096)  # and it serves its own clients as before
        assert client.get(again) == b"y" * 4096
    finally:
        ctx.term()
        client.close()
        agent.stop()
