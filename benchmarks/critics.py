"""The critics: within-problem AUC per critic and iteration, best-of-N selection by each critic
on the same test samples, and what scoring with trained critics costs the search.

    python benchmarks/critics.py [--iterations 3] [--runs runs/bench-critics]
    python benchmarks/critics.py --smoke model=<tiny checkpoint>   # the plumbing, in a minute

1. One `qstar run experiment=demo_cpu eval.decodes=[greedy,best_of_n] decode.n=8` (resumed
   if it exists). Per iteration, the critics its trained policy was evaluated with (the refit
   stage's, fitted on that policy; the critics stage's where no refit ran) report the
   within-problem AUC of value, PRM, ORM and the policy's DPO implicit reward on their
   held-out completions: right against wrong completions of one problem, averaged over
   problems with both.
2. Its eval stage draws 8 samples per test problem from each trained policy and grades every
   selection on the same samples: majority vote, ORM argmax, ORM-weighted vote and the summed
   implicit reward (against the policy's DPO reference, recorded in its meta.json).
3. search_tok_s_ratio_with_critics: the final policy searches the training problems twice in
   this process, once scored by its trained critics and once without any: same policy, same
   problems, same search settings; tokens/s with critics divided by tokens/s without.
Each finished part is kept beside the run, so a killed benchmark resumes where it stopped.
`--runs runs/bench/mcts_dpo` reuses the loop benchmark's run (benchmarks/loop.py: the same
demo loop, 3 iterations, best-of-8 among its decodes): only part 3 is then new work.
Writes benchmarks/results/critics.json (--smoke: the run directory's critics.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pipeline.compose import load_run_config  # noqa: E402
from pipeline.report.summary import critics_metrics  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.run.store import RunStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
QSTAR = str(Path(sys.executable).parent / "qstar")
CRITICS = ("value", "prm", "orm", "implicit")
SELECTIONS = ("majority", "orm", "orm_vote", "implicit")
FULL = ["experiment=demo_cpu", "eval.decodes=[greedy,best_of_n]", "decode.n=8"]
SMOKE = ["debug=default", "eval.decodes=[best_of_n]"]


def run_loop(run_dir: Path, iterations: int, overrides: list[str]) -> RunStore:
    """The qstar run, started or resumed; exits with one line if it fails."""
    if (run_dir / "manifest.json").is_file():
        command = [QSTAR, "resume", str(run_dir), f"iterations={iterations}"]
    else:
        command = [QSTAR, "run", *overrides, f"iterations={iterations}", f"hydra.run.dir={run_dir}"]
    print("$", " ".join(command), flush=True)
    env = dict(os.environ, WANDB_MODE="disabled")
    if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
        sys.exit("the benchmark's qstar run failed (rerun to resume it)")
    return RunStore(run_dir)


def within_problem(store: RunStore, iterations: int) -> dict[str, list]:
    """Per critic, per iteration: the within-problem AUC on held-out completions of the critics
    policy i+1 was evaluated with (None where the critic does not exist, e.g. implicit when no
    refit judged a DPO-trained policy)."""
    found = {kind: [] for kind in CRITICS}
    for i in range(iterations):
        metrics = critics_metrics(store, i) or {}
        for kind in CRITICS:
            found[kind].append((metrics.get(kind) or {}).get("within_problem_auc"))
    return found


def selection(store: RunStore, iterations: int, n: int) -> list[dict]:
    """Per trained policy: best-of-N test accuracy by each selection, on the same samples."""
    rows = []
    for i in range(iterations):
        decodes = (store.metrics(i, "eval") or {}).get("decodes", {})
        best = decodes.get("best_of_n")
        if best is None:
            continue
        by_select = best.get("accuracy_by_select", {})
        rows.append({"policy": i + 1, "n": n, "problems": best["total"],
                     **{name: by_select.get(name) for name in SELECTIONS}})
    return rows


def search_speed(store: RunStore, cfg, iterations: int, part: Path) -> dict:
    """Tokens/s of the final policy's search over the training problems, with and without its
    trained critics (each half kept in `part` as it finishes)."""
    from pipeline.decoding.tree_search import SearchModels, train_search
    from pipeline.lm.models import load_model, resolve_model_path
    from pipeline.stages.critics import load_critics
    from pipeline.tasks import make_task
    from pipeline.tasks.prompt import task_prompts

    done = json.loads(part.read_text()) if part.is_file() else {}
    policy = store.policy_dir(iterations, resolve_model_path(cfg.model))
    critics_dir = store.critics_dir(iterations)
    if critics_dir is None:
        return {"skipped": "the run trained no critics for its final policy"}
    model, tokenizer = load_model(cfg.model, policy)
    task = make_task(cfg.task)
    problems = task.split("train")
    prompts = task_prompts(tokenizer, task, problems)
    critics = load_critics(critics_dir, policy, model, tokenizer, cfg)
    for name, scoring in (("without_critics", None), ("with_critics", critics)):
        if name in done:
            continue
        start = time.perf_counter()
        trees, _ = train_search(problems, task, prompts, cfg, SearchModels(model, tokenizer, scoring))
        seconds = time.perf_counter() - start
        tokens = sum(t.stats.total_tokens for t in trees)
        done[name] = {"tokens": tokens, "seconds": round(seconds, 2),
                      "tokens_per_s": round(tokens / seconds, 2)}
        write_json(part, done)
    return {"policy": policy, "critics": str(critics_dir), "problems": len(problems), **done,
            "search_tok_s_ratio_with_critics": round(
                done["with_critics"]["tokens_per_s"] / done["without_critics"]["tokens_per_s"], 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-critics")
    parser.add_argument("--smoke", action="store_true",
                        help="1 iteration of the debug config (pass model=<checkpoint>)")
    parser.add_argument("overrides", nargs="*", help="extra qstar config overrides")
    args = parser.parse_args(argv)
    iterations = 1 if args.smoke else args.iterations
    overrides = [*(SMOKE if args.smoke else FULL), *args.overrides]
    store = run_loop(args.runs, iterations, overrides)
    cfg = load_run_config(args.runs, [])  # what the run ran with (a resumed run: its own config)
    result = {
        "benchmark": "critics", "smoke": args.smoke, "run": str(args.runs),
        "iterations": iterations, "overrides": overrides,
        "within_problem_auc": within_problem(store, iterations),
        "best_of_n_on_test": selection(store, iterations, cfg.decode.n),
        "search": search_speed(store, cfg, iterations, args.runs / "bench_search_speed.json"),
    }
    result["search_tok_s_ratio_with_critics"] = result["search"].get("search_tok_s_ratio_with_critics")
    out = args.runs / "critics.json" if args.smoke else RESULTS / "critics.json"
    write_json(out, result)
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
