"""Likelihood beam search as the beams grow: does it over-optimise the implicit reward?

    python benchmarks/beam_widths.py [--run runs/bench/mcts_dpo] [--iteration 0] [--widths 1 2 4 8]

"From r to Q*": a DPO policy's likelihood is its implicit reward beta * log(pi / pi_ref) up to
the reference's likelihood, so beam search over it is reward-guided search, and the paper warns
it over-optimises as beams grow. For each width this runs `qstar eval decode=beam
decode.beam_width=W` on a finished iteration's trained policy (policy_{i+1}) and then scores
the chosen completions' implicit reward against that iteration's starting policy (its DPO
reference). Over-optimisation shows as implicit reward (and log-prob) rising with the width
while held-out accuracy does not.
Each eval writes its own JSON (an existing one is kept, so a killed benchmark resumes).
Writes benchmarks/results/beam_widths.json and beam_widths.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qstar_eval import RESULTS, qstar_eval, save_figure  # noqa: E402

from pipeline.run.atomic import write_json  # noqa: E402


def eval_width(width: int, policy: Path, out_dir: Path, overrides: list[str]) -> dict:
    return qstar_eval(["decode=beam", f"decode.beam_width={width}", f"model={policy}", *overrides],
                      out_dir / f"width_{width}.json", f"beam width {width}")


def implicit_rewards(results: dict[int, dict], policy: Path, reference: str, beta: float,
                     overrides: list[str]) -> dict[int, float]:
    """Mean summed beta * log(pi / pi_ref) of each width's chosen completions."""
    from critics.implicit import implicit_reward
    from pipeline.compose import compose_config
    from pipeline.config import replace_model_name
    from pipeline.lm.models import load_model
    from pipeline.lm.teacher_forced import completion_logprobs
    from pipeline.tasks import make_task
    from pipeline.tasks.prompt import task_prompts

    cfg = compose_config(["progress=false", *overrides])
    task = make_task(cfg.task)
    problems = task.split(cfg.eval.split)  # the split the graded rows came from
    pi, tokenizer = load_model(replace_model_name(cfg.model, str(policy)))
    pi_ref, _ = load_model(replace_model_name(cfg.model, reference))
    prompts = task_prompts(tokenizer, task, problems)
    found = {}
    for width, result in results.items():
        completions = [row["completion"] for row in result["rows"]]
        rewards = implicit_reward(pi, pi_ref, tokenizer, prompts, completions, beta,
                                  completion_logprobs)
        found[width] = sum(sum(r) for r in rewards) / len(rewards)
    return found


def plot(result: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [int(w) for w in result["widths"]]
    rows = [result["widths"][str(w)] for w in widths]
    fig, left = plt.subplots(figsize=(6, 3.5))
    left.plot(widths, [r["accuracy"] for r in rows], "o-", color="C0", label="held-out accuracy")
    left.set(xlabel="beam width", ylabel="held-out accuracy", xscale="log",
             title="Likelihood beam search as beams grow")
    left.set_xticks(widths, [str(w) for w in widths], minor=False)
    left.set_xticks([], minor=True)
    right = left.twinx()
    right.plot(widths, [r["implicit_reward"] for r in rows], "s--", color="C1",
               label="implicit reward")
    right.set_ylabel("beta * log(pi / pi_ref), summed")
    fig.legend(loc="lower right", bbox_to_anchor=(0.88, 0.15))
    return save_figure(fig, "beam_widths.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench" / "mcts_dpo")
    parser.add_argument("--iteration", type=int, default=0)
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("overrides", nargs="*", help="extra qstar overrides for every eval")
    args = parser.parse_args()
    iteration = args.run.resolve() / f"iter_{args.iteration:03d}"
    policy = iteration / "train" / "policy"
    policy_meta = policy / "meta.json"
    if not policy_meta.is_file():
        sys.exit(f"{policy_meta} is missing: run benchmarks/loop.py (or qstar run) first")
    meta = json.loads(policy_meta.read_text())
    reference, beta = meta["source_policy"], meta["config"]["beta"]
    out_dir = iteration / "beam_widths"
    results = {w: eval_width(w, policy, out_dir, args.overrides) for w in args.widths}
    rewards = implicit_rewards(results, policy, reference, beta, args.overrides)
    result = {"benchmark": "beam_widths", "run": str(args.run), "iteration": args.iteration,
              "policy": str(policy), "reference": reference, "beta": beta, "widths": {}}
    for w, r in results.items():
        s = r["summary"]
        result["widths"][str(w)] = {
            "accuracy": s["accuracy"], "tokens_per_problem": round(s["tokens"] / s["total"], 1),
            "logprob_per_token": round(s["beam_logprob_per_token"], 4),
            "logprob": round(s["beam_logprob"], 3), "implicit_reward": round(rewards[w], 4)}
    write_json(RESULTS / "beam_widths.json", result)
    print(f"wrote {plot(result)}")
    for w, v in result["widths"].items():
        print(f"width {w:>2}: accuracy {v['accuracy']:.3f}  log-prob/token {v['logprob_per_token']:+.3f}  "
              f"implicit reward {v['implicit_reward']:+.4f}  tokens/problem {v['tokens_per_problem']}")


if __name__ == "__main__":
    main()
