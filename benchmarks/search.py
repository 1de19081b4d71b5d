"""MCTS search on SmolLM2 arithmetic: throughput against plain `generate`, and solve rate
against best-of-N sampling at a matched token budget, measured side by side in one run.

    python benchmarks/search.py [--problems 64] [--simulations 8]

1. search efficiency = tokens generated per second during search (options + fast rollouts)
   / plain batched `model.generate` tokens/s, same model, same batch size, same run.
2. solve rate: share of training problems for which the search finds a verified-correct
   solution (a terminal node or a rollout), beside best-of-N pass@N where N is chosen so the
   samples use the same number of generated tokens per problem as the search did.
Writes benchmarks/results/search.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("QSTAR_PROGRESS", "0")

from pipeline.compose import compose_config  # noqa: E402
from pipeline.decoding.tree_search import SearchModels, train_search  # noqa: E402
from pipeline.lm.generation import generate, plain_generate_tokens  # noqa: E402
from pipeline.lm.models import load_model  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.tasks import make_task  # noqa: E402
from pipeline.tasks.prompt import render_prompts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def solved_by_search(tree, scorer, task, problem) -> bool:
    if any(r == 1.0 for r in tree.terminal_reward if r is not None):
        return True
    return any(tree.rollout[n] == 1.0 for n in range(tree.num_nodes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--simulations", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="generation batch size")
    parser.add_argument("overrides", nargs="*", help="extra qstar config overrides")
    args = parser.parse_args()
    cfg = compose_config([f"task.num_train={args.problems}", "task.num_dev=1", "task.num_test=1",
                          f"search.simulations={args.simulations}",
                          f"search.trees_per_batch={args.problems}",
                          f"decode.batch_size={args.batch}", "progress=false", *args.overrides])
    model, tokenizer = load_model(cfg.model)
    task = make_task(cfg.task)
    problems = task.split("train")
    prompts = render_prompts(tokenizer, [p.question for p in problems], task)

    start = time.perf_counter()
    trees, scorer = train_search(problems, task, prompts, cfg, SearchModels(model, tokenizer))
    search_seconds = time.perf_counter() - start
    search_tokens = sum(t.stats.total_tokens for t in trees)
    solved = [solved_by_search(t, scorer, task, p) for t, p in zip(trees, problems)]

    # Plain generate on the same prompts and batch size, about as many tokens, for the ratio.
    rollout_len = cfg.search.rollout.max_new_tokens + cfg.search.max_option_tokens
    start = time.perf_counter()
    plain_tokens = plain_generate_tokens(model, tokenizer, prompts * 2, max_new_tokens=rollout_len,
                                         temperature=cfg.search.temperature, batch_size=args.batch)
    plain_seconds = time.perf_counter() - start

    # Best-of-N with the same generated tokens per problem.
    probe = generate(model, tokenizer, prompts, max_new_tokens=cfg.decode.max_new_tokens,
                     temperature=cfg.decode.temperature, batch_size=args.batch, seed=1)
    per_sample = sum(g.num_tokens for g in probe) / len(probe)
    n = max(1, math.floor(search_tokens / len(problems) / per_sample))
    start = time.perf_counter()
    samples = generate(model, tokenizer, [p for p in prompts for _ in range(n)],
                       max_new_tokens=cfg.decode.max_new_tokens, temperature=cfg.decode.temperature,
                       batch_size=args.batch, seed=2)
    bon_seconds = time.perf_counter() - start
    bon_tokens = sum(g.num_tokens for g in samples)
    pass_at_n = [any(task.is_correct(p, g.text) for g in samples[i * n:(i + 1) * n])
                 for i, p in enumerate(problems)]

    search_tps, plain_tps = search_tokens / search_seconds, plain_tokens / plain_seconds
    result = {
        "benchmark": "search", "model": cfg.model.name, "problems": len(problems),
        "simulations": args.simulations, "batch": args.batch,
        "search": {"tokens": search_tokens, "seconds": round(search_seconds, 1),
                   "tokens_per_s": round(search_tps, 1),
                   "tokens_per_problem": round(search_tokens / len(problems), 1),
                   "solve_rate": sum(solved) / len(solved),
                   "merges": sum(t.stats.merges for t in trees),
                   "nodes": sum(t.num_nodes for t in trees)},
        "plain_generate": {"tokens": plain_tokens, "seconds": round(plain_seconds, 1),
                           "tokens_per_s": round(plain_tps, 1)},
        "search_efficiency": round(search_tps / plain_tps, 3),
        "best_of_n": {"n": n, "tokens": bon_tokens, "seconds": round(bon_seconds, 1),
                      "tokens_per_problem": round(bon_tokens / len(problems), 1),
                      "pass_at_n": sum(pass_at_n) / len(pass_at_n)},
    }
    write_json(RESULTS / "search.json", result)
    print(json.dumps(result, indent=2))
    print(f"search efficiency {result['search_efficiency']} (target >= 0.8); solve rate "
          f"MCTS {result['search']['solve_rate']:.3f} vs best-of-{n} {result['best_of_n']['pass_at_n']:.3f}")


if __name__ == "__main__":
    main()
