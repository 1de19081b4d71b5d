"""Atomic writes: a temporary file in the same directory, fsync, then rename.

A reader never sees a half-written artifact; a killed writer leaves only a `.tmp-*` file
that nothing takes for complete. A failed write (disk full, quota, I/O error) removes its
temporary file, leaves the previous version in place and raises a QstarError naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import QstarError


def cannot_write(path: Path, exc: Exception) -> QstarError:
    return QstarError(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}")


def is_write_failure(exc: Exception) -> bool:
    # safetensors (model and critic weights) reports a full disk as SafetensorError, not OSError
    return isinstance(exc, OSError) or (type(exc).__name__ == "SafetensorError"
                                        and "I/O error" in str(exc))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", suffix=suffix, dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; follow the user's umask
    except OSError as exc:
        raise cannot_write(path, exc) from exc
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise cannot_write(path, exc) from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    count = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
    return count


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary directory beside `path`; it becomes `path` only when the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; follow the user's umask
    except OSError as exc:
        raise cannot_write(path, exc) from exc
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except Exception as exc:
        if is_write_failure(exc):
            raise cannot_write(path, exc) from exc
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
