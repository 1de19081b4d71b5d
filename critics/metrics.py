"""Held-out critic metrics. Scores are probabilities in [0, 1]; targets are in [0, 1] and are
read as positive at >= 0.5 where a metric needs classes. A metric that the data cannot
support (one class only, no examples) is None."""

from __future__ import annotations

import numpy as np


def _arrays(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    s, t = np.asarray(scores, dtype=float), np.asarray(targets, dtype=float)
    if s.shape != t.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and targets {t.shape} must be equal 1-d shapes")
    return s, t


def average_ranks(x) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def auc(scores, targets) -> float | None:
    """ROC AUC as the Mann-Whitney statistic: P(score of a positive > score of a negative),
    ties counting one half."""
    s, t = _arrays(scores, targets)
    positive = t >= 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = average_ranks(s)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def accuracy(scores, targets, threshold: float = 0.5) -> float | None:
    s, t = _arrays(scores, targets)
    if len(s) == 0:
        return None
    return float(np.mean((s >= threshold) == (t >= 0.5)))


def mse(scores, targets) -> float | None:
    s, t = _arrays(scores, targets)
    return float(np.mean((s - t) ** 2)) if len(s) else None


def expected_calibration_error(scores, targets, bins: int = 10) -> float | None:
    """Sum over equal-width score bins of |mean score - mean target|, weighted by bin size."""
    s, t = _arrays(scores, targets)
    if len(s) == 0:
        return None
    which = np.minimum((s * bins).astype(int), bins - 1)
    error = 0.0
    for b in np.unique(which):
        in_bin = which == b
        error += in_bin.sum() * abs(s[in_bin].mean() - t[in_bin].mean())
    return float(error / len(s))


def precision_recall(scores, targets, threshold: float = 0.5) -> tuple[float | None, float | None]:
    """Of the states called good (score >= threshold), the share that are; of the good states
    (target >= 0.5), the share called good."""
    s, t = _arrays(scores, targets)
    called, good = s >= threshold, t >= 0.5
    hits = int((called & good).sum())
    precision = hits / int(called.sum()) if called.any() else None
    recall = hits / int(good.sum()) if good.any() else None
    return precision, recall


def within_problem_auc(scores, targets, problems) -> tuple[float | None, int]:
    """The AUC of right against wrong completions of one problem (targets >= 0.5 are right),
    averaged over the problems that have both; and how many problems that is. This is what
    best-of-N selection and search need: across-problem AUC also rewards telling easy problems
    from hard ones, which ranks no answer to any one problem."""
    s, t = _arrays(scores, targets)
    groups = np.asarray(problems, dtype=object)
    if groups.shape != s.shape:
        raise ValueError(f"problems {groups.shape} and scores {s.shape} must be equal 1-d shapes")
    found = [auc(s[groups == g], t[groups == g]) for g in dict.fromkeys(groups.tolist())]
    found = [a for a in found if a is not None]
    return (float(np.mean(found)) if found else None), len(found)
