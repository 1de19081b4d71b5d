"""What every decoding strategy returns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Decoded:
    completions: list[str]  # one final completion per problem
    tokens: int  # every token generated to get them (all samples, rollouts, options)
    extra: dict = field(default_factory=dict)
    # Other selections from the same candidates (best-of-N: majority, orm, orm_vote), graded
    # beside the chosen one so they compare on identical samples.
    alternatives: dict[str, list[str]] = field(default_factory=dict)
    row_extra: list[dict] = field(default_factory=list)  # per problem, kept in the result rows
