"""Verifiable tasks: problems with a gold answer, deterministic train/held-out splits, and the
grader that checks a completion. Each task is a small class with its own grader; `make_task`
picks one from the config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from math_verify import parse as mv_parse
from math_verify import verify as mv_verify

from pipeline.config import TaskConfig, TaskKind
from pipeline.errors import QstarError

SYSTEM_PROMPT = (
    "Solve the problem step by step. Write short steps, one step per line. "
    "End with a final line of the form:\nAnswer: <value>"
)


def to_messages(question: str) -> list[dict]:
    """Chat messages for the tokenizer's chat template."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


@dataclass(frozen=True)
class Problem:
    id: str  # stable and unique within a task
    question: str
    answer: str  # gold answer; never shown to the model
    entry: dict  # what the grader needs (the reasoning-gym entry, the full GSM8K solution)


# ---------------------------------------------------------------- answer extraction

_ANSWER_LINE = re.compile(r"(?i)\banswer\s*\**\s*:\s*\**(.*)")
_HASHES = re.compile(r"####\s*(.*)")
_NUMBER = re.compile(r"(?<![\d.])-?\d+(?:,\d{3})*(?:\.\d+)?")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unbalanced: no answer rather than half of one


def _clean(value: str) -> str:
    value = value.strip().strip("*").strip()
    if value.startswith("$") and value.endswith("$") and len(value) > 1:
        value = value.strip("$").strip()  # $...$ LaTeX maths
    value = value.lstrip("$").rstrip(". $").strip()
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", value)  # 1,000 -> 1000


def _after_answer(text: str) -> str | None:
    """Value of the last `Answer:` line; an empty one takes the lines below it (grids, lists)."""
    lines = text.splitlines()
    for k in range(len(lines) - 1, -1, -1):
        matches = list(_ANSWER_LINE.finditer(lines[k]))
        if not matches:
            continue
        value = matches[-1].group(1).strip() or "\n".join(lines[k + 1 :]).strip()
        return (_last_boxed(value) or value) if value else None
    return None


def extract_answer(text: str) -> str | None:
    """Last `Answer: X` line, else `#### X`, else the last \\boxed{X}, else the last number."""
    value = _after_answer(text)
    if value is None:
        hashes = _HASHES.findall(text)
        value = hashes[-1] if hashes and hashes[-1].strip() else None
    if value is None:
        value = _last_boxed(text)
    if value is None:
        numbers = _NUMBER.findall(text)
        value = numbers[-1] if numbers else None
    if value is None:
        return None
    return _clean(value) or None


# ---------------------------------------------------------------- maths grading

# math-verify's timeouts use SIGALRM, which raises outside the main thread (Ray runs actor
# methods in threads). There we run it without timeouts, and everywhere we refuse the inputs
# that make sympy compute for ever (power towers, huge exponents or factorials).
logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning
_TOWER = re.compile(r"(\^|\*\*)[\s{(]*\w+[\s})]*(\^|\*\*)")
_POWER = re.compile(r"\^|\*\*|!|\\binom|\\choose")
_BIG_INT = re.compile(r"\d{5,}")


def _safe_for_sympy(answer: str) -> bool:
    if len(answer) > 200 or _TOWER.search(answer):
        return False
    return not (_POWER.search(answer) and _BIG_INT.search(answer))


def _as_number(text: str) -> float | None:
    """The text as a plain number, or None (`3/4` is not the number 4)."""
    text = text.strip()
    return float(text.replace(",", "")) if _NUMBER.fullmatch(text) else None


def math_equal(gold: str, answer: str) -> bool:
    """math-verify equivalence, with a plain numeric comparison as fallback."""
    if _safe_for_sympy(answer):
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        try:
            parsed_gold = mv_parse(gold, parsing_timeout=timeout)
            parsed = mv_parse(answer, parsing_timeout=timeout)
            if parsed_gold and parsed and mv_verify(parsed_gold, parsed, timeout_seconds=timeout):
                return True
        except Exception:  # a model's malformed answer must grade as wrong, not crash search
            pass
    g, a = _as_number(gold), _as_number(answer)
    return g is not None and a is not None and abs(g - a) <= 1e-6 * max(1.0, abs(g))


# ---------------------------------------------------------------- tasks


