"""The Task interface, the Problem record every task produces, and the three splits.

Every task yields three disjoint splits, deterministic for `task.seed`:
- train: the problems the loop searches and trains on;
- dev: what every tuning choice and the loop's per-iteration eval read (`eval.split=dev`);
- test: read only when asked for by name (`eval.split=test`), once per benchmark run.
The test split is laid out first, so it stays the same when only num_train or num_dev change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pipeline.config import TaskConfig
from pipeline.errors import QstarError, first_line
from pipeline.tasks.answers import extract_answer

SPLITS = ("train", "dev", "test")

SYSTEM_PROMPT = (
    "Solve the problem step by step. Write short steps, one step per line. "
    "End with a final line of the form:\nAnswer: <value>"
)


@dataclass(frozen=True)
class Problem:
    id: str  # stable and unique within a task
    question: str
    answer: str  # gold answer; never shown to the model
    entry: dict  # what the grader needs (the reasoning-gym entry, the full GSM8K solution)


class Task:
    name: str
    _splits: dict[str, list[Problem]]  # set by each subclass's __init__ (see `_set_splits`)
    system_prompt: str = SYSTEM_PROMPT
    example: tuple[str, str] | None = None  # one worked (question, solution) shown before the question

    def split(self, name: str) -> list[Problem]:
        """The problems of one split: train, dev or test."""
        if name not in SPLITS:
            raise QstarError(f"split {name!r} is invalid: allowed: {', '.join(SPLITS)}")
        return list(self._splits[name])

    def _set_splits(self, train: list[Problem], dev: list[Problem], test: list[Problem]) -> None:
        self._splits = {"train": list(train), "dev": list(dev), "test": list(test)}

    def messages(self, problem: Problem) -> list[dict]:
        """The chat messages that ask the policy this problem: the task's system prompt, its
        worked example if any, then the question. Never the gold answer."""
        messages = [{"role": "system", "content": self.system_prompt}]
        if self.example is not None:
            messages += [{"role": "user", "content": self.example[0]},
                         {"role": "assistant", "content": self.example[1]}]
        return messages + [{"role": "user", "content": problem.question}]

    def extract_answer(self, completion: str) -> str | None:
        return extract_answer(completion)

    def grade(self, problem: Problem, answer: str) -> bool:
        """Whether an already extracted answer is correct."""
        raise NotImplementedError

    def is_correct(self, problem: Problem, completion: str) -> bool:
        answer = self.extract_answer(completion)
        return answer is not None and self.grade(problem, answer)

    def score(self, problem: Problem, completion: str) -> float:
        """A whole completion's reward in [0, 1], 1.0 = correct: the verifier's value of a
        terminal node and GRPO's reward. A custom task may give partial credit."""
        return 1.0 if self.is_correct(problem, completion) else 0.0

    def off_track(self, problem: Problem, working: str) -> bool:
        """The training verifier on a solution's working so far (text through a line's end):
        True once it can no longer score 1 whatever follows (search.prune_steps). The base task
        checks only whole solutions: never."""
        return False

    @property
    def checks_working(self) -> bool:
        """Whether `off_track` can ever be True (search.prune_steps has work to do)."""
        return False


def problems_digest(problems: list[Problem]) -> str:
    """A short hash of a split's problems (ids, questions, gold answers, in order): a run records
    it, so that resuming it on problems its task no longer makes is refused, not mixed in."""
    text = json.dumps([[p.id, p.question, p.answer] for p in problems], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {first_line(e)}"


def split_sizes(cfg: TaskConfig) -> int:
    return cfg.num_train + cfg.num_dev + cfg.num_test


def _too_few(available: int, cfg: TaskConfig, where: str) -> QstarError:
    return QstarError(
        f"task.num_train={cfg.num_train} + task.num_dev={cfg.num_dev} + "
        f"task.num_test={cfg.num_test} = {split_sizes(cfg)} problems requested but {where} has "
        f"only {available} distinct questions"
    )


def layout(ordered: list[Problem], cfg: TaskConfig) -> tuple[list, list, list]:
    """(train, dev, test) from one ordered pool laid out as [test | dev | train]."""
    t, d = cfg.num_test, cfg.num_dev
    return ordered[t + d : t + d + cfg.num_train], ordered[t : t + d], ordered[:t]
