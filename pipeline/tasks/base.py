"""The Task interface and the Problem record every task produces."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import TaskConfig
from pipeline.errors import QstarError, first_line
from pipeline.tasks.answers import extract_answer
from pipeline.tasks.prompt import to_messages


@dataclass(frozen=True)
class Problem:
    id: str  # stable and unique within a task
    question: str
    answer: str  # gold answer; never shown to the model
    entry: dict  # what the grader needs (the reasoning-gym entry, the full GSM8K solution)


class Task:
    name: str
    _train: list[Problem]  # set by each subclass's __init__
    _heldout: list[Problem]

    def splits(self) -> tuple[list[Problem], list[Problem]]:
        """(train, heldout): deterministic for the config's seed, no question in both."""
        return list(self._train), list(self._heldout)

    def messages(self, problem: Problem) -> list[dict]:
        """The chat messages that ask the policy this problem (qstar's step-by-step prompt)."""
        return to_messages(problem.question)

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


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {first_line(e)}"


def _too_few(available: int, cfg: TaskConfig, where: str) -> QstarError:
    need = cfg.num_train + cfg.num_heldout
    return QstarError(
        f"task.num_train={cfg.num_train} + task.num_heldout={cfg.num_heldout} = {need} problems "
        f"requested but {where} has only {available} distinct questions"
    )
