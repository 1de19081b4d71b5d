import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from mcts import ExpandRequest, LeafEval, Option, SearchParams, Tree, search
from mcts.fake import FakeCritic, FakePolicy, FakeVerifier

GOLDEN = Path(__file__).parent / "golden"
PROMPTS = ["What is 12 + 30?", "What is 7 * 6?", "Solve x + 5 = 9."]

GOLDEN_CASES = {
    "search_training": dict(params=SearchParams(simulations=12, seed=7), verifier=True),
    "search_evaluation": dict(params=SearchParams(simulations=10, token_budget=150, max_depth=4,
                                                  leaves_per_tree=3, seed=1), verifier=False),
}


def _run(params, verifier=True, prompts=PROMPTS):
    policy, critic, reward = FakePolicy(params.seed), FakeCritic(params.seed), FakeVerifier()
    rounds = []
    trees = search(prompts, policy, critic, params, terminal_reward_fn=reward if verifier else None,
                   on_round=rounds.append)
    return trees, policy, critic, reward, rounds


def _comparable(trees):
    """to_json of every tree, through JSON text, with wall time zeroed."""
    out = json.loads(json.dumps([t.to_json() for t in trees]))
    for tree in out:
        tree["stats"]["seconds"] = 0.0
    return out


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_trees(name):
    case = GOLDEN_CASES[name]
    got = _comparable(_run(case["params"], case["verifier"])[0])
    path = GOLDEN / f"{name}.json"
    if os.environ.get("QSTAR_REGEN_GOLDEN") == "1":
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(path.read_text())


def test_deterministic_for_a_seed_and_seed_matters():
    params = SearchParams(simulations=10, seed=3)
    first = _comparable(_run(params)[0])
    assert first == _comparable(_run(params)[0])
    assert first != _comparable(_run(SearchParams(simulations=10, seed=4))[0])


def test_each_tree_expands_once_per_round_plus_retries_and_trees_share_calls():
    params = SearchParams(simulations=12, merge_retries=2)
    policy, critic = FakePolicy(), FakeCritic()
    marks = {}  # tree -> the attempt of its requests, call by call
    trees = search(PROMPTS, policy, critic, params)
    for tree in trees:
        attempts = [{r.attempt for r in call if r.tree_index == tree.tree_index}
                    for call in policy.calls]
        attempts = [a for a in attempts if a]
        assert all(len(a) == 1 for a in attempts)  # a tree's requests in one call: one attempt
        sequence = [a.pop() for a in attempts]
        assert sequence[0] == 0
        for before, now in zip(sequence, sequence[1:]):
            assert now in (0, before + 1) and now <= params.merge_retries  # round, then retries
        evaluations = sum(any(r.tree_index == tree.tree_index for r in call) for call in critic.calls)
        assert evaluations == 1 + sequence.count(0)  # the root's, then one per round
        marks[tree.tree_index] = sequence
    assert any(n > 0 for sequence in marks.values() for n in sequence)  # retries happened
    # what every waiting tree asks goes in one call: the first holds every tree, and a tree's
    # merge retry shares a call with another tree's next round
    assert {r.tree_index for r in policy.calls[0]} == {0, 1, 2}
    assert any(len({r.attempt for r in call}) > 1 for call in policy.calls)
    assert max(len({r.tree_index for r in call}) for call in critic.calls) >= 2


def test_virtual_loss_spreads_one_trees_leaves_in_a_round():
    def round_two_nodes(virtual_loss):
        policy = FakePolicy()
        search(PROMPTS[:1], policy, FakeCritic(),
               SearchParams(simulations=3, leaves_per_tree=2, virtual_loss=virtual_loss, merge_retries=0))
        return [r.node_id for r in policy.calls[1]]

    nodes = round_two_nodes(1.0)
    assert len(nodes) == 2 and nodes[0] != nodes[1]
    # without virtual loss the second descent repeats the first and finds it already in flight
    assert len(round_two_nodes(0.0)) == 1


