"""vLLM's own KV event stream, with the connector: a real vLLM process publishes the
chunks the connector stored (``take_events``) next to its own block events, read back
through vLLM's replay socket and decoded with vLLM's classes."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
from test_vllm_connector import _namespace  # type: ignore[import-not-found]

from kvnode.connector.keys import chunk_keys
from tests.kv_events import replay_events

pytestmark = pytest.mark.vllm

C = 256


def test_vllm_publishes_the_chunks_the_connector_stored(
    make_agent: Any, spawn_runner: Any, tiny_model: str, tmp_path: Path
) -> None:
    from vllm.distributed.kv_events import BlockStored

    rng = random.Random(31)
    prompt = [rng.randrange(2, 1000) for _ in range(800)]  # 3 chunks
    agent = make_agent()
    replay = f"ipc://{tmp_path}/replay"
    events_cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"ipc://{tmp_path}/events",
        "replay_endpoint": replay,
    }
    runner = spawn_runner({"kvnode.runtime_dir": str(agent.runtime_dir)}, "events",
                          llm_kwargs={"kv_events_config": events_cfg})  # fmt: skip
    runner.generate([prompt], 4)
    keys = chunk_keys(_namespace(tiny_model), prompt, C)
    deadline = time.monotonic() + 10
    while True:
        stored = [
            e for e in replay_events(replay) if isinstance(e, BlockStored) and e.medium == "CPU"
        ]
        if len(stored) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    runner.close()
    assert [e.block_hashes for e in stored] == [[k] for k in keys]
    assert [e.parent_block_hash for e in stored] == [None, keys[0], keys[1]]
    assert stored[1].token_ids == prompt[C : 2 * C]
    assert all(e.block_size == C for e in stored)
