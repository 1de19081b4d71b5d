"""The run directory: manifest of completed stages, lock, per-iteration paths, metrics.jsonl.

A stage counts as complete only once its artifacts are written (atomically) and the manifest
says so; the manifest itself is replaced atomically. So a run killed at any moment resumes
from the first stage the manifest does not list, losing only the work in flight.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import QstarError
from pipeline.run.atomic import read_jsonl, write_json, write_jsonl

MANIFEST_VERSION = 1
STAGES = ("search", "critics", "data", "train", "refit", "eval")  # per iteration, in order
GRPO_STAGES = ("train", "eval")  # train.mode=grpo samples while it trains: no search or critics
BASELINE = "baseline"  # iteration 0 evaluates the base policy first


class RunStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self.manifest = self._read_manifest()

    # --- manifest ---

    def _read_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"version": MANIFEST_VERSION, "created": time.time(), "stages": {}}
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise QstarError(f"{self.manifest_path}: unreadable manifest ({exc})") from None
        if manifest.get("version") != MANIFEST_VERSION:
            raise QstarError(f"{self.manifest_path}: manifest version {manifest.get('version')!r} "
                             f"is not {MANIFEST_VERSION}; this qstar cannot resume that run")
        return manifest

    @staticmethod
    def key(iteration: int, stage: str) -> str:
        return f"iter_{iteration:03d}/{stage}"

    def done(self, iteration: int, stage: str) -> bool:
        return self.key(iteration, stage) in self.manifest["stages"]

    def metrics(self, iteration: int, stage: str) -> dict | None:
        entry = self.manifest["stages"].get(self.key(iteration, stage))
        return entry["metrics"] if entry else None

    def complete(self, iteration: int, stage: str, metrics: dict, seconds: float,
                 peak_rss_mb: float | None = None) -> None:
        """Record a finished stage; call only after its artifacts are on disk. peak_rss_mb: the
        driver process's peak resident memory during the stage (pipeline.run.memory)."""
        self.manifest["stages"][self.key(iteration, stage)] = {
            "iteration": iteration, "stage": stage, "seconds": round(seconds, 2),
            "peak_rss_mb": peak_rss_mb, "finished": time.time(), "metrics": metrics,
        }
        write_json(self.manifest_path, self.manifest)
        self._write_metrics_jsonl()

    def _write_metrics_jsonl(self) -> None:
        # Derived from the manifest, so it never disagrees with what is complete.
        write_jsonl(self.root / "metrics.jsonl", self.manifest["stages"].values())

    def set_info(self, **info) -> None:
        self.manifest.update(info)
        write_json(self.manifest_path, self.manifest)
        # Every run and resume starts here: repair a metrics.jsonl that a kill between the two
        # writes of `complete` left one stage behind the manifest.
        self._write_metrics_jsonl()

    # --- paths ---

    def iter_dir(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration:03d}"

    def stage_dir(self, iteration: int, stage: str) -> Path:
        return self.iter_dir(iteration) / stage

    def policy_ref(self, iteration: int, base: str) -> str:
        """policy_i as recorded: the base model's name for i = 0, else what iteration i-1's train
        stage names: a path relative to the run directory (so a moved run still finds it), or
        the base model's name when training was skipped."""
        if iteration == 0:
            return base
        train = self.metrics(iteration - 1, "train")
        if train is None:
            raise QstarError(f"iteration {iteration - 1} has no completed train stage")
        return train["policy_dir"]

    def policy_dir(self, iteration: int, base: str) -> str:
        """policy_i as a checkpoint directory: `base` (resolved) for i = 0, else the recorded
        reference resolved against this run directory."""
        ref = self.policy_ref(iteration, base)
        if self.in_run(ref):
            return str(self.root / ref)
        return ref if os.path.isabs(ref) and os.path.isdir(ref) else base  # runs before 0.2

    def in_run(self, ref: str | None) -> bool:
        """Whether `ref` names a directory of this run, relative to it."""
        return bool(ref) and not os.path.isabs(ref) and (self.root / ref).is_dir()

    def relative(self, path: str | os.PathLike) -> str:
        """`path` relative to the run directory when it lies inside it, else unchanged."""
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path)

    def critics_dir(self, iteration: int) -> Path | None:
        """critics_i: fitted in iteration i-1 on its trees, on policy_i's features by its refit
        stage, or on policy_{i-1}'s by its critics stage when no refit ran (refit skipped, or a
        run from before that stage); none before the first iteration."""
        if iteration == 0:
            return None
        for stage in ("refit", "critics"):
            metrics = self.metrics(iteration - 1, stage)
            if metrics is not None and not metrics.get("skipped"):
                return self.stage_dir(iteration - 1, stage)
        return None

    # --- lock ---

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete `.tmp-*` files and folders a killed writer left (pipeline.run.atomic names them so).

        Called with the lock held, when no writer of this run can be alive.
        """
        stale = sorted(self.root.rglob(".tmp-*"), key=lambda p: len(p.parts))
        removed = []
        for path in stale:
            if not path.exists():  # inside a folder removed just before
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        return removed

    @contextmanager
    def lock(self):
        """One process per run: a second `qstar resume` on a busy run is refused."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise QstarError(f"{self.root} is in use by pid {holder}; wait for it or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            self.remove_stale_temporaries()
            yield self
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "manifest.json").is_file()


def load_shards(search_dir: Path) -> list[dict]:
    """Every tree row of a search stage's shards, in shard order."""
    rows = []
    for path in sorted(Path(search_dir).glob("shard_*.jsonl")):
        rows.extend(read_jsonl(path))
    return rows
