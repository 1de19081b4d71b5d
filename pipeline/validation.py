"""Range checks of a composed config: one line per bad value, naming the key and what is
allowed (the schema and its defaults are in pipeline/config.py)."""

from __future__ import annotations

import re

from pipeline.config import (
    DecodeConfig,
    DecodeStrategy,
    EvalConfig,
    QstarConfig,
    Reference,
    SearchConfig,
    TaskConfig,
    TaskKind,
    TrainConfig,
    TrainMode,
)
from pipeline.errors import ConfigError


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _require(ok: bool, key: str, allowed: str, value) -> None:
    if not ok:
        raise ConfigError(f"config key {key}={value!r} is invalid: {allowed}")


def _validate_task(t: TaskConfig) -> None:
    for key in ("num_train", "num_dev", "num_test"):
        _require(getattr(t, key) >= 1, f"task.{key}", "must be >= 1", getattr(t, key))
    _require(t.seed >= 0, "task.seed", "must be >= 0", t.seed)
    _require(1 <= t.min_terms <= t.max_terms, "task.min_terms", "need 1 <= min_terms <= max_terms",
             t.min_terms)
    _require(1 <= t.min_digits <= t.max_digits, "task.min_digits",
             "need 1 <= min_digits <= max_digits", t.min_digits)
    _require(not t.verify_steps or t.kind == TaskKind.chain_steps, "task.verify_steps",
             f"only task=chain_steps has partial sums to check (task.kind={t.kind.value})",
             t.verify_steps)


def _validate_eval(e: EvalConfig) -> None:
    for strategy in e.decodes:
        _require(strategy in DecodeStrategy.__members__, "eval.decodes",
                 f"allowed: {', '.join(DecodeStrategy.__members__)}", strategy)


def validate(cfg: QstarConfig) -> QstarConfig:
    """Refuse out-of-range values with a message naming the key and what is allowed."""
    _validate_run(cfg)
    _validate_task(cfg.task)
    _validate_decode(cfg.decode)
    _validate_search(cfg.search)
    _validate_learning(cfg)
    return cfg


def _validate_run(cfg: QstarConfig) -> None:
    _require(cfg.model.name != "???", "model.name", "give a model id or path", cfg.model.name)
    _require(not (cfg.task.kind == TaskKind.jsonl and cfg.task.path in (None, "???")), "task.path",
             "task=jsonl needs task.path=<file or directory>", cfg.task.path)
    _require(not (cfg.task.kind == TaskKind.custom and cfg.task.target in (None, "???")),
             "task.target", "task=custom needs task.target=package.module:ClassName",
             cfg.task.target)
    _require(cfg.iterations >= 1, "iterations", "must be >= 1", cfg.iterations)
    _require(0 <= cfg.search.problems_per_iteration <= cfg.task.num_train,
             "search.problems_per_iteration",
             f"need 0 <= problems_per_iteration <= task.num_train={cfg.task.num_train} (0 = all)",
             cfg.search.problems_per_iteration)
    _require(not cfg.search.prune_steps or cfg.task.kind == TaskKind.custom
             or cfg.task.kind == TaskKind.chain_steps and cfg.task.verify_steps,
             "search.prune_steps", "needs a verifier that reads the working: task=chain_steps "
             "with task.verify_steps=true, or a custom task's off_track", cfg.search.prune_steps)
    _require(cfg.model.dtype in ("float32", "bfloat16", "float16", "auto"), "model.dtype",
             "allowed: float32, bfloat16, float16, auto", cfg.model.dtype)
    _require(cfg.model.device == "cpu" or cfg.model.device.startswith("cuda"), "model.device",
             "allowed: cpu, cuda, cuda:N", cfg.model.device)
    c = cfg.cluster
    _require(c.search_workers >= 1, "cluster.search_workers", "must be >= 1", c.search_workers)
    _require(c.worker_num_gpus >= 0, "cluster.worker_num_gpus", "must be >= 0", c.worker_num_gpus)
    _validate_eval(cfg.eval)
    _require(cfg.tracking.wandb_mode in ("offline", "online", "disabled"), "tracking.wandb_mode",
             "allowed: offline, online, disabled", cfg.tracking.wandb_mode)


def _validate_decode(d: DecodeConfig) -> None:
    _require(d.n >= 1, "decode.n", "must be >= 1", d.n)
    _require(d.beam_width >= 1, "decode.beam_width", "must be >= 1", d.beam_width)
    _require(d.temperature > 0, "decode.temperature", "must be > 0", d.temperature)
    _require(0 < d.top_p <= 1, "decode.top_p", "must be in (0, 1]", d.top_p)
    _require(d.max_new_tokens >= 1, "decode.max_new_tokens", "must be >= 1", d.max_new_tokens)
    _require(d.batch_size >= 1, "decode.batch_size", "must be >= 1", d.batch_size)


