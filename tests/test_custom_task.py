"""task=custom: the protocol, the example countdown task, and every bad task refused in one line."""

from __future__ import annotations

import pytest
from test_bad_input import cli, the_error_line

from examples.countdown import Countdown, evaluate
from pipeline.compose import compose_config
from pipeline.config import TaskConfig, TaskKind
from pipeline.errors import ConfigError, QstarError
from pipeline.loop import run_loop
from pipeline.run.atomic import read_jsonl
from pipeline.run.store import STAGES, RunStore
from pipeline.tasks import make_task
from pipeline.tasks.custom import CustomTask

COUNTDOWN = "examples.countdown:Countdown"


def custom(target: str, **kw) -> TaskConfig:
    return TaskConfig(kind=TaskKind.custom, target=target, num_train=6, num_dev=2, num_test=2, **kw)


# ---------------------------------------------------------------- the example task


def test_countdown_loads_with_seeded_disjoint_splits():
    task = make_task(custom(COUNTDOWN, params={"count": 30}))
    assert isinstance(task, CustomTask) and task.name == "countdown"
    train, dev, test = (task.split(s) for s in ("train", "dev", "test"))
    heldout = dev + test
    assert (len(train), len(dev), len(test)) == (6, 2, 2)
    assert not {p.question for p in train} & {p.question for p in heldout}
    assert not {p.question for p in dev} & {p.question for p in test}
    again = make_task(custom(COUNTDOWN, params={"count": 30}))
    assert [p.id for p in again.split("train")] == [p.id for p in train]
    other_seed = make_task(custom(COUNTDOWN, params={"count": 30}, seed=1))
    assert [p.id for p in other_seed.split("train")] != [p.id for p in train]
    for p in train + heldout:  # every gold expression solves its own puzzle
        value, used = evaluate(p.answer)
        assert value == p.entry["target"] and sorted(used) == p.entry["numbers"]


def test_countdown_checker_is_exact_not_a_string_match():
    puzzle = {"numbers": [2, 3, 4], "target": 20}
    game = Countdown(count=1)
    assert game.grade(puzzle, "(2 + 3) * 4") == 1.0
    assert game.grade(puzzle, "4 * (3 + 2)") == 1.0  # another order, another expression
    assert game.grade(puzzle, "4*(2+3)") == 1.0
    assert game.grade(puzzle, "(2 + 3) * 4 * 1") == 0.0  # a number that was not given
    assert game.grade(puzzle, "5 * 4") == 0.0  # uses a number that was not given, skips two
    assert game.grade(puzzle, "(2 + 2) * 4 + 3") == 0.0  # 2 twice
    assert game.grade(puzzle, "2 + 3 + 4") == 0.0  # all numbers, wrong value
    assert game.grade(puzzle, "(2 / (3 - 3)) * 4") == 0.0  # division by zero
    assert game.grade(puzzle, "__import__('os')") == 0.0  # not arithmetic: never evaluated
    assert game.grade(puzzle, "2 ** 3 + 4 * 3") == 0.0  # powers are not allowed
    assert game.grade({"numbers": [3, 4, 6], "target": 2}, "6 / 4 * (3 - 4) + 3.5") == 0.0
    assert game.grade({"numbers": [2, 3, 8], "target": 12}, "8 / 2 * 3") == 1.0


@pytest.mark.parametrize("completion, expected", [
    ("2 + 3 = 5\n5 * 4 = 20\nAnswer: (2 + 3) * 4", "(2 + 3) * 4"),
    ("Answer: (2 + 3) * 4 = 20", "(2 + 3) * 4"),
    ("**Answer:** `4 * 5`.", "4 * 5"),
    ("Answer: 1 + 1\nAnswer: 2 * 10", "2 * 10"),
    ("The answer is 20", None),
    ("Answer:", None),
])
def test_countdown_extracts_the_last_answer_line(completion, expected):
    assert Countdown(count=1).extract_answer(completion) == expected


def test_countdown_prompt_in_smollm2_chat_template():
    """The task's own messages, rendered by SmolLM2's real tokenizer, end open for the
    assistant, carry the task's system prompt instead of qstar's, and round-trip as text."""
    from pipeline.config import ModelConfig
    from pipeline.lm.models import load_tokenizer, resolve_model_path
    from pipeline.tasks.prompt import SYSTEM_PROMPT, task_prompts

    cfg = ModelConfig()
    tokenizer = load_tokenizer(cfg, resolve_model_path(cfg))
    task = make_task(custom(COUNTDOWN))
    problems = task.split("train")[:2]
    prompts = task_prompts(tokenizer, task, problems)
    for p, prompt in zip(problems, prompts):
        assert "Solve the countdown puzzle" in prompt and SYSTEM_PROMPT not in prompt
        assert p.question in prompt and prompt.endswith("<|im_start|>assistant\n")
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == prompt


