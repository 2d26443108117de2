"""Time to first token with real vLLM on the CPU: cold, vLLM's own prefix cache, and a
fresh vLLM process served from kvnode. Prints ONE JSON object.

TTFT is measured as the wall time of ``LLM.generate(prompt, max_tokens=1)`` (prefill
plus one sampled token), median over several distinct prompts. Every number comes
from this run, on this machine:

- ``ttft_cold_s``: a vLLM process without any connector, prompts it has never seen;
- ``ttft_apc_s``: the same process, the same prompts again (vLLM's in-process prefix
  cache hit);
- ``ttft_kvnode_s``: a fresh vLLM process with the kvnode connector, prompts that
  another process (with the connector) computed before; they come from the agent.
  Repeats reset that process's own prefix cache first, so every sample loads from
  the agent (``ttft_kvnode_fresh_process_s``: the first pass alone;
  ``ttft_kvnode_by_pass_s``: each pass's median);
- ``nohit_throughput_ratio``: prefill tokens/s on unique prompts (all misses: lookups
  and saves, no loads) with the connector / without it: the median over rounds of
  the ratio within a round (each round runs both, back to back, order alternating).
- ``save_wait_share``: the time the forward pass spent inside ``wait_for_save`` over
  the saves' copy time (agent mode: the agent's copy threads' time on saves; worker
  mode: the worker's own save time, so about 1). ``save_handover_share`` adds the
  time spent in ``save_kv_layer`` (where agent mode on the CPU hands the saves over
  and marks layers). ``--transfer agent|worker|auto`` picks who moves the bytes (the
  connector's ``kvnode.transfer``);
- ``load_wait_per_hit_s``: the time a hit's forward pass spent on its loads
  (``start_load_kv`` plus ``wait_for_layer_load``);
- ``nohit_short_throughput_ratio``: the same for many short unique prompts at once
  (``--short-tokens`` 128, ``--short-batch`` 64 in flight per round), where the
  connector's per-request and per-step costs show rather than the prefill's. Prompts
  shorter than one chunk (plus the token vLLM must compute) are never looked up.

The processes live side by side and take turns (only one computes at a time), so the
noise of a shared machine hits both sides of each comparison alike.

The model has random weights (scripts/build_model.py --size bench: 8 layers, hidden
768), so prefill costs as on a real model of that size; outputs are not meaningful.

    python benchmarks/vllm_ttft.py [--transfer agent|worker|auto] [--prompts 5] [--rounds 12]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TAG = "@@kvnode-bench@@ "
VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 1000) for _ in range(n)]


# --------------------------------------------------------------------- child side
def _llm(model: str, runtime_dir: str | None, transfer: str) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs: dict[str, Any] = {}
    if runtime_dir:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVNodeConnector",
            kv_connector_module_path="kvnode.connector",
            kv_role="kv_both",
            kv_connector_extra_config={
                "kvnode.runtime_dir": runtime_dir,
                "kvnode.transfer": transfer,
            },
        )
    return LLM(
        model=model, dtype="float32", enforce_eager=True, max_model_len=8192, seed=0, **kwargs
    )


def _connector_totals() -> dict[str, float]:
    """The worker-side connector's running totals in this (single-process) engine."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return {}
    return dict(getattr(get_kv_transfer_group(), "_totals", {}))