class Task:
    name: str
    _train: list[Problem]  # set by each subclass's __init__
    _heldout: list[Problem]

    def splits(self) -> tuple[list[Problem], list[Problem]]:
        """(train, heldout): deterministic for the config's seed, no question in both."""
        return list(self._train), list(self._heldout)

    def extract_answer(self, completion: str) -> str | None:
        return extract_answer(completion)

    def grade(self, problem: Problem, answer: str) -> bool:
        """Whether an already extracted answer is correct."""
        raise NotImplementedError

    def is_correct(self, problem: Problem, completion: str) -> bool:
        answer = self.extract_answer(completion)
        return answer is not None and self.grade(problem, answer)


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _too_few(available: int, cfg: TaskConfig, where: str) -> QstarError:
    need = cfg.num_train + cfg.num_heldout
    return QstarError(
        f"task.num_train={cfg.num_train} + task.num_heldout={cfg.num_heldout} = {need} problems "
        f"requested but {where} has only {available} distinct questions"
    )


class ReasoningGymTask(Task):
    """Any reasoning-gym generator; correct means its own scorer gives exactly 1.0."""

    def __init__(self, cfg: TaskConfig, generator: str | None = None, **generator_config):
        import reasoning_gym  # slow to import, and only this task needs it
        from reasoning_gym.factory import DATASETS

        self.generator = generator or cfg.name
        self.name = self.generator
        if self.generator not in DATASETS:
            raise QstarError(
                f"task.name={self.generator!r} is not a reasoning-gym generator; valid names: "
                f"{', '.join(sorted(DATASETS))}"
            )
        need = cfg.num_train + cfg.num_heldout
        size = 4 * need + 100  # room for duplicate questions; fixed by cfg, so deterministic
        try:
            self.dataset = reasoning_gym.create_dataset(
                self.generator, seed=cfg.seed, size=size, **generator_config
            )
            problems = self._distinct(need, cfg.seed)
        except Exception as e:  # config validation or generation inside reasoning-gym
            raise QstarError(f"reasoning-gym {self.generator}: {_one_line(e)}") from None
        if len(problems) < need:
            raise _too_few(len(problems), cfg, f"reasoning-gym {self.generator} (seed {cfg.seed}, "
                                               f"{size} items generated)")
        # held-out first: it stays the same when only num_train changes
        self._heldout, self._train = problems[: cfg.num_heldout], problems[cfg.num_heldout :]

    def _distinct(self, need: int, seed: int) -> list[Problem]:
        problems, seen = [], set()
        for idx in range(len(self.dataset)):
            entry = self.dataset[idx]
            if entry["question"] in seen:
                continue
            seen.add(entry["question"])
            # some generators (boxnet, rush_hour, ...) have no single gold answer: None
            gold = "" if entry["answer"] is None else str(entry["answer"])
            pid = f"{self.generator}/seed{seed}/{idx}"
            problems.append(Problem(pid, entry["question"], gold, entry))
            if len(problems) == need:
                break
        return problems

    def grade(self, problem: Problem, answer: str) -> bool:
        try:
            return self.dataset.score_answer(answer, problem.entry) == 1.0
        except Exception:  # some scorers crash on malformed answers: that is a wrong answer
            return False


class ArithmeticTask(ReasoningGymTask):
    """reasoning-gym chain_sum with the configured number of terms and digits."""

    def __init__(self, cfg: TaskConfig):
        super().__init__(
            cfg, "chain_sum", min_terms=cfg.min_terms, max_terms=cfg.max_terms,
            min_digits=cfg.min_digits, max_digits=cfg.max_digits,
        )
        self.name = "arithmetic"

    def extract_answer(self, completion: str) -> str | None:
        # small models often write `Answer: 15 - 43 = -28`; chain_sum's scorer wants `-28`
        answer = extract_answer(completion)
        if answer is None or "=" not in answer:
            return answer
        return answer.rsplit("=", 1)[1].strip() or None


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

    def _split_one(self, problems: list[Problem],
                   where: str) -> tuple[list[Problem], list[Problem]]:
        """One pool: a seeded order, held-out first, then train."""
        if not problems:
            raise QstarError(f"{where} has no usable rows")
        if len(problems) < self.cfg.num_train + self.cfg.num_heldout:
            raise _too_few(len(problems), self.cfg, where)
        ordered = _seeded_order(problems, self.cfg.seed)
        h = self.cfg.num_heldout
        return ordered[h : h + self.cfg.num_train], ordered[:h]

    def _split_two(self, train: list[Problem], test: list[Problem], train_where: str,
                   test_where: str) -> tuple[list[Problem], list[Problem]]:
        """Separate pools: train drops every question the test pool also has."""
        test_questions = {p.question for p in test}
        train = [p for p in train if p.question not in test_questions]
        for pool, where, key, n in ((train, train_where, "task.num_train", self.cfg.num_train),
                                    (test, test_where, "task.num_heldout", self.cfg.num_heldout)):
            if not pool:
                raise QstarError(f"{where} has no usable rows")
            if n > len(pool):
                raise QstarError(f"{key}={n} is larger than the {len(pool)} distinct problems in "
                                 f"{where}")
        return (_seeded_order(train, self.cfg.seed)[: self.cfg.num_train],
                _seeded_order(test, self.cfg.seed)[: self.cfg.num_heldout])

    def grade(self, problem: Problem, answer: str) -> bool:
        return math_equal(problem.answer, answer)


