"""Run-directory files moved through Ray's object store instead of a shared filesystem.

Under `cluster=ray` no worker sees the driver's run directory. The driver packs the part of
the run a stage needs (policy_i, critics_i and its backbone) into one `{run-relative path:
bytes}` dict, puts it in the object store once, and each worker unpacks it into its own temporary
directory with the same layout, so run-relative references (a policy `iter_000/train/policy`,
a critic backbone `../../iter_000/train/policy`) resolve there as they do in the run. What a
worker makes comes back the same way and the driver writes it atomically.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.run.atomic import atomic_dir


def pack(root: str | os.PathLike, rels: Iterable[str],
         skip: Iterable[str] = ()) -> dict[str, bytes]:
    """Every file under root/rel for each rel, keyed by its path relative to `root`, except
    temporaries and what lies under a `skip` directory (relative to `root` too)."""
    root = Path(root)
    skipped = {Path(s) for s in skip}
    files = {}
    for rel in rels:
        base = root / rel
        paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in paths:
            key = path.relative_to(root)
            if not path.name.startswith(".tmp-") and skipped.isdisjoint(key.parents):
                files[key.as_posix()] = path.read_bytes()
    return files


def unpack(files: dict[str, bytes], root: str | os.PathLike) -> Path:
    """Write `files` under `root` (a worker's own directory); returns root."""
    root = Path(root)
    for rel, data in files.items():
        path = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ValueError(f"refusing to unpack {rel!r} outside {root}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def unpack_atomic(files: dict[str, bytes], target: str | os.PathLike) -> Path:
    """Write a packed directory (keys relative to it) to `target` in one atomic rename."""
    with atomic_dir(target) as tmp:
        unpack(files, tmp)
    return Path(target)


@contextmanager
def worker_dir(prefix: str) -> Iterator[Path]:
    """A fresh directory in the worker's own temporary space, removed with what it holds when
    the block ends (a worker process serves many stages: nothing may pile up in its /tmp)."""
    with tempfile.TemporaryDirectory(prefix=f"qstar-{prefix}-") as path:
        yield Path(path)


@dataclass(frozen=True)
class RunFiles:
    """Where a worker finds the run files it needs: the driver's run directory (`root`, under
    cluster=local) or a packed subset of it in Ray's object store (`ref`, under cluster=ray)."""

    root: str | None = None
    ref: Any = None  # ray.ObjectRef of pack(...)

    @contextmanager
    def opened(self, prefix: str = "run") -> Iterator[Path]:
        """The directory to resolve run-relative paths against for the block: the run itself,
        or the packed files unpacked into a worker directory removed when the block ends."""
        if self.ref is None:
            yield Path(self.root)
            return
        import ray  # only cluster=ray packs files, and its workers have Ray

        with worker_dir(prefix) as root:
            yield unpack(ray.get(self.ref), root)
