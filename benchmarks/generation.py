"""Tokens/s of qstar's generation module beside plain `model.generate`, same prompts, same run.

    python benchmarks/generation.py [--batches 1,8,32,64] [--max-new-tokens 64]
           [--random-init smollm2|qwen2] [--device cuda --dtype bfloat16]

Both sides sample (temperature 0.8, full vocabulary) from the same chat-templated arithmetic
prompts with the same seeds; each batch size runs plain and ours alternately, `--repeats`
times, and keeps the best of each. Writes benchmarks/results/generation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench_models import add_model_args, load  # noqa: E402

from pipeline.config import TaskConfig  # noqa: E402
from pipeline.lm.generation import generate, plain_generate_tokens  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.tasks import make_task  # noqa: E402
from pipeline.tasks.prompt import task_prompts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = fn()
    return tokens, time.perf_counter() - start


def measure(model, tokenizer, prompts, batch, max_new_tokens, repeats) -> dict:
    def plain():
        return plain_generate_tokens(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     temperature=0.8, batch_size=batch, seed=0)

    def ours():
        gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                        temperature=0.8, batch_size=batch, seed=0)
        return sum(g.num_tokens for g in gens)

    best = {"plain": 0.0, "qstar": 0.0}
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("qstar", ours)):
            tokens, seconds = timed(fn)
            best[name] = max(best[name], tokens / seconds)
    return {"batch": batch, "prompts": len(prompts), "plain_tok_s": round(best["plain"], 1),
            "qstar_tok_s": round(best["qstar"], 1),
            "ratio": round(best["qstar"] / best["plain"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    add_model_args(parser)
    args = parser.parse_args()

    model, tokenizer, described = load(args)
    task = make_task(TaskConfig(num_train=1, num_dev=64, num_test=1))
    dev = task.split("dev")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = task_prompts(tokenizer, task, dev[:max(batch, 4)])
        row = measure(model, tokenizer, prompts, batch, args.max_new_tokens, args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"benchmark": "generation", "model": described, "device": args.device,
              "dtype": args.dtype,
              "max_new_tokens": args.max_new_tokens, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "rows": rows, "min_ratio": min(r["ratio"] for r in rows)}
    name = f"generation_{args.random_init}_{args.device}.json" if args.random_init else "generation.json"
    write_json(args.out or RESULTS / name, result)
    print(f"min ratio qstar/plain: {result['min_ratio']}  (target >= 0.9)")


if __name__ == "__main__":
    main()
