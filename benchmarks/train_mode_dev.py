"""Which train mode turns one iteration's search data into the best next policy? On dev.

    python benchmarks/train_mode_dev.py --run runs/matched_budget/mcts [--iteration 0] \
        [--modes sft dpo dpo_then_sft]

Takes a finished iteration of a `qstar run` (its policy and its data stage's dpo.jsonl and
sft.jsonl), trains the iteration's policy once per `train.mode` with the run's own train
settings otherwise (pipeline.stages.train.train_policy; the run's own mode is the run's
iter_NNN/train/policy, not retrained), and grades each next policy greedily on the **dev**
split (`qstar eval`, the split tuning reads). Each trained policy and each eval JSON is kept
under --out, so a killed run resumes. Writes benchmarks/results/train_mode_dev.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.compose import load_run_config  # noqa: E402
from pipeline.config import DecodeStrategy, Split, TrainMode  # noqa: E402
from pipeline.lm.models import resolve_model_path  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.run.store import RunStore  # noqa: E402
from pipeline.stages.eval import run_eval  # noqa: E402
from pipeline.stages.train import train_policy  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def next_policy(store: RunStore, cfg, i: int, mode: TrainMode, out: Path) -> Path:
    """policy_{i+1} trained from the iteration's data with `mode`; the run's own when it matches."""
    if mode == cfg.train.mode:
        return store.policy_dir(i + 1, resolve_model_path(cfg.model))
    source = store.policy_dir(i, resolve_model_path(cfg.model))
    metrics = train_policy(source, store.stage_dir(i, "data"), replace(cfg.train, mode=mode),
                           out / mode.value, model_cfg=replace(cfg.model, name=str(source)),
                           iteration=i, progress=cfg.progress)
    return Path(metrics["policy_dir"])


def dev_greedy(cfg, policy: Path, output: Path) -> dict:
    """Greedy on dev with the run's own task and decoding settings (as its eval stage)."""
    if not output.is_file():
        run_eval(replace(cfg, model=replace(cfg.model, name=str(policy)), progress=False,
                         decode=replace(cfg.decode, strategy=DecodeStrategy.greedy),
                         eval=replace(cfg.eval, split=Split.dev, output=str(output))))
    return json.loads(output.read_text())["summary"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a qstar run directory")
    parser.add_argument("--iteration", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=[m.value for m in TrainMode],
                        choices=[m.value for m in TrainMode])
    parser.add_argument("--out", type=Path, default=None,
                        help="where the trained policies and eval JSONs go (default: "
                             "RUN/bench_train_mode/iter_NNN)")
    parser.add_argument("--output", type=Path, default=RESULTS / "train_mode_dev.json")
    args = parser.parse_args(argv)
    store, i = RunStore(args.run), args.iteration
    if not store.done(i, "data"):
        parser.error(f"--run {args.run} has no finished data stage in iteration {i}")
    cfg = load_run_config(args.run, [])
    out = args.out or args.run / "bench_train_mode" / f"iter_{i:03d}"
    rows = {}
    for mode in map(TrainMode, args.modes):
        policy = next_policy(store, cfg, i, mode, out)
        summary = dev_greedy(cfg, policy, out / f"{mode.value}_dev_greedy.json")
        rows[mode.value] = {"policy": str(policy), "dev_greedy": summary["accuracy"],
                            "correct": summary["correct"], "total": summary["total"]}
        print(f"{mode.value:<14} dev greedy {summary['accuracy']:.3f}", flush=True)
    base = dev_greedy(cfg, store.policy_dir(i, resolve_model_path(cfg.model)),
                      out / "start_dev_greedy.json")
    result = {"benchmark": "train_mode_dev", "split": "dev", "run": str(args.run), "iteration": i,
              "run_mode": cfg.train.mode.value, "start_dev_greedy": base["accuracy"],
              "modes": rows}
    write_json(args.output, result)
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