def test_simulation_budget_is_respected():
    trees, policy, _, _, rounds = _run(SearchParams(simulations=9, leaves_per_tree=2))
    for tree in trees:
        assert tree.stats.simulations <= 9
        assert tree.stats.stop_reason in ("simulations", "exhausted")
        if tree.stats.stop_reason == "simulations":
            assert tree.stats.simulations == 9
    assert sum(rounds) == sum(t.stats.simulations for t in trees)
    assert rounds[:len(PROMPTS)] == [1] * len(PROMPTS)  # each tree's round 1 selects its root alone
    assert all(1 <= n <= 2 for n in rounds)


def test_token_budget_stops_each_tree_between_rounds():
    budget = 80
    spent: dict[int, int] = {}
    policy, critic = FakePolicy(), FakeCritic()

    def expand(requests):
        if requests[0].attempt == 0:  # a round begins: every asking tree must be under budget
            assert all(spent.get(r.tree_index, 0) < budget for r in requests)
        out = policy(requests)
        for r, options in zip(requests, out, strict=True):
            spent[r.tree_index] = spent.get(r.tree_index, 0) + sum(o.num_tokens for o in options)
        return out

    def evaluate(requests):
        out = critic(requests)
        for r, e in zip(requests, out, strict=True):
            spent[r.tree_index] = spent.get(r.tree_index, 0) + e.tokens
        return out

    trees = search(PROMPTS, expand, evaluate, SearchParams(simulations=1000, token_budget=budget))
    for tree in trees:
        assert tree.stats.total_tokens == spent[tree.tree_index]
        assert tree.stats.stop_reason in ("token_budget", "exhausted")
        if tree.stats.stop_reason == "token_budget":  # short of it only after a non-root round
            assert tree.stats.total_tokens >= budget or tree.stats.simulations > 1


@pytest.mark.parametrize("budget, spent", [(108, 100), (112, 120), (100, 100), (1, 20)])
def test_token_budget_ends_nearest_to_the_budget(budget, spent):
    """Every simulation costs 20 tokens (2 distinct options of 10, no rollout tokens), one per
    round: the tree stops at the multiple of 20 nearest the budget, not the first one at or above
    it (108 -> 100, where stopping once reached spends 120)."""
    def expand(requests):
        return [[Option(f"s{len(r.steps)}.{r.node_id}.{i}\n", -1.0, 10, False)
                 for i in range(r.num_options)] for r in requests]

    def evaluate(requests):
        return [LeafEval(total=0.5) for _ in requests]

    params = SearchParams(simulations=1000, token_budget=budget, leaves_per_tree=1, c_min=2,
                          c_max=2, root_c_min=2, root_c_max=2, max_depth=50, merge_threshold=2.0)
    (tree,) = search(["p"], expand, evaluate, params)
    assert tree.stats.stop_reason == "token_budget"
    assert tree.stats.total_tokens == spent


def test_evaluation_time_never_needs_a_reward_and_scores_terminals_by_critics():
    trees, _, critic, reward, _ = _run(SearchParams(simulations=16), verifier=False)
    assert reward.calls == []
    terminal_requests = [r for call in critic.calls for r in call if r.terminal]
    assert terminal_requests
    for tree in trees:
        assert all(r is None for r in tree.terminal_reward)
        for node in range(tree.num_nodes):
            if tree.terminal[node]:
                assert tree.total[node] is not None


def test_training_terminals_go_to_the_verifier_only():
    trees, _, critic, reward, _ = _run(SearchParams(simulations=16), verifier=True)
    assert not [r for call in critic.calls for r in call if r.terminal]
    assert reward.calls
    for tree in trees:
        for node in range(1, tree.num_nodes):
            if tree.terminal[node]:
                assert tree.terminal_reward[node] in (0.0, 1.0)
                assert tree.total[node] == tree.terminal_reward[node]
            else:
                assert tree.terminal_reward[node] is None


def test_requests_carry_the_path_and_no_answer_key():
    trees, policy, critic, _, _ = _run(SearchParams(simulations=6))
    for call in policy.calls:
        for r in call:
            assert isinstance(r, ExpandRequest)
            assert r.steps == trees[r.tree_index].steps(r.node_id)
            assert r.prompt == PROMPTS[r.tree_index]
    # each root is evaluated once, first, all in one call
    assert [(r.tree_index, r.node_id, r.steps) for r in critic.calls[0]] == \
        [(i, 0, []) for i in range(len(PROMPTS))]
    assert all(r.node_id != 0 for call in critic.calls[1:] for r in call)


