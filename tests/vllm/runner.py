"""A vLLM process driven line by line over stdin, for the tests in this folder.

    python runner.py MODEL_DIR '{"kvnode.runtime_dir": DIR}'   # with the connector
    python runner.py MODEL_DIR none                             # without any connector
    python runner.py MODEL_DIR none '{"tensor_parallel_size": 2}'  # more LLM() arguments

Each stdin line is one JSON command; each answer is one stdout line starting with
``@@kvnode@@`` (vLLM logs to stdout too). Commands:
    {"op": "generate", "prompts": [[ids...], ...], "max_tokens": 8}
        -> {"outputs": [{"tokens": [...], "cached": n, "elapsed_s": t}, ...]}
           (prompts run one at a time; elapsed_s is each generate call's wall time)
    {"op": "reset_prefix_cache"} -> {"ok": true}   (vLLM's own prefix cache only)
    {"op": "totals"} -> the worker-side connector's running totals (its counters summed)
    {"op": "exit"}
"""

from __future__ import annotations

import json
import os
import sys
import time

TAG = "@@kvnode@@ "


def main() -> int:
    model, extra = sys.argv[1], sys.argv[2]
    llm_kwargs = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    for k, v in {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }.items():
        os.environ.setdefault(k, v)
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kwargs: dict = {}
    if isinstance(llm_kwargs.get("kv_events_config"), dict):
        from vllm.config import KVEventsConfig

        llm_kwargs["kv_events_config"] = KVEventsConfig(**llm_kwargs["kv_events_config"])
    if extra != "none":
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVNodeConnector",
            kv_connector_module_path="kvnode.connector",
            kv_role="kv_both",
            kv_connector_extra_config=json.loads(extra),
        )
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=4096,
        seed=0,
        **kwargs,
        **llm_kwargs,
    )
    # Warm-up: first-call costs are not what the tests time.
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2), use_tqdm=False)
    print(TAG + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "exit":
            break
        if op == "reset_prefix_cache":
            answer: dict = {"ok": bool(llm.reset_prefix_cache())}
        elif op == "totals":
            from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

            group = get_kv_transfer_group() if has_kv_transfer_group() else None
            answer = dict(getattr(group, "_totals", {}))
        elif op == "generate":
            sp = SamplingParams(max_tokens=cmd.get("max_tokens", 8), temperature=0.0)
            outs = []
            for ids in cmd["prompts"]:
                t0 = time.perf_counter()
                o = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
                outs.append(
                    {
                        "tokens": list(o.outputs[0].token_ids),
                        "cached": o.num_cached_tokens or 0,
                        "elapsed_s": time.perf_counter() - t0,
                    }
                )
            answer = {"outputs": outs}
        else:
            answer = {"error": f"unknown op {op}"}
        print(TAG + json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
