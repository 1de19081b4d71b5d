"""The GRPO baseline's train stage (`train.mode=grpo`, `experiment=grpo_cpu`): TRL's
`GRPOTrainer` on the training problems, rewarded by the task's grader -> policy_{i+1}.

GRPO needs no search, critics or data stage: it samples while it trains. Iteration i trains
policy_i for `train.epochs` epochs over the training problems; each optimizer step samples
`train.grpo.num_generations` completions for each of `train.grpo.prompts_per_step` problems
(one generation batch per step: on-policy), rewards every completion with `Task.score` (1.0 =
correct; a custom task may give partial credit), and applies TRL's GRPO loss. The prompts are
the task's chat messages, which TRL renders with the same chat template as search and eval.
The eval stage then measures policy_{i+1} like any other loop's policy.

With `train.grpo.token_budget` > 0, training stops after the first optimizer step whose sampled
tokens reach the budget (train.epochs is then a cap): the matched-budget benchmark gives GRPO the
MCTS loop's search tokens this way.

Generated tokens are counted as the search stage counts them: every sampled completion token up
to and including EOS (TRL's `completion_ids`). The count comes from TRL's own per-step log
(`completions/mean_length` x completions per step), which its checkpoints keep, so a training
resumed after a kill still counts the steps before it.

Metrics: mode, policy_dir, source_policy, iteration, problems, token_budget, steps, completions, tokens
(generated), seconds, loss (last step), reward_first / reward_last / reward_mean (the grader's
mean per step), solve_rate_first / solve_rate_last / solve_rate_mean (completions graded 1.0).
Checkpoints and the atomic final save follow pipeline.stages.train, and so does the LM head:
on a CPU too it projects only the completion tokens (`lm_head_on_labels_only`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from pipeline.config import ModelConfig, TrainConfig, to_dict
from pipeline.lm.models import load_tokenizer
from pipeline.run.atomic import atomic_dir, write_json
from pipeline.run.progress import weight_bars_off
from pipeline.run.train_progress import show_progress
from pipeline.stages.base import Loop, resolve_ref
from pipeline.stages.train import _free_memory, _last_checkpoint
from pipeline.stages.trl_trainers import (
    common_args,
    lm_head_on_labels_only,
    load_policy_for_training,
    lora_config,
    quiet_unless,
)
from pipeline.tasks.base import Problem, Task

REWARD = "grader"  # the reward function's name: TRL logs rewards/grader/mean


def grader_reward(task: Task, problems: list[Problem]):
    """TRL's reward function: the task's score of each completion for its problem."""
    by_id = {p.id: p for p in problems}

    def grader(prompts, completions, problem_id, log_metric=None, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = [task.score(by_id[pid], text) for pid, text in zip(problem_id, texts)]
        if log_metric is not None:
            log_metric("solve_rate", sum(r == 1.0 for r in rewards) / max(len(rewards), 1))
        return rewards

    grader.__name__ = REWARD
    return grader


def grpo_args(cfg: TrainConfig, model_cfg: ModelConfig, output_dir: Path, report_to: str,
              save_steps: int, progress: bool = False):
    from trl import GRPOConfig  # heavy: TRL is imported only where a trainer is built

    g = cfg.grpo
    common = common_args(cfg, model_cfg, output_dir, report_to, save_steps, progress)
    common.pop("max_length")  # GRPO caps completions instead (max_completion_length)
    per_step = g.prompts_per_step * g.num_generations
    common["gradient_accumulation_steps"] = per_step // cfg.batch_size  # one generation per step
    return GRPOConfig(**common, num_generations=g.num_generations,
                      max_completion_length=g.max_completion_length, temperature=g.temperature,
                      top_p=1.0, beta=g.beta, remove_unused_columns=False)


def _series(logs: list[dict], key: str, name: str) -> dict:
    values = [h[key] for h in logs if key in h]
    if not values:
        return {}
    return {f"{name}_first": values[0], f"{name}_last": values[-1],
            f"{name}_mean": sum(values) / len(values)}


def _step_logs(history: list[dict]) -> list[dict]:
    return [h for h in history if "train_runtime" not in h and "loss" in h]


def sampled_tokens(history: list[dict], completions_per_step: int) -> int:
    """Completion tokens sampled so far: TRL logs each step's mean completion length."""
    lengths = [h["completions/mean_length"] for h in _step_logs(history)
               if "completions/mean_length" in h]
    return round(sum(lengths) * completions_per_step)


class TokenBudgetStop(TrainerCallback):
    """Stops training after the optimizer step whose sampled tokens reach `budget`. It reads the
    trainer's log history, which a resumed training restores, so steps before a kill count."""

    def __init__(self, budget: int, completions_per_step: int):
        self.budget, self.per_step = budget, completions_per_step

    def on_log(self, args, state, control, **kwargs):
        if sampled_tokens(state.log_history, self.per_step) >= self.budget:
            control.should_training_stop = True


