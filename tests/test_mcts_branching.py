import pytest

from mcts import SearchParams, search
from mcts.branching import branching_bounds, importance, num_children
from mcts.types import LeafEval, Option


def test_importance_is_max_abs_difference():
    assert importance(0.5, [0.2, 0.9, 0.5]) == pytest.approx(0.4)
    assert importance(0.5, []) == 0.0


@pytest.mark.parametrize(
    ("i", "lo", "hi", "expected"),
    [
        (0.0, 2, 3, 2),  # floor(0)+1 = 1 -> clamped up to c_min
        (0.4, 2, 3, 2),  # floor(1.6)+1 = 2
        (0.6, 2, 3, 3),  # floor(2.4)+1 = 3
        (0.9, 2, 3, 3),  # floor(3.6)+1 = 4 -> clamped down to c_max
        (0.75, 3, 5, 4),  # floor(3.0)+1 = 4, root bounds
        (1.0, 3, 5, 5),
    ],
)
def test_num_children_hand_computed(i, lo, hi, expected):
    assert num_children(i, 4.0, lo, hi) == expected


def test_root_has_wider_bounds():
    assert branching_bounds(0, 2, 3, 3, 5) == (3, 5)
    assert branching_bounds(2, 2, 3, 3, 5) == (2, 3)


def _distinct_policy(requests):
    return [[Option(f"{r.node_id}.{r.seed}.{i}\n", -1.0, 1, False) for i in range(r.num_options)]
            for r in requests]


def _search_with_root_children(values):
    """Root value 0.5; the k-th child of the root is worth values[k]; deeper nodes 0.5."""
    def critic(requests):
        return [LeafEval(total=values[r.node_id - 1] if len(r.steps) == 1 else 0.5) for r in requests]

    params = SearchParams(simulations=6, root_c_min=2, root_c_max=4, alpha=4.0, merge_threshold=1.01,
                          leaves_per_tree=1)
    return search(["p"], _distinct_policy, critic, params)[0]


def test_disagreeing_children_get_a_sibling():
    # I(root) = |0 - 0.5| = 0.5 -> n = floor(2) + 1 = 3 > 2 children: the root asks for one more
    tree = _search_with_root_children([0.0, 1.0, 0.5, 0.5])
    assert tree.expand_target[0] == 3
    assert len(tree.children[0]) == 3


def test_agreeing_children_get_none():
    tree = _search_with_root_children([0.5, 0.5, 0.5, 0.5])
    assert tree.expand_target[0] == 2
    assert len(tree.children[0]) == 2
