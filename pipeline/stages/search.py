"""The search stage: iteration i's training problems (all, or a window: Loop.search_problems)
searched with policy_i and critics_i.

Problems are cut into shards of `search.trees_per_batch`; each shard is one `SearchJob` for a
`SearchWorker` (in-process, or a Ray actor), which searches it and returns its rows; the driver
writes `iter_NNN/search/shard_KKKK.jsonl` atomically. A shard counts only when its file holds
exactly its problems (by id), so a resumed or retried stage searches only the missing ones, and
the stage is recorded complete only when none is missing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mcts.tree import Tree
from pipeline.config import QstarConfig, replace_model_name
from pipeline.decoding.tree_search import LeafScorer, SearchModels, train_search
from pipeline.errors import QstarError
from pipeline.lm.models import load_model
from pipeline.run.atomic import read_jsonl, write_jsonl
from pipeline.run.store import load_shards
from pipeline.run.transfer import RunFiles
from pipeline.stages.base import Loop, resolve_ref
from pipeline.stages.critics import load_critics
from pipeline.stages.reference import dpo_reference, load_implicit, searches_implicit
from pipeline.tasks.base import Problem, Task
from pipeline.tasks.prompt import task_prompts


@dataclass(frozen=True)
class SearchJob:
    """One shard of one iteration's search: everything a worker needs, nothing it must share."""

    iteration: int
    shard: int  # its index: the driver writes the rows to iter_NNN/search/shard_KKKK.jsonl
    problems: tuple[Problem, ...]
    task: Task
    files: RunFiles  # the run files below, in-process or through Ray's object store
    policy: str  # policy_i: run-relative, or the base model's name
    critics: str | None  # critics_i, run-relative; None in iteration 0


class SearchWorker:
    """Holds policy_i (+ critics_i) and searches shards of training problems. It returns the
    tree rows and writes nothing: under Ray it sees only its own temporary directory."""

    def __init__(self, cfg: QstarConfig):
        self.cfg = cfg
        self.loaded: tuple | None = None
        self.models: SearchModels | None = None

    def _ensure(self, job: SearchJob) -> SearchModels:
        if self.loaded != (job.files, job.policy, job.critics):
            self.models = None  # free the previous iteration's models first
            with job.files.opened("search") as root:  # under Ray: gone once the models load
                self.models = self._load(root, job)
            self.loaded = (job.files, job.policy, job.critics)
        return self.models

    def _load(self, root: Path, job: SearchJob) -> SearchModels:
        policy_dir = resolve_ref(root, job.policy, self.cfg.model)
        model, tokenizer = load_model(replace_model_name(self.cfg.model, policy_dir))
        critics = load_critics(root / job.critics if job.critics else None, policy_dir,
                               model, tokenizer, self.cfg)
        rollout_model = rollout_tokenizer = None
        if self.cfg.search.rollout.model:
            rollout_model, rollout_tokenizer = load_model(
                replace_model_name(self.cfg.model, self.cfg.search.rollout.model))
        implicit = None
        if searches_implicit(self.cfg.critics):
            implicit = load_implicit(policy_dir, model, tokenizer, self.cfg.model,
                                     self.cfg.critics.score_batch_size)
        return SearchModels(model, tokenizer, critics, rollout_model, rollout_tokenizer, implicit)

    def run(self, job: SearchJob) -> dict:
        """Search one shard: its rows (one per problem) and the KV cache's statistics.
        Self-contained, so a retry is safe."""
        models = self._ensure(job)
        problems = list(job.problems)
        prompts = task_prompts(models.tokenizer, job.task, problems)
        desc = f"iter {job.iteration} shard {job.shard}" if self.cfg.progress else None
        trees, scorer = train_search(problems, job.task, prompts, self.cfg, models, desc=desc)
        return {"rows": shard_rows(trees, scorer, problems, job.iteration),
                "kv": scorer.kv.stats.as_dict(), "leaf_scoring": dict(scorer.leaf_scoring)}


def shard_path(out: Path, shard: int) -> Path:
    return out / f"shard_{shard:04d}.jsonl"


