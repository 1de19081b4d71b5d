"""Option-level MCTS over a batch of problems, with the models injected as callbacks.

Each tree searches in rounds of its own (a generator, mcts/schedule.py); `drive` batches what
the trees ask, because batched generation is where the time goes:

1. select: the tree hands up to `leaves_per_tree` leaves; virtual loss on a selected path
   steers the next selection in the same tree elsewhere.
2. expand: its leaves' options in one expansion; duplicates of siblings are resampled in one
   more expansion per retry round, then dropped (state merge).
3. evaluate: its new children in one evaluation (and, in training, its terminal ones in one
   verifier call). Each root is evaluated once, before the first round (all roots in one
   call), with steps=[]: its value is v(root) for branching, not backed up (evaluate_root;
   without, v(root) is the mean of its children's values).
4. back up: one simulation is one visit along its path (standard MCTS). Each new child gets its
   own first visit with its own value; the path root..expanded node gets ONE visit, valued by the
   mean of the new children's values. Then undo the virtual loss and update each expanded
   node's importance-based child target n(s).

A selection that reaches a terminal node backs up its stored value again without generating.
So the root's visits equal the simulations, and every other node's visits are its own first
visit plus the simulations that ended at or below it.

Widening (`widening`): a node never expanded is a leaf and is expanded. A node that has
children but wants more (n(s) above its child count) is widened only when the child not yet
sampled wins PUCT against the existing ones ("puct": no visits, its parent's Q, prior 1/(k+1));
"first" widens before descending, whatever the children's values (the old rule).
A tree under its token budget with nothing left to expand reopens its root (reopen_root).
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from mcts.branching import branching_bounds, importance, num_children
from mcts.merge import match_candidates, text_similarity
from mcts.params import SearchParams, Widening, validate_params
from mcts.schedule import Ask, BatchedExpander, Expander, TreeRun, drive
from mcts.selection import (
    SelectChildFn,
    priors_from_logprobs,
    puct_child_score,
    puct_select_child,
    puct_widen_score,
)
from mcts.tree import ROOT_INDEX, Tree
from mcts.types import (
    EvalRequest,
    EvaluateFn,
    ExpandFn,
    ExpandRequest,
    LeafEval,
    Option,
    SimilarityFn,
    TerminalRewardFn,
)


@dataclass
class _Leaf:
    """One selection in one tree this round."""

    tree: Tree
    node: int  # the node to expand, or the terminal node to revisit
    num_new: int  # children to request; 0 = revisit a terminal node
    kept: list[Option] = field(default_factory=list)  # options that survived the merge
    kept_draws: list[int] = field(default_factory=list)  # per kept option: 1 + its duplicates
    new_children: list[int] = field(default_factory=list)


def search(
    prompts: list[str],
    expand_fn: ExpandFn,
    evaluate_fn: EvaluateFn,
    params: SearchParams,
    terminal_reward_fn: TerminalRewardFn | None = None,
    similarity_fn: SimilarityFn | None = None,
    on_round: Callable[[int], None] | None = None,
    *,
    select_child_fn: SelectChildFn = puct_select_child,
    expander: Expander | None = None,
) -> list[Tree]:
    """Search one tree per prompt; returns the trees in prompt order.

    terminal_reward_fn=None (evaluation time): terminal nodes are scored by evaluate_fn like
    any leaf. similarity_fn=None: difflib ratio on whitespace-normalised text.
    on_round(n): called after each tree's round with the simulations completed in it.
    expander: where expansions go (mcts/schedule.py); None: one expand_fn call for what every
    waiting tree asks, rounds in lock-step.
    """
    validate_params(params)
    similarity = similarity_fn or text_similarity
    trees = [Tree(prompt, i) for i, prompt in enumerate(prompts)]
    start = time.perf_counter()
    verified = terminal_reward_fn is not None
    runs = [_tree_search(tree, params, select_child_fn, similarity, verified, start, on_round)
            for tree in trees]
    drive(runs, expander or BatchedExpander(expand_fn), evaluate_fn, terminal_reward_fn)
    return trees


def _tree_search(tree: Tree, params: SearchParams, select_child_fn: SelectChildFn,
                 similarity: SimilarityFn, verified: bool, start: float,
                 on_round: Callable[[int], None] | None) -> TreeRun:
    """One tree's rounds until it is done; yields its requests (mcts/schedule.py).

    With params.evaluate_root the root is evaluated once, first (every tree's root in one
    call), so that v(root) exists for I(root); its value is not backed up. Without, I(root)
    reads the mean of the root's children's values."""
    if params.evaluate_root:
        yield from _evaluate(tree, [ROOT_INDEX], verified, params.seed)
    while True:
        round_start = (tree.stats.total_tokens, tree.stats.simulations)
        leaves = _select_leaves(tree, params, select_child_fn)
        yield from _expand(leaves, similarity, params)
        yield from _evaluate(tree, [c for leaf in leaves for c in leaf.new_children], verified,
                             params.seed)
        for leaf in leaves:
            _backup_leaf(leaf)
        for leaf in leaves:
            _add_virtual_loss(tree, leaf.node, -1)
            _update_branching(leaf, params)
            tree.stats.simulations += 1
        if on_round is not None:
            on_round(len(leaves))
        if _finish_if_done(tree, params, start, round_start):
            return


# --- select ---


def _select_leaves(tree: Tree, params: SearchParams, select_child_fn: SelectChildFn) -> list[_Leaf]:
    remaining = params.simulations - tree.stats.simulations
    leaves: list[_Leaf] = []
    expanding: set[int] = set()
    for _ in range(min(params.leaves_per_tree, remaining)):
        leaf = _select_leaf(tree, params, select_child_fn, expanding)
        if leaf is None:
            break
        _add_virtual_loss(tree, leaf.node, +1)
        if leaf.num_new:
            expanding.add(leaf.node)
        leaves.append(leaf)
    return leaves


def _select_leaf(
    tree: Tree, params: SearchParams, select_child_fn: SelectChildFn, expanding: set[int]
) -> _Leaf | None:
    """Descend by the selection rule until a terminal node or a node that wants children.
    None when the descent ends at a childless node already being expanded this round."""
    node = ROOT_INDEX
    while True:
        if tree.terminal[node]:
            return _Leaf(tree, node, 0)
        if node not in expanding and tree.wants_children(node) and _widen(tree, node, params):
            return _Leaf(tree, node, _children_to_request(tree, node, params))
        if not tree.children[node]:
            return None
        node = select_child_fn(tree, node, params.c_puct, params.virtual_loss)


def _widen(tree: Tree, node: int, params: SearchParams) -> bool:
    """Should a node that wants children get them now, rather than descend to a child?"""
    if not tree.children[node] or params.widening == Widening.first:
        return True
    best_child = max(puct_child_score(tree, node, c, params.c_puct, params.virtual_loss)
                     for c in tree.children[node])
    return puct_widen_score(tree, node, params.c_puct, params.virtual_loss) > best_child


def _children_to_request(tree: Tree, node: int, params: SearchParams) -> int:
    if tree.expand_target[node] == 0:  # first expansion starts at the lower bound
        lo, _ = branching_bounds(tree.depth[node], params.c_min, params.c_max,
                                 params.root_c_min, params.root_c_max)
        return lo
    return tree.expand_target[node] - len(tree.children[node])


def _add_virtual_loss(tree: Tree, node: int, sign: int) -> None:
    for n in tree.path(node):
        tree.pending[n] += sign


# --- expand and merge ---


def _expand(leaves: list[_Leaf], similarity: SimilarityFn, params: SearchParams) -> TreeRun:
    """One expansion for the leaves, then one per merge-retry round for the duplicates."""
    wanted = [(leaf, leaf.num_new) for leaf in leaves if leaf.num_new > 0]
    attempt = 0
    while wanted:
        requests = [_expand_request(leaf, n, attempt, params.seed) for leaf, n in wanted]
        results = yield Ask.expand, requests
        retry = []
        for (leaf, n), options in zip(wanted, results, strict=True):
            duplicates = _merge_options(leaf, list(options)[:n], similarity, params.merge_threshold)
            if duplicates and attempt < params.merge_retries:
                retry.append((leaf, duplicates))
        wanted, attempt = retry, attempt + 1
    for leaf in leaves:
        if leaf.num_new > 0:
            _add_children(leaf, params.max_depth)


def _expand_request(leaf: _Leaf, num_options: int, attempt: int, seed: int) -> ExpandRequest:
    tree, node = leaf.tree, leaf.node
    tree.expand_requests[node] += 1
    return ExpandRequest(
        tree_index=tree.tree_index,
        node_id=node,
        prompt=tree.prompt,
        steps=tree.steps(node),
        num_options=num_options,
        attempt=attempt,
        seed=derive_seed(seed, tree.tree_index, node, tree.expand_requests[node]),
    )


def _merge_options(leaf: _Leaf, options: list[Option], similarity: SimilarityFn, threshold: float) -> int:
    """Keep the options unlike every sibling; count the rest as merges, and as one more draw of
    the sibling each duplicates. Returns the duplicates."""
    tree, node = leaf.tree, leaf.node
    tree.stats.tokens_generated += sum(o.num_tokens for o in options if not o.reused)  # duplicates' too
    tree.stats.evaluator_tokens += sum(o.rollout_tokens for o in options)  # fused rollouts, theirs too
    tree.stats.reused += sum(o.reused for o in options)
    options = [o for o in options if o.text.strip()]  # a blank option is no step: dropped, counted
    children = tree.children[node]
    siblings = [tree.text[c] for c in children] + [o.text for o in leaf.kept]
    duplicates = 0
    for option, match in zip(options, match_candidates([o.text for o in options], siblings,
                                                       similarity, threshold), strict=True):
        if match is None:
            leaf.kept.append(option)
            leaf.kept_draws.append(1)
        elif match < len(children):
            tree.draws[children[match]] += 1
            duplicates += 1
        else:
            leaf.kept_draws[match - len(children)] += 1
            duplicates += 1
    tree.merges[node] += duplicates
    tree.stats.merges += duplicates
    return duplicates


def _add_children(leaf: _Leaf, max_depth: int) -> None:
    tree, node = leaf.tree, leaf.node
    for option, draws in zip(leaf.kept, leaf.kept_draws, strict=True):
        terminal = option.terminal or tree.depth[node] + 1 >= max_depth
        child = tree.add_node(node, option.text, option.num_tokens, option.logprob,
                              terminal or option.dead_end)
        tree.draws[child] = draws
        tree.dead_end[child] = option.dead_end
        leaf.new_children.append(child)
    siblings = tree.children[node]
    priors = priors_from_logprobs([tree.logprob[c] for c in siblings], [tree.num_tokens[c] for c in siblings])
    for child, prior in zip(siblings, priors, strict=True):
        tree.prior[child] = prior
    if not siblings:
        tree.terminal[node] = True  # dead end: the policy offered nothing to continue with
    elif not leaf.new_children:
        tree.expand_target[node] = len(siblings)  # resampling finds only duplicates: stop asking


# --- evaluate ---


def _evaluate(tree: Tree, new_nodes: list[int], verified: bool, seed: int) -> TreeRun:
    """One evaluation for the critics' nodes, one verifier call for the verifier's."""
    by_verifier = [n for n in new_nodes if verified and tree.terminal[n]]
    by_critics = [n for n in new_nodes if not verified or not tree.terminal[n]]
    if by_critics:
        evals = yield Ask.evaluate, [_eval_request(tree, n, seed) for n in by_critics]
        for node, leaf_eval in zip(by_critics, evals, strict=True):
            _record_eval(tree, node, leaf_eval)
    if by_verifier:
        rewards = yield Ask.reward, [_eval_request(tree, n, seed) for n in by_verifier]
        for node, reward in zip(by_verifier, rewards, strict=True):
            tree.total[node] = tree.terminal_reward[node] = _finite("terminal reward", reward)


def _eval_request(tree: Tree, node: int, seed: int) -> EvalRequest:
    path = tree.path(node)
    return EvalRequest(
        tree_index=tree.tree_index,
        node_id=node,
        prompt=tree.prompt,
        steps=tree.steps(node),
        terminal=tree.terminal[node],
        seed=derive_seed(seed, tree.tree_index, node, 0),
        logprob=sum(tree.logprob[n] for n in path),
        num_tokens=sum(tree.num_tokens[n] for n in path),
    )


def _record_eval(tree: Tree, node: int, leaf_eval: LeafEval) -> None:
    tree.total[node] = _finite("LeafEval.total", leaf_eval.total)
    tree.value[node] = leaf_eval.value
    tree.prm[node] = leaf_eval.prm
    tree.orm[node] = leaf_eval.orm
    tree.rollout[node] = leaf_eval.rollout
    tree.stats.evaluator_tokens += leaf_eval.tokens


def _finite(name: str, x: float) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


# --- backup and branching ---


def _backup_leaf(leaf: _Leaf) -> None:
    """One simulation = one visit along root..leaf.node.

    Expansion: each new child gets its own first visit (its value, on itself only); the path
    gets one visit valued by the MEAN of the new children. Not the max: the max of k noisy
    critic values grows with k, so a node would look better for having more children (the
    breadth bias this rule removes); the mean is the node's value if its next step is drawn
    from the children as sampled. No child survived (dead end, or only duplicates): the node's
    own value. A revisited terminal node backs up its stored value again.
    """
    tree, node = leaf.tree, leaf.node
    for child in leaf.new_children:
        tree.backup(child, tree.total[child], path=False)
    if leaf.new_children:
        values = [tree.total[c] for c in leaf.new_children]
        tree.backup(node, sum(values) / len(values))
    elif tree.total[node] is not None or tree.children[node]:
        tree.backup(node, tree.node_value(node))


def _update_branching(leaf: _Leaf, params: SearchParams) -> None:
    """n(s) from the disagreement of the node's children; above the child count -> expand again."""
    if not leaf.new_children:
        return
    tree, node = leaf.tree, leaf.node
    lo, hi = branching_bounds(tree.depth[node], params.c_min, params.c_max,
                              params.root_c_min, params.root_c_max)
    spread = importance(tree.node_value(node), [tree.total[c] for c in tree.children[node]])
    replaced = min(sum(tree.dead_end[c] for c in tree.children[node]), params.dead_end_retries)
    tree.expand_target[node] = num_children(spread, params.alpha, lo, hi) + replaced


