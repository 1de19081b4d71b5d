"""search.check_answers: a whole solution whose answer line states a number other than the last
number of the line above it is flagged (pipeline/tasks/equations.unsupported_answer).

The check on hand-written solutions and on every worked solution of the default task; how
checked majority, the training verifier and the search treat what it flags (with a stand-in
check, since a random model writes no answer lines); and benchmarks/answer_check.py on a built
graded JSON."""

from __future__ import annotations

import json
import random

import pytest
from conftest import load_benchmark
from test_search_stage import (  # noqa: F401 (cfg and models are fixtures)
    SpyTask,
    cfg,
    models,
    problems_,
    rule,
)

from pipeline.compose import compose_config
from pipeline.config import SearchAlgorithm, SearchConfig, to_dict
from pipeline.decoding import tree_search
from pipeline.decoding.best_of_n import check_selection, checked_majority, sample_check
from pipeline.decoding.tree_search import eval_search, train_search
from pipeline.errors import QstarError
from pipeline.tasks import make_task
from pipeline.tasks.chain_steps import worked_solution
from pipeline.tasks.equations import unsupported_answer
from pipeline.tasks.prompt import render_prompts

UNSUPPORTED = ["Answer: 23", "12 + 34 = 46\nAnswer: 41", "Answer: 1,000", "3 - 8 = -5\nAnswer: 5",
               "The sum is 12.\nAnswer: 13", "12 + 34 = 46\n#### 47", "**Answer:** 7",
               "2 + 2 = 4\nAnswer: 4\n4 + 1 = 5\nAnswer: 6",  # the last answer line is judged
               "12 + 34 = 46\n46 - 5 = 41\nAnswer: 46"]  # written above, but not where it ended
SUPPORTED_OR_UNREAD = ["12 + 34 = 46\n46 - 5 = 41\nAnswer: 41", "3 - 8 = -5\nAnswer: -5",
                       "So 1000 total.\n#### 1,000", "The total is 41. Answer: 41",
                       "12 + 34 = 46\nAnswer: 46.\n", "x = 1/2\nAnswer: 1/2", "no answer line",
                       "Answer: x + 1", "Answer:", "2.5 + 1 = 3.5\nAnswer: 3.50", "",
                       "12 + 34 = 46\n**Answer:** 46", "12 + 34 = 46\n\nAnswer: 46"]


@pytest.mark.parametrize("text", UNSUPPORTED)
def test_an_answer_that_is_not_the_workings_last_number_is_flagged(text):
    assert unsupported_answer(text)


@pytest.mark.parametrize("text", SUPPORTED_OR_UNREAD)
def test_a_supported_or_unreadable_answer_is_not(text):
    assert not unsupported_answer(text)


def test_every_worked_solution_passes_and_its_bare_answer_does_not():
    """The default task's own solution format: the full working passes; the answer alone is
    flagged, and so is the answer of a chain whose last step was dropped unless that step left
    the partial result as it was (the property, on 200 chains)."""
    rng = random.Random(0)
    for _ in range(200):
        terms = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5))]
        expression = " ".join(x for t in terms for x in (rng.choice("+-"), t))[2:]
        lines = worked_solution(expression).splitlines()
        assert not unsupported_answer("\n".join(lines))
        assert unsupported_answer(lines[-1])
        answer, before = int(lines[-1].split()[-1]), int(lines[-3].split()[-1])
        assert unsupported_answer("\n".join([*lines[:-2], lines[-1]])) == (before != answer)


def test_sample_check_composes_the_checks_it_is_given():
    false_eq, bare = "2 + 2 = 5\nAnswer: 5", "Answer: 5"
    assert sample_check(SearchConfig(check_equations=False, check_answers=False)) is None
    only_eq = sample_check(SearchConfig(check_equations=True, check_answers=False))
    assert only_eq(false_eq) and not only_eq(bare)
    only_answers = sample_check(SearchConfig(check_equations=False, check_answers=True))
    assert only_answers(bare) and not only_answers(false_eq)  # "5" is written above its answer
    both = sample_check(SearchConfig(check_equations=True, check_answers=True))
    assert both(false_eq) and both(bare) and not both("2 + 3 = 5\nAnswer: 5")


