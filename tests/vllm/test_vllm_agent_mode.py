"""Agent mode under real vLLM on the CPU: the agent moves the KV bytes itself through
cross-memory attach, a real agent process and real vLLM processes.

Every output is compared with a run without any connector (greedy decoding); the
agent's own counters tell which mode moved the bytes.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from vllm_harness import BIN, Agent

from kvnode.connector.keys import Namespace, chunk_keys
from kvnode.connector.namespace import model_identity
from kvnode.ipc.protocol import Status

pytestmark = pytest.mark.vllm

C = 256  # chunk tokens (the connector's default)
MAX_TOKENS = 8
TP2 = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 1000) for _ in range(n)]


A = _tokens(1100, 21)  # 4 usable chunks
B = A[: 2 * C] + _tokens(500, 22)  # shares exactly A's first 2 chunks
E = _tokens(700, 23)  # 2 chunks; one gets corrupted in the arena
S = _tokens(900, 24)  # saved while the agent is frozen, then killed
L = _tokens(900, 25)  # loaded while the agent is frozen, then killed
G = _tokens(900, 26)  # saved to the restarted agent
X = _tokens(300, 27)  # one chunk, saved to make a worker export again
G2, G3 = _tokens(900, 28), _tokens(900, 29)
PROMPTS = {"A": A, "B": B, "E": E, "S": S, "L": L, "G": G, "X": X, "G2": G2, "G3": G3}


@pytest.fixture(scope="module")
def reference(spawn_runner: Any) -> dict[str, Any]:
    r = spawn_runner(None, "agent-mode-reference")
    outs = r.generate(list(PROMPTS.values()), MAX_TOKENS)
    r.close()
    return dict(zip(PROMPTS, outs, strict=True))


def _agent_extra(agent: Any) -> dict[str, Any]:
    return {"kvnode.runtime_dir": str(agent.runtime_dir), "kvnode.transfer": "agent"}


def _transfers(agent: Any) -> dict[str, Any]:
    return agent.stats()["transfers"]


def _namespace(model: str) -> Namespace:
    return Namespace(
        model=model_identity(model),
        dtype="float32/float32",
        kv_layout="cpu",
        block_shape=(2, 2, 128, 64),
        block_size=128,
        chunk_tokens=C,
        tp_size=1,
        tp_rank=0,
        pp_rank=0,
    )


def _corrupt(agent: Any, key: bytes) -> None:
    c = agent.client()
    try:
        [(status, slot)] = c.pin([key])
        assert status == Status.OK, "the chunk to corrupt is not in the arena"
        view = c.views(slot)[0]
        view[1000:1064] = bytes((b ^ 0xFF) for b in view[1000:1064])
        c.release([key])
    finally:
        c.close()


def _wait_for(cond: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_two_processes_share_the_agent_in_agent_mode(
    reference: dict[str, Any], make_agent: Any, spawn_runner: Any, tiny_model: str
) -> None:
    agent = make_agent()
    extra = _agent_extra(agent)
    first = spawn_runner(extra, "agent-first")
    outs = first.generate([A, E], MAX_TOKENS)
    assert [o["tokens"] for o in outs] == [reference["A"]["tokens"], reference["E"]["tokens"]]
    assert all(o["cached"] == 0 for o in outs)
    first.close()
    t = _transfers(agent)
    assert t["agent"]["save_chunks"] == 6, t  # A's 4 chunks and E's 2, moved by the agent
    assert t["worker"]["save_bytes"] == 0, t  # no worker copied a byte itself
    assert t["agent"]["exporting_workers"] == 0, t  # the process is gone, so is its export
    # vLLM named each layer as its forward pass wrote it: the saves went over then.
    assert t["agent"]["layerwise_jobs"] == t["agent"]["jobs"] >= 2, t

    keys_e = chunk_keys(_namespace(tiny_model), E, C)
    _corrupt(agent, keys_e[1])
    pinned_by_clients = _transfers(agent)["worker"]["load_bytes"]  # the corrupting pin

    second = spawn_runner(extra, "agent-second")
    [b] = second.generate([B], MAX_TOKENS)  # a partial prefix: A's first 2 chunks
    assert b["cached"] == 2 * C and b["tokens"] == reference["B"]["tokens"]
    [a] = second.generate([A], MAX_TOKENS)  # 2 chunks from vLLM's cache, 2 from the agent
    assert a["cached"] == 4 * C and a["tokens"] == reference["A"]["tokens"]
    [e] = second.generate([E], MAX_TOKENS)  # a corrupted chunk: recomputed, dropped
    assert e["tokens"] == reference["E"]["tokens"]
    t = _transfers(agent)
    assert t["agent"]["load_chunks"] >= 5, t
    assert t["agent"]["checksum_errors"] == 1, t
    assert t["worker"]["load_bytes"] == pinned_by_clients, t
    assert t["agent"]["exporting_workers"] == 1, t
    # The forward passes waited for those loads layer by layer, and that is counted.
    totals = second.totals()
    assert totals.get("load_chunks", 0) >= 5 and totals.get("load_wait_s", 0) > 0, totals
    second.close()
    stats = agent.stats()
    assert stats["arena"]["pinned"] == 0 and stats["arena"]["reserved"] == 0


def test_agent_killed_mid_save_and_mid_load_then_restarted(
    reference: dict[str, Any], make_agent: Any, spawn_runner: Any
) -> None:
    agent = make_agent()
    extra = _agent_extra(agent)
    proc = spawn_runner(extra, "agent-killed")
    [a] = proc.generate([A], MAX_TOKENS)  # exports, saves A
    assert a["tokens"] == reference["A"]["tokens"]
    _wait_for(lambda: _transfers(agent)["agent"]["save_chunks"] >= 4)

    # Mid-save: the agent is frozen while S's save is handed over, then killed. The
    # request's blocks are held for the save; the worker sees the agent exit, fails
    # the save and lets them go: the next request runs, no request is stuck.
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        [s] = proc.generate([S], MAX_TOKENS)
        assert s["tokens"] == reference["S"]["tokens"]
    finally:
        agent.kill()
    [s2] = proc.generate([S[:-1] + [9]], MAX_TOKENS)  # the engine steps on
    assert s2["cached"] >= 3 * C  # vLLM's own cache holds S

    # Mid-load: a new agent serves L's chunks; frozen while the load is handed over,
    # then killed: the load fails, vLLM recomputes, the tokens are the same.
    again = make_agent(runtime_dir=agent.runtime_dir)
    writer = spawn_runner(extra, "agent-killed-writer")
    [w] = writer.generate([L], MAX_TOKENS)
    writer.close()
    assert w["tokens"] == reference["L"]["tokens"]
    _wait_for(lambda: _transfers(again)["agent"]["save_chunks"] >= 3)
    [x] = proc.generate([X], MAX_TOKENS)  # the worker exports to the new agent
    assert x["tokens"] == reference["X"]["tokens"]
    _wait_for(lambda: _transfers(again)["agent"]["exports"] == 2)
    assert again.proc is not None
    again.proc.send_signal(signal.SIGSTOP)
    try:
        import threading

        killer = threading.Timer(2.0, again.kill)
        killer.start()
        [lo] = proc.generate([L], MAX_TOKENS)
        killer.join()
    finally:
        again.kill()
    assert lo["tokens"] == reference["L"]["tokens"]

    # Restarted: the worker exports again to the new generation and saves through it.
    # (Its links reconnect in the background; a step that runs before they are up is
    # served without the cache, so a few fresh prompts are tried.)
    third = make_agent(runtime_dir=agent.runtime_dir)
    saved = None
    for name in ("G", "G2", "G3"):
        [g] = proc.generate([PROMPTS[name]], MAX_TOKENS)
        assert g["tokens"] == reference[name]["tokens"]
        try:
            _wait_for(lambda: _transfers(third)["agent"]["save_chunks"] >= 3, timeout_s=10)
        except AssertionError:
            continue
        saved = name
        break
    assert saved is not None, "the worker never saved through the restarted agent"
    t = _transfers(third)
    assert t["agent"]["exports"] >= 1 and t["worker"]["save_bytes"] == 0, t
    reader = spawn_runner(extra, "agent-killed-reader")
    [g2] = reader.generate([PROMPTS[saved]], MAX_TOKENS)
    reader.close()
    assert g2["tokens"] == reference[saved]["tokens"] and g2["cached"] == 3 * C
    proc.close()


def test_tensor_parallel_two_ranks_in_agent_mode(make_agent: Any, spawn_runner: Any) -> None:
    ref = spawn_runner(None, "agent-tp2-reference", llm_kwargs=TP2)
    [want] = ref.generate([A], MAX_TOKENS)
    ref.close()
    agent = make_agent()
    extra = _agent_extra(agent)
    first = spawn_runner(extra, "agent-tp2-first", llm_kwargs=TP2)
    [a] = first.generate([A], MAX_TOKENS)
    first.close()
    assert a["tokens"] == want["tokens"] and a["cached"] == 0
    _wait_for(lambda: _transfers(agent)["agent"]["save_chunks"] >= 8)  # 4 chunks x 2 ranks
    second = spawn_runner(extra, "agent-tp2-second", llm_kwargs=TP2)
    [b] = second.generate([A], MAX_TOKENS)
    second.close()
    assert b["tokens"] == want["tokens"] and b["cached"] == 4 * C
    t = _transfers(agent)
    assert t["agent"]["load_chunks"] >= 8 and t["worker"]["load_bytes"] == 0, t


class _AgentAs(Agent):
    """The agent under another uid than vLLM's, without CAP_SYS_PTRACE: it may not
    attach to vLLM's processes."""

    def __init__(self, runtime_dir: Path, log_path: Path, uid: int) -> None:
        super().__init__(runtime_dir, log_path)
        self.uid = uid

    def start(self) -> _AgentAs:
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.runtime_dir, self.uid, self.uid)
        self.log = open(self.log_path, "ab")  # noqa: SIM115 (lives as long as the agent)
        drop = ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups"]
        self.proc = subprocess.Popen(
            [*drop, str(BIN / "python"), "-m", "kvnode", "agent", "--runtime-dir",
             str(self.runtime_dir), "--cpu-bytes", "256MiB"],
            stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(self.runtime_dir)},
        )  # fmt: skip
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-2000:]
            try:
                self.client().close()
                return self
            except Exception:
                time.sleep(0.1)
        raise AssertionError("agent did not answer in 30 s")


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run the agent as another uid",
)
def test_an_agent_that_may_not_attach_leaves_the_worker_copying(
    reference: dict[str, Any], spawn_runner: Any
) -> None:
    # Outside pytest's temporary tree, whose directories only root may enter.
    base = Path(tempfile.mkdtemp(prefix="kvnode-other-uid-"))
    base.chmod(0o755)
    agent = _AgentAs(base / "run", base / "agent.log", uid=65534).start()
    try:
        extra = _agent_extra(agent)
        first = spawn_runner(extra, "agent-nobody-first")
        [a] = first.generate([A], MAX_TOKENS)
        [a2] = first.generate([A[:-1] + [5]], MAX_TOKENS)  # more steps, no second line
        first.close()
        assert a["tokens"] == reference["A"]["tokens"]
        t = _transfers(agent)
        assert t["agent"]["exports_refused"] >= 1 and t["agent"]["save_chunks"] == 0, t
        assert t["worker"]["save_bytes"] > 0, t  # the worker copied itself
        log = first.log_path.read_text()
        lines = [ln for ln in log.splitlines() if "agent mode not available" in ln]
        assert len(lines) == 1, lines
        assert "may not attach" in lines[0] and "CAP_SYS_PTRACE" in lines[0], lines[0]
        second = spawn_runner(extra, "agent-nobody-second")
        [b] = second.generate([A], MAX_TOKENS)
        second.close()
        assert b["tokens"] == reference["A"]["tokens"] and b["cached"] == 4 * C
        assert a2["tokens"]  # the process kept serving
    finally:
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_openai_server_in_agent_mode(make_agent: Any, tiny_model: str, tmp_path: Path) -> None:
    """vLLM's OpenAI server (its multi-process engine: the worker is a process of its
    own) saves through the agent, and a second server is served from it."""
    from vllm_harness import ApiServer

    agent = make_agent()
    extra = _agent_extra(agent)
    outs = []
    for name in ("agent-api-first", "agent-api-second"):
        server = ApiServer(tiny_model, extra, tmp_path / f"{name}.log")
        try:
            outs.append(server.complete(A, MAX_TOKENS))
        finally:
            server.close()
        if not outs[1:]:
            _wait_for(lambda: _transfers(agent)["agent"]["save_chunks"] >= 4)
    first, second = outs
    cached = [(o["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") for o in outs]
    assert cached[0] in (0, None) and cached[1] == 4 * C, cached
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    t = _transfers(agent)
    assert t["agent"]["load_chunks"] >= 4 and t["worker"]["save_bytes"] == 0, t


def test_auto_picks_agent_mode_where_vllm_binds_its_threads_and_leaves_a_core(
    reference: dict[str, Any], make_agent: Any, spawn_runner: Any
) -> None:
    """``kvnode.transfer = auto``: a vLLM started on one core (as ``taskset -c``, or a
    pod given its own cores, starts it; vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` binds its
    OpenMP threads alike in its worker processes) leaves the others to the agent,
    which moves its bytes; one whose threads may run on every core copies itself.
    Same tokens both ways, and the second process is served what the first saved."""
    from kvnode.cores import node_cpus

    node = sorted(node_cpus())
    if len(node) < 2 or len(os.sched_getaffinity(0)) < len(node):
        pytest.skip("needs a process free on 2 or more cores of the node")
    agent = make_agent()
    extra = {"kvnode.runtime_dir": str(agent.runtime_dir)}  # transfer: auto (the default)
    bound = spawn_runner(extra, "auto-bound", cpus={node[0]})
    [a] = bound.generate([A], MAX_TOKENS)
    bound.close()
    assert a["tokens"] == reference["A"]["tokens"]
    t = _transfers(agent)
    assert t["agent"]["save_chunks"] == 4 and t["worker"]["save_bytes"] == 0, t
    log = bound.log_path.read_text()
    assert "transfer auto: agent mode" in log, log[-3000:]

    free = spawn_runner(extra, "auto-nobind", env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    [a2] = free.generate([A], MAX_TOKENS)  # served from what the bound process saved
    [e] = free.generate([E], MAX_TOKENS)  # and saves by itself
    free.close()
    assert a2["tokens"] == reference["A"]["tokens"] and a2["cached"] == 4 * C
    assert e["tokens"] == reference["E"]["tokens"]
    t2 = _transfers(agent)
    assert t2["agent"]["save_chunks"] == 4 and t2["worker"]["save_bytes"] > 0, t2
    assert "transfer auto: worker mode" in free.log_path.read_text()
