"""State merge: a new option that says what a sibling already says is a duplicate.

Duplicates waste the branching budget on one state; the search resamples them and then drops
what is still duplicated. Two options whose numbers or final answers differ are different states
however alike their text ("Answer: 46" vs "Answer: 47" has difflib ratio 0.9): the similarity
threshold only judges options that agree on both.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from mcts.types import SimilarityFn


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


# A number as written in a step: optional sign, digits with thousands commas, optional decimals.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# The final answer of a step: after "Answer:" or "####", or inside \boxed{...}.
_ANSWER = re.compile(r"(?:answer:|####)\s*(.*)|\\boxed\{([^{}]*)\}", re.IGNORECASE)


def numbers(text: str) -> list[str]:
    """The numbers in the text, in order, normalised ("1,200" -> "1200", "3.50" -> "3.5")."""
    found = []
    for raw in _NUMBER.findall(text):
        n = raw.replace(",", "")
        if "." in n:
            n = n.rstrip("0").rstrip(".")
        found.append(n)
    return found


def answer(text: str) -> str | None:
    """The final answer the text states (whitespace-normalised, lower case); None if it has none."""
    m = _ANSWER.search(text)
    if m is None:
        return None
    found = m.group(1) if m.group(1) is not None else m.group(2)
    return normalize_whitespace(found.strip(" *")).lower()  # "**Answer:** 4" as "Answer: 4"


def content_key(text: str) -> tuple[str | None, tuple[str, ...]]:
    """What two duplicates must share: the same answer and the same number sequence."""
    return answer(text), tuple(numbers(text))


def text_similarity(a: str, b: str) -> float:
    """Edit-distance ratio (difflib) on whitespace-normalised text; 1.0 = identical."""
    return difflib.SequenceMatcher(None, normalize_whitespace(a), normalize_whitespace(b)).ratio()


def duplicate_of(
    text: str, others: Sequence[str], similarity: SimilarityFn, threshold: float
) -> int | None:
    """The index of the first of `others` that `text` duplicates: the same answer and numbers
    (`content_key`) and similarity >= threshold. None: no duplicate."""
    key = content_key(text)
    for i, other in enumerate(others):
        if content_key(other) == key and similarity(text, other) >= threshold:
            return i
    return None


def is_duplicate(
    text: str, siblings: Sequence[str], similarity: SimilarityFn, threshold: float
) -> bool:
    return duplicate_of(text, siblings, similarity, threshold) is not None


def match_candidates(
    candidates: Sequence[str], siblings: Sequence[str], similarity: SimilarityFn, threshold: float
) -> list[int | None]:
    """Per candidate: None if it is kept, else the index of what it duplicates in `siblings`
    followed by the candidates kept before it (so the first of two equal new options survives)."""
    seen = list(siblings)
    matches: list[int | None] = []
    for text in candidates:
        match = duplicate_of(text, seen, similarity, threshold)
        matches.append(match)
        if match is None:
            seen.append(text)
    return matches


def split_duplicates(
    candidates: Sequence[str], siblings: Sequence[str], similarity: SimilarityFn, threshold: float
) -> tuple[list[int], list[int]]:
    """Indices of candidates to keep and of duplicates (`match_candidates`)."""
    matches = match_candidates(candidates, siblings, similarity, threshold)
    return ([i for i, m in enumerate(matches) if m is None],
            [i for i, m in enumerate(matches) if m is not None])
