"""search.check_equations: a line stating a false equality ends its row (pipeline/tasks/equations.py).

The check itself on hand-written lines; where a row stops under it, replayed token by token over
the per-character and SmolLM2's real tokenizer; and what the search makes of flagged options,
rollouts and samples (with a stand-in check that flags some characters, since a random model
writes no equalities)."""

from __future__ import annotations

import pytest
import torch
from test_search_stage import (  # noqa: F401 (cfg and models are fixtures)
    SpyTask,
    cfg,
    decoded_rows,
    models,
    problems_,
    rule,
    tokens_of,
)
from tiny import tiny_tokenizer

from mcts.options import is_answer_line, newline
from pipeline.config import SearchAlgorithm
from pipeline.decoding import tree_search
from pipeline.decoding.tree_search import eval_search, train_search
from pipeline.lm.generation import newline_token_ids
from pipeline.lm.stopping import Rule, replay
from pipeline.tasks.equations import false_equation
from pipeline.tasks.prompt import render_prompts

LINES = newline(32)
FALSE = ["8 - 8 = 8", "-6 + 2 = -3", "1 + (1) = 1", "9 - 9 - 3 + 2 = 21", "3 x 4 = 13",
         "7 / 3 = 2.4", "The total is 12 + 34 = 47 apples", "2 + 3 * 4 = 20",
         "5 - 4 = 1\n1 - 7 = -5", "So 12 + 3 = 16 apples.", "(1/2 + 1/4) = 1",
         "8 - 0 - 1 - 4 = -1 + 9 = -2", "Now, 1 + 5 = 15", "2 + 2 = 4, 4 + 4 = 9", "+2 + 1 = 2"]
TRUE_OR_UNREAD = ["8 - 8 = 0", "-6 + 2 = -4", "5 - 4 = 1\n1 - 7 = -6\n-6 + 2 = -4", "Answer: 4",
                  "x + 2 = 5", "6x - 2 = 4", "12 / 5 = 2.4", "7 / 3 = 2.33", "3 × 4 = 12",
                  "1,000 + 2 = 1,002", "(2 + 3) * 4 = 20", "10 - -3 = 13", "3/0 = 1", "5 = 5",
                  "50% of 10 = 5", "", "x^2 + 3 = 12", "x ^ 2 + 3 = 12", "1/2 + 1/4 = 3/4",
                  "10 + 5 = 16%", "a = 2 + 3 = 6 - 1", "So 12 + 3 = 15 apples.", "v1.2 + 3 = 9",
                  "1 + 2 + 3 = 6, 6 - 8 = -2", "50% of 10 + 2 = 7", "8 - 0 - 1 - 4 = 3 = 1 + 2",
                  " + ".join(["1"] * 3000) + " = 2",  # too deep to evaluate: unread, no crash
                  "2 ** 3 = 9"]


@pytest.mark.parametrize("text", FALSE)
def test_a_false_equality_is_flagged(text):
    assert false_equation(text)


@pytest.mark.parametrize("text", TRUE_OR_UNREAD)
def test_a_true_or_unreadable_line_is_not(text):
    assert not false_equation(text)


@pytest.fixture(params=["per_character", "smollm2"])
def tokenizer(request):
    return tiny_tokenizer() if request.param == "per_character" else request.getfixturevalue(
        "smollm2_tokenizer")


def ended(tokenizer, text: str, stop=LINES, rollout_tokens: int = 40, wrong=false_equation,
          eos: bool = False):
    """The Generation a row writing `text` (then EOS) ends as, under the step check."""
    rule_ = Rule(tokenizer, torch.tensor([tokenizer.eos_token_id]), stop, newline_token_ids(tokenizer),
                 32 if stop is not None else 200, rollout_tokens, is_answer_line, 0.8, wrong)
    tokens = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id] * eos
    return replay(rule_, tokens, [-0.5] * len(tokens))


def test_a_flagged_option_ends_its_row_at_the_boundary(tokenizer):
    for sep in ("\n", "\n\n"):  # "\n\n" is one SmolLM2 token
        g = ended(tokenizer, f"2 + 2 = 5{sep}5 + 3 = 8{sep}Answer: 8")
        assert g.wrong and not g.rollout_wrong and g.stopped
        assert g.text.strip() == "2 + 2 = 5" and g.rollout == "" and not g.rollout_ids


def test_a_flagged_rollout_line_ends_the_rollout_there(tokenizer):
    for sep in ("\n", "\n\n"):
        g = ended(tokenizer, f"2 + 2 = 4{sep}4 + 1 = 5{sep}5 + 1 = 7{sep}Answer: 7")
        assert not g.wrong and g.rollout_wrong and not g.rollout_finished
        assert g.text.strip() == "2 + 2 = 4" and g.rollout.strip() == f"4 + 1 = 5{sep}5 + 1 = 7"
    at_eos = ended(tokenizer, "2 + 2 = 4\n4 + 1 = 6", eos=True)  # the last line, ended by EOS
    assert at_eos.rollout_wrong and at_eos.rollout_finished
    option_at_eos = ended(tokenizer, "2 + 2 = 5", eos=True)
    assert option_at_eos.wrong and option_at_eos.finished


