"""Build a tiny random-weight Llama model offline, for tests, the demo and benchmarks.

No model hub is needed: the tokenizer is a byte-level BPE trained on a synthetic word
corpus, the weights come from a fixed seed, so every build of the same config gives
the same model. The result is reused when the directory already holds a complete build.

    python scripts/build_model.py                 # .cache/models/tiny-llama (2 layers)
    python scripts/build_model.py --size bench    # .cache/models/bench-llama (8 layers, hidden 768)
    python scripts/build_model.py --out DIR --size tiny
    python scripts/build_model.py --size tiny-gemma3  # sliding-window + full layers

Prints the model directory on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Model sizes. "bench" makes prefill cost dominate a 2k-4k token prompt, as on real models.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    ),
    "tiny-gemma3": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    ),
    "bench": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
    ),
}
VOCAB_SIZE = 1024
MAX_POSITIONS = 8192
_DONE_MARKER = ".kvnode-model-complete"


def _corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "ri", "to", "men", "sa", "lo", "vi", "dun", "el", "or", "th", "qu"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(n_lines)]


def _build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out))


def _build_weights(out: Path, size: str) -> None:
    import torch

    torch.manual_seed(0)
    if size == "tiny-gemma3":
        _build_gemma3(out)
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=0,
        eos_token_id=1,
        torch_dtype="float32",
        **SIZES[size],
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out), safe_serialization=True)


def _build_gemma3(out: Path) -> None:
    """A Gemma-3-shaped text model: 3 sliding-window layers (window 128) and 1 full
    one. Prompts that differ only before the window still give different greedy
    tokens, so a test that compares tokens really tests the full layer's loaded KV."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        torch_dtype="float32",
        **SIZES["tiny-gemma3"],
        sliding_window=128,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
    )
    Gemma3ForCausalLM(cfg).save_pretrained(str(out), safe_serialization=True)


def build(out: Path, size: str) -> Path:
    """Build the model into ``out`` unless a complete build is already there."""
    if (out / _DONE_MARKER).exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _build_tokenizer(tmp)
    _build_weights(tmp, size)
    (tmp / _DONE_MARKER).write_text(json.dumps({"size": size, **SIZES[size]}))
    # Built aside and renamed, so a concurrent or interrupted build never leaves a
    # half-written model where a reader would take it for a complete one.
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / _DONE_MARKER).exists():
            raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--out", type=Path, default=None, help="default: .cache/models/<size>-llama")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    out = a.out or ROOT / ".cache" / "models" / (
        a.size if a.size.endswith("gemma3") else f"{a.size}-llama"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    print(build(out.resolve(), a.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