def shard_ids(path: Path) -> list[str] | None:
    """The problem ids a shard file holds, in order; None when it is missing or unreadable."""
    try:
        return [str(row["problem_id"]) for row in read_jsonl(path)]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def expected_shards(problems: Sequence[Problem], size: int) -> list[tuple[Problem, ...]]:
    if not problems:
        raise QstarError("the search stage has no training problems (task.num_train)")
    return [tuple(problems[k:k + size]) for k in range(0, len(problems), size)]


def missing_shards(shards: Sequence[tuple[Problem, ...]], out: Path) -> list[int]:
    """Shards whose file is absent or does not hold exactly its problems (by id, in order)."""
    return [k for k, shard in enumerate(shards)
            if shard_ids(shard_path(out, k)) != [str(p.id) for p in shard]]


def run(loop: Loop, i: int) -> dict:
    """Search every shard not yet on disk; complete only when every shard holds its problems."""
    out = loop.store.stage_dir(i, "search")
    out.mkdir(parents=True, exist_ok=True)
    shards = expected_shards(loop.search_problems(i), loop.cfg.search.trees_per_batch)
    critics, critic_rels = loop.critics_refs(i)
    policy = loop.policy_ref(i)
    # the implicit reward's pi_ref and the policy's DPO phase travel only when leaves use it
    reference = dpo_reference(loop.policy(i)) if searches_implicit(loop.cfg.critics) else None
    files = loop.run_files([policy, *critic_rels, loop.store.relative(reference[0]) if reference else None],
                           implicit=policy if reference else None)
    start = time.perf_counter()
    kv_stats, scored = [], {}

    def write_shard(job, result):
        write_jsonl(shard_path(out, job.shard), result["rows"])
        kv_stats.append(result["kv"])
        for source, leaves in result["leaf_scoring"].items():
            scored[source] = scored.get(source, 0) + leaves

    for _ in range(loop.cfg.cluster.max_restarts + 1):
        todo = missing_shards(shards, out)
        if not todo:
            break
        jobs = [SearchJob(i, k, shards[k], loop.task, files, policy, critics) for k in todo]
        loop.cluster.map_actors(SearchWorker, jobs, loop.cfg.cluster.search_workers,
                                "search worker", on_result=write_shard)
    todo = missing_shards(shards, out)
    if todo:
        raise QstarError(f"search: shards {todo} of {len(shards)} did not come back with their "
                         "problems; the stage is not complete and the run is resumable")
    summary = summarize_search(load_shards(out), time.perf_counter() - start)
    summary["shards"] = len(shards)
    summary["tokens_per_s"] = round(summary["tokens"] / max(summary["seconds"], 1e-9), 1)
    if any(scored.values()):  # critics scored leaves: from generation or a backbone pass
        summary["critic_leaves"] = scored
    return summary | kv_summary(kv_stats)


def kv_summary(stats: list[dict]) -> dict:
    """The KV prefix cache over the shards searched now (none when all were on disk)."""
    prompt = sum(s["prompt_tokens"] for s in stats)
    if not prompt:
        return {}
    return {"kv_hit_rate": round(sum(s["reused_tokens"] for s in stats) / prompt, 4),
            "kv_peak_mb": max(s["peak_mb"] for s in stats),
            "prefill_tokens": sum(s["prefill_tokens"] for s in stats)}


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
            "reused_options": sum(s.get("reused", 0) for s in stats),  # older trees lack it
            **search_spread(rows), "seconds": round(seconds, 2)}


def search_spread(rows: list[dict]) -> dict:
    """How much the trees had to contrast, which is what the data stage pairs.

    option_logp_per_token: the options kept in the trees, their summed token log-prob over their
    tokens (None without any); nearer 0 is a sharper policy, whose resampled options merge.
    contrast_problems: trees that reached both a verified-correct and a wrong terminal, the
    problems a trajectory pair can come from."""
    options = [n for r in rows for n in r["tree"]["nodes"] if n["num_tokens"]]
    option_tokens = sum(n["num_tokens"] for n in options)
    contrast = 0
    for row in rows:
        rewards = {n["terminal_reward"] == 1.0 for n in row["tree"]["nodes"]
                   if n["terminal"] and n["terminal_reward"] is not None}
        contrast += rewards == {True, False}
    return {"option_logp_per_token": (round(sum(n["logprob"] for n in options) / option_tokens, 4)
                                      if option_tokens else None),
            "contrast_problems": contrast}
