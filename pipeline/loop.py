"""The self-play loop, top to bottom: baseline, then per iteration search -> critics -> data ->
train -> refit -> eval. Each stage is a function of pipeline/stages taking (loop, i) and
returning a dict (`run`, or critics.refit): it reads the previous stages' artifacts from the run
directory, writes its own atomically, and returns the metrics the manifest records.

Iteration i starts from policy_i (the base model for i = 0) and critics_i (none for i = 0:
leaves are scored by verified rollouts and the policy's confidence). Its train stage makes
policy_{i+1}; its refit stage fits value/PRM/ORM heads on its trees on policy_{i+1}'s features:
critics_{i+1}, which share policy_{i+1}'s weights. With critics.refit=false (or a separate
critics.backbone) the critics stage fits them instead, before train, on policy_i's features. Its
eval stage measures policy_{i+1} with critics_{i+1}.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.compose import load_run_config
from pipeline.config import QstarConfig, TrainMode, to_dict
from pipeline.errors import QstarError
from pipeline.lm.models import resolve_model_path
from pipeline.report.inspect import iteration_table
from pipeline.report.plots import write_plots
from pipeline.run.memory import peak_rss_mb, release_freed_memory, reset_peak_rss
from pipeline.run.store import BASELINE, GRPO_STAGES, STAGES, RunStore
from pipeline.run.tracking import Tracker
from pipeline.run.workers import Cluster
from pipeline.stages import critics, data, grpo, search, train
from pipeline.stages import eval as evaluation
from pipeline.stages.base import Loop
from pipeline.tasks import make_task
from pipeline.tasks.base import problems_digest

STAGE_RUNNERS: dict[str, Callable[[Loop, int], dict]] = {
    "search": search.run, "critics": critics.run, "data": data.run, "train": train.run,
    "refit": critics.refit, "eval": evaluation.run,
}
assert tuple(STAGE_RUNNERS) == STAGES
# The GRPO baseline samples while it trains: no search, critics, data or refit stage.
GRPO_RUNNERS: dict[str, Callable[[Loop, int], dict]] = {"train": grpo.run,
                                                        "eval": evaluation.run}
assert tuple(GRPO_RUNNERS) == GRPO_STAGES


def stage_runners(cfg: QstarConfig) -> dict[str, Callable[[Loop, int], dict]]:
    return GRPO_RUNNERS if cfg.train.mode == TrainMode.grpo else STAGE_RUNNERS


def open_loop(cfg: QstarConfig, store: RunStore) -> Loop:
    task = make_task(cfg.task)
    return Loop(cfg=cfg, store=store, cluster=Cluster(cfg), task=task,
                train_problems=task.split("train"), eval_problems=task.split(cfg.eval.split),
                base_policy=resolve_model_path(cfg.model), tracker=Tracker(cfg, store))


def run_stage(loop: Loop, iteration: int, stage: str, fn: Callable[[Loop, int], dict]) -> None:
    if loop.store.done(iteration, stage):
        return
    print(f"qstar: iteration {iteration} {stage} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    release_freed_memory()
    reset_peak_rss()
    metrics = fn(loop, iteration)
    seconds = time.perf_counter() - start
    loop.store.complete(iteration, stage, metrics, seconds, peak_rss_mb())
    loop.tracker.log(iteration, stage, metrics, seconds)


def run_iterations(loop: Loop) -> None:
    run_stage(loop, 0, BASELINE, evaluation.run_baseline)
    for i in range(loop.cfg.iterations):
        for stage, fn in stage_runners(loop.cfg).items():
            run_stage(loop, i, stage, fn)
        write_plots(loop.store)


def run_loop(cfg: QstarConfig, run_dir: str | Path) -> RunStore:
    """`qstar run`: a new run in `run_dir` (Hydra's run directory), or its continuation."""
    store = RunStore(run_dir)
    with store.lock():
        loop = open_loop(cfg, store)  # refuses bad task/model input before the manifest exists
        problems = same_problems(store, loop)
        store.set_info(iterations=cfg.iterations, config=to_dict(cfg), problems=problems)
        try:
            run_iterations(loop)
        finally:
            loop.tracker.finish()
    print(iteration_table(store))
    print(f"run directory: {store.root}   plots: {store.root / 'plots'}")
    return store


def same_problems(store: RunStore, loop: Loop) -> dict[str, str]:
    """The digests of the loop's train and eval problems, checked against those the run
    recorded when it started (a run from before digests were recorded is taken as it is): a
    task whose data file, generator or reasoning-gym version changed since makes other
    problems under the same ids, and a resumed run must not mix them."""
    found = {"train": problems_digest(loop.train_problems),
             loop.cfg.eval.split.value: problems_digest(loop.eval_problems)}
    recorded = store.manifest.get("problems") or {}
    for split, digest in found.items():
        if recorded.get(split, digest) != digest:
            t = loop.cfg.task
            raise QstarError(f"{store.root}: the task's {split} problems are not the ones this "
                             f"run started with (task {t.kind.value}, name {t.name}, seed "
                             f"{t.seed}): its data or generator changed since; start a new run")
    return found


def resume_run(run_dir: str, overrides: list[str]) -> RunStore:
    """`qstar resume RUN_DIR [iterations=N]`: the run's own config, from its first open stage."""
    if not Path(run_dir).is_dir() or not (Path(run_dir) / "manifest.json").is_file():
        raise QstarError(f"{run_dir} is not a qstar run directory (no manifest.json)")
    cfg = load_run_config(Path(run_dir), overrides)
    return run_loop(cfg, run_dir)


def final_accuracy(store: RunStore, cfg: QstarConfig) -> float | None:
    """The finished run's last policy's accuracy on eval.split (dev by default) under
    eval.decodes[0]: the objective `qstar run -m` returns to Hydra's sweeper (the optuna sweeper
    maximises it with hydra.sweeper.direction=maximize; the basic sweeper ignores it). None
    when eval.decodes is empty: the run graded nothing."""
    if not cfg.eval.decodes:
        return None
    last = (cfg.iterations - 1, "eval") if cfg.iterations else (0, BASELINE)
    return float(store.metrics(*last)["decodes"][cfg.eval.decodes[0]]["accuracy"])
