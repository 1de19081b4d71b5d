"""task=arithmetic: reasoning-gym's chain_sum with the configured terms and digits."""

from __future__ import annotations

from pipeline.config import TaskConfig
from pipeline.tasks.answers import extract_answer
from pipeline.tasks.reasoning_gym import ReasoningGymTask


class ArithmeticTask(ReasoningGymTask):
    """reasoning-gym chain_sum with the configured number of terms and digits."""

    def __init__(self, cfg: TaskConfig):
        super().__init__(
            cfg, "chain_sum", min_terms=cfg.min_terms, max_terms=cfg.max_terms,
            min_digits=cfg.min_digits, max_digits=cfg.max_digits,
        )
        self.name = "arithmetic"

    def extract_answer(self, completion: str) -> str | None:
        # small models often write `Answer: 15 - 43 = -28`; chain_sum's scorer wants `-28`
        answer = extract_answer(completion)
        if answer is None or "=" not in answer:
            return answer
        return answer.rsplit("=", 1)[1].strip() or None
