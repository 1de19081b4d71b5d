"""Verifiable tasks: problems with a gold answer, deterministic splits, and each task's grader.
`make_task` picks one from the config; each task kind is one module."""

from __future__ import annotations

from pipeline.config import TaskConfig, TaskKind
from pipeline.errors import QstarError
from pipeline.tasks.arithmetic import ArithmeticTask
from pipeline.tasks.base import Task
from pipeline.tasks.chain_steps import ChainStepsTask
from pipeline.tasks.custom import CustomTask
from pipeline.tasks.hf import HFTask
from pipeline.tasks.jsonl import JsonlTask
from pipeline.tasks.reasoning_gym import ReasoningGymTask

TASKS: dict[TaskKind, type[Task]] = {
    TaskKind.chain_steps: ChainStepsTask,
    TaskKind.arithmetic: ArithmeticTask,
    TaskKind.reasoning_gym: ReasoningGymTask,
    TaskKind.jsonl: JsonlTask,
    TaskKind.hf: HFTask,
    TaskKind.custom: CustomTask,
}


def make_task(cfg: TaskConfig) -> Task:
    if cfg.kind not in TASKS:
        raise QstarError(f"task.kind={cfg.kind!r} is invalid: allowed: "
                         f"{', '.join(k.value for k in TaskKind)}")
    return TASKS[cfg.kind](cfg)
