"""Option-level MCTS (mcts/) driven by the policy, rollouts and critics.

`mcts.search` is pure; this module supplies its callbacks:
- expand: one batched `generate` call samples every requested option of every tree. When the
  rollout policy is the policy itself, each row continues past its option boundary
  (sampled at search.rollout.temperature; 0 = greedy),
  so the new node's fast rollout comes from the same KV cache (no second prefill).
- evaluate: ONE leaf value for training and evaluation (README, "Leaf value"): the weighted mean
  of the parts that exist: V(s), PRM(s), the ORM on s + its fast rollout (before any critic
  exists: the policy's confidence in s + rollout, exp(mean token log-prob)), on training
  problems only the verifier on s + rollout (the `rollout` slot), and, for a DPO policy, sigmoid
  of its option's implicit reward (`critics.trained_weights.implicit`; pipeline.stages.reference).
  Terminal nodes are leaves like any other (their rollout is empty); at training the verifier
  alone scores them.

Gold answers reach the search only through `train_search`, which takes the task's problems.
`eval_search` takes prompt strings alone; it has no path to a verifier.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from critics.critic_set import FeatureSet
from critics.implicit import implicit_score
from mcts.options import is_answer_line
from mcts.search import search
from mcts.tree import Tree
from mcts.types import EvalRequest, ExpandRequest, LeafEval, Option
from pipeline.config import (
    CriticWeights,
    LeafFeatures,
    MergeMethod,
    QstarConfig,
    SearchAlgorithm,
)
from pipeline.decoding.leaf_features import LeafFeatureStore
from pipeline.decoding.reuse import RolloutReuse, split_requests
from pipeline.decoding.sampling import sample_trees
from pipeline.decoding.search_keys import option_end, search_params, similarity_fn
from pipeline.decoding.streaming import StreamingExpander, expansion_rows
from pipeline.errors import QstarError
from pipeline.lm.generation import generate, replayed, streaming_decoder
from pipeline.lm.prefix_cache import PrefixCache
from pipeline.lm.stopping import OptionClaims
from pipeline.run.progress import progress_bar
from pipeline.tasks.base import Problem, Task
from pipeline.tasks.equations import false_equation, unsupported_answer

RewardFn = Callable[[int, str], float]  # (tree index, full solution text) -> reward in [0, 1]


@dataclass
class Rollout:
    text: str
    tokens: int
    mean_logprob: float
    finished: bool
    fused: bool = False  # decoded with its node's expansion, whose Option counted its tokens
    token_ids: list[int] = field(default_factory=list)  # what search.reuse_rollouts replays
    logprobs: list[float] = field(default_factory=list)
    wrong: bool = False  # stopped at a line the step check flagged (search.check_equations)


def _blank(g) -> Option:
    """A row whose option is only whitespace: no step, but its tokens (and its fused rollout's)
    were decoded, so the search drops it and counts them."""
    return Option(text=g.text, logprob=g.logprob, num_tokens=g.num_tokens, terminal=True,
                  rollout_tokens=g.rollout_tokens, reused=g.replayed)


@dataclass
class SearchModels:
    """What a search needs: the policy, an optional separate rollout model, optional critics."""

    policy: object
    tokenizer: object
    critics: object | None = None  # critics.CriticSet
    rollout_model: object | None = None  # None: the policy rolls out (fused with expansion)
    rollout_tokenizer: object | None = None
    implicit: object | None = None  # critics.ImplicitCritic: the policy's DPO reward, if it has one


@dataclass
class LeafScorer:
    """The expand and evaluate callbacks, and what they learned (rollouts) for the shard rows."""

    cfg: QstarConfig
    models: SearchModels
    reward_fn: RewardFn | None  # training only: the verifier on a full solution
    generation_batch: int = 64
    # training only, search.prune_steps: (tree index, working so far) -> the verifier rejects it
    off_track: Callable[[int, str], bool] | None = None
    pending: dict = field(default_factory=dict)  # (tree, prefix text) -> Rollout from expansion
    rollouts: dict = field(default_factory=dict)  # (tree, node) -> Rollout, kept for the record
    implicit: dict = field(default_factory=dict)  # (tree, steps text) -> the option's implicit reward
    kv: PrefixCache | None = None  # expansions' KV across rounds; built from search.kv_cache_mb
    features: LeafFeatureStore = field(default_factory=LeafFeatureStore)  # leaf_features=generation
    leaf_scoring: dict = field(default_factory=lambda: {"generation": 0, "backbone": 0})  # leaves

    claims: OptionClaims | None = None  # which row first wrote each option (search.cut_repeats)
    reuse: RolloutReuse | None = None  # options read off their node's rollout (reuse_rollouts)

    def __post_init__(self) -> None:
        s = self.cfg.search
        if self.kv is None:
            self.kv = PrefixCache(s.kv_cache_mb)
        # a repeated option is a duplicate only where the merge drops identical siblings
        if s.cut_repeats and s.merge != MergeMethod.none and s.merge_threshold < 1.0:
            self.claims = OptionClaims()
        if self.reuses:
            kwargs = self.expansion_kwargs()
            self.reuse = RolloutReuse(functools.partial(
                replayed, self.models.policy, self.models.tokenizer,
                **{k: kwargs[k] for k in ("max_new_tokens", "stop", "rollout_tokens", "final",
                                          "rollout_temperature", "wrong")}), self.claims)

    @property
    def fused(self) -> bool:
        r = self.cfg.search.rollout
        return r.enabled and self.models.rollout_model is None

    @property
    def reuses(self) -> bool:
        """search.reuse_rollouts applies: the policy's rollout is a sample at the options'
        temperature, and the critics read no hidden state (a replayed option has none)."""
        s, critics = self.cfg.search, self.models.critics
        reads_hidden = self.generation_features and FeatureSet.hidden in critics.features.values()
        return (s.reuse_rollouts and self.fused and s.rollout.temperature == s.temperature
                and not reads_hidden)

    @property
    def generation_features(self) -> bool:
        """The critics read the decoding pass's features (they share the policy's weights)."""
        critics = self.models.critics
        return (critics is not None and critics.model is self.models.policy
                and self.cfg.critics.leaf_features == LeafFeatures.generation)

    def expand(self, requests: list[ExpandRequest]) -> list[list[Option]]:
        fresh, taken = split_requests(self.reuse, requests)
        prompts, seeds, groups = expansion_rows(fresh)
        gens = generate(self.models.policy, self.models.tokenizer, prompts, **self.expansion_kwargs(),
                        batch_size=self.generation_batch, seeds=seeds, groups=groups,
                        checks=self.row_checks(fresh))
        return self.options(requests, expansion_rows(requests)[0],
                            RolloutReuse.join(fresh, taken, gens))

    @property
    def step_check(self):
        """search.check_equations: a line stating a false equality ends its row."""
        return false_equation if self.cfg.search.check_equations else None

    def row_checks(self, requests) -> list | None:
        """One check per row of these requests' expansions (or rollouts, `expansion_rows`
        order): search.prune_steps' verifier on the node's steps plus the row's text."""
        if self.off_track is None:
            return None
        return [functools.partial(_off_track, self.off_track, r.tree_index, "".join(r.steps))
                for r in requests
                for _ in range(r.num_options if isinstance(r, ExpandRequest) else 1)]

    def unsupported(self, solution: str) -> bool:
        """search.check_answers: a solution whose answer is not its working's last number."""
        return self.cfg.search.check_answers and unsupported_answer(solution)

    def dead(self, request: EvalRequest) -> bool:
        """A terminal node whose last step the step check flags, whose working the verifier
        rejects (search.prune_steps), or whose answer is not its working's last number
        (search.check_answers): a dead end, worth 0."""
        working = "".join(request.steps)
        return bool(request.terminal and request.steps and (
            self.step_check is not None and self.step_check(request.steps[-1])
            or self.off_track is not None and self.off_track(request.tree_index, working)
            or self.unsupported(working)))

    def expansion_kwargs(self) -> dict:
        """How expansions decode (`generate`'s arguments, past the prompts and batching):
        options to their boundary, then, fused, the new node's rollout."""
        s = self.cfg.search
        return dict(max_new_tokens=s.max_option_tokens, temperature=s.temperature,
                    stop=option_end(s), rollout_tokens=s.rollout.max_new_tokens if self.fused else 0,
                    rollout_temperature=s.rollout.temperature, final=is_answer_line,
                    wrong=self.step_check, prefix_cache=self.kv, hidden=self.generation_features,
                    claims=self.claims)

    def options(self, requests: list[ExpandRequest], prompts: list[str], gens) -> list[list[Option]]:
        """The requests' options from their rows' generations (`expansion_rows` order)."""
        self._implicit_rewards(requests, prompts, gens)
        options, k = [], 0
        for r in requests:
            mine = gens[k:k + r.num_options]
            k += r.num_options
            options.append([self._option(r, g) if g.text.strip() else _blank(g) for g in mine])
        return options

    def _implicit_rewards(self, requests: list[ExpandRequest], prompts: list[str], gens) -> None:
        """Each new option's implicit reward, when it is a leaf-value part: log pi from this
        generation pass, log pi_ref from one batched forward of the reference."""
        if self.models.implicit is None or self.weights().implicit <= 0:
            return
        rewards = self.models.implicit.of_tokens(prompts, [g.token_ids for g in gens],
                                                 [g.logprobs for g in gens])
        owners = [r for r in requests for _ in range(r.num_options)]
        for r, g, reward in zip(owners, gens, rewards, strict=True):
            self.implicit[(r.tree_index, "".join(r.steps) + g.text)] = reward

    def _option(self, request: ExpandRequest, g) -> Option:
        """The row's option; its fused rollout and features wait for the option's evaluation.
        Of two rows with one option the first's are kept, as the merge keeps the first row; a
        cut row (a repeat) has no rollout to keep."""
        terminal = g.finished or is_answer_line(g.text) or g.wrong
        if self.generation_features and not g.cut:
            self.features.record(request.tree_index, "".join(request.steps), g, g.text, terminal,
                                 rolled_out=self.fused)
        if self.fused and not terminal and not g.cut:
            prefix = "".join(request.steps) + g.text
            lps = g.rollout_logprobs or []
            self.pending.setdefault((request.tree_index, prefix), Rollout(
                g.rollout, len(lps), sum(lps) / max(len(lps), 1), g.rollout_finished, fused=True,
                token_ids=g.rollout_ids or [], logprobs=lps, wrong=g.rollout_wrong))
        dead = g.wrong or terminal and self.unsupported("".join(request.steps) + g.text)
        return Option(text=g.text, logprob=g.logprob, num_tokens=g.num_tokens, terminal=terminal,
                      rollout_tokens=0 if g.replayed else g.rollout_tokens, reused=g.replayed,
                      dead_end=bool(dead))

    def evaluate(self, requests: list[EvalRequest]) -> list[LeafEval]:
        rollouts = self._rollouts(requests)
        prompts = [r.prompt for r in requests]
        states = ["".join(r.steps) for r in requests]
        full = [state + ro.text for state, ro in zip(states, rollouts)]
        scores = self._critic_scores(requests, rollouts, prompts, states, full)
        results = []
        for i, (r, ro) in enumerate(zip(requests, rollouts)):
            self.rollouts[(r.tree_index, r.node_id)] = ro
            if self.reuse is not None and not r.terminal:
                self.reuse.keep(r.tree_index, r.node_id, ro.token_ids, ro.logprobs, ro.finished)
            parts = {kind: float(values[i]) for kind, values in scores.items()}
            if "orm" not in parts:  # no critics yet: the policy's own outcome score
                parts["orm"] = confidence(r, ro)
            if self.reward_fn is not None:  # training only: the verifier on s + rollout
                parts["rollout"] = self.reward_fn(r.tree_index, states[i] + ro.text)
            dead = self.dead(r)  # the step check: a dead end's parts are all 0, a failed rollout's outcome's
            failed = ro.wrong or self.unsupported(states[i] + ro.text)
            for kind in [k for k in parts if dead or (failed and k in ("orm", "rollout"))]:
                parts[kind] = 0.0
            reward = self.implicit.pop((r.tree_index, states[i]), None)
            if reward is not None:
                parts["implicit"] = implicit_score(reward)
            results.append(LeafEval(total=weighted(parts, self.weights()),
                                    tokens=0 if ro.fused else ro.tokens, **parts))
        return results

    def terminal_reward(self, requests: list[EvalRequest]) -> list[float]:
        return [0.0 if self.dead(r) else self.reward_fn(r.tree_index, "".join(r.steps))
                for r in requests]

    def weights(self) -> CriticWeights:
        c = self.cfg.critics
        return c.trained_weights if self.models.critics is not None else c.weights

    def _rollouts(self, requests: list[EvalRequest]) -> list[Rollout]:
        found = [self.pending.pop((r.tree_index, "".join(r.steps)), None) for r in requests]
        # A terminal node (answer, EOS, or the depth cap) ends the solution: no rollout after it.
        found = [None if r.terminal else ro for r, ro in zip(requests, found)]
        missing = [i for i, ro in enumerate(found) if ro is None and not requests[i].terminal]
        if missing and self.cfg.search.rollout.enabled:
            fresh = self._generate_rollouts([requests[i] for i in missing])
            for i, ro in zip(missing, fresh):
                found[i] = ro
        return [ro or Rollout("", 0, 0.0, False) for ro in found]

    def _generate_rollouts(self, requests: list[EvalRequest]) -> list[Rollout]:
        model = self.models.rollout_model or self.models.policy
        tokenizer = self.models.rollout_tokenizer or self.models.tokenizer
        prompts = [r.prompt + "".join(r.steps) for r in requests]
        hidden = self.generation_features and self.models.rollout_model is None
        rollout = self.cfg.search.rollout
        # the policy's rollouts (the roots') share the expansions' KV cache: the roots' first
        # expansions then prefill nothing of their prompts
        kv = self.kv if self.models.rollout_model is None else None
        gens = generate(model, tokenizer, prompts, max_new_tokens=rollout.max_new_tokens,
                        temperature=rollout.temperature, seeds=[r.seed for r in requests],
                        batch_size=self.generation_batch, hidden=hidden, wrong=self.step_check,
                        prefix_cache=kv, checks=self.row_checks(requests))
        for r, g in zip(requests, gens if hidden else []):
            self.features.record_rollout(r.tree_index, "".join(r.steps), g)
        return [Rollout(g.text, g.num_tokens, g.logprob / max(g.num_tokens, 1), g.finished,
                        token_ids=g.token_ids, logprobs=g.logprobs, wrong=g.wrong) for g in gens]

    def _critic_scores(self, requests: list[EvalRequest], rollouts: list[Rollout],
                       prompts: list[str], states: list[str], full: list[str]) -> dict:
        """Value and PRM on each leaf's steps; the ORM on its steps plus its rollout: from the
        decoding pass's features where it left them, else from a backbone pass."""
        critics = self.models.critics
        if critics is None:
            return {}
        scores = {kind: np.zeros(len(requests)) for kind in ("value", "prm", "orm")}
        leaves = [self.features.take(r.tree_index, state, ro.tokens) if self.generation_features
                  else None for r, state, ro in zip(requests, states, rollouts)]
        own = [i for i, leaf in enumerate(leaves) if leaf is not None]
        rest = [i for i, leaf in enumerate(leaves) if leaf is None]
        if own:
            state, whole = self.features.features([requests[i].tree_index for i in own],
                                                  [leaves[i] for i in own])
            found = critics.score_features(state, ("value", "prm")) | critics.score_features(
                whole, ("orm",))
            for kind, values in found.items():
                scores[kind][own] = values
        if rest:
            def pick(texts: list[str]) -> list[str]:
                return [texts[i] for i in rest]

            found = critics.score(pick(prompts), pick(states), kinds=("value", "prm")) | critics.score(
                pick(prompts), pick(full), kinds=("orm",))
            for kind, values in found.items():
                scores[kind][rest] = values
        self.leaf_scoring["generation"] += len(own)
        self.leaf_scoring["backbone"] += len(rest)
        return scores



