"""A Gemma-3-shaped model (3 sliding-window layers, 1 full) in real vLLM processes on
the CPU. vLLM's CPU backend has no hybrid KV cache manager, so the model reaches the
connector as one full-attention-shaped group: every layer's blocks are stored and
loaded whole. A second process must get the same greedy tokens as a run without the
connector, with the prefix loaded from the agent."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from vllm_harness import Runner

pytestmark = pytest.mark.vllm

C = 256
MAX_TOKENS = 8


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 1000) for _ in range(n)]


P = _tokens(900, 11)  # 3 full chunks
Q = _tokens(C, 12) + P[C:]  # differs from P only in its first chunk, before the window


def test_sliding_window_model_served_from_the_agent(
    tiny_gemma3_model: str, make_agent: Any, tmp_path: Path
) -> None:
    ref = Runner(tiny_gemma3_model, None, tmp_path / "reference.log")
    try:
        want_p, want_q = (o["tokens"] for o in ref.generate([P, Q], MAX_TOKENS))
    finally:
        ref.close()
    # The negative control that makes the comparison mean something: the first chunk,
    # far outside the sliding window, still changes the greedy tokens (full layer).
    assert want_p != want_q

    agent = make_agent()
    extra = {"kvnode.runtime_dir": str(agent.runtime_dir)}
    first = Runner(tiny_gemma3_model, extra, tmp_path / "first.log")
    try:
        [p1] = first.generate([P], MAX_TOKENS)
    finally:
        first.close()
    assert p1["tokens"] == want_p and p1["cached"] == 0
    second = Runner(tiny_gemma3_model, extra, tmp_path / "second.log")
    try:
        [p2, q2] = second.generate([P, Q], MAX_TOKENS)
    finally:
        second.close()
    assert p2["cached"] == 3 * C, "the prefix was not loaded from the agent"
    assert p2["tokens"] == want_p
    assert q2["tokens"] == want_q and q2["cached"] == 0  # its chunk keys differ from P's
    stats = agent.stats()  # read by the worker (worker mode) or by the agent (agent mode)
    assert stats["counters"]["pins"] + stats["transfers"]["agent"]["load_chunks"] >= 1
