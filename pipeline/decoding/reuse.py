"""Steps read off rollouts (`search.reuse_rollouts`).

A node's fast rollout is one sample of the policy's continuation from it, at the options'
temperature (`search.rollout.temperature` = `search.temperature`, the policy rolling out): its
first line is a sample of the node's first option, and the rest is a sample of that option's
rollout. So a node's first expansion takes one of its options from its rollout, already
decoded and counted in the budget once, and samples only the others; the option's rollout is
the rest, so the new child is evaluated without decoding anything either. The replay ends the
option exactly where a decoding row would (pipeline.lm.stopping.replay), and the option claims
its text first among its siblings (`OptionClaims`), so a sampled sibling that repeats it stops
at its boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from mcts.types import ExpandRequest
from pipeline.lm.stopping import Generation, OptionClaims

Replay = Callable[[list[int], list[float]], Generation]  # rollout tokens, log-probs -> a row's end

FIRST = (0, 0)  # OptionClaims order before every decoded row's (epochs count from 1)


@dataclass
class RolloutReuse:
    """Per node, its rollout until the node's first expansion takes an option from it."""

    replay: Replay
    claims: OptionClaims | None = None
    kept: dict[tuple[int, int], tuple[list[int], list[float]]] = field(default_factory=dict)
    reused: int = 0  # options read off rollouts so far

    def keep(self, tree: int, node: int, token_ids: list[int], logprobs: list[float],
             finished: bool) -> None:
        """A node's rollout, if it ended (EOS): one cut at its cap would leave the reused step a
        rollout shorter than one of its own."""
        if token_ids and finished:
            self.kept[(tree, node)] = (token_ids, logprobs)

    def split(self, requests: list[ExpandRequest]) -> tuple[list[ExpandRequest], list[Generation | None]]:
        """The requests less the option each reads off its node's rollout (its first expansion
        only), and per request that option's Generation (None: all its options are sampled)."""
        fresh, taken = [], []
        for r in requests:
            kept = self.kept.pop((r.tree_index, r.node_id), None)
            g = self.replay(*kept) if kept and r.num_options > 0 else None
            if g is not None and not g.text.strip():
                g = None  # a rollout of whitespace: no step
            if g is not None:
                self.reused += 1
                if self.claims is not None:
                    self.claims.claim((r.tree_index, r.node_id), tuple(g.token_ids), FIRST)
            taken.append(g)
            fresh.append(r if g is None else replace(r, num_options=r.num_options - 1))
        return fresh, taken

    @staticmethod
    def join(fresh: list[ExpandRequest], taken: list[Generation | None],
             gens: list[Generation]) -> list[Generation]:
        """Each request's generations, its reused option first, in `expansion_rows` order of the
        whole requests; `gens`: the fresh requests' decoded rows."""
        out, k = [], 0
        for r, g in zip(fresh, taken, strict=True):
            out += ([g] if g is not None else []) + gens[k:k + r.num_options]
            k += r.num_options
        return out


def split_requests(reuse: RolloutReuse | None,
                   requests: list[ExpandRequest]) -> tuple[list[ExpandRequest], list[Generation | None]]:
    """`RolloutReuse.split`, or every option sampled when nothing is reused."""
    return reuse.split(requests) if reuse is not None else (requests, [None] * len(requests))
