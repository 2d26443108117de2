"""kvnode demo: two separate vLLM processes, one agent.

Starts an agent, runs one vLLM process answering a long prompt (a 3072-token document
and a question), then a second, separate vLLM process given the same document and
another question. The second one is
served the prefix's KV from the agent instead of computing it. For each prints: prompt
tokens, tokens served from kvnode, time to first token (wall time of a generate with
max_tokens=1).

    python scripts/demo.py [--size bench|tiny] [--prefix-tokens 3072]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TAG = "@@kvnode-demo@@ "
VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}


def _child(model: str, runtime_dir: str, ids: list[int]) -> dict[str, Any]:
    for k, v in VLLM_ENV.items():
        os.environ.setdefault(k, v)
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=8192,
        seed=0,
        kv_transfer_config=KVTransferConfig(
            kv_connector="KVNodeConnector",
            kv_connector_module_path="kvnode.connector",
            kv_role="kv_both",
            kv_connector_extra_config={"kvnode.runtime_dir": runtime_dir},
        ),
    )
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], sp, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
    ttft = time.perf_counter() - t0
    return {"prompt_tokens": len(ids), "served": out.num_cached_tokens or 0, "ttft_s": ttft}


def _run(name: str, model: str, runtime_dir: str, ids: list[int]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                f.name,
                "--model",
                model,
                "--runtime-dir",
                runtime_dir,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, **VLLM_ENV},
            timeout=900,
        )
    finally:
        os.unlink(f.name)
    for line in proc.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG) :])
    raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def _wait_for_agent(runtime_dir: str, agent: subprocess.Popen[bytes]) -> None:
    from kvnode.ipc.client import AgentClient

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise SystemExit("the agent exited at start")
        try:
            with AgentClient(runtime_dir=runtime_dir, name="demo", timeout_s=1.0) as c:
                c.connect()
            return
        except Exception:
            time.sleep(0.2)
    raise SystemExit("the agent did not answer in 60 s")


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=("tiny", "bench"), default="bench")
    p.add_argument("--prefix-tokens", type=int, default=3072, help="shared by both prompts")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--runtime-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        ids = json.loads(Path(a.child).read_text())
        print(TAG + json.dumps(_child(a.model, a.runtime_dir, ids)), flush=True)
        return 0

    sys.path.insert(0, str(ROOT / "scripts"))
    import build_model

    print(f"building/reusing the {a.size} random-weight model ...", flush=True)
    model = str(build_model.build(ROOT / ".cache" / "models" / f"{a.size}-llama", a.size))
    rng = random.Random(7)
    prefix = [rng.randrange(2, 1000) for _ in range(a.prefix_tokens)]
    first_ids = prefix + [rng.randrange(2, 1000) for _ in range(20)]
    second_ids = prefix + [rng.randrange(2, 1000) for _ in range(20)]  # same prefix, new question

    with tempfile.TemporaryDirectory(prefix="kvnode-demo-") as rd:
        kvnode = Path(sys.executable).parent / "kvnode"
        agent = subprocess.Popen(
            [str(kvnode), "agent", "--runtime-dir", rd, "--cpu-bytes", "512MiB"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for_agent(rd, agent)
            print(f"agent started (pid {agent.pid}, runtime dir {rd})", flush=True)
            rows = []
            for name, ids in (("vLLM process 1", first_ids), ("vLLM process 2", second_ids)):
                print(f"running {name} ...", flush=True)
                r = _run(name, model, rd, ids)
                rows.append((name, r))
        finally:
            agent.terminate()
            agent.wait(30)
    print()
    print(f"{'':16} {'prompt tokens':>14} {'from kvnode':>12} {'TTFT':>10}")
    for name, r in rows:
        print(f"{name:16} {r['prompt_tokens']:>14} {r['served']:>12} {r['ttft_s'] * 1000:>8.0f}ms")
    t1, t2 = rows[0][1]["ttft_s"], rows[1][1]["ttft_s"]
    print(
        f"\nsecond process: {t1 / t2:.1f}x faster to first token (TTFT = generate with max_tokens=1)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
