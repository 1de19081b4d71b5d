"""The embedded SmolLM2-135M-Instruct: converted from the GGUF once, loaded, greedy eval is
deterministic. Slow (minutes on a 2-core CPU): `make test-slow` / `pytest -m slow`.

The conversion goes to a fresh session directory, so it is exercised on every run; set
QSTAR_TEST_CACHE (e.g. ~/.cache/qstar) to reuse a converted checkpoint instead.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.compose import compose_config
from pipeline.config import DecodeStrategy
from pipeline.lm.generation import generate
from pipeline.lm.models import load_model, resolve_model_path
from pipeline.lm.teacher_forced import completion_logprobs
from pipeline.stages.eval import evaluate
from pipeline.tasks import make_task
from pipeline.tasks.prompt import render_prompts

pytestmark = pytest.mark.slow

HELDOUT = 32


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return os.environ.get("QSTAR_TEST_CACHE") or str(tmp_path_factory.mktemp("qstar-cache"))


@pytest.fixture(scope="module")
def cfg(cache_dir):
    return compose_config([f"model.cache_dir={cache_dir}", "model.dtype=float32", "task=arithmetic",
                           f"task.num_test={HELDOUT}", "decode=greedy",
                           "decode.max_new_tokens=96", "progress=false"])


@pytest.fixture(scope="module")
def smollm2(cfg):
    return load_model(cfg.model)


def test_converted_checkpoint_is_plain(cfg, smollm2, cache_dir):
    model, tokenizer = smollm2
    path = Path(resolve_model_path(cfg.model))
    assert path == Path(cache_dir).expanduser() / "models" / "smollm2-135m"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "hf_quantizer", None) is None
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    assert model.training is False
    assert {str(p.dtype) for p in model.parameters()} == {"torch.float32"}
    assert 100_000_000 < sum(p.numel() for p in model.parameters()) < 200_000_000
    assert tokenizer.chat_template and tokenizer.padding_side == "left"


def test_greedy_eval_is_deterministic(cfg, smollm2):
    model, tokenizer = smollm2
    task = make_task(cfg.task)
    heldout = task.split("test")
    assert len(heldout) == HELDOUT
    first = evaluate(cfg, DecodeStrategy.greedy, model, tokenizer, task, heldout)
    second = evaluate(cfg, DecodeStrategy.greedy, model, tokenizer, task, heldout)
    assert first.total == second.total == HELDOUT
    assert [r["completion"] for r in first.rows] == [r["completion"] for r in second.rows]
    assert first.accuracy == second.accuracy and first.tokens == second.tokens
    assert first.tokens > 0 and any(r["predicted"] is not None for r in first.rows)
    print(f"\nSmolLM2 greedy on {HELDOUT} held-out arithmetic: accuracy {first.accuracy:.3f}, "
          f"{first.tokens} tokens, {first.tokens_per_s:.1f} tok/s")


def test_recorded_logprobs_match_teacher_forcing(smollm2):
    """The recorded log-probs are the model's own distribution (no processor from the converted
    generation_config runs before they are taken), greedy and sampled."""
    model, tokenizer = smollm2
    prompts = render_prompts(tokenizer, ["What is 12 + 30?", "What is 7 + 5?"])
    for temperature in (0.0, 0.8):
        gens = generate(model, tokenizer, prompts, max_new_tokens=24, temperature=temperature,
                        seed=0)
        forced = completion_logprobs(model, tokenizer, prompts,
                                     [tokenizer.decode(g.token_ids) for g in gens])
        for g, f in zip(gens, forced):
            assert len(f) == g.num_tokens
            assert g.logprobs == pytest.approx(f, abs=2e-3)


@pytest.fixture(autouse=True)
def all_cores():
    """SmolLM2 is big enough to use both cores (the tiny-model tests pin torch to one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(threads)
