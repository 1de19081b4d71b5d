"""Critic features and teacher-forced log-probs with the prompt run once per tree against one
pass per text, side by side.

    python benchmarks/critic_features.py [--run runs/matched_budget/mcts] [--iteration 0]
                                         [--problems 16]

Takes the critics' texts of an MCTS run's iteration (the first --problems trees, the critics
stage's text cap applied) and computes their features on that iteration's policy twice in one
process, alternating: `backbone_features` (texts that share a prompt run it once) and one
left-padded pass per text (what it did before). Prints both times, the tokens each ran through
the model, and the largest difference between the two paths' features. Then the same for the
teacher-forced log-probs of the same texts (pipeline.lm.teacher_forced: the implicit reward's
two passes in the refit, best-of-N selection and credit maps). Writes
benchmarks/results/critic_features.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from critics import critic_examples  # noqa: E402
from critics import features as features_module  # noqa: E402
from critics.targets import cap_state_examples  # noqa: E402
from pipeline.compose import load_run_config  # noqa: E402
from pipeline.lm import teacher_forced  # noqa: E402
from pipeline.lm.models import load_model, resolve_model_path  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.run.store import RunStore, load_shards  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def one_pass_each(model, tokenizer, prompts, completions, batch_size, max_length) -> features_module.Features:
    n = len(prompts)
    out = features_module._Rows([None] * n, [None] * n, [None] * n)
    features_module._left_padded(model, model.get_output_embeddings(), tokenizer, prompts,
                                 completions, list(range(n)), batch_size, max_length, out)
    return features_module.Features(torch.stack(out.hidden), torch.stack(out.prompt),
                                    torch.stack(out.logprob))


def alternate(sides: dict, repeats: int = 2) -> tuple[dict, dict]:
    """Each side's mean seconds over `repeats` alternating calls, and its last result."""
    seconds, found = dict.fromkeys(sides, 0.0), {}
    for _ in range(repeats):
        for side, call in sides.items():
            start = time.perf_counter()
            found[side] = call()
            seconds[side] += time.perf_counter() - start
    return {k: round(v / repeats, 2) for k, v in seconds.items()}, found


def teacher_forced_sides(model, tokenizer, prompts, completions, batch_size) -> dict:
    """Teacher-forced log-probs of the texts: a left-padded pass per text against shared
    prompts; seconds, speedup and the largest log-prob difference."""
    pairs = [(tokenizer(p, add_special_tokens=False).input_ids,
              tokenizer(c, add_special_tokens=False).input_ids if c else [])
             for p, c in zip(prompts, completions, strict=True)]
    seconds, found = alternate({
        "one_pass_each": lambda: teacher_forced._left_padded(model, tokenizer, pairs, batch_size),
        "shared_prompt": lambda: teacher_forced._tail_logprobs(model, tokenizer, pairs, batch_size)})
    diff = max((abs(x - y) for a, b in zip(found["one_pass_each"], found["shared_prompt"], strict=True)
                for x, y in zip(a, b, strict=True)), default=0.0)
    return {"seconds": seconds, "speedup": round(seconds["one_pass_each"] / seconds["shared_prompt"], 2),
            "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "matched_budget" / "mcts")
    parser.add_argument("--iteration", type=int, default=0)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--output", type=Path, default=RESULTS / "critic_features.json")
    args = parser.parse_args(argv)
    run = args.run.resolve()
    cfg, store = load_run_config(run, []), RunStore(run)
    if not store.done(args.iteration, "search"):
        sys.exit(f"{run}: iteration {args.iteration}'s search stage has not finished")
    rows = load_shards(store.stage_dir(args.iteration, "search"))[:args.problems]
    examples = cap_state_examples(critic_examples(rows), cfg.critics.max_state_texts, cfg.critics.seed)
    texts = sorted({(e.prompt, e.completion) for found in examples.values() for e in found})
    prompts, completions = [p for p, _ in texts], [c for _, c in texts]
    policy = store.policy_dir(args.iteration, resolve_model_path(cfg.model))
    model, tokenizer = load_model(replace(cfg.model, name=policy))
    size, length = cfg.critics.score_batch_size, cfg.critics.max_length
    with torch.no_grad():
        seconds, found = alternate({
            "one_pass_each": lambda: one_pass_each(model, tokenizer, prompts, completions, size, length),
            "shared_prompt": lambda: features_module.backbone_features(model, tokenizer, prompts, completions,
                                                                       size, length, logprobs=True)})
        forced = teacher_forced_sides(model, tokenizer, prompts, completions, size)
    tokens = {"one_pass_each": 0, "shared_prompt": 0}
    for prompt in set(prompts):
        tokens["shared_prompt"] += len(tokenizer(prompt, add_special_tokens=False).input_ids)
    for prompt, completion in texts:
        p = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        c = len(tokenizer(completion, add_special_tokens=False).input_ids) if completion else 0
        tokens["one_pass_each"] += min(p + c, length)
        tokens["shared_prompt"] += c
    a, b = found["shared_prompt"], found["one_pass_each"]
    result = {
        "benchmark": "critic_features", "run": str(run), "iteration": args.iteration,
        "problems": len(rows), "texts": len(texts), "prompts": len(set(prompts)),
        "seconds": seconds,  # mean of two repeats
        "speedup": round(seconds["one_pass_each"] / seconds["shared_prompt"], 2),
        "tokens": tokens,
        "max_abs_diff": {"hidden": float((a.hidden - b.hidden).abs().max()),
                         "prompt_hidden": float((a.prompt_hidden - b.prompt_hidden).abs().max()),
                         "logprob": float((a.logprob - b.logprob).abs().max())},
        "teacher_forced": forced,
        "threads": torch.get_num_threads(),
    }
    write_json(args.output, result)
    print(f"{len(texts)} texts of {len(rows)} problems: one pass per text "
          f"{result['seconds']['one_pass_each']} s ({tokens['one_pass_each']} tokens), prompt shared "
          f"{result['seconds']['shared_prompt']} s ({tokens['shared_prompt']} tokens): "
          f"{result['speedup']}x; largest feature difference {result['max_abs_diff']}")
    print(f"teacher-forced log-probs: one pass per text {forced['seconds']['one_pass_each']} s, prompt "
          f"shared {forced['seconds']['shared_prompt']} s: {forced['speedup']}x; largest difference "
          f"{forced['max_abs_diff']:.2g}")
    return result


if __name__ == "__main__":
    main()
