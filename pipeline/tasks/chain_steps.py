"""task=chain_steps: reasoning-gym chain_sum of 3-5 terms, solved one partial result per line.

    Compute 12 + 34 - 5 one step at a time.
    12 + 34 = 46
    46 - 5 = 41
    Answer: 41

Every solution takes at least three lines (two partial results and the answer), so option-level
search has steps to choose between. The prompt shows one worked example.
"""

from __future__ import annotations

from pipeline.config import TaskConfig
from pipeline.tasks.arithmetic import ArithmeticTask

SYSTEM_PROMPT = (
    "Add or subtract the numbers one at a time, left to right. Write one partial result per "
    "line. End with a final line of the form:\nAnswer: <value>"
)

# Four terms, both operators; not a chain_sum question of its own (the numbers are fixed here).
EXAMPLE = ("Compute 12 + 34 - 5 + 7 one step at a time.",
           "12 + 34 = 46\n46 - 5 = 41\n41 + 7 = 48\nAnswer: 48")


class ChainStepsTask(ArithmeticTask):
    """chain_sum with task.min_terms..max_terms terms, asked for one partial result per line."""

    system_prompt = SYSTEM_PROMPT
    example = EXAMPLE

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        self.name = "chain_steps"

    def question(self, entry: dict) -> str:
        return f"Compute {entry['metadata']['expression']} one step at a time."