def test_checked_majority_skips_answers_without_working():
    def extract(text):
        return text.rsplit("Answer: ", 1)[-1]

    candidates = ["Answer: 7"] * 3 + ["3 + 2 = 5\nAnswer: 5"] * 2
    both = sample_check(SearchConfig(check_equations=True, check_answers=True))
    assert extract(checked_majority(candidates, extract, both)) == "5"
    only_eq = sample_check(SearchConfig(check_equations=True, check_answers=False))
    assert extract(checked_majority(candidates, extract, only_eq)) == "7"


def test_checked_majority_with_both_checks_off_is_refused_in_one_line():
    d = compose_config(["decode=best_of_n", "decode.select=checked_majority"]).decode
    with pytest.raises(QstarError, match="search.check_equations=true or search.check_answers=true"):
        check_selection(d, False, False, False)
    check_selection(d, False, False, True)


def flags(text: str) -> bool:
    """The stand-in whole-solution check: two lengths in three are flagged, independently of
    the spy verifier's rule (even lengths are right)."""
    return len(text) % 3 != 0



@pytest.fixture
def stand_in(monkeypatch, cfg):  # noqa: F811
    calls = []

    def unsupported(text: str) -> bool:
        calls.append(text)
        return flags(text)

    monkeypatch.setattr(tree_search, "unsupported_answer", unsupported)
    cfg.search.check_equations = False
    cfg.search.check_answers = True
    cfg.search.simulations = 8
    cfg.search.rollout.max_new_tokens = 48
    return cfg, calls


def _solution(tree, node: int) -> str:
    return "".join(tree.text[k] for k in tree.path(node)[1:])


def test_training_search_makes_a_flagged_solution_a_dead_end_worth_0(stand_in, models):  # noqa: F811
    cfg_, _ = stand_in
    problems = problems_(4)
    prompts = render_prompts(models.tokenizer, [p.question for p in problems])
    trees, scorer = train_search(problems, SpyTask(problems), prompts, cfg_, models)
    terminals = [(t, n) for t in trees for n in range(1, t.num_nodes) if t.terminal[n]]
    flagged = [(t, n) for t, n in terminals if flags(_solution(t, n))]
    assert flagged and all(t.terminal_reward[n] == 0.0 == t.total[n] for t, n in flagged)
    # an option that ends a solution on its own is a dead end (resampled: dead_end_retries); one
    # at max_depth ends by depth, and only the stand-in flags a solution with no answer line
    ended = [(t, n) for t, n in flagged if t.depth[n] < cfg_.search.max_depth]
    assert ended and all(t.dead_end[n] for t, n in ended)
    assert any(rule(_solution(t, n)) for t, n in flagged)  # the verifier alone would say 1
    passed = [(t, n) for t, n in terminals if not flags(_solution(t, n))]
    assert passed and all(t.terminal_reward[n] == float(rule(_solution(t, n))) for t, n in passed)
    for (index, node), ro in scorer.rollouts.items():  # a flagged rollout has no outcome
        if flags(_solution(trees[index], node) + ro.text):
            assert trees[index].rollout[node] == 0.0


def test_evaluation_search_marks_flagged_solutions_dead_ends(stand_in, models):  # noqa: F811
    cfg_, _ = stand_in
    prompts = render_prompts(models.tokenizer, [p.question for p in problems_(4)])
    trees, scorer = eval_search(prompts, cfg_, models)
    terminals = [(t, n) for t in trees for n in range(1, t.num_nodes) if t.terminal[n]]
    assert any(flags(_solution(t, n)) for t, n in terminals)
    assert all(t.dead_end[n] == flags(_solution(t, n)) for t, n in terminals
               if t.depth[n] < cfg_.search.max_depth)
    assert all(t.total[n] == 0.0 for t, n in terminals if flags(_solution(t, n)))
    failed = [(trees[i], n) for (i, n), ro in scorer.rollouts.items()
              if flags(_solution(trees[i], n) + ro.text)]
    assert failed and all(t.orm[n] == 0.0 for t, n in failed)


