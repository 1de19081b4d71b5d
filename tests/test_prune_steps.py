"""search.prune_steps: at training, a line the task's verifier rejects ends its row, a dead end.

The chain_steps check itself (`leaves_steps`) on hand-written and computed working; where a row
with its own check stops, replayed token by token over the per-character and SmolLM2's real
tokenizer; what training search and the sampler make of it, with a stand-in task whose verifier
rejects some characters (a random model writes no sums); that evaluation never prunes; and the
one-line refusals."""

from __future__ import annotations

import functools
import random

import pytest
import torch
from test_search_stage import SpyTask, cfg, models, problems_  # noqa: F401 (fixtures)
from tiny import tiny_tokenizer

from mcts.options import is_answer_line, newline
from mcts.types import ExpandRequest
from pipeline.compose import compose_config
from pipeline.config import SearchAlgorithm
from pipeline.decoding.tree_search import LeafScorer, eval_search, train_search
from pipeline.errors import ConfigError, QstarError
from pipeline.lm.generation import newline_token_ids
from pipeline.lm.stopping import Rule, replay
from pipeline.tasks.chain_steps import follows_steps, leaves_steps, partial_sums, worked_solution
from pipeline.tasks.prompt import render_prompts
from pipeline.validation import validate

EXPRESSION = "12 + 34 - 5 + 7"  # partial sums 46, 41, 48
LINES = newline(32)


@pytest.mark.parametrize("working", ["", "12 + 34 = 46\n", "12 + 34 = 46\n46 - 5 = 41\n",
                                     "First, 12 + 34 = 46 apples\nthen 41\n",  # no "=": unread
                                     "12 + 34 = 46\n46 - 5 = 41\n41 + 7 = 48\nAnswer: 48",
                                     "12 + 34 = 46\nAnswer: 99"])  # the answer is the verifier's
def test_working_on_the_partial_sums_is_on_track(working):
    assert not leaves_steps(EXPRESSION, working)


@pytest.mark.parametrize("working", ["12 + 34 = 47\n", "12 + 34 - 5 = 41\n",  # a sum skipped
                                     "12 + 34 = 46\n46 - 5 = 42\n", "12 + 34 = \n",
                                     "12 + 34 = 46\n46 - 5 = 41\n41 + 7 = 48\n48 + 0 = 48\n"])
def test_a_line_off_the_partial_sums_leaves_them(working):
    assert leaves_steps(EXPRESSION, working)


def test_every_line_prefix_of_a_worked_solution_is_on_track_and_one_changed_result_is_not():
    rng = random.Random(0)
    for _ in range(200):
        terms = [str(rng.randint(0, 99)) for _ in range(rng.randint(3, 5))]
        expression = " ".join(x for pair in zip([""] + [rng.choice("+-") for _ in terms[1:]], terms)
                              for x in pair if x)
        lines = worked_solution(expression).splitlines(keepends=True)
        for k in range(len(lines) + 1):
            assert not leaves_steps(expression, "".join(lines[:k]))
        k = rng.randrange(len(partial_sums(expression)))
        wrong = lines[k].rsplit("=", 1)[0] + f"= {partial_sums(expression)[k] + 1}\n"
        assert leaves_steps(expression, "".join(lines[:k] + [wrong]))
        assert not follows_steps(expression, "".join(lines[:k] + [wrong] + lines[k + 1:]))


@pytest.fixture(params=["per_character", "smollm2"])
def tokenizer(request):
    return tiny_tokenizer() if request.param == "per_character" else request.getfixturevalue(
        "smollm2_tokenizer")


def ended(tokenizer, steps: str, text: str, stop=LINES, rollout_tokens: int = 40):
    """The Generation a row at `steps` writing `text` then EOS ends as, with its own check."""
    rule = Rule(tokenizer, torch.tensor([tokenizer.eos_token_id]), stop, newline_token_ids(tokenizer),
                32 if stop is not None else 200, rollout_tokens, is_answer_line, 0.8, None)
    tokens = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return replay(rule, tokens, [-0.5] * len(tokens),
                  check=lambda written: leaves_steps(EXPRESSION, steps + written))


def test_an_option_off_the_sums_ends_its_row_at_the_boundary(tokenizer):
    for sep in ("\n", "\n\n"):  # "\n\n" is one SmolLM2 token
        g = ended(tokenizer, f"12 + 34 = 46{sep}", f"46 - 5 = 40{sep}40 + 7 = 47{sep}Answer: 47")
        assert g.wrong and g.stopped and g.rollout == "" and g.text.strip() == "46 - 5 = 40"


def test_a_rollout_stops_at_its_first_line_off_the_sums(tokenizer):
    for sep in ("\n", "\n\n"):
        g = ended(tokenizer, "", f"12 + 34 = 46{sep}46 - 5 = 41{sep}41 + 7 = 49{sep}Answer: 49")
        assert not g.wrong and g.rollout_wrong and not g.rollout_finished
        assert g.rollout.strip() == f"46 - 5 = 41{sep}41 + 7 = 49"
        right = ended(tokenizer, "", f"12 + 34 = 46{sep}46 - 5 = 41{sep}41 + 7 = 48{sep}Answer: 48")
        assert not (right.wrong or right.rollout_wrong) and right.rollout_finished


def test_a_whole_sample_stops_at_its_first_line_off_the_sums(tokenizer):
    g = ended(tokenizer, "", "12 + 34 = 46\n46 - 5 = 31\n31 + 7 = 38\nAnswer: 38", stop=None,
              rollout_tokens=0)
    assert g.wrong and not g.finished and g.text.rstrip("\n") == "12 + 34 = 46\n46 - 5 = 31"


