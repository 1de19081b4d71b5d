"""Where work runs: this process (`cluster=local`) or Ray (`cluster=ray`).

Workers are plain classes and functions, wrapped with `ray.remote` in exactly one place
(`Cluster`). With `cluster=local` everything runs in this process, where a debugger works.
Models are loaded by checkpoint path inside a worker, never pickled across.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from pipeline.config import ClusterKind, QstarConfig
from pipeline.errors import QstarError, last_line


class Cluster:
    def __init__(self, cfg: QstarConfig):
        self.cfg = cfg
        self.ray = None
        if cfg.cluster.kind == ClusterKind.ray:
            self._start_ray()

    def _start_ray(self) -> None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray  # heavy, and only cluster=ray needs it

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

    def map_actors(self, worker_cls: type, jobs: Sequence, count: int, name: str) -> list:
        """`worker_cls(cfg).run(job)` for every job, on `count` workers (round-robin); the
        workers live for this call only, so their memory and GPUs are free when it returns.
        `name` says in errors what failed ("search worker")."""
        if self.ray is None:
            worker = worker_cls(self.cfg)
            return [worker.run(job) for job in jobs]
        c = self.cfg.cluster
        actor = self.ray.remote(num_cpus=c.worker_num_cpus, num_gpus=c.worker_num_gpus,
                                max_restarts=c.max_restarts, max_task_retries=c.max_restarts)
        actors = [actor(worker_cls).remote(self.cfg) for _ in range(max(1, min(count, len(jobs))))]
        try:
            refs = [actors[k % len(actors)].run.remote(job) for k, job in enumerate(jobs)]
            return self.ray.get(refs)
        except self.ray.exceptions.RayError as exc:
            raise QstarError(f"{name} failed after {c.max_restarts} restarts: "
                             f"{last_line(exc)}; the run is resumable") from None
        finally:
            for a in actors:
                self.ray.kill(a)

    def run_task(self, fn: Callable, *args, num_gpus: float = 0.0, **kwargs):
        """Training and critic fitting: a Ray task with its GPU request, or a plain call."""
        if self.ray is None:
            return fn(*args, **kwargs)
        remote = self.ray.remote(num_gpus=num_gpus, num_cpus=self.cfg.cluster.worker_num_cpus,
                                 max_retries=self.cfg.cluster.max_restarts)(fn)
        try:
            return self.ray.get(remote.remote(*args, **kwargs))
        except self.ray.exceptions.RayError as exc:
            raise QstarError(f"{fn.__name__} failed in a Ray task: {last_line(exc)}; "
                             "the run is resumable") from None
