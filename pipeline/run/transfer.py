"""Run-directory files moved through Ray's object store instead of a shared filesystem.

Under `cluster=ray` no worker sees the driver's run directory. The driver packs the part of
the run a stage needs (policy_i, critics_i and its backbone) file by file into the object
store (`Cluster.share`: `{run-relative path: [ObjectRef of each CHUNK_BYTES piece]}`, one
piece in the driver at a time, so a checkpoint of any size costs the driver at most CHUNK_BYTES;
a file the previous stage shipped is not put again), and each worker writes them into its own
temporary directory with the same layout, piece by piece, so run-relative references (a
policy `iter_000/train/policy`, a critic backbone `../../iter_000/train/policy`) resolve there as
they do in the run. What a worker makes comes back as one `{path: bytes}` dict (`pack`) and the
driver writes it atomically.
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

CHUNK_BYTES = 256 * 2**20  # the most of one file the driver reads at once to ship it


def chunks(path: Path) -> Iterator[bytes]:
    """A file's bytes, CHUNK_BYTES at a time (one empty piece for an empty file)."""
    size = CHUNK_BYTES
    with path.open("rb") as f:
        piece = f.read(size)
        yield piece
        while piece := f.read(size):
            yield piece


def files_under(root: str | os.PathLike, rels: Iterable[str],
                skip: Iterable[str] = ()) -> Iterator[tuple[str, Path]]:
    """(path relative to `root`, path) of every file under root/rel for each rel, except
    temporaries and what lies under a `skip` directory (relative to `root` too)."""
    root = Path(root)
    skipped = {Path(s) for s in skip}
    for rel in rels:
        base = root / rel
        paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in paths:
            key = path.relative_to(root)
            if not path.name.startswith(".tmp-") and skipped.isdisjoint(key.parents):
                yield key.as_posix(), path


def pack(root: str | os.PathLike, rels: Iterable[str],
         skip: Iterable[str] = ()) -> dict[str, bytes]:
    """files_under(root, rels, skip) read into one `{relative path: bytes}` dict."""
    return {key: path.read_bytes() for key, path in files_under(root, rels, skip)}


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
    cluster=local) or a subset of it in Ray's object store (`refs`, under cluster=ray)."""

    root: str | None = None
    # run-relative path -> ray.ObjectRefs of its bytes, CHUNK_BYTES at a time, in order
    refs: dict[str, list[Any]] | None = None

    @contextmanager
    def opened(self, prefix: str = "run") -> Iterator[Path]:
        """The directory to resolve run-relative paths against for the block: the run itself,
        or the shipped files written into a worker directory, one at a time, removed when the
        block ends."""
        if self.refs is None:
            yield Path(self.root)
            return
        import ray  # only cluster=ray ships files, and its workers have Ray

        with worker_dir(prefix) as root:
            for rel, refs in self.refs.items():
                path = unpack({rel: b""}, root) / rel
                with path.open("ab") as f:
                    for ref in refs:
                        f.write(ray.get(ref))
            yield root
