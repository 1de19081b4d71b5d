"""task=jsonl: a GSM8K-format JSONL file, or a directory with train.jsonl and test.jsonl."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pipeline.config import TaskConfig
from pipeline.errors import QstarError
from pipeline.tasks.base import Problem, _one_line
from pipeline.tasks.math_rows import MathTask, _BadRow


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
    train.jsonl (training and dev problems) and test.jsonl (test problems)."""

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
            self._split_two(train, test, str(train_path), str(test_path))
        else:
            problems = self._load(path)
            self._warn_skipped(str(path))
            self._split_one(problems, str(path))

    def _load(self, path: Path) -> list[Problem]:
        try:
            return self._read(_jsonl_rows(path))
        except (OSError, UnicodeDecodeError) as e:
            raise QstarError(f"task.path: cannot read {path}: {_one_line(e)}") from None
