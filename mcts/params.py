"""The search's knobs: one dataclass, validated beside it (the pipeline's SearchConfig mirrors it)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Widening(str, Enum):
    """When a node below its importance target n(s) gets another child."""

    puct = "puct"  # its next child competes with its children under PUCT (no visits, parent's Q)
    first = "first"  # it is widened before any descent (the rule before one-visit backups)


@dataclass
class SearchParams:
    simulations: int = 16  # select-expand-evaluate-backup cycles per tree
    token_budget: int = 0  # option + rollout tokens per tree (TreeStats.total_tokens), spent as nearly as rounds allow; 0 = off
    c_puct: float = 1.0
    max_depth: int = 8  # a node at this depth is terminal (depth cap)
    c_min: int = 2  # importance branching bounds
    c_max: int = 3
    root_c_min: int = 3  # wider at the root
    root_c_max: int = 5
    alpha: float = 4.0
    merge_threshold: float = 0.9  # similarity >= threshold counts as a duplicate sibling; > 1 disables
    merge_retries: int = 1  # extra expand rounds to resample duplicates, then drop them
    virtual_loss: float = 1.0  # visits of value 0 added per in-flight selection through a node
    leaves_per_tree: int = 2  # leaves gathered per tree per round
    widening: Widening = Widening.puct  # more children for an expanded node
    # dead-end children (Option.dead_end) per node that do not count toward its n(s): the node
    # samples a replacement for each, so a rejected step does not take a live option's place
    dead_end_retries: int = 2  # chosen on dev at evaluation (benchmarks/RESULTS.md, "Dead ends replaced")
    # with a token_budget: a tree left with nothing to expand while under its budget asks its
    # root for one more first step and goes on (a reopening), rather than stop `exhausted`;
    # chosen on dev: 0.96x the budget spent, not 0.80x (benchmarks/RESULTS.md, "A reopened root")
    reopen_root: bool = True
    # evaluate the root before the first round (a leaf evaluation with no steps: with a policy, a
    # fast rollout from the prompt) for v(root) in I(root); False: v(root) is the mean of its
    # children's values (Tree.node_value), and the root's evaluation costs nothing
    evaluate_root: bool = True
    seed: int = 0


def validate_params(params: SearchParams) -> None:
    checks = [
        (params.simulations >= 1, "simulations must be >= 1"),
        (params.token_budget >= 0, "token_budget must be >= 0 (0 = off)"),
        (params.c_puct >= 0, "c_puct must be >= 0"),
        (params.max_depth >= 1, "max_depth must be >= 1"),
        (1 <= params.c_min <= params.c_max, "need 1 <= c_min <= c_max"),
        (1 <= params.root_c_min <= params.root_c_max, "need 1 <= root_c_min <= root_c_max"),
        (params.alpha >= 0, "alpha must be >= 0"),
        (params.merge_retries >= 0, "merge_retries must be >= 0"),
        (params.dead_end_retries >= 0, "dead_end_retries must be >= 0"),
        (params.virtual_loss >= 0, "virtual_loss must be >= 0"),
        (params.leaves_per_tree >= 1, "leaves_per_tree must be >= 1"),
        (params.widening in Widening.__members__, f"widening must be one of {', '.join(Widening.__members__)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"SearchParams: {message}")
