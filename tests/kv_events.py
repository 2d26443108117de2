"""Reading an agent's KV events as a router does: replay from sequence 0 on its replay
socket, decoded with vLLM's own classes."""

from __future__ import annotations

from typing import Any

import msgspec
import zmq


def replay_events(endpoint: str, timeout_ms: int = 5000) -> list[Any]:
    """Every event the agent still holds, oldest first."""
    from vllm.distributed.kv_events import KVEventBatch

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.connect(endpoint)
    decoder = msgspec.msgpack.Decoder(KVEventBatch)
    events: list[Any] = []
    try:
        sock.send_multipart([b"", (0).to_bytes(8, "big")])
        while True:
            _, _topic, seq, payload = sock.recv_multipart()
            if int.from_bytes(seq, "big", signed=True) == -1:  # the end marker
                return events
            events.extend(decoder.decode(payload).events)
    finally:
        sock.close()
