"""The connector under vLLM's multi-process set-ups on the CPU, with a real agent:
tensor parallel 2 (one worker process per rank, each saving and loading its own
rank's keys) and the OpenAI server in its default multi-process engine.

Each test starts few processes (vLLM start-up dominates) and compares tokens with a run
without the connector (greedy decoding)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from vllm_harness import ApiServer

pytestmark = pytest.mark.vllm

C = 256  # chunk tokens (the connector's default)
MAX_TOKENS = 8
TP2 = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 1000) for _ in range(n)]


P = _tokens(1100, 11)  # 4 usable chunks


def test_tensor_parallel_two_ranks_share_the_agent(make_agent: Any, spawn_runner: Any) -> None:
    ref = spawn_runner(None, "tp2-reference", llm_kwargs=TP2)
    [want] = ref.generate([P], MAX_TOKENS)
    ref.close()
    agent = make_agent()
    extra = {"kvnode.runtime_dir": str(agent.runtime_dir)}
    first = spawn_runner(extra, "tp2-first", llm_kwargs=TP2)
    [a] = first.generate([P], MAX_TOKENS)
    first.close()
    assert a["tokens"] == want["tokens"] and a["cached"] == 0
    # Both ranks saved their own keys: 4 chunks each.
    assert agent.stats()["arena"]["entries"] == 8
    # The scheduler may answer lookups from the agent's shared index (no request, so no
    # "hits" counted there): the ranks' reads are what shows the agent served them.
    reads = _reads(agent.stats())
    second = spawn_runner(extra, "tp2-second", llm_kwargs=TP2)
    [b] = second.generate([P], MAX_TOKENS)
    second.close()
    assert b["tokens"] == want["tokens"]
    assert b["cached"] == 4 * C
    assert _reads(agent.stats()) >= reads + 2  # from each rank


def _reads(stats: dict[str, Any]) -> int:
    """Pin calls (worker mode) plus chunks the agent loaded (agent mode)."""
    return int(stats["counters"]["pins"] + stats["transfers"]["agent"]["load_chunks"])


def test_openai_server_reports_tokens_served_by_kvnode(
    make_agent: Any, tiny_model: str, tmp_path: Path
) -> None:
    agent = make_agent()
    extra = {"kvnode.runtime_dir": str(agent.runtime_dir)}
    outs = []
    for name in ("api-first", "api-second"):
        server = ApiServer(tiny_model, extra, tmp_path / f"{name}.log")
        try:
            outs.append(server.complete(P, MAX_TOKENS))
        finally:
            server.close()
    first, second = outs
    cached = [(o["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") for o in outs]
    assert cached[0] in (0, None) and cached[1] == 4 * C, cached
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