def test_a_whole_sample_stops_at_its_first_flagged_line(tokenizer):
    g = ended(tokenizer, "1 + 1 = 2\n2 + 2 = 5\n5 + 1 = 6\nAnswer: 6", stop=None, rollout_tokens=0)
    assert g.wrong and not g.finished and g.text.rstrip("\n") == "1 + 1 = 2\n2 + 2 = 5"


def test_rows_the_check_does_not_flag_end_as_without_it(tokenizer):
    text = "2 + 2 = 4\n4 + 1 = 5\n\n5 + 1 = 6\nAnswer: 6"
    for stop, rollout in ((LINES, 40), (None, 0)):
        with_check = ended(tokenizer, text, stop, rollout, eos=True)
        without = ended(tokenizer, text, stop, rollout, wrong=None, eos=True)
        assert with_check == without and not (with_check.wrong or with_check.rollout_wrong)


FLAGGED = set("aeo")  # the stand-in check: a random model writes no equalities


def flagged(text: str) -> bool:
    return bool(FLAGGED & set(text))


def lines_of(text: str) -> list[str]:
    return text.splitlines(keepends=True)


@pytest.fixture
def stand_in(monkeypatch, cfg):  # noqa: F811
    monkeypatch.setattr(tree_search, "false_equation", flagged)
    cfg.search.check_equations = True
    cfg.search.simulations = 8
    cfg.search.rollout.max_new_tokens = 48
    return cfg


@pytest.mark.parametrize("stream", [False, True])
def test_a_flagged_option_is_a_dead_end_and_a_flagged_rollout_fails(stand_in, models, monkeypatch,  # noqa: F811
                                                                    stream):
    """Training search: a flagged option is a terminal node worth 0 whatever the verifier would
    say, and no rollout is decoded after it; a flagged rollout stops at its flagged line and
    its outcome parts (ORM, verifier) are 0; the budget still counts every decoded token."""
    decoded = decoded_rows(monkeypatch)
    stand_in.search.stream = stream
    problems = problems_(4)
    prompts = render_prompts(models.tokenizer, [p.question for p in problems])
    trees, scorer = train_search(problems, SpyTask(problems), prompts, stand_in, models)
    assert sum(t.stats.total_tokens for t in trees) == tokens_of(decoded)
    cap = stand_in.search.max_option_tokens
    assert all(g.rollout_tokens < cap and not g.rollout_finished for g in decoded if g.wrong)
    dead = [(t, n) for t in trees for n in range(1, t.num_nodes) if flagged(t.text[n])]
    assert dead and all(t.terminal[n] and t.total[n] == 0.0 == t.terminal_reward[n] for t, n in dead)
    assert any(rule("".join(t.text[k] for k in t.path(n)[1:])) for t, n in dead)  # verifier: 1
    failed = 0
    for (index, node), ro in scorer.rollouts.items():
        tree, lines = trees[index], lines_of(ro.text)
        checked = lines if ro.finished else [x for x in lines if x.endswith("\n")]
        if ro.wrong:
            failed += 1
            assert flagged(lines[-1]) and not any(flagged(x) for x in lines[:-1])
            assert tree.orm[node] == 0.0 == tree.rollout[node]
        else:
            assert not any(flagged(x) for x in checked)
    assert failed


def test_at_evaluation_a_dead_end_is_worth_0_and_a_failed_rollout_has_no_outcome(stand_in, models):  # noqa: F811
    problems = problems_(4)
    prompts = render_prompts(models.tokenizer, [p.question for p in problems])
    trees, scorer = eval_search(prompts, stand_in, models)
    dead = [(t, n) for t in trees for n in range(1, t.num_nodes) if flagged(t.text[n])]
    assert dead and all(t.terminal[n] and t.total[n] == 0.0 for t, n in dead)
    # the search is told which children are dead ends (search.dead_end_retries replaces them)
    marked = [(t, n) for t in trees for n in range(1, t.num_nodes) if t.dead_end[n]]
    assert marked and all(flagged(t.text[n]) for t, n in marked)
    failed = [(trees[i], n) for (i, n), ro in scorer.rollouts.items() if ro.wrong]
    assert failed and all(t.orm[n] == 0.0 for t, n in failed)


def test_the_sampler_stops_a_sample_at_its_first_flagged_line(stand_in, models):  # noqa: F811
    stand_in.search.algorithm = SearchAlgorithm.sample
    problems = problems_(4)
    prompts = render_prompts(models.tokenizer, [p.question for p in problems])
    trees, _ = train_search(problems, SpyTask(problems), prompts, stand_in, models)
    samples = [(t, n) for t in trees for n in t.children[0]]
    stopped = 0
    for t, n in samples:
        lines = lines_of(t.text[n])
        assert not any(flagged(x) for x in lines[:-1])  # only the last line may be flagged
        if lines and lines[-1].endswith("\n") and flagged(lines[-1]):  # a finished line flagged
            stopped += 1
            assert t.terminal_reward[n] == 0.0
    assert stopped
