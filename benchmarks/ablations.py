"""Ablations of evaluation-time MCTS at our scale (AlphaLLM's table 3).

    python benchmarks/ablations.py [--run runs/bench/mcts_dpo] [--iteration 0]

Takes a finished iteration of a `qstar run` (default: the one benchmarks/loop.py makes): its
trained policy and the critics it was evaluated with (fitted on its trees: iter_NNN/refit, or
iter_NNN/critics where no refit ran), and runs `qstar eval decode=mcts` on the
held-out set once with everything on and once per component switched off:
- without importance branching: search.alpha=0 (every node gets c_min children),
- without state merge: search.merge=none,
- without the PRM: critics.trained_weights.prm=0,
- without fast rollouts: search.rollout.enabled=false (leaves valued by the critics alone).
And one addition: the answer voted over the tree's solutions (search.best_path=vote) instead
of the most-visited path's.
Each eval writes its own JSON (an existing one is kept, so a killed benchmark resumes).
Writes benchmarks/results/ablations.json and ablations.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qstar_eval import RESULTS, qstar_eval, save_figure  # noqa: E402

from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.run.store import RunStore  # noqa: E402

VARIANTS = {
    "full": [],
    "no_importance_branching": ["search.alpha=0"],
    "no_state_merge": ["search.merge=none"],
    "no_prm": ["critics.trained_weights.prm=0"],
    "no_fast_rollout": ["search.rollout.enabled=false"],
    "answer_by_vote": ["search.best_path=vote"],  # an addition, not an ablation: same trees
}


def eval_variant(name: str, extra: list[str], policy: Path, critics: Path, out_dir: Path,
                 overrides: list[str]) -> dict:
    summary = qstar_eval(["decode=mcts", f"model={policy}", f"eval.critics={critics}",
                          *overrides, *extra], out_dir / f"{name}.json", f"ablation {name}")["summary"]
    return {"overrides": extra, "accuracy": summary["accuracy"], "correct": summary["correct"],
            "total": summary["total"], "tokens_per_problem": round(summary["tokens"] / summary["total"], 1),
            "seconds": summary["seconds"]}


def plot(result: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [result["variants"][n]["accuracy"] for n in names])
    ax.set(ylabel="held-out accuracy", title="Evaluation-time MCTS ablations")
    ax.tick_params(axis="x", labelrotation=20)
    return save_figure(fig, "ablations.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench" / "mcts_dpo")
    parser.add_argument("--iteration", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="extra qstar overrides for every eval")
    args = parser.parse_args()
    iteration = args.run.resolve() / f"iter_{args.iteration:03d}"
    policy = iteration / "train" / "policy"
    critics = RunStore(args.run.resolve()).critics_dir(args.iteration + 1) or iteration / "critics"
    for path in (policy / "meta.json", critics / "orm" / "meta.json"):
        if not path.is_file():
            sys.exit(f"{path} is missing: run benchmarks/loop.py (or qstar run) first")
    out_dir = iteration / "ablations"
    result = {"benchmark": "ablations", "run": str(args.run), "iteration": args.iteration,
              "policy": str(policy), "critics": str(critics), "variants": {}}
    for name, extra in VARIANTS.items():
        result["variants"][name] = eval_variant(name, extra, policy, critics, out_dir,
                                                args.overrides)
    write_json(RESULTS / "ablations.json", result)
    print(f"wrote {plot(result)}")
    for name, v in result["variants"].items():
        print(f"{name:<24} accuracy {v['accuracy']:.3f}  tokens/problem {v['tokens_per_problem']}")


if __name__ == "__main__":
    main()
