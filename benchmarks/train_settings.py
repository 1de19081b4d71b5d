"""The train stage alone under several settings, on one run's data, each in its own process.

    python benchmarks/train_settings.py RUN [--iteration 0] [--output FILE]

Trains policy_i of RUN (the base model for iteration 0) on RUN/iter_<i>/data, as the run's own
config (`experiment=demo_cpu` by default) and each setting's overrides say, one process after
another (peak RSS is per process), and prints and writes, per setting: the stage's wall seconds,
each phase's seconds, the process's peak RSS and DPO's after-training means over every pair
(margin, pair accuracy, chosen log-prob change). The settings are the demo's before and after
it took LoRA (issue 16): every weight with activation checkpointing at 2e-5, LoRA at 2e-4 with
and without it, and LoRA at four rows per forward or under bf16 autocast (train.cpu_autocast),
and under autocast on the last 15, 10 or 6 decoder layers only (train.lora_layer_fraction) at
the same or a larger step; and the run's own config with DPO's steps started at the first
adapted layer from the reference pass's states (pipeline.lm.trunk) and without.
Compare seconds only between settings run on an equally quiet machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.run.atomic import write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FULL = ["train.lora=false", "train.learning_rate=2e-5", "train.activation_checkpointing=true",
        "train.cpu_autocast=false"]
LORA = ["train.lora=true", "train.learning_rate=2e-4", "train.cpu_autocast=false"]
SETTINGS = {
    "full_checkpointing": FULL,
    "lora_checkpointing": [*LORA, "train.activation_checkpointing=true"],
    "lora": [*LORA, "train.activation_checkpointing=false"],
    # the same optimizer steps, four rows per forward instead of one row four times
    "lora_batch4": [*LORA, "train.activation_checkpointing=false", "train.batch_size=4",
                    "train.gradient_accumulation_steps=1"],
    # the demo's since 2026-12-03: bf16 autocast over the fp32 weights (model.dtype bfloat16)
    "lora_autocast": [*LORA[:2], "train.activation_checkpointing=false", "train.cpu_autocast=true"],
    # the adapter on the last 15 / 10 of SmolLM2-135M's 30 decoder layers: the backward pass stops
    # there (train.lora_layer_fraction)
    "lora_autocast_top15": [*LORA[:2], "train.activation_checkpointing=false",
                            "train.cpu_autocast=true", "train.lora_layer_fraction=0.5"],
    "lora_autocast_top10": [*LORA[:2], "train.activation_checkpointing=false",
                            "train.cpu_autocast=true", "train.lora_layer_fraction=0.33"],
    # the same with a larger step, to move the policy as far as the whole adapter does
    "lora_autocast_top15_4e-4": ["train.lora=true", "train.learning_rate=4e-4",
                                 "train.activation_checkpointing=false", "train.cpu_autocast=true",
                                 "train.lora_layer_fraction=0.5"],
    "lora_autocast_top10_6e-4": ["train.lora=true", "train.learning_rate=6e-4",
                                 "train.activation_checkpointing=false", "train.cpu_autocast=true",
                                 "train.lora_layer_fraction=0.33"],
    "lora_autocast_top6_1e-3": ["train.lora=true", "train.learning_rate=1e-3",
                                "train.activation_checkpointing=false", "train.cpu_autocast=true",
                                "train.lora_layer_fraction=0.2"],
    # the run's own config, DPO's steps starting at the first adapted layer (pipeline.lm.trunk),
    # and the same with every layer run at every step (SHARE_TRUNK off)
    "run_config": [],
    "run_config_whole_trunk": [],
}
WHOLE_TRUNK = {"run_config_whole_trunk"}  # settings that turn pipeline.lm.trunk off
KEPT = ("dpo/seconds", "sft/seconds", "dpo/steps", "sft/steps", "dpo/loss_last", "sft/loss_last",
        "dpo/after/rewards/margins", "dpo/after/rewards/accuracies", "dpo/logps/chosen_change")


def one_setting(run: Path, iteration: int, name: str, out: Path) -> dict:
    """Train in this process; returns the setting's numbers."""
    from omegaconf import OmegaConf

    import pipeline.lm.trunk as trunk_lib
    from pipeline.compose import recorded_config, to_config
    from pipeline.lm.models import resolve_model_path
    from pipeline.run.store import RunStore
    from pipeline.stages.train import train_policy

    trunk_lib.SHARE_TRUNK = name not in WHOLE_TRUNK
    cfg = to_config(OmegaConf.merge(recorded_config(run), OmegaConf.from_dotlist(SETTINGS[name])))
    policy = RunStore(run).policy_ref(iteration, cfg.model.name)
    policy = str(run / policy) if (run / policy).exists() else resolve_model_path(cfg.model)
    shutil.rmtree(out / name, ignore_errors=True)  # a finished policy there would be returned as is
    start = time.perf_counter()
    metrics = train_policy(policy, run / f"iter_{iteration:03d}" / "data", cfg.train, out / name,
                           model_cfg=cfg.model, iteration=iteration, reference_dir=policy)
    return {"overrides": SETTINGS[name], "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            **{key: metrics[key] for key in KEPT if key in metrics}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory whose iteration has its data")
    parser.add_argument("--iteration", type=int, default=0)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="in this order; a name given twice runs twice (kept as name#2)")
    parser.add_argument("--work", type=Path, default=None, help="where each setting trains "
                        "(default: RUN/train_settings)")
    parser.add_argument("--output", type=Path, default=RESULTS / "train_settings.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: this setting only
    args = parser.parse_args()
    work = args.work or args.run / "train_settings"
    if args.one:
        print(json.dumps(one_setting(args.run, args.iteration, args.one, work)))
        return
    results = {}
    for name in args.settings:
        child = subprocess.run([sys.executable, __file__, str(args.run), "--iteration",
                                str(args.iteration), "--work", str(work), "--one", name],
                               check=True, capture_output=True, text=True)
        key = name if name not in results else f"{name}#{sum(k.split('#')[0] == name for k in results) + 1}"
        results[key] = json.loads(child.stdout.strip().splitlines()[-1])
        print(key, json.dumps(results[key]), flush=True)
    write_json(args.output, {"benchmark": "train_settings", "run": str(args.run),
                             "iteration": args.iteration, "settings": results})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