def child(model: str, runtime_dir: str | None, transfer: str) -> None:
    """A vLLM process that runs one command per stdin line (JSON) and answers with one
    tagged stdout line: ``{"op": "ttft", "ids": [...]}`` -> seconds and cached tokens,
    ``{"op": "batch", "prompts": [[...], ...]}`` -> seconds for the whole batch."""
    for k, v in VLLM_ENV.items():
        os.environ.setdefault(k, v)
    from vllm import SamplingParams

    llm = _llm(model, runtime_dir, transfer)
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([{"prompt_token_ids": _prompt(64, 999)}], sp, use_tqdm=False)  # warm-up
    print(TAG + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        if cmd["op"] == "totals":
            print(TAG + json.dumps(_connector_totals()), flush=True)
            continue
        if cmd["op"] == "reset":
            # Drop vLLM's own prefix cache: the next request of a prompt is served as
            # in a fresh process (from kvnode when the connector is on).
            print(TAG + json.dumps({"ok": bool(llm.reset_prefix_cache())}), flush=True)
            continue
        prompts = [cmd["ids"]] if cmd["op"] == "ttft" else cmd["prompts"]
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        print(TAG + json.dumps({"s": dt, "cached": outs[0].num_cached_tokens or 0}), flush=True)


# --------------------------------------------------------------------- parent side
VLLM_CPUS: set[int] = set()  # --vllm-cpus: the cores every vLLM process runs on


def _bind_vllm() -> None:
    """In a vLLM child before it starts: only the ``--vllm-cpus`` cores (its OpenMP
    threads follow the mask), as vLLM's own thread binding leaves cores to others."""
    os.sched_setaffinity(0, VLLM_CPUS)


class _Child:
    def __init__(self, model: str, runtime_dir: str | None, transfer: str = "worker") -> None:
        cmd = [sys.executable, __file__, "--child", "--model", model, "--transfer", transfer]
        if runtime_dir:
            cmd += ["--runtime-dir", runtime_dir]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **VLLM_ENV},
            text=True,
            preexec_fn=_bind_vllm if VLLM_CPUS else None,
        )
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG) :])
        raise RuntimeError(f"benchmark child exited with {self.proc.wait()}")

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(op="exit")
            except (RuntimeError, OSError):
                pass
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _start_agent(runtime_dir: str, cpu_bytes: str) -> subprocess.Popen[bytes]:
    agent = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "kvnode"),
            "agent",
            "--runtime-dir",
            runtime_dir,
            "--cpu-bytes",
            cpu_bytes,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    from kvnode.ipc.client import AgentClient

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            c = AgentClient(runtime_dir=runtime_dir, name="bench", timeout_s=1.0)
            c.connect()
            c.close()
            return agent
        except Exception:
            if agent.poll() is not None:
                raise RuntimeError("the agent exited at start") from None
            time.sleep(0.2)
    raise RuntimeError("the agent did not answer")


def measure(a: argparse.Namespace, model: str, rd: str) -> dict[str, Any]:
    """Processes live side by side and take turns, so machine noise hits both sides of
    every comparison alike: plain (no connector) and with the connector alternate."""
    prompts = [_prompt(a.prompt_tokens, 1 + i) for i in range(a.prompts)]
    plain, seeder = _Child(model, None), _Child(model, rd, a.transfer)
    r: dict[str, list[Any]] = {
        k: [] for k in ("cold", "cold_conn", "apc", "kvnode", "kvnode_first", "cached")
    }
    r.update(apc_cached=[], tp_plain=[], tp_conn=[], short_plain=[], short_conn=[], totals=[])
    try:
        for p in prompts:
            r["cold"].append(plain.call(op="ttft", ids=p)["s"])
            r["cold_conn"].append(seeder.call(op="ttft", ids=p)["s"])  # saves to the agent
        r["totals"].append(seeder.call(op="totals"))
        seeder.close()
        served = _Child(model, rd, a.transfer)  # a fresh process: nothing of these prompts
        try:
            # Alternate the two sides prompt by prompt; repeat with vLLM's own cache of
            # the served process reset, so each kvnode sample loads from the agent.
            for rep in range(a.repeats):
                for p in prompts:
                    if rep:
                        served.call(op="reset")
                    apc = plain.call(op="ttft", ids=p)
                    kv = served.call(op="ttft", ids=p)
                    r["apc"].append(apc["s"])
                    r["kvnode"].append(kv["s"])
                    if rep == 0:
                        r["apc_cached"].append(apc["cached"])
                        r["cached"].append(kv["cached"])
                        r["kvnode_first"].append(kv["s"])
            # Unique prompts (all misses: the connector looks up and saves, loads
            # nothing). Short rounds in pairs, the order flipped every round, so both
            # sides of a pair see the same machine; the ratio is the median pair's.
            n = a.batch * a.prompt_tokens
            for i in range(a.rounds):
                mine = [_prompt(a.prompt_tokens, 10_000 + 100 * i + j) for j in range(a.batch)]
                theirs = [_prompt(a.prompt_tokens, 50_000 + 100 * i + j) for j in range(a.batch)]
                order = [(plain, mine, "tp_plain"), (served, theirs, "tp_conn")]
                for child_, batch, key in order if i % 2 == 0 else order[::-1]:
                    r[key].append(n / child_.call(op="batch", prompts=batch)["s"])
            short_rounds(a, plain, served, r)
            r["totals"].append(served.call(op="totals"))
        finally:
            served.close()
    finally:
        plain.close()
        seeder.close()
    return r


