"""What should the ORM read? Best-of-N selection with each `critics.orm_features`.

    python benchmarks/orm_features.py [--run runs/bench/mcts_dpo] [--iterations 0 1]

For each finished iteration i of a run this refits the critics on that iteration's trees (as
its critics stage does, backbone policy_i) once per ORM feature set, then runs `qstar eval
decode=best_of_n` on policy_{i+1} with each. The N samples are seeded, so every feature set
selects among the same candidates: majority vote, ORM argmax and the ORM-weighted vote compare
side by side, with the ORM's held-out AUC on the trees.
Each step keeps what it wrote (critics directory, eval JSON), so a killed benchmark resumes.
Writes benchmarks/results/orm_features.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qstar_eval import RESULTS, qstar_eval  # noqa: E402

from critics.critic_set import FeatureSet  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402


def refit_critics(run: Path, iteration: int, features: FeatureSet, out: Path) -> dict:
    from pipeline.compose import load_run_config
    from pipeline.lm.models import resolve_model_path
    from pipeline.run.store import RunStore, load_shards
    from pipeline.stages.critics import train_critics

    if not (out / "metrics.json").is_file():
        cfg = load_run_config(run, [])
        store = RunStore(run)
        policy = store.policy_dir(iteration, resolve_model_path(cfg.model))
        rows = load_shards(store.stage_dir(iteration, "search"))
        train_critics(rows, policy, replace(cfg.critics, orm_features=features), out,
                      model_cfg=cfg.model)
    return json.loads((out / "metrics.json").read_text())["orm"]


def eval_best_of_n(policy: Path, critics: Path, output: Path) -> dict:
    return qstar_eval(["decode=best_of_n", f"model={policy}", f"eval.critics={critics}"], output,
                      f"eval with {critics}")["summary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench" / "mcts_dpo")
    parser.add_argument("--iterations", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    run = args.run.resolve()
    result = {"benchmark": "orm_features", "run": str(run), "iterations": {}}
    for i in args.iterations:
        iteration = run / f"iter_{i:03d}"
        policy = iteration / "train" / "policy"
        if not (policy / "meta.json").is_file():
            sys.exit(f"{policy / 'meta.json'} is missing: run benchmarks/loop.py (or qstar run) first")
        found = result["iterations"][str(i)] = {"policy": f"policy {i + 1}"}
        for features in FeatureSet:
            where = iteration / "orm_features" / features.value
            orm = refit_critics(run, i, features, where / "critics")
            summary = eval_best_of_n(policy, where / "critics", where / "best_of_n.json")
            found[features.value] = {"orm_auc": orm["auc"], "orm_ece": orm["ece"],
                                     **summary["accuracy_by_select"]}
        write_json(RESULTS / "orm_features.json", result)
    for i, found in result["iterations"].items():
        for features in FeatureSet:
            r = found[features.value]
            print(f"iteration {i} ({found['policy']}), orm_features={features.value:<10}: ORM AUC "
                  f"{r['orm_auc']:.3f}  best-of-N majority {r['majority']:.2f}  ORM {r['orm']:.2f}  "
                  f"ORM vote {r['orm_vote']:.2f}")


if __name__ == "__main__":
    main()
