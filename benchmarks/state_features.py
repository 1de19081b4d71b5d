"""What should the value and PRM heads read? Held-out ranking with each `critics.state_features`.

    python benchmarks/state_features.py [--run runs/matched_budget/mcts] [--iterations 0 1]
                                        [--folds 5]

For each finished iteration i of an MCTS run, this takes that iteration's trees and the
backbone its refit stage used (policy_{i+1}; policy_i if the iteration has no trained policy),
computes the critics' features once per distinct text (as the critics stage does, with the
same text cap), and fits the value and PRM heads once per feature set and per fold of a
K-fold split over the training problems: every problem is held out exactly once, so every
state and completion gets a held-out score. Reported per feature set, pooled over the folds:

- `state_auc`: across-problem AUC of held-out states (partial solutions), good = PRM target
  >= 0.5 (the share of its verified descendants that are right, else its rollout's reward);
- `state_within_auc`: the same within each problem, averaged over problems with both kinds;
- `completion_within_auc`: right against wrong completions of one problem (the ORM's held-out
  examples: verified terminal nodes and rollouts), what search's leaf values must rank.

Beside them, the untrained mean token log-prob of the text as a score. Nothing here reads dev
or test: the folds are over the run's training problems. Writes
benchmarks/results/state_features.json.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from critics import critic_examples, train_head  # noqa: E402
from critics.critic_set import FeatureSet, linear_features, pick  # noqa: E402
from critics.features import backbone_features  # noqa: E402
from critics.metrics import auc, within_problem_auc  # noqa: E402
from critics.targets import cap_state_examples  # noqa: E402
from pipeline.compose import load_run_config  # noqa: E402
from pipeline.lm.models import load_model, resolve_model_path  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.run.store import RunStore, load_shards  # noqa: E402
from pipeline.stages.critics import LOSS, _rows_of  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STATE_KINDS = ("value", "prm")


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def folds_of(problem_ids: list[str], folds: int, seed: int) -> list[set[str]]:
    """The problems dealt into `folds` disjoint, seeded groups that cover them all."""
    ids = sorted(set(problem_ids))
    random.Random(seed).shuffle(ids)
    return [set(ids[k::folds]) for k in range(folds)]


def ranking(scores, examples) -> dict:
    targets = [e.target for e in examples]
    within, problems = within_problem_auc(scores, targets, [e.problem_id for e in examples])
    return {"auc": auc(scores, targets), "within_auc": within, "within_problems": problems}


def judge_iteration(run: Path, iteration: int, folds: int) -> dict:
    cfg = load_run_config(run, [])
    store = RunStore(run)
    trained = store.stage_dir(iteration, "train") / "policy"
    backbone = str(trained) if (trained / "meta.json").is_file() else store.policy_dir(
        iteration, resolve_model_path(cfg.model))
    rows = load_shards(store.stage_dir(iteration, "search"))
    examples = cap_state_examples(critic_examples(rows), cfg.critics.max_state_texts, cfg.critics.seed)
    states = sorted({(e.prompt, e.completion) for found in examples.values() for e in found})
    model, tokenizer = load_model(replace(cfg.model, name=backbone))
    print(f"iteration {iteration}: {len(states)} texts on {backbone}", flush=True)
    found = backbone_features(model, tokenizer, [p for p, _ in states], [c for _, c in states],
                              cfg.critics.score_batch_size, cfg.critics.max_length, logprobs=True)
    index = {state: i for i, state in enumerate(states)}
    problems = [str(row["problem_id"]) for row in rows]
    groups = folds_of(problems, folds, cfg.critics.seed)
    prm_states, completions = examples["prm"], examples["orm"]
    result = {"backbone": backbone, "problems": len(set(problems)), "folds": folds,
              "states": len(prm_states), "completions": len(completions),
              "mean_logprob": {
                  "state": ranking(_rows_of(found.logprob, index, prm_states)[:, 0].numpy(), prm_states),
                  "completion": ranking(_rows_of(found.logprob, index, completions)[:, 0].numpy(),
                                        completions)}}
    for features in FeatureSet:
        x = pick(found, features)
        state_scores = {kind: np.zeros(len(prm_states)) for kind in STATE_KINDS}
        completion_scores = {kind: np.zeros(len(completions)) for kind in STATE_KINDS}
        for heldout in groups:
            for kind in STATE_KINDS:
                train = [e for e in examples[kind] if e.problem_id not in heldout]
                c = cfg.critics
                head, _ = train_head(_rows_of(x, index, train), [e.target for e in train], LOSS[kind],
                                     c.learning_rate, c.epochs, c.batch_size, c.seed,
                                     linear_features(features, model.config.hidden_size))
                for scores, judged in ((state_scores[kind], prm_states),
                                       (completion_scores[kind], completions)):
                    at = [i for i, e in enumerate(judged) if e.problem_id in heldout]
                    if at:
                        scores[at] = head.predict(_rows_of(x, index, [judged[i] for i in at])).numpy()
        result[features.value] = {
            kind: {"state": ranking(state_scores[kind], prm_states),
                   "completion": ranking(completion_scores[kind], completions)}
            for kind in STATE_KINDS}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "matched_budget" / "mcts")
    parser.add_argument("--iterations", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS / "state_features.json")
    args = parser.parse_args(argv)
    run = args.run.resolve()
    result = {"benchmark": "state_features", "run": str(run), "iterations": {}}
    for i in args.iterations:
        if not RunStore(run).done(i, "search"):
            sys.exit(f"{run}: iteration {i}'s search stage has not finished")
        result["iterations"][str(i)] = judge_iteration(run, i, args.folds)
        write_json(args.output, result)
    for i, found in result["iterations"].items():
        base = found["mean_logprob"]
        print(f"iteration {i}: {found['states']} states, {found['completions']} completions; "
              f"untrained mean log-prob, within-problem AUC: states {_f(base['state']['within_auc'])}, "
              f"completions {_f(base['completion']['within_auc'])}")
        for features in FeatureSet:
            for kind in STATE_KINDS:
                state, completion = found[features.value][kind]["state"], found[features.value][kind]["completion"]
                print(f"  {kind:<5} reads {features.value:<10}: state AUC {_f(state['auc'])}  within "
                      f"{_f(state['within_auc'])}  completions within {_f(completion['within_auc'])} "
                      f"({completion['within_problems']} problems)")
    return result


if __name__ == "__main__":
    main()