def short_rounds(
    a: argparse.Namespace, plain: _Child, served: _Child, r: dict[str, list[Any]]
) -> None:
    """Many short unique prompts in flight at once, in pairs of rounds as above."""
    n = a.short_batch * a.short_tokens
    for i in range(a.short_rounds):
        seeds = [200_000 + 1000 * i + j for j in range(2 * a.short_batch)]
        mine = [_prompt(a.short_tokens, s) for s in seeds[: a.short_batch]]
        theirs = [_prompt(a.short_tokens, s) for s in seeds[a.short_batch :]]
        order = [(plain, mine, "short_plain"), (served, theirs, "short_conn")]
        for child_, batch, key in order if i % 2 == 0 else order[::-1]:
            r[key].append(n / child_.call(op="batch", prompts=batch)["s"])


def _agent_transfers(rd: str) -> dict[str, Any]:
    from kvnode.ipc.client import AgentClient

    c = AgentClient(runtime_dir=rd, name="bench-stats", timeout_s=5.0, heartbeat=False)
    try:
        return dict(c.stats().get("transfers", {}))
    finally:
        c.close()


def parent(a: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_model

    model = str(build_model.build(ROOT / ".cache" / "models" / "bench-llama", "bench"))
    cfg = json.loads((Path(model) / "config.json").read_text())
    with tempfile.TemporaryDirectory(prefix="kvnode-bench-") as rd:
        agent = _start_agent(rd, a.cpu_bytes)
        try:
            r = measure(a, model, rd)
            r["agent"] = [_agent_transfers(rd)]
        finally:
            agent.terminate()
            agent.wait(30)
    med = statistics.median
    cold, apc, kv = med(r["cold"]), med(r["apc"]), med(r["kvnode"])
    wait_s = sum(t.get("save_wait_s", 0.0) for t in r["totals"])
    layer_s = sum(t.get("save_layer_s", 0.0) for t in r["totals"])
    hits = max(1, len(r["kvnode"]))
    load_wait_s = sum(t.get("load_wait_s", 0.0) for t in r["totals"])
    agent_t = r["agent"][0]
    if agent_t.get("agent", {}).get("save_bytes"):  # agent mode (asked for, or auto's pick)
        copy_s = agent_t.get("agent", {}).get("save_copy_s", 0.0)
    else:
        copy_s = sum(t.get("save_s", 0.0) for t in r["totals"])
    tp_plain, tp_conn = med(r["tp_plain"]), med(r["tp_conn"])
    return {
        "benchmark": "vllm_ttft",
        "ttft_cold_s": round(cold, 4),
        "ttft_apc_s": round(apc, 4),
        "ttft_kvnode_s": round(kv, 4),
        "transfer": a.transfer,
        "speedup": round(cold / kv, 2),
        "save_wait_share": round(wait_s / copy_s, 4) if copy_s else None,
        "save_wait_s": round(wait_s, 4),
        # Agent mode on the CPU hands saves over inside save_kv_layer: that time counted too.
        "save_handover_share": round((wait_s + layer_s) / copy_s, 4) if copy_s else None,
        "save_layer_s": round(layer_s, 4),
        "save_copy_s": round(copy_s, 4),
        # The time a hit's forward pass waited for its loads (agent mode overlaps the
        # rest of the copy with the forward pass).
        "load_wait_per_hit_s": round(load_wait_s / hits, 4),
        "agent_save_bytes": agent_t.get("agent", {}).get("save_bytes"),
        "agent_load_bytes": agent_t.get("agent", {}).get("load_bytes"),
        "worker_save_bytes": agent_t.get("worker", {}).get("save_bytes"),
        "worker_load_bytes": agent_t.get("worker", {}).get("load_bytes"),
        "vs_apc": round(kv / apc, 3),
        "nohit_throughput_ratio": round(
            med(c / p for c, p in zip(r["tp_conn"], r["tp_plain"], strict=True)), 4
        ),
        "nohit_throughput_ratio_of_medians": round(tp_conn / tp_plain, 4),
        "nohit_short_throughput_ratio": round(
            med(c / p for c, p in zip(r["short_conn"], r["short_plain"], strict=True)), 4
        ),
        "short_throughput_tok_s_without": round(med(r["short_plain"]), 1),
        "short_throughput_tok_s_with": round(med(r["short_conn"]), 1),
        "throughput_tok_s_without": round(tp_plain, 1),
        "throughput_tok_s_with": round(tp_conn, 1),
        "ttft_cold_with_connector_s": round(med(r["cold_conn"]), 4),
        "ttft_kvnode_fresh_process_s": round(med(r["kvnode_first"]), 4),
        # per pass over the prompts (the first is the fresh process's): the medians
        "ttft_kvnode_by_pass_s": _by_pass(r["kvnode"], a.prompts),
        "ttft_apc_by_pass_s": _by_pass(r["apc"], a.prompts),
        "ttft_samples": {"cold": len(r["cold"]), "apc": len(r["apc"]), "kvnode": len(r["kvnode"])},
        "kvnode_cached_tokens": r["cached"],
        "apc_cached_tokens": r["apc_cached"],
        "prompt_tokens": a.prompt_tokens,
        "prompts": a.prompts,
        "throughput_rounds": a.rounds,
        "throughput_batch": a.batch,
        "short_prompt_tokens": a.short_tokens,
        "short_in_flight": a.short_batch,
        "short_rounds": a.short_rounds,
        "ttft_definition": "wall time of LLM.generate(max_tokens=1), median over prompts",
        "model": {
            k: cfg[k]
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
            )
        },
        "dtype": "float32",
        "device": "cpu",
        "cpus": os.cpu_count(),
        "vllm_cpus": sorted(VLLM_CPUS) or "all",
    }


