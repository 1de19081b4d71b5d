"""Which train settings turn one iteration's search data into the best next policy? On dev.

    python benchmarks/train_mode_dev.py --run runs/matched_budget/mcts [--iteration 0] \
        [--variant "NAME OVERRIDE..."]...

Takes a finished iteration of a `qstar run` (its policy and its data stage's dpo.jsonl and
sft.jsonl), trains the iteration's policy once per variant: the run's own config with the
variant's `train.*` overrides (default: one variant per train.mode, sft, dpo and
dpo_then_sft; e.g. `--variant "rpo train.loss_type=[sigmoid,sft]"`), through
pipeline.stages.train.train_policy. A variant whose train config is the run's own reuses the
run's iter_NNN/train/policy. Each next policy is graded greedily on the **dev** split, with the
run's task and decoding, as its eval stage grades (the split tuning reads). Each trained policy
and eval JSON is kept under --out, so a killed run resumes. Writes
benchmarks/results/train_mode_dev.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from pipeline.compose import load_run_config, one_line, recorded_config, to_config  # noqa: E402
from pipeline.config import DecodeStrategy, QstarConfig, Split, TrainConfig, TrainMode  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.lm.models import resolve_model_path  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.run.store import RunStore  # noqa: E402
from pipeline.stages.eval import run_eval  # noqa: E402
from pipeline.stages.train import train_policy  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TRAINED_BY_DATA = (TrainMode.sft, TrainMode.dpo, TrainMode.dpo_then_sft)  # grpo samples its own


def next_policy(store: RunStore, cfg, train: TrainConfig, i: int, out: Path) -> str:
    """policy_{i+1} trained from the iteration's data with `train`; the run's own when it is
    the run's train config."""
    if train == cfg.train:
        return store.policy_dir(i + 1, resolve_model_path(cfg.model))
    source = store.policy_dir(i, resolve_model_path(cfg.model))
    metrics = train_policy(source, store.stage_dir(i, "data"), train, out,
                           model_cfg=replace(cfg.model, name=str(source)), iteration=i,
                           progress=cfg.progress)
    return str(metrics["policy_dir"])


def run_config_with(run: Path, overrides: list[str]) -> QstarConfig:
    """The run's recorded config with dotlist overrides (which a resume would refuse)."""
    try:
        return to_config(OmegaConf.merge(recorded_config(run), OmegaConf.from_dotlist(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line(exc)) from None


def variant_train(parser, run: Path, name: str, overrides: list[str]) -> TrainConfig:
    """The train config of one variant, or one line (exit 2) saying what is not allowed."""
    if any(not o.startswith("train.") for o in overrides):
        parser.error(f"--variant {name}: only train.* overrides are allowed, got {overrides}")
    try:
        train = run_config_with(run, overrides).train
    except ConfigError as exc:
        parser.error(f"--variant {name}: {exc}")
    if train.mode not in TRAINED_BY_DATA:
        parser.error(f"--variant {name}: train.mode={train.mode.value}: allowed here: "
                     f"{', '.join(m.value for m in TRAINED_BY_DATA)}")
    return train


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
    parser.add_argument("--variant", action="append", metavar='"NAME OVERRIDE..."',
                        help="a name and its train.* overrides, in one argument (repeatable; "
                             "default: one variant per train mode)")
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
    variants = {m.value: [f"train.mode={m.value}"] for m in TRAINED_BY_DATA}
    if args.variant:
        variants = {v.split()[0]: v.split()[1:] for v in args.variant if v.split()}
    trains = {name: variant_train(parser, args.run, name, overrides)  # all checked before
              for name, overrides in variants.items()}                # any variant trains
    rows = {}
    for name, train in trains.items():
        policy = next_policy(store, cfg, train, i, out / name)
        summary = dev_greedy(cfg, Path(policy), out / f"{name}_dev_greedy.json")
        rows[name] = {"overrides": variants[name], "policy": policy,
                      "dev_greedy": summary["accuracy"], "correct": summary["correct"],
                      "total": summary["total"]}
        print(f"{name:<14} dev greedy {summary['accuracy']:.3f}", flush=True)
    base = dev_greedy(cfg, store.policy_dir(i, resolve_model_path(cfg.model)),
                      out / "start_dev_greedy.json")
    result = {"benchmark": "train_mode_dev", "split": "dev", "run": str(args.run), "iteration": i,
              "run_mode": cfg.train.mode.value, "start_dev_greedy": base["accuracy"],
              "variants": rows}
    write_json(args.output, result)
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
