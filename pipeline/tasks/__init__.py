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


def make_task(cfg: TaskConfig) -> Task:
    if cfg.kind == TaskKind.chain_steps:
        return ChainStepsTask(cfg)
    if cfg.kind == TaskKind.arithmetic:
        return ArithmeticTask(cfg)
    if cfg.kind == TaskKind.reasoning_gym:
        return ReasoningGymTask(cfg)
    if cfg.kind == TaskKind.jsonl:
        return JsonlTask(cfg)
    if cfg.kind == TaskKind.hf:
        return HFTask(cfg)
    if cfg.kind == TaskKind.custom:
        return CustomTask(cfg)
    raise QstarError(f"task.kind={cfg.kind!r} is invalid: allowed: "
                     f"{', '.join(k.value for k in TaskKind)}")
