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


def puct_child_score(tree: Tree, node: int, child: int, c_puct: float, virtual_loss: float) -> float:
    """PUCT score of one child of `node`; an unvisited child is assumed as good as its parent."""
    q = effective_q(tree, child, virtual_loss)
    q_norm = tree.minmax.normalize(q) if q is not None else _parent_norm(tree, node, virtual_loss)
    return puct_score(q_norm, tree.prior[child], effective_visits(tree, node, virtual_loss),
                      effective_visits(tree, child, virtual_loss), c_puct)


def puct_widen_score(tree: Tree, node: int, c_puct: float, virtual_loss: float) -> float:
    """PUCT score of the child not sampled yet (progressive widening as one more action): no
    visits, Q assumed as good as the parent's (the unvisited-child rule), and the prior it would
    get among k+1 siblings if the policy rated it like the others, 1/(k+1)."""
    prior = 1.0 / (len(tree.children[node]) + 1)
    return puct_score(_parent_norm(tree, node, virtual_loss), prior,
                      effective_visits(tree, node, virtual_loss), 0.0, c_puct)


def _parent_norm(tree: Tree, node: int, virtual_loss: float) -> float:
    parent_q = effective_q(tree, node, virtual_loss)
    return tree.minmax.normalize(parent_q) if parent_q is not None else 0.5


def puct_select_child(tree: Tree, node: int, c_puct: float, virtual_loss: float) -> int:
    """The child with the highest PUCT score; ties go to the lowest index (first child)."""
    best, best_score = -1, -math.inf
    for child in tree.children[node]:
        score = puct_child_score(tree, node, child, c_puct, virtual_loss)
        if score > best_score:
            best, best_score = child, score
    return best


SelectChildFn = Callable[[Tree, int, float, float], int]  # (tree, node, c_puct, virtual_loss) -> child