def _expansions(policy, tree_index):
    """node id -> simulations that expanded it (first samplings; merge resamples excluded)."""
    counts = {}
    for call in policy.calls:
        for r in call:
            if r.tree_index == tree_index and r.attempt == 0:
                counts[r.node_id] = counts.get(r.node_id, 0) + 1
    return counts


@pytest.mark.parametrize("widening", ["puct", "first"])
@pytest.mark.parametrize("verifier", [True, False])
def test_one_simulation_is_one_visit_along_its_path(widening, verifier):
    params = SearchParams(simulations=14, seed=5, widening=widening)
    trees, policy, _, _, _ = _run(params, verifier)
    for tree in trees:
        assert tree.visits[0] == tree.stats.simulations  # the root: one visit per simulation
        expanded = _expansions(policy, tree.tree_index)
        for node in range(tree.num_nodes):
            # visits = own first visit + simulations ending here + those passing to a child
            first = 0 if node == 0 else 1
            passing = sum(tree.visits[c] - 1 for c in tree.children[node])
            own = tree.visits[node] - first - passing
            if tree.terminal[node]:
                assert own >= 0  # revisits of a terminal node
            else:
                assert own == expanded.get(node, 0)
            assert tree.visits[node] >= first
        assert all(p == 0 for p in tree.pending)  # virtual loss undone


def test_an_expansion_backs_up_one_visit_valued_by_the_mean_of_its_children():
    values = {1: 0.2, 2: 0.9, 3: 0.4}

    def critic(requests):
        return [LeafEval(total=values.get(r.node_id, 0.5)) for r in requests]

    def policy(requests):
        return [[Option(f"s{i}\n", -1.0, 2, False) for i in range(r.num_options)] for r in requests]

    tree = search(["p"], policy, critic, SearchParams(simulations=1, merge_threshold=2.0))[0]
    assert len(tree.children[0]) == 3  # root_c_min children, one simulation
    assert tree.visits[0] == 1 and tree.value_sum[0] == pytest.approx(0.5)  # mean(0.2, 0.9, 0.4)
    assert [tree.visits[c] for c in tree.children[0]] == [1, 1, 1]
    assert [tree.value_sum[c] for c in tree.children[0]] == [0.2, 0.9, 0.4]


def test_depth_cap_makes_nodes_terminal():
    def never_ending(requests):
        return [[Option(f"step {r.node_id} {i} {'x' * i}\n", -1.0, 3, False) for i in range(r.num_options)]
                for r in requests]

    tree = search(["p"], never_ending, FakeCritic(), SearchParams(simulations=50, max_depth=2))[0]
    assert max(tree.depth) == 2
    assert all(tree.terminal[n] for n in range(tree.num_nodes) if tree.depth[n] == 2)
    assert tree.stats.stop_reason in ("exhausted", "simulations")


def test_small_tree_is_exhausted():
    def one_answer(requests):
        return [[Option("Answer: 1\n", -0.1, 3, True)] for _ in requests]

    tree = search(["p"], one_answer, lambda rs: [LeafEval(0.3) for _ in rs],
                  SearchParams(simulations=10, root_c_min=1, root_c_max=1))[0]
    assert tree.num_nodes == 2
    assert tree.stats.stop_reason == "exhausted"


def test_empty_expansion_marks_a_dead_end():
    critic, verifier = FakeCritic(), FakeVerifier()
    tree = search(["p"], lambda rs: [[] for _ in rs], critic, SearchParams(simulations=5),
                  terminal_reward_fn=verifier)[0]
    assert tree.num_nodes == 1
    # the root was evaluated before its expansion (every root is, first); nothing after it
    assert [[r.node_id for r in call] for call in critic.calls] == [[0]] and verifier.calls == []
    assert tree.terminal[0]
    assert tree.stats.stop_reason == "exhausted"


