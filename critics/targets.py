"""Critic training examples from search trees.

A critic reads plain text: the tree's chat-templated prompt followed by the completion, the
option texts from the root to the node (and, for an ORM rollout example, the rollout).
Targets (all in [0, 1]):
- value: every visited non-root node -> its Q (mean backed-up value).
- prm: every evaluated non-root node -> the share of its terminal descendants (itself included)
  the verifier rewarded 1.0; a node with no verified terminal below it uses its rollout score.
- orm: every verified terminal node -> 1.0 if the verifier gave exactly 1.0, else 0.0.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mcts.tree import Tree

KINDS = ("value", "prm", "orm")


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    target: float
    problem_id: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def verified_counts(tree: Tree) -> tuple[list[int], list[int]]:
    """Per node: (correct, verified) terminal nodes in its subtree, itself included."""
    correct, verified = [0] * tree.num_nodes, [0] * tree.num_nodes
    for node in reversed(range(tree.num_nodes)):  # a child's id is larger than its parent's
        if tree.terminal_reward[node] is not None:
            verified[node] += 1
            correct[node] += tree.terminal_reward[node] == 1.0
        if tree.parent[node] >= 0:
            correct[tree.parent[node]] += correct[node]
            verified[tree.parent[node]] += verified[node]
    return correct, verified


def tree_examples(tree: Tree, problem_id: str) -> dict[str, list[Example]]:
    examples: dict[str, list[Example]] = {kind: [] for kind in KINDS}
    correct, verified = verified_counts(tree)
    for node in range(1, tree.num_nodes):
        state = (tree.prompt, "".join(tree.steps(node)))
        if tree.visits[node] > 0:
            examples["value"].append(Example(*state, tree.q(node), problem_id))
        if verified[node]:
            examples["prm"].append(Example(*state, correct[node] / verified[node], problem_id))
        elif tree.total[node] is not None:
            examples["prm"].append(Example(*state, tree.rollout[node], problem_id))
        if tree.terminal[node] and tree.terminal_reward[node] is not None:
            examples["orm"].append(Example(*state, float(tree.terminal_reward[node] == 1.0),
                                           problem_id))
    return examples


def rollout_examples(tree: Tree, rollouts: dict, problem_id: str) -> list[Example]:
    """ORM examples from verified fast rollouts: the leaf's steps plus its rollout, labelled by
    the verifier's reward on the rolled-out answer (the node's `rollout` part in training)."""
    found = []
    for node_key, rollout in sorted(rollouts.items(), key=lambda item: int(item[0])):
        node = int(node_key)
        if rollout["text"] and not tree.terminal[node] and tree.total[node] is not None:
            completion = "".join(tree.steps(node)) + rollout["text"]
            found.append(Example(tree.prompt, completion, float(tree.rollout[node] == 1.0),
                                 problem_id))
    return found


def critic_examples(rows: Iterable[dict]) -> dict[str, list[Example]]:
    """Examples of every kind from search shard rows ({"problem_id", "tree", "rollouts"?})."""
    examples: dict[str, list[Example]] = {kind: [] for kind in KINDS}
    for row in rows:
        tree, problem_id = Tree.from_json(row["tree"]), str(row["problem_id"])
        for kind, found in tree_examples(tree, problem_id).items():
            examples[kind].extend(found)
        examples["orm"].extend(rollout_examples(tree, row.get("rollouts", {}), problem_id))
    return examples


def cap_state_examples(examples: dict[str, list[Example]], max_texts: int,
                       seed: int) -> dict[str, list[Example]]:
    """Keep at most `max_texts` distinct partial-solution texts for value and PRM (a seeded
    sample): critic features cost a full backbone pass per text, the CPU's bottleneck."""
    texts = sorted({e.text for kind in ("value", "prm") for e in examples[kind]})
    if len(texts) <= max_texts:
        return examples
    keep = set(random.Random(seed).sample(texts, max_texts))
    capped = {kind: [e for e in found if e.text in keep] for kind, found in examples.items()
              if kind != "orm"}
    capped["orm"] = examples["orm"]
    return capped


def heldout_problems(problem_ids: Iterable[str], fraction: float, seed: int) -> set[str]:
    """A seeded `fraction` of the problems (at least one, and never all when there are two)."""
    ids = sorted(set(problem_ids))
    if len(ids) < 2:
        return set()
    random.Random(seed).shuffle(ids)
    count = min(max(1, round(fraction * len(ids))), len(ids) - 1)
    return set(ids[:count])


def split_by_problem(examples: Sequence[Example], fraction: float, seed: int,
                     problem_ids: Iterable[str] | None = None) -> tuple[list[Example], list[Example]]:
    """(train, held-out) with every problem on one side only. Pass the same `problem_ids` for
    every kind so the value, PRM and ORM splits hold out the same problems."""
    universe = problem_ids if problem_ids is not None else (e.problem_id for e in examples)
    heldout = heldout_problems(universe, fraction, seed)
    return ([e for e in examples if e.problem_id not in heldout],
            [e for e in examples if e.problem_id in heldout])
