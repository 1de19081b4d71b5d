"""Critic features and teacher-forced log-probs with the trees' prompts' common prefix run once,
with a tree's texts run as one token tree, with the prompt run once per tree, and with one pass
per text, side by side.

    python benchmarks/critic_features.py [--run runs/matched_budget/mcts] [--iteration 0]
                                         [--problems 16]

Takes the critics' texts of an MCTS run's iteration (the first --problems trees, the critics
stage's text cap applied) and computes their features on that iteration's policy three ways in
one process, alternating: `backbone_features` as it runs (`shared_prefix`: the prefix every
tree's prompt opens with, the task's instruction and worked example, runs once, and the
completions after a prompt run as one token tree, critics.shared_prompt), the same with each
prompt run whole (`shared_tree`), the same with tree attention off too (`shared_prompt`: the
prompt runs once, each completion in its own right-padded row) and one left-padded pass per text
(`one_pass_each`). Prints the times, the tokens each input to the
model, and the largest difference from one pass per text. Then the same for the teacher-forced
log-probs of the same texts (pipeline.lm.teacher_forced: the implicit reward's two passes in the
refit, best-of-N selection and credit maps). Writes benchmarks/results/critic_features.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from critics import critic_examples, shared_prompt  # noqa: E402
from critics import features as features_module  # noqa: E402
from critics.targets import cap_state_examples  # noqa: E402
from pipeline.compose import load_run_config  # noqa: E402
from pipeline.lm import teacher_forced  # noqa: E402
from pipeline.lm.models import load_model, resolve_model_path  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.run.store import RunStore, load_shards  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHARED = ("shared_prompt", "shared_tree", "shared_prefix")  # the sides that share a prompt's pass


def one_pass_each(model, tokenizer, prompts, completions, batch_size, max_length) -> features_module.Features:
    n = len(prompts)
    out = features_module._Rows([None] * n, [None] * n, [None] * n)
    features_module._left_padded(model, model.get_output_embeddings(), tokenizer, prompts,
                                 completions, list(range(n)), batch_size, max_length, out)
    return features_module.Features(torch.stack(out.hidden), torch.stack(out.prompt),
                                    torch.stack(out.logprob))


@contextmanager
def patched(**values):
    """critics.shared_prompt's constants set to `values` for the block."""
    kept = {name: getattr(shared_prompt, name) for name in values}
    for name, value in values.items():
        setattr(shared_prompt, name, value)
    try:
        yield
    finally:
        for name, value in kept.items():
            setattr(shared_prompt, name, value)


def sides_of(call) -> dict:
    """`call` as it runs (shared_prefix), with each prompt run whole (shared_tree), and with
    tree attention off too (shared_prompt)."""
    def under(**values):
        def run():
            with patched(**values):
                return call()
        return run
    whole = dict(MIN_SHARED=10**9)
    return {"shared_prompt": under(TREE_TOKENS=0, **whole), "shared_tree": under(**whole),
            "shared_prefix": call}


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
    """Teacher-forced log-probs of the texts: a left-padded pass per text, shared prompts and
    token trees; seconds, speedups and the largest log-prob difference from one pass each."""
    pairs = [(tokenizer(p, add_special_tokens=False).input_ids,
              tokenizer(c, add_special_tokens=False).input_ids if c else [])
             for p, c in zip(prompts, completions, strict=True)]
    shared = lambda: teacher_forced.tail_logprobs(model, tokenizer, pairs, batch_size)  # noqa: E731
    seconds, found = alternate({
        "one_pass_each": lambda: teacher_forced._left_padded(model, tokenizer, pairs, batch_size),
        **sides_of(shared)})
    diff = max((abs(x - y) for side in SHARED
                for a, b in zip(found["one_pass_each"], found[side], strict=True)
                for x, y in zip(a, b, strict=True)), default=0.0)
    return {"seconds": seconds, "speedup": speedups(seconds), "max_abs_diff": diff}


def speedups(seconds: dict) -> dict:
    out = {side: round(seconds["one_pass_each"] / seconds[side], 2) for side in SHARED}
    return {**out, "tree_over_prompt": round(seconds["shared_prompt"] / seconds["shared_tree"], 2),
            "prefix_over_tree": round(seconds["shared_tree"] / seconds["shared_prefix"], 2)}


def input_tokens(model, tokenizer, texts: list[tuple[str, str]], length: int, batch_size: int) -> dict:
    """Tokens each side inputs to the model (padding not counted). As in backbone_features, a
    text over `length` tokens or with a prompt of its own runs whole (its tail) on every side."""
    pairs = [(tokenizer(p, add_special_tokens=False).input_ids,
              tokenizer(c, add_special_tokens=False).input_ids if c else []) for p, c in texts]
    whole = [min(len(p) + len(c), length) for p, c in pairs]
    groups, alone = shared_prompt.group_by_prompt(pairs, length, min_group=2)
    rest = sum(whole[i] for i in alone)
    tokens = {"one_pass_each": sum(whole), "shared_prompt": rest, "shared_tree": rest}
    for prompt, rows in groups.items():
        trees = shared_prompt.token_trees(rows, batch_size, shared_prompt.TREE_TOKENS)
        tokens["shared_prompt"] += len(prompt) + sum(len(ids) for _, ids in rows)
        tokens["shared_tree"] += len(prompt) + sum(len(tree.tokens) for tree in trees)
    k = shared_prompt.shareable_prefix_length(model, list(groups))
    tokens["shared_prefix"] = tokens["shared_tree"] - k * (len(groups) - 1)
    return tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "matched_budget" / "mcts")
    parser.add_argument("--iteration", type=int, default=0)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--output", type=Path, default=RESULTS / "critic_features.json")
    parser.add_argument("--tree-tokens", type=int, default=shared_prompt.TREE_TOKENS,
                        help="tree tokens per forward (critics.shared_prompt.TREE_TOKENS)")
    args = parser.parse_args(argv)
    shared_prompt.TREE_TOKENS = args.tree_tokens
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
    features = lambda: features_module.backbone_features(  # noqa: E731
        model, tokenizer, prompts, completions, size, length, logprobs=True)
    with torch.no_grad():
        seconds, found = alternate({
            "one_pass_each": lambda: one_pass_each(model, tokenizer, prompts, completions, size, length),
            **sides_of(features)})
        forced = teacher_forced_sides(model, tokenizer, prompts, completions, size)
    b = found["one_pass_each"]
    result = {
        "benchmark": "critic_features", "run": str(run), "iteration": args.iteration,
        "problems": len(rows), "texts": len(texts), "prompts": len(set(prompts)),
        "tree_tokens": shared_prompt.TREE_TOKENS, "seconds": seconds,  # mean of two repeats
        "speedup": speedups(seconds), "tokens": input_tokens(model, tokenizer, texts, length, size),
        "max_abs_diff": {side: {key: float((getattr(found[side], key) - getattr(b, key)).abs().max())
                                for key in ("hidden", "prompt_hidden", "logprob")}
                         for side in SHARED},
        "teacher_forced": forced,
        "threads": torch.get_num_threads(),
    }
    write_json(args.output, result)
    print(f"{len(texts)} texts of {len(rows)} problems, seconds (tokens input): "
          + ", ".join(f"{side} {seconds[side]} s ({result['tokens'][side]})" for side in seconds)
          + f"; speedups {result['speedup']}; largest feature difference {result['max_abs_diff']}")
    print(f"teacher-forced log-probs, seconds: {forced['seconds']}; speedups {forced['speedup']}; "
          f"largest difference {forced['max_abs_diff']:.2g}")
    return result


if __name__ == "__main__":
    main()
