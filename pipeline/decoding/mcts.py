"""decode=mcts: evaluation-time search over prompts alone; critics (or the policy's own
confidence) value the leaves, and `search.best_path` picks the answer."""

from __future__ import annotations

from collections.abc import Callable

from mcts.tree import PathRule, Tree, highest_q, most_visited
from pipeline.config import BestPath, QstarConfig
from pipeline.decoding.base import Decoded
from pipeline.decoding.tree_search import LeafScorer, SearchModels, eval_search
from pipeline.decoding.voting import weighted_vote


def completion_of(tree: Tree, scorer: LeafScorer, rule: PathRule = most_visited) -> str:
    """The best trajectory's text, finished by its leaf's rollout when it stops short."""
    path = tree.best_trajectory(rule)
    text = tree.trajectory_text(path)
    leaf = path[-1]
    if not tree.terminal[leaf]:
        rollout = scorer.rollouts.get((tree.tree_index, leaf))
        text += rollout.text if rollout else ""
    return text


def tree_solutions(tree: Tree, scorer: LeafScorer) -> list[tuple[str, int]]:
    """Every whole solution the search wrote, with its node's visits: terminal nodes, and
    evaluated nodes whose rollout ended the solution."""
    found = []
    for node in range(1, tree.num_nodes):
        if tree.terminal[node]:
            found.append((tree.trajectory_text(tree.path(node)), tree.visits[node]))
            continue
        rollout = scorer.rollouts.get((tree.tree_index, node))
        if rollout is not None and rollout.finished:
            found.append((tree.trajectory_text(tree.path(node)) + rollout.text, tree.visits[node]))
    return found


def vote_completion(tree: Tree, scorer: LeafScorer, extract: Callable[[str], str | None],
                    by_visits: bool = True) -> str:
    """Self-consistency over the tree: the answer whose solutions' visits sum highest, as its
    most-visited solution (by_visits=False: the answer most solutions give, each one vote, as
    its first solution). No answer anywhere: the most-visited path."""
    solutions = tree_solutions(tree, scorer)
    weights = [v if by_visits else 1 for _, v in solutions]
    best = weighted_vote([text for text, _ in solutions], weights, extract)
    return completion_of(tree, scorer) if best is None else solutions[best][0]


def decode_mcts(cfg: QstarConfig, model, tokenizer, prompts: list[str], critics,
                progress: str | None, extract: Callable[[str], str | None], implicit=None):
    """One completion per prompt from an evaluation-time search (`search.best_path` picks it,
    the other rules are kept as alternatives); `extract` reads answers for best_path=vote and
    never sees gold."""
    models = SearchModels(policy=model, tokenizer=tokenizer, critics=critics, implicit=implicit)
    trees, scorer = eval_search(prompts, cfg, models, desc=progress)
    # every rule reads the same trees: the chosen one answers, the others are graded beside it
    picks = {BestPath.visits.value: [completion_of(t, scorer, most_visited) for t in trees],
             BestPath.q.value: [completion_of(t, scorer, highest_q) for t in trees],
             BestPath.vote.value: [vote_completion(t, scorer, extract) for t in trees],
             BestPath.majority.value: [vote_completion(t, scorer, extract, by_visits=False)
                                       for t in trees]}
    mode = cfg.search.best_path.value
    return Decoded(picks.pop(mode), sum(t.stats.total_tokens for t in trees),
                   extra={"best_path": mode}, alternatives=picks, alternatives_of="best_path")
