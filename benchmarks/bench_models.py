"""The model a benchmark measures: a qstar model name, or a randomly initialised model of
SmolLM2-135M's or Qwen2-0.5B's architecture built from its config (`--random-init`), for a
machine that cannot receive the embedded GGUF (a GPU node without network access).

A random model's throughput is the real architecture's (same layers, heads, KV size); its
text is noise, so its solve rates mean nothing. Its tokenizer is SmolLM2's when the embedded
model or a saved copy is on this machine, else the tests' character-level ChatML tokenizer;
the vocabulary is sized to the tokenizer (the only change to the architecture).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

from pipeline.config import ModelConfig
from pipeline.errors import QstarError
from pipeline.lm.models import cache_root, cuda_attention, embedded_gguf, load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

# Published configs (SmolLM2-135M-Instruct, Qwen2-0.5B-Instruct), minus the vocabulary size.
ARCHS = {
    "smollm2": ("LlamaConfig", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3,
                                    max_position_embeddings=8192, rope_theta=100000.0,
                                    rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                  num_attention_heads=14, num_key_value_heads=2,
                                  max_position_embeddings=32768, rope_theta=1000000.0,
                                  rms_norm_eps=1e-6, tie_word_embeddings=True)),
}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="qstar model name or path")
    parser.add_argument("--random-init", choices=sorted(ARCHS), default=None,
                        help="a random model of this architecture instead of --model")
    parser.add_argument("--layers", type=_at_least_one, default=None,
                        help="hidden layers of the --random-init model (default: the architecture's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of layers, at least 1 (got {text!r})")
    return int(text)


def model_overrides(args) -> list[str]:
    """qstar config overrides for the model args (device and dtype; the name unless random)."""
    names = [] if args.random_init else [f"model={args.model}"] if args.model != "smollm2-135m" else []
    return [*names, f"model.device={args.device}", f"model.dtype={args.dtype}"]


def load(args) -> tuple[object, object, str]:
    """(model, tokenizer, description) for the parsed model args."""
    if not args.random_init:
        model, tokenizer = load_model(ModelConfig(name=args.model, device=args.device,
                                                  dtype=args.dtype))
        return model, tokenizer, args.model
    return random_model(args.random_init, args.device, args.dtype, args.layers)


def random_model(arch: str, device: str, dtype: str, layers: int | None = None):
    """A random model of `arch` (`layers` hidden layers, default the architecture's)."""
    tokenizer, tok_name = _tokenizer()
    config_cls, dims = ARCHS[arch]
    dims = dims if layers is None else {**dims, "num_hidden_layers": layers}
    config = getattr(transformers, config_cls)(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **dims)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    cuda_attention(device)
    model.to(device).eval()
    return model, tokenizer, (f"random {arch} ({config.num_hidden_layers} layers, {tok_name} "
                              f"tokenizer, vocab {len(tokenizer)})")


def _tokenizer():
    """SmolLM2's tokenizer if this machine has it, else the tests' character-level one."""
    cfg = ModelConfig()
    for path in (cache_root(cfg) / "models" / cfg.name, cache_root(cfg) / "tokenizers" / cfg.name):
        if (path / "tokenizer_config.json").is_file():
            return load_tokenizer(cfg, str(path)), "SmolLM2"
    try:
        gguf = embedded_gguf(cfg.name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        tokenizer.padding_side = "left"
        return tokenizer, "SmolLM2"
    except QstarError:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import tiny_tokenizer  # only found once tests/ is on the path

        tokenizer = tiny_tokenizer()
        tokenizer.padding_side = "left"
        return tokenizer, "character-level"
