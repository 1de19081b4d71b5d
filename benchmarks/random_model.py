"""A randomly initialised model of SmolLM2-135M's architecture, built from a config, offline.

    python benchmarks/random_model.py OUT_DIR [--layers N]

For machines without network and without the 98 MB GGUF (benchmarks/gpu_check.sh): the
dimensions of SmolLM2-135M (hidden 576, 9 heads, 3 KV heads, MLP 1536, RoPE theta 1e5, tied
embeddings, 30 layers unless --layers) with the test suite's per-character ChatML tokenizer, so
the vocabulary (and the embedding matrix) is ~100 rows instead of 49152. Speeds measured on it
are those of a 135M-class body; its answers are noise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from bench_models import ARCHS  # noqa: E402  (the published dimensions, one copy)
from tiny import tiny_tokenizer  # noqa: E402  (the per-character tokenizer, no download)

SMOLLM2_135M = ARCHS["smollm2"][1]


def build(out: Path, layers: int | None = None, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    dims = dict(SMOLLM2_135M, **({"num_hidden_layers": layers} if layers else {}))
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, **dims)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=None, help="default: 30, as SmolLM2-135M")
    args = parser.parse_args()
    print(build(args.out, args.layers))


if __name__ == "__main__":
    main()
