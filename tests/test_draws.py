"""Tree.draws (how often the policy sampled each option, its merged duplicates included) and
search.best_path=draws, the answer distribution the tree estimates from them."""

import json
import zlib
from types import SimpleNamespace

import pytest

from mcts import Option, SearchParams, Tree, search
from mcts.fake import FakeCritic
from mcts.merge import match_candidates, text_similarity
from pipeline.decoding import mcts as dm
from pipeline.decoding.tree_search import Rollout
from pipeline.tasks.answers import extract_answer
from pipeline.tasks.equations import false_equation


def extract(text):
    return text.rsplit("Answer: ", 1)[1].strip() if "Answer: " in text else None


def test_match_candidates_names_what_each_duplicate_repeats():
    # "b" repeats the sibling "b"; the second "c" repeats the first new "c" (index 3 = after
    # the three siblings); "7 + 1 = 9" differs from the sibling "7 + 1 = 8" in a number: kept
    found = match_candidates(["c\n", "b\n", "c\n", "7 + 1 = 9\n"], ["a\n", "b\n", "7 + 1 = 8\n"],
                             text_similarity, 0.9)
    assert found == [None, 1, 3, None]
    assert match_candidates(["7 + 1 = 9"], ["7 + 1 = 8"], text_similarity, 0.5) == [None]


class Skewed:
    """A policy that samples "a" three times in four and "b" once, then answers 1 (after "a") or
    2 (after "b"), or, one time in three, the other answer: many duplicates, known shares."""

    def __call__(self, requests):
        return [[self.option(r, i) for i in range(r.num_options)] for r in requests]

    def option(self, request, i):
        h = zlib.crc32(f"{request.seed}/{request.steps}/{i}".encode())
        if not request.steps:
            text = "a\n" if h % 4 else "b\n"
        else:
            right = "1" if request.steps[0] == "a\n" else "2"
            text = f"Answer: {right if h % 3 else {'1': '2', '2': '1'}[right]}\n"
        return Option(text, logprob=-1.0, num_tokens=2, terminal=text.startswith("Answer"))


def test_draws_count_every_sampled_option_and_survive_json():
    params = SearchParams(simulations=12, root_c_min=4, root_c_max=5, c_min=2, c_max=3,
                          merge_retries=2, seed=5)
    trees = search(["P1", "P2", "P3"], Skewed(), FakeCritic(), params)
    duplicates = 0
    for tree in trees:
        for node in range(tree.num_nodes):
            kids = tree.children[node]
            if kids:  # every option sampled here is one child's draw: kept or merged into it
                assert sum(tree.draws[c] for c in kids) == len(kids) + tree.merges[node]
            duplicates += tree.merges[node]
        assert tree.draws[0] == 1
        back = Tree.from_json(json.loads(json.dumps(tree.to_json())))
        assert back.draws == tree.draws
    assert duplicates > 0 and max(max(t.draws) for t in trees) > 1  # the case is exercised
    old = trees[0].to_json()
    for row in old["nodes"]:
        del row["draws"]  # a tree written before draws were counted
    assert Tree.from_json(old).draws == [1] * trees[0].num_nodes


def skewed_tree():
    """Root options "a" (sampled 3 times) and "b" (once). Under "a" one solution answers 1; under
    "b" two answer 2 (a terminal child and b's own finished rollout). One vote per solution picks
    2; the policy's own odds are 3 : 1 for 1."""
    tree = Tree("P:")
    a = tree.add_node(0, "a\n", 2, -1.0, terminal=False)
    b = tree.add_node(0, "b\n", 2, -1.0, terminal=False)
    tree.add_node(a, "Answer: 1\n", 3, -1.0, terminal=True)
    tree.add_node(b, "Answer: 2\n", 3, -1.0, terminal=True)
    tree.draws[a] = 3
    rollouts = {(0, b): Rollout("Answer: 2\n", 3, -0.1, finished=True),
                (0, a): Rollout("Answer: 5", 3, -0.1, finished=False)}  # cut short: no answer
    return tree, SimpleNamespace(rollouts=rollouts, step_check=None)


def test_answer_shares_weigh_each_branch_by_its_draws():
    tree, scorer = skewed_tree()
    shares, solution = dm.answer_shares(tree, scorer, extract)
    assert shares == pytest.approx({"1": 0.75, "2": 0.25})
    assert solution == {"1": "a\nAnswer: 1\n", "2": "b\nAnswer: 2\n"}
    assert dm.draws_completion(tree, scorer, extract) == "a\nAnswer: 1\n"
    assert dm.vote_completion(tree, scorer, extract, by_visits=False) == "b\nAnswer: 2\n"
    # a node mixes its own finished rollout (one draw) with its children (their draws):
    # b = rollout 2 (1) + "Answer: 2" (1) + "Answer: 3" sampled twice = {2: 1/2, 3: 1/2}
    c = tree.add_node(2, "Answer: 3\n", 3, -1.0, terminal=True)
    tree.draws[c] = 2
    shares, _ = dm.answer_shares(tree, scorer, extract)
    assert shares == pytest.approx({"1": 0.75, "2": 0.125, "3": 0.125})
    # no answer anywhere: the most-visited path, as the other rules do
    assert dm.draws_completion(tree, scorer, lambda text: None) == dm.completion_of(tree, scorer)


