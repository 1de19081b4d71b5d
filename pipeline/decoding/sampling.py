"""decode=greedy and decode=sample, and the n samples per prompt best-of-N selects from."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from mcts.tree import ROOT_INDEX, Tree
from pipeline.config import DecodeConfig, QstarConfig
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


def sample_trees(prompts: list[str], model, tokenizer, cfg: QstarConfig,
                 reward_fn: Callable[[int, str], float], step_check=None,
                 desc: str | None = None,
                 off_track: Callable[[int, str], bool] | None = None) -> list[Tree]:
    """The STaR baseline's search: `search.simulations` whole solutions per prompt, verified.

    Each prompt becomes a depth-1 tree whose children are the complete samples (terminal,
    visited once, valued by the verifier), so the data stage reads them like MCTS trees: the
    SFT row is a verified sample, trajectory pairs are correct vs incorrect samples. With a
    `step_check` (search.check_equations), a sample stops at the first line it flags, reward 0;
    so it does with `off_track` (search.prune_steps: prompt index, text so far -> rejected).
    """
    s, d = cfg.search, cfg.decode
    start = time.perf_counter()
    repeated = [p for p in prompts for _ in range(s.simulations)]
    gens = generate(model, tokenizer, repeated, max_new_tokens=d.max_new_tokens,
                    temperature=s.temperature, batch_size=d.batch_size, seed=s.seed,
                    progress=desc, wrong=step_check,
                    checks=None if off_track is None else
                    [functools.partial(off_track, i) for i in range(len(prompts))
                     for _ in range(s.simulations)])
    trees = []
    for i, prompt in enumerate(prompts):
        tree = Tree(prompt, i)
        for g in gens[i * s.simulations:(i + 1) * s.simulations]:
            node = tree.add_node(ROOT_INDEX, g.text, g.num_tokens, g.logprob, terminal=True)
            reward = 0.0 if g.wrong else reward_fn(i, g.text)
            tree.total[node] = tree.terminal_reward[node] = reward
            tree.backup(node, reward)  # the tree's one writer of visits, values and min/max
            tree.stats.tokens_generated += g.num_tokens
            tree.stats.simulations += 1
        tree.stats.seconds = time.perf_counter() - start
        tree.stats.stop_reason = "simulations"
        trees.append(tree)
    return trees
