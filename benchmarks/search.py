"""MCTS search on SmolLM2 arithmetic: throughput against plain `generate`, and solve rate
against best-of-N sampling at a matched token budget, measured side by side in one run.

    python benchmarks/search.py [--problems 64] [--simulations 8] [--no-best-of-n]
           [--random-init smollm2|qwen2] [--device cuda --dtype bfloat16] [overrides ...]

1. search efficiency = tokens generated per second during search (options + fast rollouts)
   / plain batched `model.generate` tokens/s, same model, same batch size, same run.
   Beside it: prefill tokens per generated token (search: what ran through the model after
   the KV prefix cache; plain: every prompt), the cache's token hit rate and peak KV MiB, and
   the process's peak RSS (and peak CUDA memory on a GPU).
2. solve rate: share of training problems for which the search finds a verified-correct
   solution (a terminal node or a rollout), beside best-of-N pass@N where N is chosen so the
   samples use the same number of generated tokens per problem as the search did.
Writes benchmarks/results/search.json (search_<arch>_<device>.json for a random model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from bench_models import add_model_args, load, model_overrides  # noqa: E402

from pipeline.compose import compose_config  # noqa: E402
from pipeline.decoding.tree_search import SearchModels, train_search  # noqa: E402
from pipeline.lm.generation import generate, plain_generate_tokens  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.tasks import make_task  # noqa: E402
from pipeline.tasks.prompt import task_prompts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def solved_by_search(tree, scorer, task, problem) -> bool:
    if any(r == 1.0 for r in tree.terminal_reward if r is not None):
        return True
    return any(tree.rollout[n] == 1.0 for n in range(tree.num_nodes))


def peak_memory_mb(device: str) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"peak_rss_mb": round(rss, 1)}
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def measure_search(cfg, model, tokenizer, task, problems, prompts) -> dict:
    start = time.perf_counter()
    trees, scorer = train_search(problems, task, prompts, cfg, SearchModels(model, tokenizer))
    seconds = time.perf_counter() - start
    tokens = sum(t.stats.total_tokens for t in trees)
    solved = [solved_by_search(t, scorer, task, p) for t, p in zip(trees, problems)]
    kv = scorer.kv.stats
    return {"tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
            "tokens_per_problem": round(tokens / len(problems), 1),
            "solve_rate": sum(solved) / len(solved), "merges": sum(t.stats.merges for t in trees),
            "nodes": sum(t.num_nodes for t in trees),
            "prefill_tokens_per_generated_token": round(kv.prefill_tokens / max(tokens, 1), 3),
            "kv": kv.as_dict()}


def measure_plain(cfg, model, tokenizer, prompts, batch: int) -> dict:
    """Plain generate on the same prompts and batch size, about as many tokens, for the ratio."""
    rollout_len = cfg.search.rollout.max_new_tokens + cfg.search.max_option_tokens
    start = time.perf_counter()
    tokens = plain_generate_tokens(model, tokenizer, prompts * 2, max_new_tokens=rollout_len,
                                   temperature=cfg.search.temperature, batch_size=batch)
    seconds = time.perf_counter() - start
    prefill = 2 * sum(len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts)
    return {"tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
            "prefill_tokens_per_generated_token": round(prefill / max(tokens, 1), 3)}


def best_of_n(cfg, model, tokenizer, task, problems, prompts, search_tokens: int, batch: int) -> dict:
    """Best-of-N with the same generated tokens per problem as the search."""
    d = cfg.decode
    probe = generate(model, tokenizer, prompts, max_new_tokens=d.max_new_tokens,
                     temperature=d.temperature, batch_size=batch, seed=1)
    per_sample = sum(g.num_tokens for g in probe) / len(probe)
    n = max(1, math.floor(search_tokens / len(problems) / per_sample))
    start = time.perf_counter()
    samples = generate(model, tokenizer, [p for p in prompts for _ in range(n)],
                       max_new_tokens=d.max_new_tokens, temperature=d.temperature,
                       batch_size=batch, seed=2)
    seconds = time.perf_counter() - start
    tokens = sum(g.num_tokens for g in samples)
    pass_at_n = [any(task.is_correct(p, g.text) for g in samples[i * n:(i + 1) * n])
                 for i, p in enumerate(problems)]
    return {"n": n, "tokens": tokens, "seconds": round(seconds, 1),
            "tokens_per_problem": round(tokens / len(problems), 1),
            "pass_at_n": sum(pass_at_n) / len(pass_at_n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--simulations", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="generation batch size")
    parser.add_argument("--no-best-of-n", action="store_true", help="throughput only")
    parser.add_argument("--output", default=None, help="JSON path (default under benchmarks/results)")
    add_model_args(parser)
    parser.add_argument("overrides", nargs="*", help="extra qstar config overrides")
    args = parser.parse_args()
    cfg = compose_config([f"task.num_train={args.problems}", "task.num_dev=1", "task.num_test=1",
                          f"search.simulations={args.simulations}",
                          f"search.trees_per_batch={args.problems}",
                          f"decode.batch_size={args.batch}", "progress=false",
                          *model_overrides(args), *args.overrides])
    model, tokenizer, described = load(args)
    task = make_task(cfg.task)
    problems = task.split("train")
    prompts = task_prompts(tokenizer, task, problems)

    search = measure_search(cfg, model, tokenizer, task, problems, prompts)
    plain = measure_plain(cfg, model, tokenizer, prompts, args.batch)
    result = {
        "benchmark": "search", "model": described, "device": args.device, "dtype": args.dtype,
        "problems": len(problems), "simulations": args.simulations, "batch": args.batch,
        "kv_cache_mb": cfg.search.kv_cache_mb, "stream": cfg.search.stream, "cpus": os.cpu_count(),
        "search": search, "plain_generate": plain,
        "search_efficiency": round(search["tokens_per_s"] / plain["tokens_per_s"], 3),
        "prefill_tokens_per_generated_token": search["prefill_tokens_per_generated_token"],
        "kv_hit_rate": search["kv"]["hit_rate"], **peak_memory_mb(args.device),
    }
    if not args.no_best_of_n:
        result["best_of_n"] = best_of_n(cfg, model, tokenizer, task, problems, prompts,
                                        search["tokens"], args.batch)
    name = f"search_{args.random_init}_{args.device}.json" if args.random_init else "search.json"
    write_json(Path(args.output) if args.output else RESULTS / name, result)
    print(json.dumps(result, indent=2))
    print(f"search efficiency {result['search_efficiency']} (target >= 2.0), kv hit rate "
          f"{result['kv_hit_rate']}, prefill/generated {result['prefill_tokens_per_generated_token']}")


if __name__ == "__main__":
    main()
