"""Pure option-level MCTS: the models come in as callbacks (no torch, no pipeline imports)."""

from mcts.options import OptionEnd, is_answer_line, newline, sentence_end, step_marker, token_cap
from mcts.search import SearchParams, search
from mcts.tree import NO_PARENT, ROOT_INDEX, Tree, TreeStats, highest_q, most_visited
from mcts.types import (
    EvalRequest,
    EvaluateFn,
    ExpandFn,
    ExpandRequest,
    LeafEval,
    Option,
    SimilarityFn,
    TerminalRewardFn,
)

__all__ = [
    "NO_PARENT",
    "ROOT_INDEX",
    "EvalRequest",
    "EvaluateFn",
    "ExpandFn",
    "ExpandRequest",
    "LeafEval",
    "Option",
    "OptionEnd",
    "SearchParams",
    "SimilarityFn",
    "TerminalRewardFn",
    "Tree",
    "TreeStats",
    "highest_q",
    "is_answer_line",
    "most_visited",
    "newline",
    "search",
    "sentence_end",
    "step_marker",
    "token_cap",
]