def _by_pass(samples: list[float], per_pass: int) -> list[float]:
    return [
        round(statistics.median(samples[i : i + per_pass]), 4)
        for i in range(0, len(samples), per_pass)
    ]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--prompts", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=2100)
    p.add_argument("--rounds", type=int, default=12, help="throughput rounds (pairs)")
    p.add_argument("--repeats", type=int, default=3, help="APC / kvnode TTFT samples per prompt")
    p.add_argument("--batch", type=int, default=1, help="prompts per throughput round")
    p.add_argument("--short-tokens", type=int, default=128, help="short unique prompt length")
    p.add_argument("--short-batch", type=int, default=64, help="short prompts in flight")
    p.add_argument("--short-rounds", type=int, default=8, help="short throughput rounds (pairs)")
    p.add_argument("--cpu-bytes", default="1GiB")
    p.add_argument("--transfer", choices=("agent", "worker", "auto"), default="agent")
    p.add_argument(
        "--vllm-cpus",
        default="",
        help="cores the vLLM processes run on (e.g. 0 or 0-3), the agent on any: a host "
        "whose vLLM leaves cores free, as its thread binding does (default: all cores)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--runtime-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.vllm_cpus:
        from kvnode.cores import parse_cpu_list

        VLLM_CPUS.update(parse_cpu_list(a.vllm_cpus))
    if a.child:
        child(a.model, a.runtime_dir, a.transfer)
    else:
        print(json.dumps(parent(a)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
