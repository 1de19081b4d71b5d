"""The self-play loop, top to bottom: baseline, then per iteration search -> critics -> data ->
train -> eval. One short function per stage; each reads the previous stages' artifacts from
the run directory, writes its own atomically, and returns the metrics the manifest records.

Iteration i starts from policy_i (the base model for i = 0) and critics_i (none for i = 0:
leaves are scored by verified rollouts). Its critics stage fits critics_{i+1} on its trees;
its train stage makes policy_{i+1}; its eval stage measures policy_{i+1} with critics_{i+1}.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import QstarConfig, replace_model_name, to_dict
from pipeline.errors import QstarError
from pipeline.runstore import BASELINE, STAGES, RunStore
from pipeline.tasks import make_task
from pipeline.workers import Cluster, load_critics


@dataclass
class Loop:
    cfg: QstarConfig
    store: RunStore
    cluster: Cluster
    task: object
    train_problems: list
    heldout: list
    base_policy: str
    tracker: object
    _model: tuple = field(default=(None, None, None))  # (path, model, tokenizer) cached in-process

    def model(self, path: str):
        """The driver keeps one model loaded (eval, critics); reloaded when the path changes."""
        if self._model[0] != path:
            from pipeline.models import load_model

            self._model = (None, None, None)
            self._model = (path, *load_model(replace_model_name(self.cfg.model, path)))
        return self._model[1], self._model[2]


def open_loop(cfg: QstarConfig, store: RunStore) -> Loop:
    from pipeline.models import resolve_model_path
    from pipeline.tracking import Tracker

    task = make_task(cfg.task)
    train, heldout = task.splits()
    return Loop(cfg=cfg, store=store, cluster=Cluster(cfg), task=task, train_problems=train,
                heldout=heldout, base_policy=resolve_model_path(cfg.model),
                tracker=Tracker(cfg, store))


# --- stages ---


def evaluate_policy(loop: Loop, policy_dir: str, critics_dir: Path | None, out_dir: Path) -> dict:
    from pipeline.atomic import write_json
    from pipeline.config import DecodeStrategy
    from pipeline.evaluate import evaluate

    model, tokenizer = loop.model(policy_dir)
    critics = load_critics(critics_dir, policy_dir, model, tokenizer, loop.cfg)
    results = {}
    for name in loop.cfg.eval.decodes:
        result = evaluate(loop.cfg, DecodeStrategy(name), model, tokenizer, loop.task,
                          loop.heldout, critics=critics)
        results[name] = result.summary()
        write_json(out_dir / f"{name}.json", {"summary": result.summary(), "rows": result.rows})
    metrics = {"policy_dir": policy_dir, "decodes": results}
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def stage_baseline(loop: Loop) -> dict:
    return evaluate_policy(loop, loop.base_policy, None, loop.store.stage_dir(0, BASELINE))


def stage_search(loop: Loop, i: int) -> dict:
    from pipeline.search_stage import load_shards, summarize_search

    out = loop.store.stage_dir(i, "search")
    out.mkdir(parents=True, exist_ok=True)
    policy = loop.store.policy_dir(i, loop.base_policy)
    critics = loop.store.critics_dir(i)
    size = loop.cfg.search.trees_per_batch
    problems = loop.train_problems
    jobs = []
    for k in range(0, len(problems), size):
        path = out / f"shard_{k // size:04d}.jsonl"
        if not path.exists():  # atomic writes: an existing shard is complete
            jobs.append({"iteration": i, "problems": problems[k:k + size], "task": loop.task,
                         "out_path": str(path), "policy_dir": policy,
                         "critics_dir": str(critics) if critics else None})
    start = time.perf_counter()
    loop.cluster.search_shards(jobs)
    loop.cluster.release()
    summary = summarize_search(load_shards(out), time.perf_counter() - start)
    summary["tokens_per_s"] = round(summary["tokens"] / max(summary["seconds"], 1e-9), 1)
    return summary


def stage_critics(loop: Loop, i: int) -> dict:
    from pipeline.critics_stage import train_critics
    from pipeline.search_stage import load_shards

    if not loop.cfg.critics.enabled:
        return {"skipped": "critics.enabled=false"}
    rows = load_shards(loop.store.stage_dir(i, "search"))
    policy = loop.store.policy_dir(i, loop.base_policy)
    return loop.cluster.run_task(train_critics, rows, policy, loop.cfg.critics,
                                 loop.store.stage_dir(i, "critics"), model_cfg=loop.cfg.model,
                                 num_gpus=loop.cfg.cluster.worker_num_gpus)


def stage_data(loop: Loop, i: int) -> dict:
    from pipeline.data_stage import write_data
    from pipeline.search_stage import load_shards

    rows = load_shards(loop.store.stage_dir(i, "search"))
    return write_data(rows, i, loop.cfg.train.pairs, loop.store.stage_dir(i, "data"))


def stage_train(loop: Loop, i: int) -> dict:
    from pipeline.train_stage import train_policy

    loop._model = (None, None, None)  # free the driver's copy while TRL trains
    report_to = loop.tracker.report_to if loop.cluster.ray is None else "none"
    return loop.cluster.run_task(
        train_policy, loop.store.policy_dir(i, loop.base_policy), loop.store.stage_dir(i, "data"),
        loop.cfg.train, loop.store.stage_dir(i, "train"), report_to=report_to,
        model_cfg=loop.cfg.model, num_gpus=loop.cfg.cluster.worker_num_gpus)


def stage_eval(loop: Loop, i: int) -> dict:
    return evaluate_policy(loop, loop.store.policy_dir(i + 1, loop.base_policy),
                           loop.store.critics_dir(i + 1), loop.store.stage_dir(i, "eval"))


STAGE_FUNCTIONS = {"search": stage_search, "critics": stage_critics, "data": stage_data,
                   "train": stage_train, "eval": stage_eval}


# --- driver ---


def run_stage(loop: Loop, iteration: int, stage: str, fn) -> None:
    if loop.store.done(iteration, stage):
        return
    print(f"qstar: iteration {iteration} {stage} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    metrics = fn()
    seconds = time.perf_counter() - start
    loop.store.complete(iteration, stage, metrics, seconds)
    loop.tracker.log(iteration, stage, metrics, seconds)


def run_iterations(loop: Loop) -> None:
    run_stage(loop, 0, BASELINE, lambda: stage_baseline(loop))
    for i in range(loop.cfg.iterations):
        for stage in STAGES:
            run_stage(loop, i, stage, lambda fn=STAGE_FUNCTIONS[stage], i=i: fn(loop, i))
        loop.tracker.plot()


def run_loop(cfg: QstarConfig, run_dir: str | Path) -> RunStore:
    """`qstar run`: a new run in `run_dir` (Hydra's run directory), or its continuation."""
    from pipeline.inspect_run import iteration_table

    store = RunStore(run_dir)
    with store.lock():
        loop = open_loop(cfg, store)  # refuses bad task/model input before the manifest exists
        store.set_info(iterations=cfg.iterations, config=to_dict(cfg))
        try:
            run_iterations(loop)
        finally:
            loop.tracker.finish()
    print(iteration_table(store))
    print(f"run directory: {store.root}   plots: {store.root / 'plots'}")
    return store


def resume_run(run_dir: str, overrides: list[str]) -> RunStore:
    """`qstar resume RUN_DIR [iterations=N]`: the run's own config, from its first open stage."""
    from pipeline.compose import load_run_config

    if not Path(run_dir).is_dir() or not (Path(run_dir) / "manifest.json").is_file():
        raise QstarError(f"{run_dir} is not a qstar run directory (no manifest.json)")
    cfg = load_run_config(Path(run_dir), overrides)
    return run_loop(cfg, run_dir)
