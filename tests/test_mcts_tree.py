import json

import pytest

from mcts import SearchParams, Tree, highest_q, most_visited, search
from mcts.fake import FakeCritic, FakePolicy, FakeVerifier


def _hand_tree():
    """      0
           /   \\
     1 (N3 Q.5)  2 (N2 Q.9)
      /    \\         \\
   3 (N2 Q.2) 4 (N1 Q.9)  5 (N2 Q.9)"""
    tree = Tree("What is 1+1?")
    for parent, text in [(0, "a\n"), (0, "b\n"), (1, "c\n"), (1, "d\n"), (2, "Answer: 2\n")]:
        tree.add_node(parent, text, 2, -1.0, text.startswith("Answer"))
    tree.visits[:] = [5, 3, 2, 2, 1, 2]
    tree.value_sum[:] = [3.3, 1.5, 1.8, 0.4, 0.9, 1.8]
    return tree


def test_paths_steps_and_q():
    tree = _hand_tree()
    assert tree.path(4) == [0, 1, 4]
    assert tree.steps(4) == ["a\n", "d\n"]
    assert tree.steps(0) == []
    assert tree.depth == [0, 1, 1, 2, 2, 2]
    assert tree.children[1] == [3, 4]
    assert tree.q(1) == pytest.approx(0.5)
    unvisited = tree.add_node(0, "x\n", 1, 0.0, False)
    assert tree.q(unvisited) == 0.0


def test_best_trajectory_by_visits_and_by_q():
    tree = _hand_tree()
    assert tree.best_trajectory() == tree.best_trajectory(most_visited) == [0, 1, 3]
    assert tree.best_trajectory(highest_q) == [0, 2, 5]
    assert tree.trajectory_text([0, 2, 5]) == "b\nAnswer: 2\n"
    tree.visits[2] = 3  # a tie in visits goes to the first child
    assert tree.best_trajectory(most_visited)[1] == 1
    # any rule is a function of (tree, child): fewest tokens first
    assert tree.best_trajectory(lambda t, c: -t.num_tokens[c])[1] in tree.children[0]


def test_best_trajectory_skips_unvisited_children():
    tree = _hand_tree()
    tree.add_node(3, "e\n", 1, 0.0, False)
    assert tree.best_trajectory(highest_q) == [0, 2, 5]
    assert tree.best_trajectory(most_visited) == [0, 1, 3]


def test_hand_tree_json_round_trip():
    tree = _hand_tree()
    data = json.loads(json.dumps(tree.to_json()))
    again = Tree.from_json(data)
    assert again.to_json() == data
    assert again.children == tree.children
    assert data["best_trajectory"] == [0, 1, 3]
    assert data["best_text_q"] == "b\nAnswer: 2\n"
    assert set(data["nodes"][1]) >= {"id", "parent", "depth", "text", "num_tokens", "prior", "visits",
                                     "q", "value", "prm", "orm", "rollout", "terminal",
                                     "terminal_reward", "merges"}


def test_searched_tree_json_round_trip():
    trees = search(["2+2?", "3*3?"], FakePolicy(), FakeCritic(), SearchParams(simulations=8),
                   terminal_reward_fn=FakeVerifier())
    for tree in trees:
        data = json.loads(json.dumps(tree.to_json()))
        again = Tree.from_json(data)
        assert again.to_json() == data
        assert again.minmax == tree.minmax
        assert again.stats == tree.stats


def test_from_json_refuses_other_versions():
    data = _hand_tree().to_json()
    data["version"] = 99
    with pytest.raises(ValueError, match="version"):
        Tree.from_json(data)
