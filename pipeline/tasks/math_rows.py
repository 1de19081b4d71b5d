"""GSM8K-format rows (`question`, `answer` ending in `#### <answer>`): parsing, bad-row policy,
seeded splits, math-verify grading. Shared by task=jsonl and task=hf."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable

from pipeline.config import TaskConfig
from pipeline.errors import QstarError
from pipeline.tasks.answers import _as_number, _clean, math_equal, math_parses
from pipeline.tasks.base import Problem, Task, _too_few, layout, split_sizes


class _BadRow(Exception):
    pass


def _seeded_order(problems: list[Problem], seed: int) -> list[Problem]:
    """A shuffle fixed by seed and question text only, not by row order."""
    return sorted(problems,
                  key=lambda p: hashlib.sha256(f"{seed}\0{p.question}".encode()).hexdigest())


class MathTask(Task):
    """GSM8K-format rows (`question`, `answer` ending in `#### <number>`), math-verify grading."""

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.skipped_rows = 0

    def _problem(self, pid: str, row) -> Problem:
        if isinstance(row, _BadRow):  # a line that is not JSON
            raise row
        if not isinstance(row, dict):
            raise _BadRow("not a JSON object")
        fields = (self.cfg.question_field, self.cfg.answer_field)
        for key, field in zip(("task.question_field", "task.answer_field"), fields, strict=True):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise _BadRow(f"missing text field {field!r} ({key})")
        question, solution = row[self.cfg.question_field], row[self.cfg.answer_field]
        if "####" not in solution or not solution.rsplit("####", 1)[1].strip():
            raise _BadRow(f"field {self.cfg.answer_field!r} has no final '#### <answer>'")
        gold = _clean(solution.rsplit("####", 1)[1])
        if _as_number(gold) is None and not math_parses(gold):  # a number needs no sympy parse
            raise _BadRow(f"gold answer {gold!r} in field {self.cfg.answer_field!r} cannot be "
                          f"parsed by math-verify, so no answer could be graded against it")
        return Problem(pid, question.strip(), gold, {"solution": solution})

    def _read(self, rows: Iterable[tuple[str, str, object]]) -> list[Problem]:
        """rows: (id, where for errors, row). Bad rows raise or, if configured, are counted."""
        problems, seen = [], set()
        for pid, where, row in rows:
            try:
                problem = self._problem(pid, row)
            except _BadRow as e:
                if not self.cfg.skip_bad_rows:
                    raise QstarError(f"{where}: {e} (task.skip_bad_rows=true skips such rows)") \
                        from None
                self.skipped_rows += 1
                continue
            if problem.question not in seen:
                seen.add(problem.question)
                problems.append(problem)
        return problems

    def _warn_skipped(self, source: str) -> None:
        if self.skipped_rows:
            print(f"warning: skipped {self.skipped_rows} bad rows in {source} "
                  f"(task.skip_bad_rows=true)", file=sys.stderr)

    def _split_one(self, problems: list[Problem], where: str) -> None:
        """One pool: a seeded order, laid out as [test | dev | train]."""
        if not problems:
            raise QstarError(f"{where} has no usable rows")
        if len(problems) < split_sizes(self.cfg):
            raise _too_few(len(problems), self.cfg, where)
        self._set_splits(*layout(_seeded_order(problems, self.cfg.seed), self.cfg))

    def _split_two(self, train: list[Problem], test: list[Problem], train_where: str,
                   test_where: str) -> None:
        """Separate pools: test from the test pool; dev, then train, from the training pool,
        which drops every question the test pool also has."""
        c = self.cfg
        test_questions = {p.question for p in test}
        train = [p for p in train if p.question not in test_questions]
        for pool, where in ((train, train_where), (test, test_where)):
            if not pool:
                raise QstarError(f"{where} has no usable rows")
        if c.num_test > len(test):
            raise QstarError(f"task.num_test={c.num_test} is larger than the {len(test)} distinct "
                             f"problems in {test_where}")
        if c.num_train + c.num_dev > len(train):
            raise QstarError(f"task.num_train={c.num_train} + task.num_dev={c.num_dev} = "
                             f"{c.num_train + c.num_dev} problems requested but {train_where} has "
                             f"only {len(train)} distinct questions not in the test pool "
                             f"(task.num_test={c.num_test} come from {test_where})")
        ordered = _seeded_order(train, c.seed)
        self._set_splits(ordered[c.num_dev : c.num_dev + c.num_train], ordered[: c.num_dev],
                         _seeded_order(test, c.seed)[: c.num_test])

    def grade(self, problem: Problem, answer: str) -> bool:
        return math_equal(problem.answer, answer)
