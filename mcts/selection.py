"""Selection rules: small pure functions so a variant can be swapped in.

PUCT score = q_norm(child) + c_puct * prior(child) * sqrt(N(parent)) / (1 + N(child)).
Q is normalised by the min/max Q seen in the tree (`Tree.minmax`, MuZero's MinMaxStats), so c_puct means the
same thing whatever range the critics' values live in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from mcts.tree import Tree


def priors_from_logprobs(logprobs: Sequence[float], num_tokens: Sequence[int]) -> list[float]:
    """Softmax over siblings of the length-normalised log-prob (so long options are not punished)."""
    if not logprobs:
        return []
    scores = [lp / max(1, n) for lp, n in zip(logprobs, num_tokens, strict=True)]
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


def puct_score(
    q_norm: float, prior: float, parent_visits: float, child_visits: float, c_puct: float
) -> float:
    return q_norm + c_puct * prior * math.sqrt(parent_visits) / (1.0 + child_visits)


def effective_visits(tree: Tree, node: int, virtual_loss: float) -> float:
    """Real visits plus the virtual ones of selections still in flight this round."""
    return tree.visits[node] + virtual_loss * tree.pending[node]


def effective_q(tree: Tree, node: int, virtual_loss: float) -> float | None:
    """Q with each in-flight selection counted as `virtual_loss` visits of value 0; None if unvisited."""
    visits = effective_visits(tree, node, virtual_loss)
    return tree.value_sum[node] / visits if visits > 0 else None


def puct_select_child(tree: Tree, node: int, c_puct: float, virtual_loss: float) -> int:
    """The child with the highest PUCT score; ties go to the lowest index (first child)."""
    parent_q = effective_q(tree, node, virtual_loss)
    parent_norm = tree.minmax.normalize(parent_q) if parent_q is not None else 0.5
    parent_visits = effective_visits(tree, node, virtual_loss)
    best, best_score = -1, -math.inf
    for child in tree.children[node]:
        q = effective_q(tree, child, virtual_loss)
        # An unvisited child is assumed to be as good as its parent.
        q_norm = tree.minmax.normalize(q) if q is not None else parent_norm
        score = puct_score(
            q_norm,
            tree.prior[child],
            parent_visits,
            effective_visits(tree, child, virtual_loss),
            c_puct,
        )
        if score > best_score:
            best, best_score = child, score
    return best


SelectChildFn = Callable[[Tree, int, float, float], int]  # (tree, node, c_puct, virtual_loss) -> child
