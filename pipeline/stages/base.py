"""What every stage receives: the run's config, store, cluster, task and splits (`Loop`).

Each stage module exposes `run(loop, i) -> dict`: it reads the previous stages' artifacts from
the run directory, writes its own atomically, and returns the metrics the manifest records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import QstarConfig, replace_model_name
from pipeline.lm.models import load_model
from pipeline.run.store import RunStore
from pipeline.run.tracking import Tracker
from pipeline.run.workers import Cluster
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
    _model: tuple = field(default=(None, None, None))  # (path, model, tokenizer) cached in-process

    def policy(self, i: int) -> str:
        """policy_i: the base model for i = 0, else iteration i-1's trained policy."""
        return self.store.policy_dir(i, self.base_policy)

    def model(self, path: str):
        """The driver keeps one model loaded (eval); reloaded when the path changes."""
        if self._model[0] != path:
            self._model = (None, None, None)
            self._model = (path, *load_model(replace_model_name(self.cfg.model, path)))
        return self._model[1], self._model[2]

    def free_model(self) -> None:
        self._model = (None, None, None)
