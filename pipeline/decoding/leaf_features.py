"""The critics' features of search leaves, taken from the search's own decoding pass
(`critics.leaf_features=generation`): no forward pass per leaf beyond generation itself.

What the heads read (critics/features.py) and where it comes from here:
- hidden (value, PRM: the state; a hidden-feature ORM: state + rollout): `generate(hidden=True)`
  gives the final hidden state at the option's last token and at the rollout's last token;
- logprob (the confidence ORM: mean, min, sum and count of the completion's token log-probs):
  the path's tokens are every option's on the way down plus the rollout's, each already
  log-scored by the pass that sampled it, so a node keeps its path's running sum, min and count;
- prompt_hidden (the confidence ORM's per-problem term): the hidden state at the prompt's last
  token, from the prefill of the tree's root expansion.
The heads are fitted on a teacher-forced pass over the tree texts (the critics and refit
stages); the two differ only where the texts re-tokenize differently from the sampled ids
(tests/test_leaf_features.py measures both on the same leaves). A leaf with no generation
features (a rollout from a separate rollout model) is scored by the backbone pass instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from critics.features import Features

Key = tuple[int, str]  # (tree index, the node's steps text root..node)


@dataclass(frozen=True)
class PathStats:
    """Running statistics of a path's token log-probs."""

    total: float = 0.0
    low: float = float("inf")
    count: int = 0

    def extend(self, logprobs: list[float]) -> PathStats:
        if not logprobs:
            return self
        return PathStats(self.total + sum(logprobs), min(self.low, min(logprobs)),
                         self.count + len(logprobs))

    def row(self) -> list[float]:
        """critics.features.LOGPROB_STATS: mean, min, sum, tokens (all zeros for no tokens)."""
        if self.count == 0:
            return [0.0, 0.0, 0.0, 0.0]
        return [self.total / self.count, self.low, self.total, float(self.count)]


@dataclass
class Leaf:
    # None: an option read off its parent's rollout (search.reuse_rollouts) has no hidden state;
    # the search reuses rollouts only for heads that read none
    state_hidden: torch.Tensor | None  # at the option's last token: the state root..node
    state: PathStats  # the state's tokens
    end_hidden: torch.Tensor | None  # at the rollout's last token (the state's when it has none)
    end: PathStats  # the state's tokens and the rollout's
    rollout_tokens: int


@dataclass
class LeafFeatureStore:
    """Per node, its path's log-prob statistics; per new leaf, its features until evaluated."""

    paths: dict[Key, PathStats] = field(default_factory=dict)
    leaves: dict[Key, Leaf] = field(default_factory=dict)
    problem_hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    def record(self, tree: int, parent_steps: str, gen, text: str, terminal: bool,
               rolled_out: bool) -> None:
        """A new option `text` sampled under the node `parent_steps` (`gen`: its Generation with
        hidden states); `rolled_out`: its fused rollout is what evaluation will use."""
        if not parent_steps and gen.prompt_hidden is not None:
            self.problem_hidden.setdefault(tree, gen.prompt_hidden)
        parent = self.paths.get((tree, parent_steps), PathStats() if not parent_steps else None)
        if parent is None:  # the parent's path was never recorded (cannot happen in one search)
            return
        # a final EOS is no text: the critics' texts (and so their fitted features) lack it
        state = parent.extend(gen.logprobs[:-1] if gen.finished else gen.logprobs)
        self.paths[(tree, parent_steps + text)] = state
        rollout = (gen.rollout_logprobs or []) if rolled_out and not terminal else []
        if rollout and gen.rollout_finished:
            rollout = rollout[:-1]
        self.leaves.setdefault((tree, parent_steps + text), Leaf(  # the first row's, as its rollout
            gen.option_hidden, state, gen.end_hidden if rollout else gen.option_hidden,
            state.extend(rollout), gen.rollout_tokens if rolled_out and not terminal else 0))

    def record_rollout(self, tree: int, steps: str, gen) -> None:
        """A rollout generated for the node `steps` at evaluation (not fused with its expansion:
        the root's, say); its prefill's hidden state is the state's."""
        if not steps:
            self.problem_hidden.setdefault(tree, gen.prompt_hidden)
        state = self.paths.get((tree, steps), PathStats() if not steps else None)
        if state is None:
            return
        rollout = gen.logprobs[:-1] if gen.finished else gen.logprobs
        self.leaves[(tree, steps)] = Leaf(gen.prompt_hidden, state, gen.end_hidden,
                                          state.extend(rollout), gen.num_tokens)

    def take(self, tree: int, steps: str, rollout_tokens: int) -> Leaf | None:
        """The leaf's features, if they describe the rollout it is evaluated with (a leaf
        evaluated with none, at the depth cap say, is its state alone)."""
        leaf = self.leaves.pop((tree, steps), None)
        if leaf is None or tree not in self.problem_hidden:
            return None
        if rollout_tokens == 0:
            return Leaf(leaf.state_hidden, leaf.state, leaf.state_hidden, leaf.state, 0)
        return leaf if leaf.rollout_tokens == rollout_tokens else None

    def features(self, trees: list[int], leaves: list[Leaf]) -> tuple[Features, Features]:
        """The heads' inputs for the leaves' states (value, PRM) and states + rollouts (ORM)."""
        prompt = torch.stack([self.problem_hidden[t] for t in trees])
        state = Features(_stack([x.state_hidden for x in leaves], prompt), prompt,
                         torch.tensor([x.state.row() for x in leaves]))
        full = Features(_stack([x.end_hidden for x in leaves], prompt), prompt,
                        torch.tensor([x.end.row() for x in leaves]))
        return state, full


def _stack(hidden: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    """The leaves' hidden states; zeros for a leaf without one (read by no head: see Leaf)."""
    return torch.stack([torch.zeros_like(like[0]) if h is None else h for h in hidden])
