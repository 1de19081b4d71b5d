"""What shipping run files to Ray workers costs the driver, the old way against the new, side by
side in one run.

    python benchmarks/ray_share.py --run RUN [--iteration 1] [--output PATH]

One iteration of a `cluster=ray` loop with greedy eval ships, stage by stage
(pipeline/stages/*: `run_files`), policy_i to search and train, policy_{i+1} with the DPO phase
it keeps for the implicit reward and policy_i (its DPO reference) to refit, then policy_{i+1} to
eval and the next search (the critics' heads and the data rows are kilobytes). `RUN` is a
finished run whose iteration `--iteration` trained a policy (a `make demo` run: iteration 1
trains policy_2 from policy_1; at iteration 0 policy_0 is the base model, resolved on each node
and never shipped). Each side replays that sequence
in its own process with a local Ray (1 CPU) and reports the seconds spent shipping, the bytes put
in the object store and the driver's peak resident memory above what it held once Ray was up:

- `pack_whole` (before): each stage's files read into one `{path: bytes}` dict, then put whole;
- `per_file_reused` (`Cluster.share` now): each file put on its own, one file's bytes in the
  driver at a time, a file the previous stage shipped not put again.

A worker then reads the shipped files once per stage either way. Writes JSON (default
benchmarks/results/ray_share.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.compose import load_run_config  # noqa: E402
from pipeline.config import ClusterKind  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.run.store import RunStore  # noqa: E402
from pipeline.run.transfer import pack  # noqa: E402
from pipeline.run.workers import Cluster  # noqa: E402
from pipeline.stages.reference import KEPT_PHASES  # noqa: E402

SIDES = ("pack_whole", "per_file_reused")


def stage_files(run: Path, i: int) -> list[tuple[str, list[str], list[str]]]:
    """(stage, run-relative dirs, skipped dirs) in the order one iteration ships them; the base
    model (policy_0) is resolved on each node, never shipped."""
    store, name = RunStore(run), load_run_config(run, []).model.name
    old, new = store.policy_ref(i, name), store.policy_ref(i + 1, name)
    old = [old] if store.in_run(old) else []
    data = store.relative(store.stage_dir(i, "data"))

    def kept(rels):
        return [f"{r}/{k}" for r in rels for k in KEPT_PHASES]
    # refit judges the new policy's implicit reward (its DPO phase) against its DPO reference,
    # policy_i; greedy eval and search need neither
    return [("search", old, kept(old)), ("train", [*old, data], kept(old)),
            ("refit", [new, *old], kept(old)), ("eval", [new], kept([new])),
            ("next search", [new], kept([new]))]


def replay(run: Path, i: int, side: str) -> dict:
    import ray

    cfg = load_run_config(run, [])
    cfg.cluster.kind = ClusterKind.ray
    cfg.cluster.num_cpus = 1
    cluster = Cluster(cfg)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stages, start, put_bytes, held = [], time.perf_counter(), 0, None
    for stage, rels, skip in stage_files(run, i):
        t0 = time.perf_counter()
        if side == "pack_whole":
            files = pack(run, rels, skip)
            put_bytes += sum(len(b) for b in files.values())
            held = ray.put(files)  # alive while its stage runs, as the loop holds it
            del files
        else:
            held = cluster.share(run, rels, skip)
            put_bytes = cluster.put_bytes
        stages.append({"stage": stage, "seconds": round(time.perf_counter() - t0, 3)})
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del held
    out = {"seconds": round(time.perf_counter() - start, 3), "stages": stages,
           "driver_peak_rss_above_ray_mb": round((peak_kb - base_kb) / 1024, 1)}
    out["put_mb"] = round(put_bytes / 2**20, 1)
    ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--iteration", type=int, default=1)
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one side, in its process
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/ray_share.json")
    args = ap.parse_args()
    if args.side:
        print(json.dumps(replay(args.run, args.iteration, args.side)))
        return
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    result = {"run": str(args.run), "iteration": args.iteration,
              "stages": [s for s, _, _ in stage_files(args.run, args.iteration)]}
    for side in SIDES:
        proc = subprocess.run([sys.executable, __file__, "--run", str(args.run), "--iteration",
                               str(args.iteration), "--side", side], env=env, check=True,
                              capture_output=True, text=True)
        result[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(side, json.dumps(result[side]))
    write_json(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
