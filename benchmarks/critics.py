"""The critics: within-problem AUC per critic and iteration, best-of-N selection by each critic
on the same test samples, and what scoring with trained critics costs the search.

    python benchmarks/critics.py [--iterations 3] [--runs runs/bench-critics]
    python benchmarks/critics.py --smoke model=<tiny checkpoint>   # the plumbing, in a minute

1. One `qstar run experiment=demo_cpu` (resumed if it exists). Per iteration, the critics its
   trained policy was evaluated with (the refit stage's, fitted on that policy; the critics
   stage's where no refit ran) report the within-problem AUC of value, PRM, ORM and the
   policy's DPO implicit reward on their held-out completions: right against wrong completions
   of one problem, averaged over problems with both (`within_problem_auc_trees`: held out from
   the heads, but DPO trained the policy on those problems).
2. Each trained policy draws --n samples per test problem (`qstar eval eval.split=test
   decode=best_of_n` with those critics) and every selection is graded on the same samples:
   majority vote, ORM argmax, ORM-weighted vote and the summed implicit reward (against the
   policy's DPO reference, recorded in its meta.json), each also against majority problem by
   problem (`paired_with_majority`, benchmarks/paired.py). On the same samples, of problems nothing
   trained on, `within_problem_auc` per critic and policy, beside four untrained scores (the
   samples' mean log-prob, their answer's vote share, the step check's pass or flag, and
   checked majority's score: the pass plus the answer's share of the samples passed).
3. search_tok_s_ratio_with_critics: the final policy searches the training problems three
   times in this process: without critics, with its trained critics reading a backbone pass
   per leaf (critics.leaf_features=backbone), and with them reading the search's own decoding
   pass (generation, the default); same policy, problems and settings. The ratio is tokens/s
   with critics (generation) over tokens/s without; the backbone ratio is reported beside it.
Each finished part is kept beside the run, so a killed benchmark resumes where it stopped.
`--runs DIR --iterations K` reuses any MCTS-loop run with K finished iterations (e.g.
runs/matched_budget/mcts); `--search-problems N` limits part 3 to the first N problems.
Writes benchmarks/results/critics.json (--smoke: the run directory's critics.json; --output: the
path given).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from paired import against_rule  # noqa: E402
from sample_scores import candidate_scores  # noqa: E402

from pipeline.compose import load_run_config  # noqa: E402
from pipeline.config import Selection  # noqa: E402
from pipeline.report.summary import critics_metrics  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.run.store import RunStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
QSTAR = str(Path(sys.executable).parent / "qstar")
CRITICS = ("value", "prm", "orm", "implicit")
UNTRAINED = ("mean_logprob", "vote_share", "step_check", "checked_vote")  # scores no run trained
SELECTIONS = tuple(s.value for s in Selection)  # majority, orm, ..., checked_majority
HALVES = (("without_critics", False, "generation"),  # (name, with critics, critics.leaf_features)
          ("with_critics_backbone", True, "backbone"),
          ("with_critics", True, "generation"))
FULL = ["experiment=demo_cpu"]
SMOKE = ["debug=default"]


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
    """Per critic, per iteration: the within-problem AUC the run recorded on the held-out trees
    of the critics policy i+1 was evaluated with (None where the critic does not exist, e.g.
    implicit when no refit judged a DPO-trained policy). Held out from the heads, not from the
    policy: DPO trained policy i+1 on those problems' trees, which flatters the implicit reward
    and the log-prob features; on_test_samples is the fair measure."""
    found = {kind: [] for kind in CRITICS}
    for i in range(iterations):
        metrics = critics_metrics(store, i) or {}
        for kind in CRITICS:
            found[kind].append((metrics.get(kind) or {}).get("within_problem_auc"))
    return found


def selection(store: RunStore, cfg, iterations: int, n: int, out: Path) -> list[dict]:
    """Per trained policy: best-of-N accuracy on the test split by each selection, on the same
    samples, with the critics it was evaluated with (`qstar eval eval.split=test`, once; the
    JSON in `out` is the cache)."""
    from pipeline.config import DecodeStrategy, Split
    from pipeline.lm.models import resolve_model_path
    from pipeline.stages.eval import run_eval

    rows = []
    base = resolve_model_path(cfg.model)
    for i in range(1, iterations + 1):
        critics = store.critics_dir(i)
        output = out / f"p{i}_best_of_{n}_test.json"
        if not output.is_file():  # the run's own config, pointed at policy i and the test split
            print("eval ->", output, flush=True)
            run_eval(replace(
                cfg, progress=False, model=replace(cfg.model, name=store.policy_dir(i, base)),
                decode=replace(cfg.decode, strategy=DecodeStrategy.best_of_n, n=n),
                eval=replace(cfg.eval, split=Split.test, output=str(output),
                             critics=str(critics) if critics else None)))
        graded = json.loads(output.read_text())
        best = graded["summary"]
        by_select = best.get("accuracy_by_select", {})
        rows.append({"policy": i, "n": n, "problems": best["total"], "split": best["split"],
                     "critics": str(critics) if critics else None, "pass_at_n": best.get("pass_at_n"),
                     **{name: by_select.get(name) for name in SELECTIONS},
                     "paired_with_majority": against_rule(graded["rows"], "select",
                                                          Selection.majority.value)})
    return rows


def on_test_samples(store: RunStore, cfg, iterations: int, n: int, out: Path) -> dict[str, list]:
    """Per critic, per trained policy: the within-problem AUC on that policy's best-of-N samples
    of the test problems (right against wrong samples of one problem, averaged over problems
    with both), which no policy or critic trained on. Beside the critics, untrained scores for
    reference: the samples' mean token log-prob under the policy, and the rules'
    (benchmarks/sample_scores.py): their answer's vote share, the step check (1 when it flags no
    line, 0 when it does) and checked majority's score (the check plus the answer's share of
    the samples it passes).
    Value and PRM judge the whole sample as a state. Kept per policy in `out`."""
    from critics.metrics import within_problem_auc
    from pipeline.lm.models import load_model, resolve_model_path
    from pipeline.lm.teacher_forced import completion_logprobs
    from pipeline.stages.critics import load_critics
    from pipeline.tasks import make_task
    from pipeline.tasks.prompt import task_prompts

    task = make_task(cfg.task)
    problems = {p.id: p for p in task.split("test")}
    found = {kind: [] for kind in (*CRITICS, *UNTRAINED)}
    for i in range(1, iterations + 1):
        part = out / f"p{i}_within_problem_test.json"
        if not part.is_file():
            rows = json.loads((out / f"p{i}_best_of_{n}_test.json").read_text())["rows"]
            policy = store.policy_dir(i, resolve_model_path(cfg.model))
            model, tokenizer = load_model(cfg.model, policy)
            prompts = dict(zip((r["id"] for r in rows), task_prompts(
                tokenizer, task, [problems[r["id"]] for r in rows]), strict=True))
            texts = [(r["id"], c) for r in rows for c in r["candidates"]]
            ids, samples = [t[0] for t in texts], [t[1] for t in texts]
            right = [float(task.is_correct(problems[pid], c)) for pid, c in texts]
            rules = [candidate_scores(r["candidates"], task.extract_answer) for r in rows]
            scores = {"implicit": [x for r in rows for x in r.get("implicit_rewards") or []] or None,
                      "mean_logprob": [sum(lp) / max(len(lp), 1) for lp in completion_logprobs(
                          model, tokenizer, [prompts[pid] for pid in ids], samples,
                          cfg.critics.score_batch_size)],
                      **{kind: [x for per_row in rules for x in per_row[kind]]
                         for kind in ("vote_share", "step_check", "checked_vote")}}
            critics = load_critics(store.critics_dir(i), policy, model, tokenizer, cfg)
            if critics is not None:
                scores.update({k: v.tolist() for k, v in critics.score(
                    [prompts[pid] for pid in ids], samples, ("value", "prm", "orm")).items()})
            write_json(part, {kind: within_problem_auc(v, right, ids)[0] if v else None
                              for kind, v in scores.items()})
        auc = json.loads(part.read_text())
        for kind in found:
            found[kind].append(auc.get(kind))
    return found


def search_speed(store: RunStore, cfg, iterations: int, part: Path, problems: int | None) -> dict:
    """Tokens/s of the final policy's search over the training problems: without critics, with
    its trained critics reading a backbone pass per leaf (critics.leaf_features=backbone), and
    with them reading the search's own decoding pass (generation, the default); each kept in
    `part` as it finishes."""
    from pipeline.decoding.tree_search import SearchModels, train_search
    from pipeline.lm.models import load_model, resolve_model_path
    from pipeline.stages.critics import load_critics
    from pipeline.tasks import make_task
    from pipeline.tasks.prompt import task_prompts

    policy = store.policy_dir(iterations, resolve_model_path(cfg.model))
    done = json.loads(part.read_text()) if part.is_file() else {}
    if done.get("policy") != policy:  # kept for another final policy (a run since extended)
        done = {"policy": policy}
    critics_dir = store.critics_dir(iterations)
    if critics_dir is None:
        return {"skipped": "the run trained no critics for its final policy"}
    model, tokenizer = load_model(cfg.model, policy)
    task = make_task(cfg.task)
    train = task.split("train")[:problems]
    prompts = task_prompts(tokenizer, task, train)
    critics = load_critics(critics_dir, policy, model, tokenizer, cfg)
    for name, scoring, features in HALVES:
        if name in done:
            continue
        run_cfg = replace(cfg, critics=replace(cfg.critics, leaf_features=features))
        start = time.perf_counter()
        trees, scorer = train_search(train, task, prompts, run_cfg,
                                     SearchModels(model, tokenizer, critics if scoring else None))
        seconds = time.perf_counter() - start
        tokens = sum(t.stats.total_tokens for t in trees)
        done[name] = {"tokens": tokens, "seconds": round(seconds, 2),
                      "tokens_per_s": round(tokens / seconds, 2),
                      "leaves_scored": dict(scorer.leaf_scoring)}
        write_json(part, done)
    speed = {name: done[name]["tokens_per_s"] for name, _, _ in HALVES}
    return {"critics": str(critics_dir), "problems": len(train), **done,
            "search_tok_s_ratio_with_critics": round(
                speed["with_critics"] / speed["without_critics"], 3),
            "search_tok_s_ratio_with_critics_backbone": round(
                speed["with_critics_backbone"] / speed["without_critics"], 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--n", type=int, default=8, help="best-of-N samples per test problem")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-critics")
    parser.add_argument("--smoke", action="store_true",
                        help="1 iteration of the debug config (pass model=<checkpoint>)")
    parser.add_argument("--search-problems", type=int, default=None, metavar="N",
                        help="part 3 searches the first N training problems (default: all)")
    parser.add_argument("--output", type=Path, default=None,
                        help="the JSON to write (default: benchmarks/results/critics.json; "
                             "--smoke: the run directory's critics.json)")
    parser.add_argument("overrides", nargs="*", help="extra qstar config overrides")
    args = parser.parse_args(argv)
    for flag, value in (("--n", args.n), ("--search-problems", args.search_problems),
                        ("--iterations", args.iterations)):
        if value is not None and value < 1:  # one line from argparse, exit code 2
            parser.error(f"{flag} {value}: must be >= 1")
    iterations = 1 if args.smoke else args.iterations
    if args.smoke:
        args.n = 2
    overrides = [*(SMOKE if args.smoke else FULL), *args.overrides]
    store = run_loop(args.runs, iterations, overrides)
    cfg = load_run_config(args.runs, [])  # what the run ran with (a resumed run: its own config)
    result = {
        "benchmark": "critics", "smoke": args.smoke, "run": str(args.runs),
        "iterations": iterations, "overrides": overrides,
        "within_problem_auc_trees": within_problem(store, iterations),
        "best_of_n_on_test": selection(store, cfg, iterations, args.n,
                                       args.runs / "bench_test_evals"),
        "within_problem_auc": on_test_samples(store, cfg, iterations, args.n,
                                              args.runs / "bench_test_evals"),
        "search": search_speed(store, cfg, iterations, args.runs / "bench_search_speed.json",
                               args.search_problems),
    }
    result["search_tok_s_ratio_with_critics"] = result["search"].get("search_tok_s_ratio_with_critics")
    out = args.output or (args.runs / "critics.json" if args.smoke else RESULTS / "critics.json")
    write_json(out, result)
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