def _off_track(check: Callable[[int, str], bool], tree_index: int, steps: str, text: str) -> bool:
    return check(tree_index, steps + text)


def confidence(r: EvalRequest, ro: Rollout) -> float:
    """The policy's confidence in the leaf's solution so far, steps root..node plus the fast
    rollout: exp(mean token log-prob). Terminal and non-terminal alike (a terminal's rollout is
    empty); 0.5 only for a text with no tokens at all (the root without a rollout)."""
    tokens = r.num_tokens + ro.tokens
    if tokens == 0:
        return 0.5
    return math.exp((r.logprob + ro.mean_logprob * ro.tokens) / tokens)


def weighted(parts: dict, w: CriticWeights) -> float:
    """Weighted mean over the parts that exist (a missing part, such as the verifier at
    evaluation time or a critic not trained yet, leaves the denominator). When every existing
    part has weight 0 (e.g. weights {rollout: 1} at evaluation), the plain mean of the parts."""
    pairs = [(getattr(w, kind), value) for kind, value in parts.items()]
    total_weight = sum(weight for weight, _ in pairs)
    if total_weight <= 0:
        pairs = [(1.0, value) for _, value in pairs]
        total_weight = float(len(pairs))
    if total_weight <= 0:
        return 0.0
    return min(1.0, max(0.0, sum(weight * v for weight, v in pairs) / total_weight))


