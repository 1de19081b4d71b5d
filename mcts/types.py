"""What crosses the boundary between the search and the models.

The search only ever sees prompt strings and these records; the policy, the critics and
the verifier live behind the callbacks, so no gold answer can reach an evaluation-time search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Option:
    """One generated step, returned by the expand callback."""

    text: str  # the step text, including its terminating newline if any
    logprob: float  # sum of token log-probs under the policy
    num_tokens: int
    terminal: bool  # the option ends the solution (answer line or EOS)
    # tokens its row decoded past the option (a rollout fused with the expansion): counted in
    # the budget at expansion, whether the merge keeps the option or not
    rollout_tokens: int = 0
    # the option was read off its parent's rollout (search.reuse_rollouts): its tokens were
    # counted there, so the budget does not count them again
    reused: bool = False
    # the expander rejected the step (e.g. a false equality): a terminal child worth 0, kept for
    # training pairs, that may be replaced by a new sample (SearchParams.dead_end_retries)
    dead_end: bool = False


@dataclass
class ExpandRequest:
    tree_index: int
    node_id: int
    prompt: str  # the tree's root prompt (problem as rendered; no gold answer anywhere)
    steps: list[str]  # option texts from root to this node
    num_options: int  # how many children to sample
    attempt: int = 0  # 0 = first sampling for this node; k = k-th merge resample
    seed: int = 0  # deterministic per (search seed, tree, node, request); use it to seed sampling


@dataclass
class EvalRequest:
    tree_index: int
    node_id: int
    prompt: str
    steps: list[str]  # root..node option texts, including this node's
    terminal: bool
    seed: int = 0  # deterministic per (search seed, tree, node); for sampled rollouts
    logprob: float = 0.0  # the steps' summed token log-probs under the policy (root..node)
    num_tokens: int = 0  # the steps' token count (root..node)


@dataclass
class LeafEval:
    """Returned by the evaluate callback."""

    total: float  # the weighted sum used for backup, in [0, 1]
    value: float = 0.0  # parts, recorded in the tree for inspection/training
    prm: float = 0.0
    orm: float = 0.0
    rollout: float = 0.0
    implicit: float = 0.0  # sigmoid of the option's DPO implicit reward (a part of `total` only)
    tokens: int = 0  # tokens the evaluator generated (fast rollouts), counted in the budget
    # (0 for a rollout fused with the expansion: its Option.rollout_tokens counted it)


ExpandFn = Callable[[list[ExpandRequest]], list[list[Option]]]
EvaluateFn = Callable[[list[EvalRequest]], list[LeafEval]]
TerminalRewardFn = Callable[[list[EvalRequest]], list[float]]  # training only: verifier reward in [0,1]
SimilarityFn = Callable[[str, str], float]  # 1.0 = identical
