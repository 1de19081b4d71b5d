"""What every decoding strategy returns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Decoded:
    completions: list[str]  # one final completion per problem
    tokens: int  # every token generated to get them (all samples, rollouts, options)
    extra: dict = field(default_factory=dict)
    # Other selections from the same candidates (best-of-N: majority, orm, orm_vote; MCTS: the
    # other best_path rules on the same trees), graded beside the chosen one so they compare on
    # identical samples.
    alternatives: dict[str, list[str]] = field(default_factory=dict)
    # the config key the alternatives vary ("select", "best_path"): extra[key] names the chosen
    # one, and grading reports accuracy_by_<key>
    alternatives_of: str = ""
    row_extra: list[dict] = field(default_factory=list)  # per problem, kept in the result rows