def test_the_sampler_gives_a_flagged_sample_no_reward(stand_in, models):  # noqa: F811
    cfg_, _ = stand_in
    cfg_.search.algorithm = SearchAlgorithm.sample
    problems = problems_(4)
    prompts = render_prompts(models.tokenizer, [p.question for p in problems])
    trees, _ = train_search(problems, SpyTask(problems), prompts, cfg_, models)
    samples = [(t, n) for t in trees for n in t.children[0]]
    flagged = [(t, n) for t, n in samples if flags(t.text[n])]
    assert flagged and any(rule(t.text[n]) for t, n in flagged)
    assert all(t.terminal_reward[n] == (0.0 if flags(t.text[n]) else float(rule(t.text[n])))
               for t, n in samples)


def test_with_the_key_off_the_answer_check_is_never_asked(stand_in, models):  # noqa: F811
    cfg_, calls = stand_in
    cfg_.search.check_answers = False
    problems = problems_(2)
    prompts = render_prompts(models.tokenizer, [p.question for p in problems])
    train_search(problems, SpyTask(problems), prompts, cfg_, models)
    eval_search(prompts, cfg_, models)
    assert calls == []


def test_the_benchmark_rescores_a_graded_json_by_hand(tmp_path):
    """One problem: three bare wrong answers and two worked right ones. Majority and the step
    check pick the bare answer; the answer check picks the worked one."""
    bench = load_benchmark("answer_check")
    composed = compose_config([])
    task = make_task(composed.task)
    problem = task.split("test")[0]
    wrong = str(int(problem.answer) + 1)
    right = f"{problem.answer} + 0 = {problem.answer}\nAnswer: {problem.answer}"
    row = {"id": problem.id, "candidates": [f"Answer: {wrong}"] * 3 + [right] * 2,
           "correct_by_select": {"majority": False, "checked_majority": False}}
    graded = tmp_path / "p1_best_of_5.json"
    graded.write_text(json.dumps({"config": to_dict(composed) | {"eval": {"split": "test"}},
                                  "rows": [row]}))
    found = bench.main(["--set", "p1", str(graded), "--output", str(tmp_path / "out.json")])["p1"]
    assert (found["correct_majority"], found["correct_step"]) == (0, 0)
    assert found["correct_answers"] == found["correct_anywhere"] == 1
    assert found["flagged_answers"] == 3 and found["right_samples_flagged_answers"] == 0
    assert found["within_problem_auc_checked_vote_answers"]["auc"] == pytest.approx(1.0)
    assert found["within_problem_auc_checked_vote_step"]["auc"] == pytest.approx(0.0)
    assert found["answers_minus_step"]["answers_only"] == 1
    assert json.loads((tmp_path / "out.json").read_text())["p1"]["problems"] == 1
    row["correct_by_select"]["majority"] = True  # a grade the re-scoring does not reproduce
    graded.write_text(json.dumps({"config": to_dict(composed) | {"eval": {"split": "test"}},
                                  "rows": [row]}))
    with pytest.raises(SystemExit) as stop:
        bench.main(["--set", "p1", str(graded), "--output", str(tmp_path / "out.json")])
    assert stop.value.code == 2


def test_the_benchmark_refuses_a_missing_or_broken_file_in_one_line(tmp_path, capsys):
    bench = load_benchmark("answer_check")
    broken = tmp_path / "p1_best_of_8.json"
    broken.write_text('{"rows": [')  # a grade cut short
    for argv, said in (([str(tmp_path / "absent.json")], "absent.json: no such file"),
                       ([str(broken)], f"{broken} is not a JSON file")):
        with pytest.raises(SystemExit) as stop:
            bench.main(["--set", "p1", *argv, "--output", str(tmp_path / "out.json")])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.json").exists()
