"""Importance-based branching (AlphaLLM): a node whose children disagree gets more children.

n(s) = clamp(floor(alpha * I(s)) + 1, c_min, c_max),  I(s) = max over children |v(child) - v(s)|.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def importance(node_value: float, child_values: Sequence[float]) -> float:
    """I(s): how far the best-or-worst child moves the value; 0 with no children."""
    return max((abs(v - node_value) for v in child_values), default=0.0)


def num_children(importance_value: float, alpha: float, c_min: int, c_max: int) -> int:
    """n(s) = clamp(floor(alpha * I(s)) + 1, c_min, c_max)."""
    return min(c_max, max(c_min, math.floor(alpha * importance_value) + 1))


def branching_bounds(depth: int, c_min: int, c_max: int, root_c_min: int, root_c_max: int) -> tuple[int, int]:
    """The root branches wider: it is the one decision every trajectory shares."""
    return (root_c_min, root_c_max) if depth == 0 else (c_min, c_max)