def _jsonl_rows(path: Path) -> Iterable[tuple[str, str, object]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                row = _BadRow(f"bad JSON ({e.msg})")  # reported or skipped like other bad rows
            yield f"{path.name}:{lineno}", where, row


class JsonlTask(MathTask):
    """A GSM8K-format JSONL file (split by a seeded hash of the question), or a directory with
    train.jsonl (training problems) and test.jsonl (held-out problems)."""

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        if not cfg.path:
            raise QstarError("task.path is not set: task=jsonl needs a GSM8K-format JSONL file "
                             "or a directory with train.jsonl and test.jsonl")
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise QstarError(f"task.path={cfg.path}: no such file or directory")
        self.name = path.name
        if path.is_dir():
            train_path, test_path = path / "train.jsonl", path / "test.jsonl"
            for p in (train_path, test_path):
                if not p.is_file():
                    raise QstarError(f"task.path={cfg.path}: directory has no {p.name}")
            train, test = self._load(train_path), self._load(test_path)
            self._warn_skipped(str(path))
            self._train, self._heldout = self._split_two(train, test, str(train_path),
                                                         str(test_path))
        else:
            problems = self._load(path)
            self._warn_skipped(str(path))
            self._train, self._heldout = self._split_one(problems, str(path))

    def _load(self, path: Path) -> list[Problem]:
        try:
            return self._read(_jsonl_rows(path))
        except (OSError, UnicodeDecodeError) as e:
            raise QstarError(f"task.path: cannot read {path}: {_one_line(e)}") from None


class HFTask(MathTask):
    """`datasets.load_dataset(task.name, task.hf_config)`, GSM8K-format rows."""

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        import datasets  # slow to import, and only this task needs it

        self.name = cfg.name
        try:
            data = datasets.load_dataset(cfg.name, cfg.hf_config)
        except Exception as e:  # no hub, unknown name, bad config: one line, no traceback
            raise QstarError(f"task.name={cfg.name!r} (task.hf_config={cfg.hf_config!r}): cannot "
                             f"load Hugging Face dataset: {_one_line(e)}") from None
        pools = []
        for key, split in (("task.hf_train_split", cfg.hf_train_split),
                           ("task.hf_test_split", cfg.hf_test_split)):
            if split not in data:
                raise QstarError(f"{key}={split!r}: dataset {cfg.name} has no such split "
                                 f"(has: {', '.join(data)})")
            rows = ((f"{cfg.name}/{split}/{i}", f"{cfg.name}[{split}] row {i}", row)
                    for i, row in enumerate(data[split]))
            pools.append(self._read(rows))
        self._warn_skipped(cfg.name)
        self._train, self._heldout = self._split_two(pools[0], pools[1],
                                                     f"{cfg.name}[{cfg.hf_train_split}]",
                                                     f"{cfg.name}[{cfg.hf_test_split}]")


def make_task(cfg: TaskConfig) -> Task:
    if cfg.kind == TaskKind.arithmetic:
        return ArithmeticTask(cfg)
    if cfg.kind == TaskKind.reasoning_gym:
        return ReasoningGymTask(cfg)
    if cfg.kind == TaskKind.jsonl:
        return JsonlTask(cfg)
    if cfg.kind == TaskKind.hf:
        return HFTask(cfg)
    raise QstarError(f"task.kind={cfg.kind!r} is invalid: allowed: "
                     f"{', '.join(k.value for k in TaskKind)}")
