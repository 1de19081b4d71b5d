"""Pure option-level MCTS: the models come in as callbacks (no torch, no pipeline imports)."""

from mcts.options import OptionEnd, is_answer_line, newline, sentence_end, step_marker, token_cap
from mcts.search import SearchParams, search
from mcts.tree import Tree, TreeStats
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
    "is_answer_line",
    "newline",
    "search",
    "sentence_end",
    "step_marker",
    "token_cap",
]
