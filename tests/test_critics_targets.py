import pytest

from critics.targets import critic_examples, heldout_problems, split_by_problem
from mcts.tree import Tree

PROMPT = "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"


def _hand_built_tree() -> dict:
    """root -> A -> {C: correct answer, D: wrong answer, F: partly right (0.5)}; root -> B
    (rollout only); B -> E (never evaluated, never visited)."""
    tree = Tree(PROMPT)
    a = tree.add_node(0, "Add them.\n", 4, -1.0, terminal=False)
    b = tree.add_node(0, "Guess.\n", 3, -2.0, terminal=False)
    c = tree.add_node(a, "Answer: 3\n", 4, -0.5, terminal=True)
    d = tree.add_node(a, "Answer: 4\n", 4, -0.7, terminal=True)
    f = tree.add_node(a, "Answer: 3.0?\n", 5, -0.9, terminal=True)
    tree.add_node(b, "Hmm\n", 2, -3.0, terminal=False)
    visits = {0: 6, a: 4, b: 1, c: 1, d: 1, f: 1}
    value_sum = {0: 2.6, a: 1.8, b: 0.3, c: 1.0, d: 0.0, f: 0.5}
    for node in visits:
        tree.visits[node], tree.value_sum[node] = visits[node], value_sum[node]
    tree.total[a], tree.rollout[a] = 0.6, 0.9
    tree.total[b], tree.rollout[b] = 0.3, 0.25
    for node, reward in ((c, 1.0), (d, 0.0), (f, 0.5)):
        tree.total[node] = tree.terminal_reward[node] = reward
    return tree.to_json()


def _targets(examples):
    return {e.completion: e.target for e in examples}


def test_critic_examples_give_exact_targets():
    examples = critic_examples([{"problem_id": "p1", "iteration": 0, "prompt": PROMPT,
                                 "tree": _hand_built_tree()}])
    assert _targets(examples["value"]) == pytest.approx({
        "Add them.\n": 0.45, "Guess.\n": 0.3, "Add them.\nAnswer: 3\n": 1.0,
        "Add them.\nAnswer: 4\n": 0.0, "Add them.\nAnswer: 3.0?\n": 0.5})
    assert _targets(examples["prm"]) == pytest.approx({
        "Add them.\n": 1 / 3,  # one of its three verified answers is exactly 1.0
        "Guess.\n": 0.25,  # nothing verified below: its rollout score
        "Add them.\nAnswer: 3\n": 1.0, "Add them.\nAnswer: 4\n": 0.0,
        "Add them.\nAnswer: 3.0?\n": 0.0})
    assert _targets(examples["orm"]) == {
        "Add them.\nAnswer: 3\n": 1.0, "Add them.\nAnswer: 4\n": 0.0,
        "Add them.\nAnswer: 3.0?\n": 0.0}
    assert {e.problem_id for kind in examples for e in examples[kind]} == {"p1"}
    assert all(e.prompt == PROMPT and e.text == PROMPT + e.completion
               for kind in examples for e in examples[kind])


def test_heldout_problems_are_seeded_and_never_everything():
    ids = [f"p{i}" for i in range(10)]
    held = heldout_problems(ids, 0.2, seed=3)
    assert len(held) == 2 and held == heldout_problems(reversed(ids), 0.2, seed=3)
    assert held != heldout_problems(ids, 0.2, seed=4)
    assert len(heldout_problems(ids[:2], 0.01, seed=0)) == 1
    assert len(heldout_problems(ids[:2], 0.99, seed=0)) == 1
    assert heldout_problems(ids[:1], 0.5, seed=0) == set()


def test_split_by_problem_keeps_each_problem_on_one_side():
    rows = [{"problem_id": f"p{i}", "tree": _hand_built_tree()} for i in range(5)]
    examples = critic_examples(rows)
    ids = [r["problem_id"] for r in rows]
    splits = {kind: split_by_problem(examples[kind], 0.4, 0, ids) for kind in examples}
    for kind, (train, heldout) in splits.items():
        assert {e.problem_id for e in train}.isdisjoint({e.problem_id for e in heldout})
        assert len(train) + len(heldout) == len(examples[kind]) and train and heldout
    held = {kind: {e.problem_id for e in split[1]} for kind, split in splits.items()}
    assert held["value"] == held["prm"] == held["orm"] == heldout_problems(ids, 0.4, 0)
