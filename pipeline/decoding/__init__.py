"""How text is decoded for evaluation problems: one module per strategy, and `decode` to pick one.

greedy and sample (sampling.py), best-of-N with its selections (best_of_n.py, voting.py),
step-level beam search (beam.py), evaluation-time MCTS (mcts.py, on tree_search.py).
Every strategy takes prompts only; none sees a gold answer.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import DecodeStrategy, QstarConfig
from pipeline.decoding.base import Decoded
from pipeline.decoding.beam import decode_beam
from pipeline.decoding.best_of_n import decode_best_of_n, sample_check
from pipeline.decoding.mcts import decode_mcts
from pipeline.decoding.sampling import decode_greedy, decode_sample


def decode(cfg: QstarConfig, strategy: DecodeStrategy, model, tokenizer, prompts: list[str],
           critics, progress: str | None, extract: Callable[[str], str | None],
           implicit=None) -> Decoded:
    """One completion per prompt. `extract` reads answers for voting; it never sees gold.
    `implicit`: the policy's DPO implicit reward (critics.ImplicitCritic), if it has one."""
    d, seed = cfg.decode, cfg.seed
    if strategy == DecodeStrategy.greedy:
        return decode_greedy(model, tokenizer, prompts, d, seed, progress)
    if strategy == DecodeStrategy.sample:
        return decode_sample(model, tokenizer, prompts, d, seed, progress)
    if strategy == DecodeStrategy.best_of_n:
        orm = critics.orm_scorer() if critics is not None else None
        return decode_best_of_n(model, tokenizer, prompts, d, seed, progress, extract, orm,
                                implicit, sample_check(cfg.search))
    if strategy == DecodeStrategy.beam:
        return decode_beam(cfg, model, tokenizer, prompts, progress)
    return decode_mcts(cfg, model, tokenizer, prompts, critics, progress, extract, implicit)