def _validate_search(s: SearchConfig) -> None:
    _require(s.simulations >= 1, "search.simulations", "must be >= 1", s.simulations)
    _require(s.token_budget >= 0, "search.token_budget", "must be >= 0 (0 = no cap)", s.token_budget)
    _require(s.c_puct > 0, "search.c_puct", "must be > 0", s.c_puct)
    _require(1 <= s.c_min <= s.c_max, "search.c_min", "need 1 <= c_min <= c_max", s.c_min)
    _require(1 <= s.root_c_min <= s.root_c_max, "search.root_c_min",
             "need 1 <= root_c_min <= root_c_max", s.root_c_min)
    _require(s.max_depth >= 1, "search.max_depth", "must be >= 1", s.max_depth)
    _require(s.max_option_tokens >= 1, "search.max_option_tokens", "must be >= 1",
             s.max_option_tokens)
    _require(0 < s.merge_threshold <= 1, "search.merge_threshold", "must be in (0, 1]",
             s.merge_threshold)
    _require(s.merge_retries >= 0, "search.merge_retries", "must be >= 0", s.merge_retries)
    _require(s.dead_end_retries >= 0, "search.dead_end_retries", "must be >= 0",
             s.dead_end_retries)
    _require(s.leaves_per_tree >= 1, "search.leaves_per_tree", "must be >= 1", s.leaves_per_tree)
    _require(s.trees_per_batch >= 1, "search.trees_per_batch", "must be >= 1", s.trees_per_batch)
    _require(s.temperature > 0, "search.temperature", "must be > 0", s.temperature)
    _require(s.rollout.temperature >= 0, "search.rollout.temperature", "must be >= 0 (0 = greedy)",
             s.rollout.temperature)
    _require(s.alpha >= 0, "search.alpha", "must be >= 0", s.alpha)
    _require(s.kv_cache_mb >= 0, "search.kv_cache_mb", "must be >= 0 MiB (0 = off)", s.kv_cache_mb)
    _require(s.virtual_loss >= 0, "search.virtual_loss", "must be >= 0", s.virtual_loss)
    _require(_compiles(s.step_regex), "search.step_regex", "must be a valid regular expression",
             s.step_regex)


def _validate_learning(cfg: QstarConfig) -> None:
    for name in ("weights", "trained_weights"):
        w = getattr(cfg.critics, name)
        parts = [w.value, w.prm, w.orm, w.rollout, w.implicit]
        _require(all(p >= 0 for p in parts) and sum(parts) > 0, f"critics.{name}",
                 "weights must be >= 0 and sum to more than 0", parts)
    _require(0 < cfg.critics.heldout_fraction < 1, "critics.heldout_fraction",
             "must be in (0, 1)", cfg.critics.heldout_fraction)
    tr = cfg.train
    _require(tr.beta > 0, "train.beta", "must be > 0", tr.beta)
    _require(tr.learning_rate > 0, "train.learning_rate", "must be > 0", tr.learning_rate)
    _require(tr.sft_learning_rate is None or tr.sft_learning_rate > 0, "train.sft_learning_rate",
             "must be > 0 (or null: train.learning_rate)", tr.sft_learning_rate)
    _require(tr.epochs > 0, "train.epochs", "must be > 0", tr.epochs)
    _require(0 < tr.lora_layer_fraction <= 1, "train.lora_layer_fraction",
             "must be in (0, 1] (1: every decoder layer)", tr.lora_layer_fraction)
    _require(tr.batch_size >= 1, "train.batch_size", "must be >= 1", tr.batch_size)
    _require(tr.reference_batch_size >= 1, "train.reference_batch_size", "must be >= 1",
             tr.reference_batch_size)
    _require(tr.pairs.margin >= 0, "train.pairs.margin", "must be >= 0", tr.pairs.margin)
    for key in ("max_per_problem", "sft_per_problem"):
        _require(getattr(tr.pairs, key) >= -1, f"train.pairs.{key}", "must be >= 0 (or -1: no cap)",
                 getattr(tr.pairs, key))
    _require(tr.reference != Reference.sft or tr.mode == TrainMode.dpo, "train.reference",
             f"sft needs train.mode=dpo (it adds the SFT phase before DPO), not {tr.mode.value}",
             tr.reference.value)
    _require(tr.history >= 1 or tr.history == -1, "train.history",
             "must be >= 1 (or -1: every iteration so far)", tr.history)
    grpo = "train.mode=grpo trains on its own samples, from policy_i:"
    _require(tr.mode != TrainMode.grpo or tr.history == 1, "train.history", f"{grpo} must be 1",
             tr.history)
    _require(tr.mode != TrainMode.grpo or not tr.from_base, "train.from_base",
             f"{grpo} must be false", tr.from_base)
    _require(not tr.from_base or tr.mode == TrainMode.sft or tr.reference != Reference.previous,
             "train.from_base", "true needs train.reference=base or sft when DPO trains (DPO "
             "starts from the model it is anchored to)", tr.from_base)
    _validate_grpo(tr)


def _validate_grpo(tr: TrainConfig) -> None:
    g = tr.grpo
    _require(g.num_generations >= 2, "train.grpo.num_generations",
             "must be >= 2 (GRPO compares completions within a group)", g.num_generations)
    _require(g.prompts_per_step >= 1, "train.grpo.prompts_per_step", "must be >= 1",
             g.prompts_per_step)
    per_step = g.prompts_per_step * g.num_generations
    _require(per_step % tr.batch_size == 0, "train.batch_size",
             f"must divide train.grpo.prompts_per_step * num_generations = {per_step}",
             tr.batch_size)
    _require(g.max_completion_length >= 1, "train.grpo.max_completion_length", "must be >= 1",
             g.max_completion_length)
    _require(g.temperature > 0, "train.grpo.temperature", "must be > 0", g.temperature)
    _require(g.beta >= 0, "train.grpo.beta", "must be >= 0", g.beta)
    _require(g.token_budget >= 0, "train.grpo.token_budget", "must be >= 0 (0 = no budget)",
             g.token_budget)
