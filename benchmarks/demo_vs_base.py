"""`make demo`, this tree against an older commit, side by side on one machine.

    python benchmarks/demo_vs_base.py [--base 656209d] [--runs runs/demo_vs_base]
                                      [--sides base same_task demo] [overrides ...]

The old commit is extracted with `git archive` into a temporary directory. Each side is one
`qstar run experiment=demo_cpu` in its own process (PYTHONPATH = its tree, `progress=false`),
one after the other, and reports its wall seconds, its peak resident memory (the process's
high-water mark, or the largest per-stage peak its manifest records where the tree resets the
mark per stage: the in-process loop runs every stage in it), each stage's seconds and peak, and
the accuracies its baseline and eval stages recorded. The sides:

- base: the old commit's demo, as `make demo` ran it there (the two-term `arithmetic` task);
- same_task: this tree's demo on that task (`task=arithmetic`): the same work, this code;
- demo: this tree's `make demo` as it is now (the default task).

The runs are kept under --runs; a side whose run finished before is read, not rerun (delete its
directory to time it again), so a killed benchmark resumes at the side it was on. Compare wall
times only between sides run on an equally quiet machine. Writes
benchmarks/results/demo_vs_base.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.report.summary import policy_rows  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.run.store import RunStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BASE = "656209d"  # main when issue 16 (search throughput) was filed
SIDES = {"base": ["experiment=demo_cpu"],
         "same_task": ["experiment=demo_cpu", "task=arithmetic"],
         "demo": ["experiment=demo_cpu"]}

DRIVER = """
import json, resource, sys, time
import pipeline
from pipeline.cli import main
start = time.perf_counter()
rc = main(["run", *json.loads(sys.argv[1])])
print(json.dumps({"rc": rc, "seconds": round(time.perf_counter() - start, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "source": pipeline.__file__}))
"""


def extract(commit: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    archive = into / "base.tar"
    with archive.open("wb") as out:
        done = subprocess.run(["git", "archive", commit], cwd=ROOT, stdout=out, stderr=subprocess.PIPE)
    if done.returncode != 0:
        sys.exit(f"error: --base {commit}: {done.stderr.decode().strip()}")
    tree = into / "tree"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def accuracies(run_dir: Path) -> dict:
    """Greedy accuracy per policy (0 = base), as `qstar inspect` reads the run's manifest."""
    return {f"policy_{r['policy']}": r["accuracy"].get("greedy") for r in policy_rows(RunStore(run_dir))}


def with_stages(result: dict, run_dir: Path) -> dict:
    """The side's result with each stage's seconds and peak RSS from its run's manifest, and its
    peak RSS the largest of the process's and the stages': a tree that resets the high-water
    mark per stage (pipeline/run/memory.py) leaves getrusage only the last stage's peak."""
    if not (run_dir / "manifest.json").is_file():
        return result
    stages = {key: {"seconds": entry["seconds"], "peak_rss_mb": entry.get("peak_rss_mb")}
              for key, entry in sorted(RunStore(run_dir).manifest["stages"].items())}
    peaks = [s["peak_rss_mb"] for s in stages.values() if s["peak_rss_mb"] is not None]
    return dict(result, stages=stages, peak_rss_mb=round(max([result["peak_rss_mb"], *peaks])))


def run_side(name: str, tree: Path, run_dir: Path, overrides: list[str]) -> dict:
    result_path = run_dir.parent / f"{name}.json"
    if result_path.is_file():
        return with_stages(json.loads(result_path.read_text()), run_dir)
    if run_dir.exists():
        sys.exit(f"error: {run_dir} holds an unfinished side; delete it to time {name} again")
    env = dict(os.environ, PYTHONPATH=str(tree), TRANSFORMERS_VERBOSITY="error",
               WANDB_MODE="disabled")
    args = [*overrides, "progress=false", f"hydra.run.dir={run_dir}"]
    print(f"{name}: qstar run {' '.join(args)}  (in {tree})", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(args)], cwd=tree, env=env,
                          stdout=subprocess.PIPE, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        sys.exit(f"error: side {name} failed (exit {done.returncode}); its run is in {run_dir}")
    result = json.loads(lines[-1])
    if result["rc"] != 0:
        sys.exit(f"error: side {name}: qstar run exited {result['rc']}")
    if Path(result["source"]).resolve().parent != (tree / "pipeline").resolve():
        sys.exit(f"error: side {name} imported {result['source']}, not {tree}/pipeline")
    result.update(overrides=overrides, run_dir=str(run_dir), greedy=accuracies(run_dir))
    result = with_stages(result, run_dir)
    write_json(result_path, result)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE, help="the commit to compare against")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "demo_vs_base")
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES))
    parser.add_argument("--output", type=Path, default=RESULTS / "demo_vs_base.json")
    parser.add_argument("overrides", nargs="*", help="extra qstar overrides for every side")
    args = parser.parse_args(argv)
    runs = args.runs.resolve()
    runs.mkdir(parents=True, exist_ok=True)
    sides = {}
    with tempfile.TemporaryDirectory(prefix="qstar-demo-base-") as tmp:
        base_tree = extract(args.base, Path(tmp)) if "base" in args.sides else None
        for name in args.sides:
            tree = base_tree if name == "base" else ROOT
            sides[name] = run_side(name, tree, runs / name, [*SIDES[name], *args.overrides])
    result = {"benchmark": "demo_vs_base", "base": args.base, "sides": sides}
    if "base" in sides:
        for name in ("same_task", "demo"):
            if name in sides:
                result[f"{name}_wall_over_base"] = round(sides[name]["seconds"] / sides["base"]["seconds"], 3)
    write_json(args.output, result)
    print(json.dumps({k: v for k, v in result.items() if k != "sides"}, indent=1))
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
