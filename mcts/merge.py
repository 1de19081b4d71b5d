"""State merge: a new option that says what a sibling already says is a duplicate.

Duplicates waste the branching budget on one state; the search resamples them and then drops
what is still duplicated.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from mcts.types import SimilarityFn


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def text_similarity(a: str, b: str) -> float:
    """Edit-distance ratio (difflib) on whitespace-normalised text; 1.0 = identical."""
    return difflib.SequenceMatcher(None, normalize_whitespace(a), normalize_whitespace(b)).ratio()


def is_duplicate(
    text: str, siblings: Sequence[str], similarity: SimilarityFn, threshold: float
) -> bool:
    return any(similarity(text, other) >= threshold for other in siblings)


def split_duplicates(
    candidates: Sequence[str], siblings: Sequence[str], similarity: SimilarityFn, threshold: float
) -> tuple[list[int], list[int]]:
    """Indices of candidates to keep and of duplicates, checking each against the existing
    siblings and the candidates kept before it (so the first of two equal new options survives)."""
    seen = list(siblings)
    keep, duplicates = [], []
    for i, text in enumerate(candidates):
        if is_duplicate(text, seen, similarity, threshold):
            duplicates.append(i)
        else:
            keep.append(i)
            seen.append(text)
    return keep, duplicates
