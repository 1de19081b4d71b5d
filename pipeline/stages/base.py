"""What every stage receives: the run's config, store, cluster, task and splits (`Loop`).

Each stage module exposes `run(loop, i) -> dict`: it reads the previous stages' artifacts from
the run directory, writes its own atomically, and returns the metrics the manifest records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from critics.critic_set import backbone_of
from pipeline.config import ModelConfig, QstarConfig, replace_model_name
from pipeline.lm.models import resolve_model_path
from pipeline.run.store import RunStore
from pipeline.run.tracking import Tracker
from pipeline.run.transfer import RunFiles, pack, unpack_atomic, worker_dir
from pipeline.run.workers import Cluster
from pipeline.stages.reference import KEPT_PHASES
from pipeline.tasks.base import Problem, Task


@dataclass
class Loop:
    cfg: QstarConfig
    store: RunStore
    cluster: Cluster
    task: Task
    train_problems: list[Problem]
    eval_problems: list[Problem]  # the eval.split problems (dev unless asked otherwise)
    base_policy: str  # the resolved base checkpoint: policy_0
    tracker: Tracker

    def search_problems(self, i: int) -> list[Problem]:
        """The training problems iteration i searches: all of them, or with
        search.problems_per_iteration = k the k that start at i * k, wrapping around."""
        pool, k = self.train_problems, self.cfg.search.problems_per_iteration
        if not k or k >= len(pool):
            return list(pool)
        start = i * k
        return [pool[(start + j) % len(pool)] for j in range(k)]

    def policy(self, i: int) -> str:
        """policy_i's checkpoint directory: the base model for i = 0, else iteration i-1's."""
        return self.store.policy_dir(i, self.base_policy)

    def policy_ref(self, i: int) -> str:
        """policy_i as workers get it: run-relative, or the base model's name (resolved on
        each node)."""
        return self.store.policy_ref(i, self.cfg.model.name)

    def run_files(self, rels: list[str | None], implicit: str | None = None) -> RunFiles:
        """The run files workers need (`rels` relative to the run; None and model names are
        skipped): the run directory in-process, a packed copy under Ray. The models a policy
        keeps for its implicit reward (`dpo_phase/`, `sft_phase/`: each a whole second model)
        travel only inside `implicit`: the policy whose implicit reward the stage computes."""
        shipped = [r for r in rels if r and self.store.in_run(r)]
        keep = Path(implicit) if implicit else None  # one directory may be named two ways
        skip = [(Path(r) / kept).as_posix() for r in shipped if Path(r) != keep
                for kept in KEPT_PHASES]
        return self.cluster.share(self.store.root, shipped, skip)

    def run_remote(self, fn: Callable, i: int, stage: str, files: RunFiles, *args, **kwargs):
        """`stage_work(fn, files, ...)` as a Ray task with the stage's GPU request (or
        in-process), `files` from run_files; what it made becomes iter_i/<stage> in one atomic
        rename. Returns fn's result."""
        out = self.store.stage_dir(i, stage)
        result, packed = self.cluster.run_task(
            stage_work, fn, files, None if self.cluster.ray else str(out), *args,
            num_gpus=self.cfg.cluster.worker_num_gpus, name=f"{stage} stage", **kwargs)
        if packed is not None:
            unpack_atomic(packed, out)
        return result

    def critics_refs(self, i: int) -> tuple[str | None, list[str]]:
        """critics_i relative to the run (None before any exist), and every run directory a
        worker needs to use them: the critics and their backbone when it is in the run."""
        path = self.store.critics_dir(i)
        if path is None:
            return None, []
        rel = self.store.relative(path)
        backbone = self.store.relative(backbone_of(path))
        return rel, [rel, backbone]


def stage_work(fn: Callable, files: RunFiles, out_dir: str | None, *args, **kwargs):
    """A stage's work where it runs: `fn(root, target, *args, **kwargs)`, with `root` the run
    directory (or a Ray worker's unpacked copy of what it needs) and `target` the stage's
    directory in-process, or the worker's own directory under Ray, packed for the driver."""
    with files.opened(fn.__name__) as root:
        if out_dir:
            return fn(root, Path(out_dir), *args, **kwargs), None
        with worker_dir("stage") as target:
            return fn(root, target, *args, **kwargs), pack(target, ["."])


def resolve_ref(root: Path, ref: str, model_cfg: ModelConfig) -> str:
    """A checkpoint directory for `ref`: root/ref when the run (or a worker's unpacked copy of
    it) holds it, else a model name resolved on this node."""
    if (root / ref).is_dir():
        return str(root / ref)
    return resolve_model_path(replace_model_name(model_cfg, ref))
