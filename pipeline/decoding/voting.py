"""Selection among candidate completions: (weighted) majority vote and ORM selection. None sees gold."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def weighted_vote(candidates: Sequence[str], weights: Sequence[float],
                  extract: Callable[[str], str | None]) -> int | None:
    """Index of the winning candidate: the answer whose candidates' weights sum highest (ties:
    the answer seen first), then its highest-weighted candidate (ties: earliest). None when no
    candidate has an answer. Majority vote is every weight 1."""
    answers = [extract(c) for c in candidates]
    totals: dict[str, float] = {}
    for answer, weight in zip(answers, weights, strict=True):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + weight
    if not totals:
        return None
    winner = max(totals, key=totals.get)  # dicts keep insertion order: ties go to the first seen
    mine = [j for j, a in enumerate(answers) if a == winner]
    return max(mine, key=lambda j: (weights[j], -j))


def majority_vote(candidates: list[str], extract: Callable[[str], str | None]) -> str:
    """The first candidate whose extracted answer is the most common one (ties: earliest)."""
    best = weighted_vote(candidates, [1.0] * len(candidates), extract)
    return candidates[0 if best is None else best]


def orm_select(candidates: list[str], scores: list[float]) -> str:
    """The candidate scored highest (ORM, or summed implicit reward; ties: earliest)."""
    return candidates[max(range(len(candidates)), key=lambda j: (scores[j], -j))]


def orm_weighted_vote(candidates: list[str], scores: list[float],
                      extract: Callable[[str], str | None]) -> str:
    """Votes weighted by a critic's scores (the ORM's, or sigmoid of the implicit reward):
    agreement still counts, but a confident critic can outvote a weak majority. No extracted
    answer: plain selection by the highest score."""
    best = weighted_vote(candidates, scores, extract)
    return orm_select(candidates, scores) if best is None else candidates[best]
