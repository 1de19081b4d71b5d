"""task=custom: a user's own task class, loaded from `task.target=package.module:ClassName`.

The protocol (README, "Your own task"; examples/countdown.py is a complete one):

    class MyTask:
        name = "mytask"                      # optional; default: the class name
        def __init__(self, **params): ...    # task.params, as keyword arguments
        def problems(self) -> list[dict]:    # every problem: {"id", "question", "answer", ...}
        def prompt(self, problem: dict) -> list[dict] | str:   # chat messages, or the user turn
        def extract_answer(self, completion: str) -> str | None:
        def grade(self, problem: dict, answer: str) -> float:  # in [0, 1]; 1.0 = correct

`problems` returns every problem once: a unique `id` (str or int), the `question` text and the
gold `answer` (never shown to the model); any other keys stay in the dict that `prompt` and
`grade` receive. qstar splits them into train, dev and test by a hash of the question seeded by
`task.seed` (test first, so it stays put when only task.num_train or task.num_dev change). A problem is
solved when `grade` returns exactly 1.0; anything lower is partial credit, which GRPO and the
search's verifier use as the reward.

Loading validates, each failure one line naming the target: the import, the constructor, each
method, every problem's id/question/answer, and on a seeded sample of problems: `prompt`
returns text or messages, `extract_answer` returns a string or None, `grade` returns a number
in [0, 1] — 1.0 for the problem's own gold answer, below 1.0 for an empty answer.
"""

from __future__ import annotations

import math
import os
import pkgutil
import random
import sys
from numbers import Real

from pipeline.config import TaskConfig
from pipeline.errors import QstarError
from pipeline.tasks.base import Problem, Task, _one_line, _too_few, layout, split_sizes
from pipeline.tasks.math_rows import _seeded_order

METHODS = ("problems", "prompt", "extract_answer", "grade")
SAMPLE = 16  # problems whose prompt/extract_answer/grade are checked at load time


def load_target(target: str):
    """The class (or factory) `package.module:ClassName` names. The working directory is
    importable, as with `python -m`, so `examples.countdown:Countdown` works from a clone."""
    if ":" not in target or not all(target.split(":", 1)):
        raise QstarError(f"task.target={target!r} is invalid: expected package.module:ClassName")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return pkgutil.resolve_name(target)
    except Exception as e:  # ImportError, AttributeError, or the module's own error
        raise QstarError(f"task.target={target!r}: cannot import it: {_one_line(e)}") from None


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _problem(k: int, item, target: str) -> Problem:
    where = f"task.target={target!r}: problem {k}"
    if not isinstance(item, dict):
        raise QstarError(f"{where} is a {type(item).__name__}, not a dict with id, question, "
                         f"answer")
    pid = item.get("id")
    if isinstance(pid, bool) or not (_text(pid) or isinstance(pid, int)):
        raise QstarError(f"{where} has no id (every problem needs a unique str or int 'id')")
    if not _text(item.get("question")):
        raise QstarError(f"{where} (id {pid!r}) has no 'question' text")
    if item.get("answer") is None or str(item["answer"]).strip() == "":
        raise QstarError(f"{where} (id {pid!r}) has no gold 'answer'")
    return Problem(str(pid), item["question"].strip(), str(item["answer"]), dict(item))


def _messages(value, where: str) -> list[dict]:
    if _text(value):
        return [{"role": "user", "content": value}]
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value)
    if not ok:
        raise QstarError(f"{where} returned {type(value).__name__}: expected the user message "
                         f"text or a list of {{'role', 'content'}} chat messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


class CustomTask(Task):
    """Adapts a user's task object (the protocol above) to qstar's Task."""

    def __init__(self, cfg: TaskConfig):
        self.target = str(cfg.target)
        factory = load_target(self.target)
        try:
            self.user = factory(**dict(cfg.params))
        except Exception as e:  # the user's constructor: one line, no traceback
            raise QstarError(f"task.target={self.target!r}: constructing it with task.params="
                             f"{dict(cfg.params)} failed: {_one_line(e)}") from None
        for method in METHODS:
            if not callable(getattr(self.user, method, None)):
                raise QstarError(f"task.target={self.target!r} has no method {method!r} (a task "
                                 f"needs: {', '.join(METHODS)})")
        self.name = str(getattr(self.user, "name", type(self.user).__name__))
        problems = self._load_problems()
        self._check_sample(problems, cfg.seed)
        if len(problems) < split_sizes(cfg):
            raise _too_few(len(problems), cfg, f"task.target={self.target!r}")
        self._set_splits(*layout(_seeded_order(problems, cfg.seed), cfg))

    def _call(self, method: str, *args):
        try:
            return getattr(self.user, method)(*args)
        except Exception as e:  # a bug in the user's method: one line naming it
            raise QstarError(f"task.target={self.target!r}: {method}() raised "
                             f"{_one_line(e)}") from None

    def _load_problems(self) -> list[Problem]:
        items = self._call("problems")
        if isinstance(items, (str, bytes, dict)) or not hasattr(items, "__iter__"):
            raise QstarError(f"task.target={self.target!r}: problems() returned "
                             f"{type(items).__name__}, not a list of dicts")
        problems, first, questions = [], {}, set()
        for k, item in enumerate(items):
            problem = _problem(k, item, self.target)
            if problem.id in first:
                raise QstarError(f"task.target={self.target!r}: problem id {problem.id!r} appears "
                                 f"twice (problems {first[problem.id]} and {k}); ids must be unique")
            first[problem.id] = k
            if problem.question not in questions:  # one question never lands in both splits
                questions.add(problem.question)
                problems.append(problem)
        if not problems:
            raise QstarError(f"task.target={self.target!r}: problems() returned no problems")
        return problems

    def _check_sample(self, problems: list[Problem], seed: int) -> None:
        sample = random.Random(seed).sample(problems, min(SAMPLE, len(problems)))
        for p in sample:
            self.messages(p)
            for text in ("", p.answer, f"Answer: {p.answer}"):
                self.extract_answer(text)
            gold, empty = self._grade(p, p.answer), self._grade(p, "")
            if gold != 1.0:
                raise QstarError(f"task.target={self.target!r}: grade(problem {p.id!r}, its own "
                                 f"gold answer {p.answer!r}) returned {gold}, not 1.0")
            if empty >= 1.0:
                raise QstarError(f"task.target={self.target!r}: grade(problem {p.id!r}, '') "
                                 f"returned {empty}: an empty answer must grade below 1.0")

    def messages(self, problem: Problem) -> list[dict]:
        value = self._call("prompt", problem.entry)
        return _messages(value, f"task.target={self.target!r}: prompt(problem {problem.id!r})")

    def extract_answer(self, completion: str) -> str | None:
        answer = self._call("extract_answer", completion)
        if answer is not None and not isinstance(answer, str):
            raise QstarError(f"task.target={self.target!r}: extract_answer() returned "
                             f"{type(answer).__name__}: expected a string or None")
        return answer

    def _grade(self, problem: Problem, answer: str) -> float:
        value = self._call("grade", problem.entry, answer)
        ok = isinstance(value, Real) and not math.isnan(float(value)) and 0 <= value <= 1
        if not ok:
            raise QstarError(f"task.target={self.target!r}: grade(problem {problem.id!r}, "
                             f"{answer!r}) returned {value!r}: expected a number in [0, 1]")
        return float(value)

    def grade(self, problem: Problem, answer: str) -> bool:
        return self._grade(problem, answer) == 1.0

    def score(self, problem: Problem, completion: str) -> float:
        answer = self.extract_answer(completion)
        return 0.0 if answer is None else self._grade(problem, answer)