def grpo_metrics(history: list[dict], completions_per_step: int) -> dict:
    logs = _step_logs(history)
    lengths = [h for h in logs if "completions/mean_length" in h]
    out = {"steps": len(logs), "completions": completions_per_step * len(lengths),
           "tokens": sampled_tokens(history, completions_per_step),
           "loss": logs[-1]["loss"] if logs else None}
    out.update(_series(logs, f"rewards/{REWARD}/mean", "reward"))
    out.update(_series(logs, "solve_rate", "solve_rate"))
    return out


def train_grpo(policy_dir: str, task: Task, problems: list[Problem], cfg: TrainConfig,
               out_dir: str | Path, report_to: str = "none", *,
               model_cfg: ModelConfig | None = None, iteration: int | None = None,
               save_steps: int = 10, keep_checkpoints: bool = False,
               progress: bool = False) -> dict:
    """GRPO-train the policy at `policy_dir` on `problems`; policy_{i+1} in out_dir/policy."""
    # heavy libraries, imported only when a GRPO stage trains
    from datasets import Dataset
    from transformers import set_seed
    from trl import GRPOTrainer

    out_dir = Path(out_dir)
    model_cfg = model_cfg or ModelConfig(name=policy_dir)
    final = out_dir / "policy"
    if (final / "meta.json").is_file():  # finished before: the rename is the commit point
        return json.loads((final / "meta.json").read_text())["metrics"]
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(model_cfg, policy_dir)
    model = load_policy_for_training(policy_dir, cfg, model_cfg)
    use_cache = getattr(model.config, "use_cache", None)
    dataset = Dataset.from_list([{"prompt": task.messages(p), "problem_id": p.id}
                                 for p in problems])
    output_dir = out_dir / "trainer" / "grpo"
    args = grpo_args(cfg, model_cfg, output_dir, report_to, save_steps, progress)
    per_step = cfg.grpo.prompts_per_step * cfg.grpo.num_generations
    budget = [TokenBudgetStop(cfg.grpo.token_budget, per_step)] if cfg.grpo.token_budget else []
    start = time.perf_counter()
    _free_memory()
    with quiet_unless(progress), lm_head_on_labels_only():
        trainer = GRPOTrainer(model=model, reward_funcs=grader_reward(task, problems), args=args,
                              train_dataset=dataset, processing_class=tokenizer, callbacks=budget,
                              peft_config=lora_config(cfg, model))
        show_progress(trainer, "grpo", output_dir, progress)  # a bar and a summary line
        trainer.train(resume_from_checkpoint=_last_checkpoint(output_dir))
    history = trainer.state.log_history
    metrics = {"mode": "grpo", "source_policy": policy_dir, "iteration": iteration,
               "problems": len(problems), "token_budget": cfg.grpo.token_budget or None,
               **grpo_metrics(history, per_step),
               "seconds": round(time.perf_counter() - start, 3), "policy_dir": str(final)}
    model = trainer.model.merge_and_unload() if cfg.lora else trainer.model  # saved plain
    if use_cache is not None:
        model.config.use_cache = use_cache  # as loaded: training may have switched it off
    meta = {"source_policy": policy_dir, "iteration": iteration, "metrics": metrics,
            "config": to_dict(cfg), "model": to_dict(model_cfg)}
    with atomic_dir(final) as tmp, weight_bars_off():
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        if cfg.lora:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        else:
            trainer.save_model(str(tmp))  # model + tokenizer (processing_class)
        for leftover in ("training_args.bin", "README.md"):
            (tmp / leftover).unlink(missing_ok=True)
        write_json(tmp / "meta.json", meta)
    write_json(output_dir / "log_history.json", history)
    if not keep_checkpoints:
        for ckpt in output_dir.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


def fit_grpo(root: Path, out: Path, policy: str, task: Task, problems: list[Problem],
             cfg: TrainConfig, model_cfg: ModelConfig, iteration: int, report_to: str,
             progress: bool) -> dict:  # see pipeline.stages.base.stage_work
    return train_grpo(resolve_ref(root, policy, model_cfg), task, problems, cfg, out, report_to,
                      model_cfg=model_cfg, iteration=iteration, progress=progress)


def run(loop: Loop, i: int) -> dict:
    """policy_{i+1}: policy_i GRPO-trained on iteration i's training problems (all of them, or
    the window search.problems_per_iteration gives the other loops' search); run-relative."""
    policy = loop.policy_ref(i)
    metrics = loop.run_remote(fit_grpo, i, "train", loop.run_files([policy]), policy, loop.task,
                              loop.search_problems(i), loop.cfg.train, loop.cfg.model, i,
                              loop.tracker.report_to if loop.cluster.ray is None else "none",
                              loop.cfg.progress)
    trained = loop.store.relative(loop.store.stage_dir(i, "train") / "policy")
    return {**metrics, "source_policy": policy, "policy_dir": trained}