FLAGGED = set("aeo")  # the stand-in verifier rejects working with these (a random model writes no sums)


def flagged(text: str) -> bool:
    return bool(FLAGGED & set(text))


class PruningSpy(SpyTask):
    checks_working = True

    def off_track(self, problem, working):
        return flagged(working)


@pytest.fixture
def pruning(cfg):  # noqa: F811
    cfg.search.prune_steps = True
    cfg.search.check_equations = False
    cfg.search.simulations = 8
    cfg.search.rollout.max_new_tokens = 48
    return cfg


def searched(cfg, models, search=train_search):  # noqa: F811
    problems = problems_(4)
    prompts = render_prompts(models.tokenizer, [p.question for p in problems])
    if search is eval_search:
        return eval_search(prompts, cfg, models)
    return train_search(problems, PruningSpy(problems), prompts, cfg, models)


def path_text(tree, node: int) -> str:
    return "".join(tree.text[k] for k in tree.path(node)[1:])


@pytest.mark.parametrize("stream", [False, True])
def test_training_search_marks_options_off_track_as_dead_ends(pruning, models, stream):  # noqa: F811
    """A node whose working the verifier rejects is a dead end worth 0; every other node's
    working passed (the check read each of its lines); a rollout stops at its first rejected
    line and its outcome parts are 0."""
    pruning.search.stream = stream
    trees, scorer = searched(pruning, models)
    nodes = [(t, n) for t in trees for n in range(1, t.num_nodes)]
    dead = [(t, n) for t, n in nodes if t.dead_end[n]]
    assert dead and all(t.terminal[n] and t.total[n] == 0.0 for t, n in dead)
    assert all(flagged(path_text(t, n)) for t, n in dead)
    assert all(not flagged(path_text(t, n)) for t, n in nodes if not t.dead_end[n])
    failed = [(trees[i], n, ro) for (i, n), ro in scorer.rollouts.items() if ro.wrong]
    assert failed and all(t.orm[n] == 0.0 == t.rollout[n] for t, n, _ in failed)
    assert all(flagged(path_text(t, n) + ro.text) for t, n, ro in failed)


def test_without_prune_steps_nothing_is_pruned(pruning, models):  # noqa: F811
    pruning.search.prune_steps = False
    trees, scorer = searched(pruning, models)
    assert scorer.off_track is None
    assert not any(t.dead_end[n] for t in trees for n in range(1, t.num_nodes))
    assert any(flagged(t.text[n]) for t in trees for n in range(1, t.num_nodes))


def test_evaluation_search_never_prunes(pruning, models):  # noqa: F811
    trees, scorer = searched(pruning, models, eval_search)
    assert scorer.off_track is None
    assert not any(t.dead_end[n] for t in trees for n in range(1, t.num_nodes))


def test_the_sampler_stops_a_sample_at_its_first_rejected_line(pruning, models):  # noqa: F811
    pruning.search.algorithm = SearchAlgorithm.sample
    trees, _ = searched(pruning, models)
    stopped = 0
    for t in trees:
        for n in t.children[0]:
            lines = t.text[n].splitlines(keepends=True)
            assert not flagged("".join(lines[:-1]))  # only the last line may be rejected
            if flagged(t.text[n]) and t.text[n].endswith("\n"):  # a rejected line, ended
                stopped += 1
                assert t.terminal_reward[n] == 0.0
    assert stopped


def test_prune_steps_needs_a_verifier_that_reads_the_working(pruning, models, debug_overrides):  # noqa: F811
    problems = problems_(2)
    prompts = render_prompts(models.tokenizer, [p.question for p in problems])
    with pytest.raises(QstarError, match="search.prune_steps=true is invalid: task spy"):
        train_search(problems, SpyTask(problems), prompts, pruning, models)
    pruning.task.verify_steps = False
    with pytest.raises(ConfigError, match="search.prune_steps=True is invalid: needs a verifier"):
        validate(pruning)
    pruning.task.verify_steps = True
    assert validate(pruning) is pruning


def test_the_row_checks_are_one_per_row_with_the_nodes_steps(pruning, models):  # noqa: F811
    calls = []
    scorer = LeafScorer(pruning, models, reward_fn=None, off_track=lambda i, w: calls.append((i, w)))
    requests = [ExpandRequest(tree_index=3, node_id=1, prompt="P", steps=["a\n", "b\n"],
                              num_options=2, seed=0)]
    checks = scorer.row_checks(requests)
    assert len(checks) == 2 and all(isinstance(c, functools.partial) for c in checks)
    checks[1]("c")
    assert calls == [(3, "a\nb\nc")]


def test_the_pruned_preset_prunes_with_a_narrower_tree_and_is_refused_where_nothing_prunes():
    """`search=pruned`: pruning on, fewer children than the default at every node and no
    resampled duplicates; on a task whose verifier does not read the working, one line."""
    default, pruned = (compose_config(["experiment=demo_cpu", *x]).search
                       for x in ([], ["search=pruned"]))
    assert pruned.prune_steps and not default.prune_steps
    assert pruned.c_max < default.c_max and pruned.root_c_max < default.root_c_max
    assert pruned.c_min <= pruned.c_max and pruned.root_c_min <= pruned.root_c_max
    assert pruned.merge_retries == 0 < default.merge_retries
    assert pruned.simulations == default.simulations  # the demo's budget, only the shape changes
    with pytest.raises(ConfigError, match="search.prune_steps=True is invalid"):
        validate(compose_config(["experiment=demo_cpu", "search=pruned", "task=arithmetic"]))