def test_dead_ends_and_flagged_rollouts_give_no_answer_to_any_vote():
    """A node the step check stopped ends at a false equality, not an answer; the task's
    extractor would still read its last number (8), so without the check it outvotes 7."""
    tree = Tree("P:")
    a = tree.add_node(0, "3 + 4 = 7\n", 5, -1.0, terminal=False)
    tree.add_node(a, "Answer: 7\n", 3, -1.0, terminal=True)
    for _ in range(2):  # two dead ends, both "answering" 8 by their last number
        tree.add_node(0, "3 + 4 = 8\n", 5, -1.0, terminal=True)
    b = tree.add_node(0, "3 + 5 = 8\n", 5, -1.0, terminal=False)
    # a rollout that reached EOS at a line the check flagged
    rollouts = {(0, b): Rollout("8 + 1 = 8", 5, -0.1, finished=True, wrong=True)}
    flagged = SimpleNamespace(rollouts=rollouts, step_check=false_equation)
    unchecked = SimpleNamespace(rollouts=rollouts, step_check=None)
    assert [extract_answer(t) for t, _ in dm.tree_solutions(tree, unchecked)] == ["7", "8", "8"]
    rollouts[(0, b)].wrong = False  # the same rollout, unflagged, is a solution
    answers = [extract_answer(t) for t, _ in dm.tree_solutions(tree, unchecked)]
    assert answers == ["7", "8", "8", "8"]
    rollouts[(0, b)].wrong = True
    assert dm.tree_solutions(tree, flagged) == [("3 + 4 = 7\nAnswer: 7\n", 0)]
    assert dm.vote_completion(tree, unchecked, extract_answer, by_visits=False) == "3 + 4 = 8\n"
    right = "3 + 4 = 7\nAnswer: 7\n"
    assert dm.vote_completion(tree, flagged, extract_answer, by_visits=False) == right
    shares, _ = dm.answer_shares(tree, flagged, extract_answer)
    assert shares == {"7": 1.0}
    assert dm.answer_shares(tree, unchecked, extract_answer)[0]["8"] > 0.5


def test_decode_mcts_grades_draws_beside_the_other_rules(monkeypatch):
    from pipeline.compose import compose_config

    tree, scorer = skewed_tree()
    monkeypatch.setattr(dm, "eval_search", lambda prompts, cfg, models, desc: ([tree], scorer))
    cfg = compose_config(["debug=default", "search.best_path=draws"])
    out = dm.decode_mcts(cfg, None, None, ["P:"], None, None, extract)
    assert out.completions == ["a\nAnswer: 1\n"] and out.extra["best_path"] == "draws"
    assert out.alternatives["majority"] == ["b\nAnswer: 2\n"]


def test_eval_rows_say_what_each_tree_spent_and_why_it_stopped(monkeypatch):
    from pipeline.compose import compose_config

    tree = Tree("P:")
    a = tree.add_node(0, "3 + 4 = 7\n", 5, -1.0, terminal=False)
    tree.add_node(a, "Answer: 7\n", 3, -1.0, terminal=True)
    tree.add_node(0, "3 + 4 = 8\n", 5, -1.0, terminal=True)  # a dead end
    tree.stats.stop_reason, tree.stats.tokens_generated, tree.stats.evaluator_tokens = \
        "exhausted", 13, 20
    tree.stats.simulations, tree.stats.reopens = 3, 1
    other = Tree("Q:")
    other.stats.stop_reason = "token_budget"
    scorer = SimpleNamespace(rollouts={}, step_check=false_equation)
    monkeypatch.setattr(dm, "eval_search",
                        lambda prompts, cfg, models, desc: ([tree, other], scorer))
    out = dm.decode_mcts(compose_config(["debug=default"]), None, None, ["P:", "Q:"], None, None,
                         extract_answer)
    assert out.extra["stop_reasons"] == {"exhausted": 1, "token_budget": 1}
    assert out.row_extra[0]["search"] == {"stop_reason": "exhausted", "tokens": 33,
                                          "simulations": 3, "nodes": 4, "reopens": 1,
                                          "dead_ends": 1}
    assert out.tokens == 33


def test_inspect_shows_how_often_an_option_was_sampled():
    from pipeline.report.inspect import tree_html, tree_text

    tree, _ = skewed_tree()
    row = {"problem_id": "p", "question": "q", "tree": tree.to_json()}
    text = tree_text(row).splitlines()  # a title line, then the root, then node 1 ("a")
    assert text[2].endswith("x3  a")  # sampled three times
    assert " x" not in "".join(text[:2] + text[3:])  # the others once: no mark
    assert "x3" in tree_html(row)
    for node in row["tree"]["nodes"]:
        del node["draws"]  # a tree written before draws were counted
    assert " x" not in tree_text(row)
