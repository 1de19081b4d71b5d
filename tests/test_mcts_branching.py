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


def _search_with_root_children(values, simulations=6, widening="first"):
    """Root value 0.5; the k-th child of the root is worth values[k]; deeper nodes 0.5."""
    order: list[str] = []  # root children's texts in creation order

    def critic(requests):
        for r in requests:
            if len(r.steps) == 1 and r.steps[0] not in order:
                order.append(r.steps[0])
        return [LeafEval(total=values[order.index(r.steps[0])] if len(r.steps) == 1 else 0.5)
                for r in requests]

    params = SearchParams(simulations=simulations, root_c_min=2, root_c_max=4, alpha=4.0,
                          merge_threshold=1.01, leaves_per_tree=1, widening=widening)
    return search(["p"], _distinct_policy, critic, params)[0]


@pytest.mark.parametrize("widening", ["first", "puct"])
def test_disagreeing_children_get_a_sibling(widening):
    # I(root) = |0 - 0.5| = 0.5 -> n = floor(2) + 1 = 3 > 2 children: the root asks for one more
    tree = _search_with_root_children([0.0, 1.0, 0.5, 0.5], simulations=12, widening=widening)
    assert tree.expand_target[0] == 3
    assert len(tree.children[0]) == 3


def test_puct_widening_first_exploits_a_good_child_then_widens():
    # After round 1 the root wants a 3rd child. "first" samples it at once; "puct" first
    # descends to the child worth 1.0 (its PUCT score 1.25 beats the new child's 0.5 + 1/3).
    first = _search_with_root_children([0.0, 1.0, 0.5, 0.5], simulations=2, widening="first")
    assert len(first.children[0]) == 3 and first.children[2] == []
    puct = _search_with_root_children([0.0, 1.0, 0.5, 0.5], simulations=2, widening="puct")
    assert len(puct.children[0]) == 2 and len(puct.children[2]) >= 2
    # the new child's exploration term grows with the parent's visits, so it is sampled later
    later = _search_with_root_children([0.0, 1.0, 0.5, 0.5], simulations=12, widening="puct")
    assert len(later.children[0]) == 3


def test_agreeing_children_get_none():
    tree = _search_with_root_children([0.5, 0.5, 0.5, 0.5])
    assert tree.expand_target[0] == 2
    assert len(tree.children[0]) == 2


def test_without_a_root_evaluation_the_root_reads_its_childrens_mean():
    # children worth 0.0 and 0.4: against a root evaluated at 0.5, I(root) = 0.5 -> n = 3; with
    # no root evaluation v(root) is their mean 0.2, I(root) = 0.2 -> floor(0.8) + 1 -> c_min = 2
    asked: list[list[str]] = []

    def critic(requests):
        asked.extend(list(r.steps) for r in requests)
        return [LeafEval(total=0.5 if not r.steps else [0.0, 0.4][int(r.steps[0].split(".")[2])])
                for r in requests]

    def run(evaluate_root):
        asked.clear()
        params = SearchParams(simulations=1, root_c_min=2, root_c_max=4, alpha=4.0,
                              merge_threshold=1.01, leaves_per_tree=1,
                              evaluate_root=evaluate_root)
        return search(["p"], _distinct_policy, critic, params)[0]

    evaluated = run(True)
    assert [] in asked and evaluated.total[0] == 0.5 and evaluated.expand_target[0] == 3
    unevaluated = run(False)
    assert [] not in asked and len(asked) == 2  # the two children, no root
    assert unevaluated.total[0] is None
    assert unevaluated.node_value(0) == pytest.approx(0.2)
    assert unevaluated.expand_target[0] == 2
    assert unevaluated.visits[0] == 1  # the simulation still visits the root
