"""The demo's search stage, this tree against an older commit, side by side on one machine.

    python benchmarks/search_vs_base.py [--base e0afed1] [--problems 16] [--simulations 8]
                                        [--repeats 2] [overrides ...]

The old commit is extracted with `git archive` into a temporary directory. Each side runs the
same driver in its own subprocess (PYTHONPATH = its tree), on the demo's config shrunk to
`--problems` training problems: load SmolLM2, search, report wall seconds, generated tokens and
a digest of every tree's node texts (equal digests: both sides did the same work). The sides
alternate `--repeats` times and each keeps its fastest run, so a shared CPU's load hits both.
Writes benchmarks/results/search_vs_base.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.run.atomic import write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

DRIVER = """
import hashlib, json, os, sys, time
import pipeline
from pipeline.compose import compose_config
from pipeline.decoding.tree_search import SearchModels, train_search
from pipeline.lm.models import load_model
from pipeline.tasks import make_task

cfg = compose_config(json.loads(sys.argv[1]))
model, tokenizer = load_model(cfg.model)
task = make_task(cfg.task)
if hasattr(task, "split"):  # this tree: three splits, the prompt is the task's
    from pipeline.tasks.prompt import task_prompts
    problems = task.split("train")
    prompts = task_prompts(tokenizer, task, problems)
else:  # the commit before: two splits, one prompt
    from pipeline.tasks.prompt import render_prompts
    problems, _ = task.splits()
    prompts = render_prompts(tokenizer, [p.question for p in problems])
start = time.perf_counter()
trees, scorer = train_search(problems, task, prompts, cfg, SearchModels(model, tokenizer))
seconds = time.perf_counter() - start
texts = json.dumps([[t.text[n] for n in range(t.num_nodes)] for t in trees])
kv = getattr(scorer, "kv", None)
print(json.dumps({"seconds": round(seconds, 1), "tokens": sum(t.stats.total_tokens for t in trees),
                  "nodes": sum(t.num_nodes for t in trees),
                  "digest": hashlib.sha256(texts.encode()).hexdigest()[:16],
                  "kv_hit_rate": kv.stats.hit_rate if kv else None,
                  "source": os.path.dirname(pipeline.__file__)}))
"""


def run_side(tree: Path, overrides: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), QSTAR_PROGRESS="0", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(overrides)], cwd=tree, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: the search driver failed in {tree}: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["source"]).resolve() != (tree / "pipeline").resolve():
        sys.exit(f"error: the driver imported {result['source']}, not {tree}/pipeline")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="e0afed1", help="the commit to compare against")
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--simulations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra qstar config overrides (both sides)")
    args = parser.parse_args()
    overrides = ["task=arithmetic", f"task.num_train={args.problems}",
                 f"search.simulations={args.simulations}", f"search.trees_per_batch={args.problems}",
                 "progress=false", *args.overrides]
    with tempfile.TemporaryDirectory(prefix="qstar-base-") as tmp:
        base = Path(tmp)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        runs = {"base": [], "new": []}
        for _ in range(args.repeats):
            runs["base"].append(run_side(base, overrides))
            runs["new"].append(run_side(ROOT, overrides))
            print(json.dumps({k: v[-1] for k, v in runs.items()}), flush=True)
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    result = {"benchmark": "search_vs_base", "base": args.base, "problems": args.problems,
              "simulations": args.simulations, "overrides": overrides, "cpus": os.cpu_count(),
              "runs": runs, "base_seconds": best["base"]["seconds"], "new_seconds": best["new"]["seconds"],
              "wall_ratio": round(best["new"]["seconds"] / best["base"]["seconds"], 3),
              "same_trees": best["base"]["digest"] == best["new"]["digest"],
              "base_tok_s": round(best["base"]["tokens"] / best["base"]["seconds"], 1),
              "new_tok_s": round(best["new"]["tokens"] / best["new"]["seconds"], 1)}
    write_json(RESULTS / "search_vs_base.json", result)
    print(json.dumps(result, indent=2))
    print(f"search wall time new/base {result['wall_ratio']} (target <= 0.5); "
          f"same trees: {result['same_trees']}")


if __name__ == "__main__":
    main()
