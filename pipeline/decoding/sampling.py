"""decode=greedy and decode=sample, and the n samples per prompt best-of-N selects from."""

from __future__ import annotations

from pipeline.config import DecodeConfig
from pipeline.decoding.base import Decoded
from pipeline.lm.generation import Generation, generate


def decode_greedy(model, tokenizer, prompts: list[str], d: DecodeConfig, seed: int,
                  progress: str | None) -> Decoded:
    gens = generate(model, tokenizer, prompts, max_new_tokens=d.max_new_tokens,
                    batch_size=d.batch_size, progress=progress)
    return Decoded([g.text for g in gens], sum(g.num_tokens for g in gens))


def decode_sample(model, tokenizer, prompts: list[str], d: DecodeConfig, seed: int,
                  progress: str | None) -> Decoded:
    gens = generate(model, tokenizer, prompts, max_new_tokens=d.max_new_tokens,
                    temperature=d.temperature, top_p=d.top_p, batch_size=d.batch_size,
                    seed=seed, progress=progress)
    return Decoded([g.text for g in gens], sum(g.num_tokens for g in gens))


def sample_generations(model, tokenizer, prompts: list[str], d: DecodeConfig, seed: int,
                       progress: str | None) -> list[list[Generation]]:
    """n sampled generations per prompt (text, token ids, log-probs), in one batched stream."""
    repeated = [p for p in prompts for _ in range(d.n)]
    gens = generate(model, tokenizer, repeated, max_new_tokens=d.max_new_tokens,
                    temperature=d.temperature, top_p=d.top_p, batch_size=d.batch_size,
                    seed=seed, progress=progress)
    return [gens[i * d.n:(i + 1) * d.n] for i in range(len(prompts))]


def sample_candidates(model, tokenizer, prompts: list[str], d: DecodeConfig, seed: int,
                      progress: str | None) -> tuple[list[list[str]], int]:
    """n sampled completions per prompt, in one batched stream."""
    groups = sample_generations(model, tokenizer, prompts, d, seed, progress)
    return [[g.text for g in group] for group in groups], sum(g.num_tokens for group in groups
                                                               for g in group)