@pytest.mark.parametrize("retries", [0, 1, 2, 5])
def test_dead_end_children_are_replaced_up_to_dead_end_retries(retries):
    """The root's first sampling holds two rejected steps (Option.dead_end) and one live one;
    each dead end stays a terminal child, and up to `retries` of them are resampled, so they do
    not take a live option's place in n(s). Every later option answers (terminal)."""
    first = []

    def expand(requests):
        out = []
        for r in requests:
            dead = r.node_id == 0 and not first
            first.append(r.node_id)
            out.append([Option(f"{r.seed}/{i}\n", -1.0, 2, True, dead_end=dead and i < 2)
                        for i in range(r.num_options)])
        return out

    params = SearchParams(simulations=20, root_c_min=3, root_c_max=3, alpha=0.0)
    (tree,) = search(["p"], expand, FakeCritic(), replace(params, dead_end_retries=retries))
    children = tree.children[0]
    assert sum(tree.dead_end[c] for c in children) == 2
    assert all(tree.terminal[c] for c in children)
    assert len(children) == 3 + min(retries, 2)  # n(s) = 3 live options, at most 2 replaced
    assert tree.expand_target[0] == len(children)
    assert tree.stats.stop_reason == "exhausted"
    again = Tree.from_json(json.loads(json.dumps(tree.to_json())))
    assert again.dead_end == tree.dead_end


def test_callback_contract_errors():
    with pytest.raises(ValueError, match="expand_fn returned"):
        search(["p"], lambda rs: [], FakeCritic(), SearchParams())
    with pytest.raises(ValueError, match="evaluate_fn returned"):
        search(["p"], FakePolicy(), lambda rs: [], SearchParams())
    with pytest.raises(ValueError, match="finite"):
        search(["p"], FakePolicy(), lambda rs: [LeafEval(float("nan")) for _ in rs], SearchParams())
    with pytest.raises(ValueError, match="simulations"):
        search(["p"], FakePolicy(), FakeCritic(), SearchParams(simulations=0))


def test_no_prompts_no_calls():
    assert search([], FakePolicy(), FakeCritic(), SearchParams()) == []


def test_dropped_options_and_their_fused_rollouts_count_in_the_budget():
    """An option the merge drops, or a blank one (no step), still cost the tokens its row
    decoded, its fused rollout's too; only the kept option becomes a child."""
    def expand(requests):
        return [[Option("a\n", -1.0, 3, False, rollout_tokens=5),
                 Option("a\n", -1.0, 3, False, rollout_tokens=7),  # a duplicate of the first
                 Option(" \n", -1.0, 2, False, rollout_tokens=4)]  # blank
                for _ in requests]

    def evaluate(requests):
        return [LeafEval(total=0.5, tokens=0) for _ in requests]  # fused: counted at expansion

    params = SearchParams(simulations=1, root_c_min=3, root_c_max=3, merge_retries=0)
    (tree,) = search(["p"], expand, evaluate, params)
    assert [tree.text[c] for c in tree.children[0]] == ["a\n"]
    assert tree.stats.merges == 1 and tree.draws[tree.children[0][0]] == 2
    assert tree.stats.tokens_generated == 3 + 3 + 2
    assert tree.stats.evaluator_tokens == 5 + 7 + 4
    assert tree.stats.total_tokens == 24


@pytest.mark.parametrize("reopen_root,budget", [(False, 60), (True, 0), (True, 60)])
def test_a_tree_under_its_budget_reopens_its_root_rather_than_stop_exhausted(reopen_root, budget):
    """Every option answers, so the root's first 3 children leave nothing to expand. With
    reopen_root and a token budget the root is asked for one more child at a time until the
    budget (or the simulations) runs out; without either, the tree stops `exhausted`."""
    def expand(requests):
        return [[Option(f"{r.seed}/{i}\n", -1.0, 4, True) for i in range(r.num_options)]
                for r in requests]

    params = SearchParams(simulations=200, root_c_min=3, root_c_max=3, alpha=0.0,
                          token_budget=budget, reopen_root=reopen_root)
    (tree,) = search(["p"], expand, FakeCritic(), params)
    children = tree.children[0]
    assert len(children) == 3 + tree.stats.reopens
    if reopen_root and budget:
        assert tree.stats.stop_reason == "token_budget"
        assert tree.stats.reopens >= 5  # 12 tokens before the first reopening, 4 per reopening
        assert budget - 8 <= tree.stats.total_tokens <= budget + 8
    else:
        assert (tree.stats.stop_reason, tree.stats.reopens) == ("exhausted", 0)
