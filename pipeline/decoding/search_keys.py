"""The search config in the terms of its parts: mcts.SearchParams for the pure search,
mcts.options.OptionEnd for the decoder's stop rule, the merge's similarity function."""

from __future__ import annotations

from mcts.options import OptionEnd
from mcts.search import SearchParams
from pipeline.config import MergeMethod, SearchConfig
from pipeline.lm.embedding import cosine_similarity_fn


def option_end(s: SearchConfig) -> OptionEnd:
    return OptionEnd(kind=s.termination.value, regex=s.step_regex if s.termination.value ==
                     "step_marker" else None, max_tokens=s.max_option_tokens)


def search_params(s: SearchConfig) -> SearchParams:
    return SearchParams(
        simulations=s.simulations, token_budget=s.token_budget, c_puct=s.c_puct,
        max_depth=s.max_depth, c_min=s.c_min, c_max=s.c_max, root_c_min=s.root_c_min,
        root_c_max=s.root_c_max, alpha=s.alpha,
        merge_threshold=s.merge_threshold if s.merge != MergeMethod.none else 2.0,
        merge_retries=s.merge_retries, dead_end_retries=s.dead_end_retries,
        reopen_root=s.reopen_root,
        virtual_loss=s.virtual_loss,
        leaves_per_tree=s.leaves_per_tree, widening=s.widening, evaluate_root=s.evaluate_root,
        seed=s.seed,
    )


def similarity_fn(s: SearchConfig):
    """None: mcts' default edit-distance ratio. `embedding`: MiniLM cosine, offline."""
    if s.merge != MergeMethod.embedding:
        return None
    return cosine_similarity_fn()
