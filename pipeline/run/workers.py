"""Where work runs: this process (`cluster=local`) or Ray (`cluster=ray`).

Workers are plain classes and functions, wrapped with `ray.remote` in exactly one place
(`Cluster`). With `cluster=local` everything runs in this process, where a debugger works.
Models are loaded by checkpoint path inside a worker, never pickled across.

Under Ray every stage asks for its CPUs/GPUs when it starts and gives them back when it ends
(actors are killed, tasks return), so stages never wait on each other's resources. Workers see
no shared filesystem: run files travel through the object store (`share`, pipeline.run.transfer)
and results come back as return values that the driver writes.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pipeline
from pipeline.config import ClusterKind, QstarConfig
from pipeline.errors import QstarError, last_line
from pipeline.run.transfer import RunFiles, chunks, files_under

CONNECT_TIMEOUT_S = 10.0  # a cluster.address that does not answer in this time is refused


def code_packages() -> list[str]:
    """qstar's packages, shipped to a cluster started elsewhere (runtime_env py_modules)."""
    root = Path(pipeline.__file__).resolve().parent.parent
    return [str(root / name) for name in ("pipeline", "mcts", "critics")]


def runtime_env(cfg: QstarConfig) -> dict:
    """What workers on other nodes need: qstar's code (when joining a cluster) and the
    environment variables that change how libraries behave."""
    keep = ("HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_VERBOSITY", "OMP_NUM_THREADS",
            "TOKENIZERS_PARALLELISM", "QSTAR_PROGRESS")
    env = {"env_vars": {k: os.environ[k] for k in keep if k in os.environ}}
    if cfg.cluster.address:
        env["py_modules"] = code_packages()
    return env


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """One TCP connection to host:port, so an unreachable address fails in seconds."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise QstarError(f"cluster.address={address!r}: expected auto, host:port or "
                         "ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise QstarError(f"cluster.address={address!r}: cannot reach {host}:{port} within "
                         f"{timeout:.0f} s ({exc.strerror or exc})") from None


def gpu_shortfall(cfg: QstarConfig, node_gpus: Sequence[float]) -> str | None:
    """Why the cluster cannot place what `cfg` asks for (None when it can)."""
    c = cfg.cluster
    have = f"the cluster has {sum(node_gpus):g} GPUs on {len(node_gpus)} nodes " \
           f"(at most {max(node_gpus, default=0):g} on one node)"
    if c.worker_num_gpus > max(node_gpus, default=0):
        return f"cluster.worker_num_gpus={c.worker_num_gpus:g} GPUs per worker, but {have}"
    if c.search_workers * c.worker_num_gpus > sum(node_gpus) + 1e-9:
        return (f"cluster.search_workers={c.search_workers} x cluster.worker_num_gpus="
                f"{c.worker_num_gpus:g} = {c.search_workers * c.worker_num_gpus:g} GPUs, but {have}")
    return None


def _delivered(job, result, on_result: Callable | None):
    if on_result is not None:
        on_result(job, result)
    return result


class Cluster:
    def __init__(self, cfg: QstarConfig):
        self.cfg = cfg
        self.ray = None
        self._shipped: deque[dict] = deque(maxlen=2)  # share's last two calls: file key -> pieces
        self.puts = 0  # files share has put in the object store (each file once while reused)
        self.put_bytes = 0  # and their bytes
        if cfg.cluster.kind == ClusterKind.ray:
            self._start_ray()
            self.check_resources()

    def _start_ray(self) -> None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray  # heavy, and only cluster=ray needs it

        self.ray = ray
        if ray.is_initialized():
            return
        c = self.cfg.cluster
        if c.address and c.address != "auto":
            check_reachable(c.address)
        try:
            if c.address:
                ray.init(address=c.address, include_dashboard=False, log_to_driver=True,
                         runtime_env=runtime_env(self.cfg))
            else:
                ray.init(num_cpus=c.num_cpus, include_dashboard=False, log_to_driver=True,
                         runtime_env=runtime_env(self.cfg))
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            raise QstarError(f"cluster.address={c.address!r}: cannot start or join Ray "
                             f"({last_line(exc)})") from None

    def check_resources(self) -> None:
        """Refuse, before any stage starts, a request the cluster can never place."""
        gpus = [n["Resources"].get("GPU", 0.0) for n in self.ray.nodes() if n.get("Alive")]
        why = gpu_shortfall(self.cfg, gpus)
        if why:
            raise QstarError(why)

    def share(self, root: str | os.PathLike, rels: Iterable[str],
              skip: Iterable[str] = ()) -> RunFiles:
        """The run files under `rels` for workers, without what lies under a `skip` directory:
        the directory itself in-process; under Ray each file in the object store (put once,
        read by every worker) in pieces of at most CHUNK_BYTES, one piece in this process at a
        time. A file the previous call shipped, unchanged (same path, size and mtime: run
        artifacts are renamed into place, never rewritten), is not put again: search, train,
        refit and eval ship the same policy in turn. The object store keeps the files of the
        last two calls (and what running stages still hold)."""
        if self.ray is None:
            return RunFiles(root=str(root))
        earlier = {k: ref for shipped in self._shipped for k, ref in shipped.items()}
        refs, now = {}, {}
        for rel, path in files_under(root, rels, skip):
            stat = path.stat()
            key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
            pieces = now.get(key, earlier.get(key))
            if pieces is None:
                pieces = [self.ray.put(piece) for piece in chunks(path)]
                self.puts += 1
                self.put_bytes += stat.st_size
            refs[rel] = now[key] = pieces
        self._shipped.append(now)
        return RunFiles(refs=refs)

    def _actor(self, worker_cls: type):
        c = self.cfg.cluster
        # no Ray-side restarts: map_actors replaces a dead worker itself, wherever Ray has room
        return self.ray.remote(num_cpus=c.worker_num_cpus, num_gpus=c.worker_num_gpus,
                               max_restarts=0)(worker_cls).remote(self.cfg)

    def map_actors(self, worker_cls: type, jobs: Sequence, count: int, name: str,
                   on_result: Callable | None = None) -> list:
        """`worker_cls(cfg).run(job)` for every job, on up to `count` workers; results in job
        order, each also passed to `on_result(job, result)` as soon as it arrives. A job is handed to whichever worker is free; a worker that dies (its process, or
        its node) is replaced and its job retried, up to cluster.max_restarts times per job. A
        worker with nothing left to do is killed at once, so its GPU is free for a replacement;
        every worker is gone when this returns. `name` says in errors what failed."""
        if self.ray is None:
            worker = worker_cls(self.cfg)
            return [_delivered(job, worker.run(job), on_result) for job in jobs]
        ray, limit = self.ray, self.cfg.cluster.max_restarts
        results, failures = [None] * len(jobs), [0] * len(jobs)
        todo, running = deque(range(len(jobs))), {}
        idle = [self._actor(worker_cls) for _ in range(max(1, min(count, len(jobs))))]
        try:
            while todo or running:
                while idle and todo:
                    actor, k = idle.pop(), todo.popleft()
                    running[actor.run.remote(jobs[k])] = (actor, k)
                for actor in idle:  # nothing left to hand out: give the resources back
                    ray.kill(actor)
                idle = []
                [ref], _ = ray.wait(list(running), num_returns=1)
                actor, k = running.pop(ref)
                try:
                    results[k] = _delivered(jobs[k], ray.get(ref), on_result)
                    idle.append(actor)
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                        ray.exceptions.WorkerCrashedError) as exc:
                    failures[k] += 1
                    if failures[k] > limit:
                        raise QstarError(f"{name} failed after {limit} restarts: "
                                         f"{last_line(exc)}; the run is resumable") from None
                    ray.kill(actor)
                    todo.appendleft(k)
                    idle.append(self._actor(worker_cls))
        except ray.exceptions.RayError as exc:
            raise QstarError(f"{name} failed: {last_line(exc)}; the run is resumable") from None
        finally:
            for actor in idle + [a for a, _ in running.values()]:
                ray.kill(actor)
        return results

    def run_task(self, fn: Callable, *args, num_gpus: float = 0.0, name: str | None = None,
                 **kwargs):
        """One stage's work (critics, train, eval): a Ray task with its GPU request, retried on
        another worker if its process or node dies, or a plain call."""
        if self.ray is None:
            return fn(*args, **kwargs)
        remote = self.ray.remote(num_gpus=num_gpus, num_cpus=self.cfg.cluster.worker_num_cpus,
                                 max_retries=self.cfg.cluster.max_restarts)(fn)
        try:
            return self.ray.get(remote.remote(*args, **kwargs))
        except self.ray.exceptions.RayError as exc:
            raise QstarError(f"{name or fn.__name__} failed in a Ray task: {last_line(exc)}; "
                             "the run is resumable") from None