def _run(prompts: list[str], scorer: LeafScorer, training: bool, desc: str | None) -> list[Tree]:
    s = scorer.cfg.search
    bar = progress_bar(total=len(prompts) * s.simulations, desc=desc, unit="sim")
    expander = StreamingExpander(
        streaming_decoder(scorer.models.policy, scorer.models.tokenizer, **scorer.expansion_kwargs(),
                          lines=scorer.off_track is not None),
        scorer.generation_batch, scorer.options, scorer.reuse, scorer.row_checks) if s.stream else None
    trees = search(prompts, scorer.expand, scorer.evaluate, search_params(s),
                   terminal_reward_fn=scorer.terminal_reward if training else None,
                   similarity_fn=similarity_fn(s), on_round=bar.update, expander=expander)
    bar.close()
    return trees


def train_search(problems: Sequence[Problem], task: Task, prompts: list[str], cfg: QstarConfig,
                 models: SearchModels, desc: str | None = None) -> tuple[list[Tree], LeafScorer]:
    """Training-time search: the verifier scores terminal nodes and rollouts."""

    def reward(tree_index: int, solution: str) -> float:  # search.check_answers: unsupported, no reward
        if cfg.search.check_answers and unsupported_answer(solution):
            return 0.0
        return task.score(problems[tree_index], solution)

    def off_track(tree_index: int, working: str) -> bool:
        return task.off_track(problems[tree_index], working)

    if cfg.search.prune_steps and not task.checks_working:
        raise QstarError(f"search.prune_steps=true is invalid: task {task.name}'s verifier does "
                         "not read the working (Task.off_track)")
    scorer = LeafScorer(cfg, models, reward_fn=reward, generation_batch=cfg.decode.batch_size,
                        off_track=off_track if cfg.search.prune_steps else None)
    if cfg.search.algorithm == SearchAlgorithm.sample:
        return sample_trees(prompts, models.policy, models.tokenizer, cfg, reward,
                            scorer.step_check, desc, scorer.off_track), scorer
    return _run(prompts, scorer, training=True, desc=desc), scorer


def eval_search(prompts: list[str], cfg: QstarConfig, models: SearchModels,
                desc: str | None = None) -> tuple[list[Tree], LeafScorer]:
    """Evaluation-time search: prompts only; critics (or policy confidence) score everything."""
    scorer = LeafScorer(cfg, models, reward_fn=None, generation_batch=cfg.decode.batch_size)
    return _run(prompts, scorer, training=False, desc=desc), scorer