def test_partial_credit_is_a_reward_but_not_a_solve():
    task = make_task(custom("custom_tasks:Echo"))
    p = task.split("train")[0]
    assert task.score(p, p.answer) == 1.0 and task.is_correct(p, p.answer)
    wrong = "x" * len(p.answer)
    assert task.score(p, wrong) == 0.5 and not task.is_correct(p, wrong)
    assert task.messages(p) == [{"role": "user", "content": f"Repeat the number. {p.question}"}]


# ---------------------------------------------------------------- bad tasks: one line, exit 2


BAD_TASKS = [
    ("no_such_module_qstar:Task", "task.target='no_such_module_qstar:Task': cannot import it: "
                                  "ModuleNotFoundError: No module named 'no_such_module_qstar'"),
    ("custom_tasks:NoSuchClass", "task.target='custom_tasks:NoSuchClass': cannot import it: "
                                 "AttributeError"),
    ("custom_tasks.Echo", "task.target='custom_tasks.Echo' is invalid: expected "
                          "package.module:ClassName"),
    ("custom_tasks:NoGrade", "task.target='custom_tasks:NoGrade' has no method 'grade' (a task "
                             "needs: problems, prompt, extract_answer, grade)"),
    ("custom_tasks:DuplicateIds", "problem id 'a' appears twice (problems 2 and 5); ids must be "
                                  "unique"),
    ("custom_tasks:MissingId", "problem 3 has no id"),
    ("custom_tasks:TextGrade", "returned 'correct': expected a number in [0, 1]"),
    ("custom_tasks:TooBigGrade", "returned 2.0: expected a number in [0, 1]"),
    ("custom_tasks:NanGrade", "returned nan: expected a number in [0, 1]"),
    ("custom_tasks:GoldIsWrong", "its own gold answer"),
    ("custom_tasks:EverythingIsRight", "an empty answer must grade below 1.0"),
    ("custom_tasks:CrashingGrade", "grade() raised ZeroDivisionError: float division by zero"),
    ("custom_tasks:BadPrompt", "prompt(problem"),
    ("custom_tasks:BadConstructor", "failed: RuntimeError: needs a data file"),
]


@pytest.mark.parametrize("target, needle", BAD_TASKS, ids=[t for t, _ in BAD_TASKS])
def test_bad_task_is_refused_in_one_line(target, needle, debug_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, err = cli(["run", *debug_overrides, "task=custom", f"task.target={target}",
                        f"hydra.run.dir={run}"], capsys)
    line = the_error_line(rc, out, err)
    assert needle in line, line
    assert not run.exists()


def test_missing_target_is_a_config_error():
    with pytest.raises(ConfigError, match=r"task.target=None is invalid: task=custom needs "
                                          r"task.target=package.module:ClassName"):
        compose_config(["task=custom"])


def test_too_few_problems_names_the_target():
    with pytest.raises(QstarError, match=r"requested but task.target='custom_tasks:Echo' has "
                                         r"only 5 distinct questions"):
        make_task(custom("custom_tasks:Echo", params={"count": 5}))


# ---------------------------------------------------------------- the loop end to end


def test_loop_runs_end_to_end_on_the_countdown_task(debug_overrides, tmp_path):
    overrides = debug_overrides + ["task=custom", f"task.target={COUNTDOWN}",
                                   "+task.params.count=40", "train.learning_rate=1e-3"]
    cfg = compose_config(overrides)
    assert cfg.task.params == {"count": 40}
    store = run_loop(cfg, tmp_path / "run")
    assert sorted(store.manifest["stages"]) == sorted(
        ["iter_000/baseline"] + [f"iter_000/{s}" for s in STAGES])
    trees = read_jsonl(tmp_path / "run/iter_000/search/shard_0000.jsonl")
    assert len(trees) == 4 and all("Solve the countdown puzzle" in t["prompt"] for t in trees)
    assert all(t["problem_id"].startswith("countdown-0-") for t in trees)
    evaluation = RunStore(tmp_path / "run").metrics(0, "eval")["decodes"]["greedy"]
    assert evaluation["total"] == 4 and 0.0 <= evaluation["accuracy"] <= 1.0


def test_a_module_in_the_working_directory_is_importable(tmp_path, monkeypatch):
    """As with `python -m`: `qstar run` from the folder holding the task's module finds it,
    though the `qstar` console script does not put the working directory on sys.path."""
    import sys

    from pipeline.tasks.custom import load_target

    (tmp_path / "my_task_qstar_test.py").write_text("class Mine:\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_target("my_task_qstar_test:Mine").__name__ == "Mine"
