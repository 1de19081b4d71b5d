"""Workers: plain classes, wrapped with `ray.remote` in exactly one place (`Cluster`).

With `cluster=local` everything runs in this process (a debugger works); with `cluster=ray`
the same classes run as actors with `num_cpus`/`num_gpus` from config. Models are loaded by
checkpoint path inside the worker at iteration boundaries, never pickled across.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import ClusterKind, QstarConfig, replace_model_name
from pipeline.errors import QstarError


def load_critics(critics_dir: Path | None, policy_dir: str, model, tokenizer, cfg: QstarConfig):
    """critics_i for scoring; they share the policy's weights when their backbone is the policy."""
    if critics_dir is None:
        return None
    from pipeline.critics_stage import load_critic_set

    return load_critic_set(critics_dir, policy_dir=policy_dir, model=model, tokenizer=tokenizer,
                           model_cfg=cfg.model, batch_size=cfg.critics.score_batch_size)


class SearchWorker:
    """Holds policy_i (+ critics_i) and searches shards of training problems."""

    def __init__(self, cfg: QstarConfig):
        self.cfg = cfg
        self.loaded: tuple[str, str | None] | None = None
        self.models = None

    def _ensure(self, policy_dir: str, critics_dir: str | None) -> None:
        if self.loaded == (policy_dir, critics_dir):
            return
        from pipeline.models import load_model
        from pipeline.search_stage import SearchModels

        model, tokenizer = load_model(replace_model_name(self.cfg.model, policy_dir))
        critics = load_critics(Path(critics_dir) if critics_dir else None, policy_dir, model,
                               tokenizer, self.cfg)
        rollout_model = rollout_tokenizer = None
        if self.cfg.search.rollout.model:
            rollout_model, rollout_tokenizer = load_model(
                replace_model_name(self.cfg.model, self.cfg.search.rollout.model))
        self.models = SearchModels(model, tokenizer, critics, rollout_model, rollout_tokenizer)
        self.loaded = (policy_dir, critics_dir)

    def search_shard(self, iteration: int, problems: list, task, out_path: str, policy_dir: str,
                     critics_dir: str | None) -> dict:
        """Search one shard and write it atomically; self-contained, so a retry is safe."""
        from pipeline.atomic import write_jsonl
        from pipeline.evaluate import render_prompts
        from pipeline.search_stage import shard_rows, train_search

        self._ensure(policy_dir, critics_dir)
        prompts = render_prompts(self.models.tokenizer, [p.question for p in problems])
        desc = f"iter {iteration} {Path(out_path).stem}" if self.cfg.progress else None
        trees, scorer = train_search(problems, task, prompts, self.cfg, self.models, desc=desc)
        rows = shard_rows(trees, scorer, problems, iteration)
        write_jsonl(out_path, rows)
        return {"path": out_path, "trees": len(rows), "pid": os.getpid()}

    def ping(self) -> int:
        return os.getpid()


class Cluster:
    """Where work runs: this process, or Ray actors/tasks."""

    def __init__(self, cfg: QstarConfig):
        self.cfg = cfg
        self.ray = None
        if cfg.cluster.kind == ClusterKind.ray:
            self._start_ray()
            c = cfg.cluster
            actor = self.ray.remote(num_cpus=c.worker_num_cpus, num_gpus=c.worker_num_gpus,
                                    max_restarts=c.max_restarts, max_task_retries=c.max_restarts)
            self.workers = [actor(SearchWorker).remote(cfg) for _ in range(c.search_workers)]
        else:
            self.workers = [SearchWorker(cfg)]

    def _start_ray(self) -> None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        self.ray = ray
        if ray.is_initialized():
            return
        c = self.cfg.cluster
        try:
            if c.address:
                ray.init(address=c.address, include_dashboard=False, log_to_driver=True)
            else:
                ray.init(num_cpus=c.num_cpus, include_dashboard=False, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise QstarError(f"cluster.address={c.address!r}: cannot start or join Ray ({exc})") from None

    def search_shards(self, jobs: list[dict]) -> list[dict]:
        """jobs: kwargs for SearchWorker.search_shard; sliced round-robin over the workers."""
        if self.ray is None:
            return [self.workers[0].search_shard(**job) for job in jobs]
        refs = [self.workers[k % len(self.workers)].search_shard.remote(**job)
                for k, job in enumerate(jobs)]
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayError as exc:
            raise QstarError(f"search worker failed after {self.cfg.cluster.max_restarts} "
                             f"restarts: {first_line(exc)}; the run is resumable") from None

    def run_task(self, fn, *args, num_gpus: float = 0.0, **kwargs):
        """Training and critic fitting: a Ray task with its GPU request, or a plain call."""
        if self.ray is None:
            return fn(*args, **kwargs)
        remote = self.ray.remote(num_gpus=num_gpus, num_cpus=self.cfg.cluster.worker_num_cpus,
                                 max_retries=self.cfg.cluster.max_restarts)(fn)
        try:
            return self.ray.get(remote.remote(*args, **kwargs))
        except self.ray.exceptions.RayError as exc:
            raise QstarError(f"{fn.__name__} failed in a Ray task: {first_line(exc)}; "
                             "the run is resumable") from None

    def release(self) -> None:
        """Free worker memory at stage boundaries (actors reload by path when needed)."""
        if self.ray is None:
            self.workers = [SearchWorker(self.cfg)]


def first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
