"""The search stage: every training problem of iteration i searched with policy_i and critics_i.

Problems are cut into shards of `search.trees_per_batch`; each shard is one `SearchJob` for a
`SearchWorker` (in-process, or a Ray actor), which searches it and writes
`iter_NNN/search/shard_KKKK.jsonl` atomically. A shard that exists is complete, so a resumed
stage searches only the missing ones.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mcts.tree import Tree
from pipeline.config import QstarConfig, replace_model_name
from pipeline.decoding.tree_search import LeafScorer, SearchModels, train_search
from pipeline.errors import QstarError
from pipeline.lm.models import load_model
from pipeline.run.atomic import write_jsonl
from pipeline.run.store import load_shards
from pipeline.stages.base import Loop
from pipeline.stages.critics import load_critics
from pipeline.tasks.base import Problem, Task
from pipeline.tasks.prompt import task_prompts


@dataclass(frozen=True)
class SearchJob:
    """One shard of one iteration's search: everything a worker needs, nothing it must share."""

    iteration: int
    problems: tuple[Problem, ...]
    task: Task
    out_path: str  # the shard file, written atomically
    policy_dir: str  # policy_i
    critics_dir: str | None  # critics_i; None in iteration 0


class SearchWorker:
    """Holds policy_i (+ critics_i) and searches shards of training problems."""

    def __init__(self, cfg: QstarConfig):
        self.cfg = cfg
        self.loaded: tuple[str, str | None] | None = None
        self.models: SearchModels | None = None

    def _ensure(self, policy_dir: str, critics_dir: str | None) -> SearchModels:
        if self.loaded != (policy_dir, critics_dir):
            model, tokenizer = load_model(replace_model_name(self.cfg.model, policy_dir))
            critics = load_critics(Path(critics_dir) if critics_dir else None, policy_dir, model,
                                   tokenizer, self.cfg)
            rollout_model = rollout_tokenizer = None
            if self.cfg.search.rollout.model:
                rollout_model, rollout_tokenizer = load_model(
                    replace_model_name(self.cfg.model, self.cfg.search.rollout.model))
            self.models = SearchModels(model, tokenizer, critics, rollout_model, rollout_tokenizer)
            self.loaded = (policy_dir, critics_dir)
        return self.models

    def run(self, job: SearchJob) -> dict:
        """Search one shard and write it atomically; self-contained, so a retry is safe."""
        models = self._ensure(job.policy_dir, job.critics_dir)
        problems = list(job.problems)
        prompts = task_prompts(models.tokenizer, job.task, problems)
        desc = f"iter {job.iteration} {Path(job.out_path).stem}" if self.cfg.progress else None
        trees, scorer = train_search(problems, job.task, prompts, self.cfg, models, desc=desc)
        write_jsonl(job.out_path, shard_rows(trees, scorer, problems, job.iteration))
        return {"path": job.out_path, "trees": len(problems), "pid": os.getpid()}


def shard_jobs(problems: Sequence[Problem], task: Task, iteration: int, out: Path, size: int,
               policy_dir: str, critics_dir: str | None) -> list[SearchJob]:
    """The shards of one iteration's search not yet on disk, `size` problems each."""
    if not problems:
        raise QstarError("the search stage has no training problems (task.num_train)")
    jobs = []
    for k in range(0, len(problems), size):
        path = out / f"shard_{k // size:04d}.jsonl"
        if not path.exists():  # atomic writes: an existing shard is complete
            jobs.append(SearchJob(iteration, tuple(problems[k:k + size]), task, str(path),
                                  policy_dir, critics_dir))
    return jobs


def run(loop: Loop, i: int) -> dict:
    out = loop.store.stage_dir(i, "search")
    out.mkdir(parents=True, exist_ok=True)
    critics = loop.store.critics_dir(i)
    jobs = shard_jobs(loop.train_problems, loop.task, i, out, loop.cfg.search.trees_per_batch,
                      loop.policy(i), str(critics) if critics else None)
    start = time.perf_counter()
    loop.cluster.map_actors(SearchWorker, jobs, loop.cfg.cluster.search_workers,
                            "search worker")
    summary = summarize_search(load_shards(out), time.perf_counter() - start)
    summary["tokens_per_s"] = round(summary["tokens"] / max(summary["seconds"], 1e-9), 1)
    return summary


def shard_rows(trees: list[Tree], scorer: LeafScorer, problems: Sequence[Problem],
               iteration: int) -> list[dict]:
    rows = []
    for tree, problem in zip(trees, problems):
        rollouts = {str(node): {"text": ro.text, "tokens": ro.tokens, "finished": ro.finished}
                    for (t, node), ro in scorer.rollouts.items() if t == tree.tree_index}
        solved = any(r == 1.0 for r in tree.terminal_reward if r is not None)
        rows.append({"problem_id": problem.id, "iteration": iteration, "question": problem.question,
                     "prompt": tree.prompt, "solved": solved, "tree": tree.to_json(),
                     "rollouts": rollouts})
    return rows


def summarize_search(rows: list[dict], seconds: float) -> dict:
    stats = [r["tree"]["stats"] for r in rows]
    tokens = sum(s["tokens_generated"] + s["evaluator_tokens"] for s in stats)
    return {"problems": len(rows), "solved": sum(r["solved"] for r in rows),
            "solve_rate": sum(r["solved"] for r in rows) / max(len(rows), 1),
            "nodes": sum(len(r["tree"]["nodes"]) for r in rows),
            "merges": sum(s["merges"] for s in stats), "tokens": tokens,
            "seconds": round(seconds, 2)}
