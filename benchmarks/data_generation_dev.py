"""Tune data generation on dev: verified solutions per 1,000 generated tokens, per search setting.

    python benchmarks/data_generation_dev.py [--problems 64] [OVERRIDE...] \
        [--variant "NAME OVERRIDE..."]...

The matched-budget proof's data_generation arm (benchmarks/matched_budget.py) measures the
search of the MCTS loop's iteration 0 on the *training* problems. Search settings that might
find more verified solutions per token are compared here instead, on the first --problems
*dev* problems, with the verifier scoring terminals and rollouts as in a training search (dev
is the split that tuning reads; test is never loaded). Every variant is one training-time
search (`train_search`) with the base policy under `experiment=demo_cpu` plus its overrides,
counted as matched_budget counts (count_verified: correct terminals and verified finished
rollouts); `sampling` is the STaR search (`search.algorithm=sample`) at the samples per problem
that spend the default search's tokens (rounded), and at the whole counts on either side, so
that `verified_solutions_over_sampling_interpolated` (and `solved_...`) read sampling's curve at
each variant's own tokens (None outside it): rounding can leave the two sides 10-15% apart, and
pruned sampling finds fewer solutions per token the more it samples. Each variant's counts are
cached in --runs with the problems, task and search config they came from, so a killed run
resumes, and a variant whose config changed since (a new default, another task seed, more
problems) is searched again. Writes benchmarks/results/data_generation_dev.json (`"split": "dev"`).

`--split train` measures the proof's arm (a) itself without running the loops: the same two
searches as the MCTS and STaR loops' iteration 0 (the default variant is `experiment=demo_cpu`'s
search; `sampling` is `experiment=star_cpu`'s, which differs from it only in the algorithm and
the samples per problem) on the training problems. Nothing is tuned on it. It writes
data_generation_train.json and caches under runs/data_generation_train.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from matched_budget import count_verified  # noqa: E402

from pipeline.compose import compose_config  # noqa: E402
from pipeline.config import SearchAlgorithm  # noqa: E402
from pipeline.decoding.tree_search import SearchModels, train_search  # noqa: E402
from pipeline.lm.models import load_model  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.stages.search import shard_rows, summarize_search  # noqa: E402
from pipeline.tasks import make_task  # noqa: E402
from pipeline.tasks.base import problems_digest  # noqa: E402
from pipeline.tasks.prompt import task_prompts  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# what the sampling curve is read for: distinct verified texts (the proof's arm (a) counts these),
# and problems with at least one (a tree's extra texts are often the same working worded apart)
COUNTS = ("verified_solutions", "solved")
VARIANTS = {  # name -> overrides on top of experiment=demo_cpu; "default" comes first
    "default": [],
    "no_merge_retries": ["search.merge_retries=0"],
    "narrow": ["search.c_min=1", "search.c_max=2", "search.root_c_min=2", "search.root_c_max=3"],
    "no_rollouts": ["search.rollout.enabled=false"],
}


# What the sampler (pipeline.decoding.sampling.sample_trees) reads of the search config; a
# change to a tree-search-only key (the rollout, branching, evaluate_root) leaves its count valid
SAMPLER_KEYS = ("algorithm", "simulations", "temperature", "seed", "check_equations",
               "check_answers", "prune_steps")


def search_key(cfg, problems: str) -> dict:
    """What a cached count was searched with: the problems (`problems_digest` of those searched:
    another task seed, task or --problems is another count) and the task config (its verifier:
    `task.verify_steps` changes what counts as verified), the policy, and the whole search config
    (a default changed since makes it stale); for the sampler, the keys it reads and its sample
    length."""
    key = json.loads(json.dumps(asdict(cfg.search), default=str))
    if cfg.search.algorithm == SearchAlgorithm.sample:
        key = {name: key[name] for name in SAMPLER_KEYS}
        key["max_new_tokens"] = cfg.decode.max_new_tokens
    task = json.loads(json.dumps(asdict(cfg.task), default=str))
    return {"model": str(cfg.model.name), "problems": problems, "task": task, "search": key}


def searched(base: list[str], overrides: list[str], problems: int, cache: Path, models,
             split: str = "dev") -> dict:
    """One training-time search of the first `problems` problems of `split`; its counts are
    cached under `cache` with the search config they came from, and searched again when it
    differs."""
    cfg = compose_config(["experiment=demo_cpu", *base, *overrides, "progress=false"])
    task = make_task(cfg.task)
    chosen = task.split(split)[:problems]
    key = search_key(cfg, problems_digest(chosen))
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("config") == key:
            return {**cached, "overrides": overrides}
        print(f"{cache.name}: searched with another config or other problems; searching again",
              flush=True)
    prompts = task_prompts(models.tokenizer, task, chosen)
    start = time.perf_counter()
    trees, scorer = train_search(chosen, task, prompts, cfg, models, desc=cache.stem)
    rows = shard_rows(trees, scorer, chosen, 0)
    summary = summarize_search(rows, time.perf_counter() - start)
    result = {"overrides": overrides, **count_verified(rows, summary["tokens"]),
              "seconds": summary["seconds"], "merges": summary["merges"], "nodes": summary["nodes"],
              "config": key}
    write_json(cache, result)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=64, help="the first K problems of the split")
    parser.add_argument("--split", choices=("dev", "train"), default="dev",
                        help="dev: to tune on; train: the proof's arm (a), measured alone")
    parser.add_argument("--runs", type=Path, default=None,
                        help="default: runs/data_generation_{split}")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: benchmarks/results/data_generation_{split}.json")
    parser.add_argument("--variant", action="append", metavar='"NAME OVERRIDE..."',
                        help="a name and its search overrides, in one argument (repeatable; "
                             "default: the built-in variants)")
    parser.add_argument("overrides", nargs="*", help="qstar overrides for every search (model=...)")
    args = parser.parse_args(argv)
    args.runs = args.runs or ROOT / "runs" / f"data_generation_{args.split}"
    args.output = args.output or RESULTS / f"data_generation_{args.split}.json"
    variants = dict(VARIANTS) if not args.variant else {"default": [], **{
        v.split()[0]: v.split()[1:] for v in args.variant if v.split()}}
    cfg = compose_config(["experiment=demo_cpu", *args.overrides])
    model, tokenizer = load_model(cfg.model)
    models = SearchModels(policy=model, tokenizer=tokenizer)
    found = {}
    for name, overrides in variants.items():
        found[name] = searched(args.overrides, overrides, args.problems,
                               args.runs / f"{name}.json", models, args.split)
        print(f"{name:<18} {found[name]['verified_per_1k_tokens']:>6.3f} verified / 1k tokens "
              f"({found[name]['verified_solutions']} in {found[name]['tokens']})", flush=True)
    curve = {1: sampled(args, 1, models)}  # its mean sample length sets the counts below
    per_sample = max(curve[1]["tokens"] / max(curve[1]["problems"], 1), 1.0)
    problems = found["default"]["problems"]  # the split may hold fewer than --problems
    exact = found["default"]["tokens"] / problems / per_sample
    samples = max(1, round(exact))  # the samples per problem that spend the default's tokens
    for k in sorted({max(1, math.floor(exact)), max(1, math.ceil(exact)), samples}):
        curve[k] = sampled(args, k, models)
    found["sampling"] = curve[samples]
    sampling = found["sampling"]["verified_per_1k_tokens"]
    result = {"benchmark": "data_generation_dev", "split": args.split, "problems": problems,
              "policy": str(cfg.model.name), "samples_per_problem": samples, "variants": found,
              "over_sampling": {k: round(v["verified_per_1k_tokens"] / sampling, 3) if sampling
                                else None for k, v in found.items()},
              "sampling_curve": {k: {f: c[f] for f in ("tokens", *COUNTS)} for k, c in curve.items()},
              **{f"{count}_over_sampling_interpolated": {
                  k: over_interpolated(v, list(curve.values()), count) for k, v in found.items()}
                 for count in COUNTS}}
    write_json(args.output, result)
    print(f"wrote {args.output}")
    return result


def sampled(args, samples: int, models) -> dict:
    """The STaR sampler at `samples` whole samples per problem (cached)."""
    return searched(args.overrides, ["search.algorithm=sample", f"search.simulations={samples}"],
                    args.problems, args.runs / f"sampling_{samples}.json", models, args.split)


def over_interpolated(variant: dict, curve: list[dict], count: str) -> float | None:
    """A search's `count` per token over sampling's at exactly its tokens: the sampling curve
    (tokens, count) at whole samples per problem, read between its two nearest points; None
    outside the curve. Rounding the samples per problem can leave sampling 10-15% above or below
    the search's tokens, and pruned sampling finds fewer solutions per token the more it samples."""
    points = sorted((c["tokens"], c[count]) for c in curve)
    tokens = variant["tokens"]
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t0 <= tokens <= t1 and t1 > t0:
            at = v0 + (v1 - v0) * (tokens - t0) / (t1 - t0)
            return round(variant[count] / at, 3) if at else None
    return None


if __name__ == "__main__":
    main()
