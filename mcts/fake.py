"""A seeded fake policy, critic and verifier: deterministic callbacks for tests and smoke runs.

Everything is a function of a stable hash of (seed, prompt, steps, request seed), so the same
search gives the same tree in any process. The calls are recorded for batching checks.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from mcts.types import EvalRequest, ExpandRequest, LeafEval, Option

_PHRASES = (
    "add the two numbers",
    "multiply both sides by {k}",
    "subtract {k} from the total",
    "check the units again",
    "rewrite it as a fraction",
    "carry the {k} to the next column",
)


def stable_hash(*parts: object) -> int:
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


@dataclass
class FakePolicy:
    """Options "Step d: <phrase>" or, from depth 1 on, about one in four "Answer: k"."""

    seed: int = 0
    calls: list[list[ExpandRequest]] = field(default_factory=list)

    def __call__(self, requests: list[ExpandRequest]) -> list[list[Option]]:
        self.calls.append(list(requests))
        return [[self.option(r, i) for i in range(r.num_options)] for r in requests]

    def option(self, request: ExpandRequest, i: int) -> Option:
        h = stable_hash(self.seed, request.prompt, *request.steps, request.seed, i)
        depth = len(request.steps)
        if depth >= 1 and h % 4 == 0:
            text = f"Answer: {h // 4 % 10}\n"
        else:
            text = f"Step {depth + 1}: " + _PHRASES[h // 4 % len(_PHRASES)].format(k=h // 32 % 3 + 2) + "\n"
        num_tokens = len(text.split()) + 1
        return Option(text, logprob=-0.25 * (1 + h % 13) * num_tokens / 4, num_tokens=num_tokens,
                      terminal=text.startswith("Answer:"))


@dataclass
class FakeCritic:
    """Value parts from a hash of the steps; a fixed rollout cost per non-terminal leaf."""

    seed: int = 0
    rollout_tokens: int = 5
    calls: list[list[EvalRequest]] = field(default_factory=list)

    def __call__(self, requests: list[EvalRequest]) -> list[LeafEval]:
        self.calls.append(list(requests))
        return [self.evaluate(r) for r in requests]

    def evaluate(self, request: EvalRequest) -> LeafEval:
        h = stable_hash(self.seed, "critic", request.prompt, *request.steps)
        value, prm, orm = (h % 101) / 100, (h // 101 % 101) / 100, (h // 10201 % 101) / 100
        total = round(0.5 * value + 0.3 * prm + 0.2 * orm, 6)
        tokens = 0 if request.terminal else self.rollout_tokens
        return LeafEval(total=total, value=value, prm=prm, orm=orm, rollout=orm, tokens=tokens)


@dataclass
class FakeVerifier:
    """Reward 1.0 for an odd final answer digit, else 0.0 (a stand-in for checking gold)."""

    calls: list[list[EvalRequest]] = field(default_factory=list)

    def __call__(self, requests: list[EvalRequest]) -> list[float]:
        self.calls.append(list(requests))
        return [self.reward(r) for r in requests]

    @staticmethod
    def reward(request: EvalRequest) -> float:
        last = request.steps[-1].strip() if request.steps else ""
        return 1.0 if last.startswith("Answer:") and last[-1:].isdigit() and int(last[-1]) % 2 else 0.0
