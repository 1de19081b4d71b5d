"""decode=mcts: evaluation-time search over prompts alone; critics (or the policy's own
confidence) value the leaves, and `search.best_path` picks the answer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from mcts.tree import ROOT_INDEX, PathRule, Tree, highest_q, most_visited
from pipeline.config import BestPath, QstarConfig
from pipeline.decoding.base import Decoded
from pipeline.decoding.tree_search import LeafScorer, Rollout, SearchModels, eval_search
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


def dead_end(tree: Tree, node: int, scorer: LeafScorer) -> bool:
    """A terminal node whose option the step check flags (search.check_equations): it ends at a
    false equality ("8 - 8 = 8"), not at an answer, so it is no solution, though its last number
    would read as one."""
    return bool(tree.terminal[node] and scorer.step_check is not None
                and scorer.step_check(tree.text[node]))


def finished_rollout(tree: Tree, node: int, scorer: LeafScorer) -> Rollout | None:
    """The node's fast rollout when it ended the solution and the step check passed it."""
    rollout = scorer.rollouts.get((tree.tree_index, node))
    return rollout if rollout is not None and rollout.finished and not rollout.wrong else None


def tree_solutions(tree: Tree, scorer: LeafScorer) -> list[tuple[str, int]]:
    """Every whole solution the search wrote, with its node's visits: terminal nodes, and
    evaluated nodes whose rollout ended the solution; never a dead end or a flagged rollout."""
    found = []
    for node in range(1, tree.num_nodes):
        if tree.terminal[node]:
            if not dead_end(tree, node, scorer):
                found.append((tree.trajectory_text(tree.path(node)), tree.visits[node]))
            continue
        rollout = finished_rollout(tree, node, scorer)
        if rollout is not None:
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


def answer_shares(tree: Tree, scorer: LeafScorer, extract: Callable[[str], str | None]
                  ) -> tuple[dict[str, float], dict[str, str]]:
    """The policy's answer distribution estimated on the tree, and a solution giving each answer.
    A terminal node gives its answer (a dead end none); any other node mixes its finished
    rollout (weight 1) and its children (weight Tree.draws: how often the policy sampled that
    option, duplicates included), over the parts that reach an answer. Each level weighs the
    policy's next options by how often it sampled them, so the shares estimate the policy's own
    answer probabilities, where one vote per solution (`majority`) weighs a rarely sampled
    branch with many solutions above a common one with few."""
    solution: dict[str, str] = {}

    def one(text: str) -> dict[str, float]:
        found = extract(text)
        if found is None:
            return {}
        solution.setdefault(found, text)
        return {found: 1.0}

    shares: list[dict[str, float]] = [{} for _ in range(tree.num_nodes)]
    for node in sorted(range(tree.num_nodes), key=tree.path):  # depth-first: first solutions
        prefix = tree.trajectory_text(tree.path(node))
        if tree.terminal[node]:
            shares[node] = {} if dead_end(tree, node, scorer) else one(prefix)
            continue
        rollout = finished_rollout(tree, node, scorer)
        if rollout is not None:
            shares[node] = one(prefix + rollout.text)
    for node in reversed(range(tree.num_nodes)):  # a child's id is larger than its parent's
        parts = [(tree.draws[c], shares[c]) for c in tree.children[node] if shares[c]]
        if shares[node] and not tree.terminal[node]:
            parts.append((1, shares[node]))
        if tree.terminal[node] or not parts:
            continue
        weight = sum(w for w, _ in parts)
        mixed: dict[str, float] = {}
        for w, part in parts:
            for found, p in part.items():
                mixed[found] = mixed.get(found, 0.0) + w * p / weight
        shares[node] = mixed
    return shares[ROOT_INDEX], solution


def draws_completion(tree: Tree, scorer: LeafScorer, extract: Callable[[str], str | None]) -> str:
    """A solution giving the answer with the largest estimated share (`answer_shares`; ties to
    the answer first met in depth-first order); none anywhere: the most-visited path."""
    shares, solution = answer_shares(tree, scorer, extract)
    if not shares:
        return completion_of(tree, scorer)
    return solution[max(shares, key=shares.__getitem__)]


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
                                       for t in trees],
             BestPath.draws.value: [draws_completion(t, scorer, extract) for t in trees]}
    mode = cfg.search.best_path.value
    stops = Counter(t.stats.stop_reason for t in trees)
    return Decoded(picks.pop(mode), sum(t.stats.total_tokens for t in trees),
                   extra={"best_path": mode, "stop_reasons": dict(sorted(stops.items()))},
                   alternatives=picks, alternatives_of="best_path",
                   row_extra=[{"search": tree_summary(t, scorer)} for t in trees])


def tree_summary(tree: Tree, scorer: LeafScorer) -> dict:
    """What one evaluation tree spent and why it stopped (kept in the eval rows): whether it ran
    out of simulations, of budget, or of leaves to expand (`exhausted`); how often it reopened its root."""
    return {"stop_reason": tree.stats.stop_reason, "tokens": tree.stats.total_tokens,
            "simulations": tree.stats.simulations, "nodes": tree.num_nodes, "reopens": tree.stats.reopens,
            "dead_ends": sum(dead_end(tree, n, scorer) for n in range(1, tree.num_nodes))}