def _finish_if_done(tree: Tree, params: SearchParams, start: float,
                    round_start: tuple[int, int]) -> bool:
    if tree.stats.simulations >= params.simulations:
        reason = "simulations"
    elif params.token_budget and _budget_spent(tree, params, round_start):
        reason = "token_budget"
    elif not tree.has_expandable() and not _reopen_root(tree, params):
        reason = "exhausted"
    else:
        return False
    tree.stats.stop_reason = reason
    tree.stats.seconds = time.perf_counter() - start
    return True


def _reopen_root(tree: Tree, params: SearchParams) -> bool:
    """A tree with nothing to expand asks its root for one more child, if it has a budget (called
    only once `_budget_spent` said budget is left). PUCT still decides when the root widens; the
    simulations cap ends a tree whose root never does."""
    if not (params.reopen_root and params.token_budget) or tree.terminal[ROOT_INDEX]:
        return False
    tree.expand_target[ROOT_INDEX] = len(tree.children[ROOT_INDEX]) + 1
    tree.stats.reopens += 1
    return True


def _budget_spent(tree: Tree, params: SearchParams, round_start: tuple[int, int]) -> bool:
    """Stop before a round that would, at the last round's tokens per simulation, end further
    from the budget than the tree is now: a tree spends the budget to within about half a round
    either side, and about the budget on average. (Stopping only once the budget is reached
    overshoots by up to a whole round: about 10% of best-of-8's tokens at evaluation.) The
    root's round, the first, is no guide to later ones (more children, full-length rollouts),
    so after it the tree goes on while under budget. round_start: (tokens, simulations) before
    the round that just ended."""
    spent, simulations = tree.stats.total_tokens, tree.stats.simulations
    if spent >= params.token_budget:
        return True
    tokens_before, simulations_before = round_start
    if simulations_before == 0:
        return False
    per_simulation = (spent - tokens_before) / max(simulations - simulations_before, 1)
    next_round = min(params.leaves_per_tree, params.simulations - simulations)
    return spent + per_simulation * next_round / 2 >= params.token_budget


def derive_seed(seed: int, tree_index: int, node: int, counter: int) -> int:
    """A stable 32-bit seed per request (Python's hash() of str is salted per process)."""
    return zlib.crc32(f"{seed}:{tree_index}:{node}:{counter}".encode())
