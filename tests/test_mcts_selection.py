import math

import pytest

from mcts.selection import (
    effective_q,
    priors_from_logprobs,
    puct_score,
    puct_select_child,
)
from mcts.tree import MinMaxStats, Tree


def test_minmax_empty_and_flat_give_half():
    stats = MinMaxStats()
    assert stats.normalize(0.3) == 0.5
    stats.update(0.4)
    assert stats.normalize(0.4) == 0.5


def test_minmax_normalises_by_seen_range():
    stats = MinMaxStats()
    for q in (0.6, 0.2, 0.4):
        stats.update(q)
    assert (stats.minimum, stats.maximum) == (0.2, 0.6)
    assert stats.normalize(0.4) == pytest.approx(0.5)
    assert stats.normalize(0.6) == pytest.approx(1.0)
    assert stats.normalize(0.2) == pytest.approx(0.0)


def test_priors_softmax_of_length_normalised_logprob():
    # scores -2/2 = -1 and -8/4 = -2: softmax = 1/(1+e^-1), e^-1/(1+e^-1)
    priors = priors_from_logprobs([-2.0, -8.0], [2, 4])
    assert priors == pytest.approx([0.7310586, 0.2689414])
    assert sum(priors) == pytest.approx(1.0)


def test_priors_equal_per_token_rate_are_equal_and_zero_tokens_is_safe():
    assert priors_from_logprobs([-1.0, -3.0], [1, 3]) == pytest.approx([0.5, 0.5])
    e = math.exp(-1)
    assert priors_from_logprobs([0.0, -1.0], [0, 1]) == pytest.approx([1 / (1 + e), e / (1 + e)])
    assert priors_from_logprobs([], []) == []


def test_puct_score_hand_computed():
    # 0.5 + 2.0 * 0.25 * sqrt(16) / (1 + 3) = 1.0
    assert puct_score(0.5, 0.25, 16, 3, 2.0) == pytest.approx(1.0)


def _two_child_tree():
    """Root N=4 W=2.0; A: N=3 Q=0.8 prior 0.3; B: N=1 Q=0.2 prior 0.7; min/max Q = 0.2/0.8."""
    tree = Tree("p")
    a = tree.add_node(0, "A\n", 1, 0.0, False)
    b = tree.add_node(0, "B\n", 1, 0.0, False)
    tree.visits[:] = [4, 3, 1]
    tree.value_sum[:] = [2.0, 2.4, 0.2]
    tree.prior[a], tree.prior[b] = 0.3, 0.7
    tree.minmax.update(0.2)
    tree.minmax.update(0.8)
    return tree, a, b


def test_puct_select_exploits_then_explores_with_larger_c():
    tree, a, b = _two_child_tree()
    # c=1: A = 1.0 + 0.3*2/4 = 1.15; B = 0.0 + 0.7*2/2 = 0.7
    assert puct_select_child(tree, 0, 1.0, 0.0) == a
    # c=3: A = 1.0 + 0.45 = 1.45; B = 0.0 + 2.1 = 2.1
    assert puct_select_child(tree, 0, 3.0, 0.0) == b


def test_unvisited_child_takes_parents_normalised_q():
    tree, a, b = _two_child_tree()
    c = tree.add_node(0, "C\n", 1, 0.0, False)
    tree.prior[c] = 0.0
    # c_puct=0: scores are q_norm only. Parent Q 0.5 -> 0.5; A -> 1.0; B -> 0.0; C -> 0.5
    assert puct_select_child(tree, 0, 0.0, 0.0) == a
    tree.value_sum[a] = 0.9  # A: Q 0.3 -> 0.1667 < C's 0.5
    assert puct_select_child(tree, 0, 0.0, 0.0) == c


def test_ties_go_to_lowest_index():
    tree = Tree("p")
    first = tree.add_node(0, "x\n", 1, 0.0, False)
    tree.add_node(0, "y\n", 1, 0.0, False)
    assert puct_select_child(tree, 0, 1.0, 1.0) == first


def test_virtual_loss_counts_pending_as_zero_value_visits():
    tree, a, _ = _two_child_tree()
    tree.pending[a] = 1
    assert effective_q(tree, a, 1.0) == pytest.approx(2.4 / 4)
    assert effective_q(tree, a, 0.0) == pytest.approx(0.8)
