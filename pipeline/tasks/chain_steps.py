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



def worked_solution(expression: str) -> str:
    """The solution the prompt asks for: one partial result per line, then `Answer:`.
    `expression` is chain_sum's `a op b op c ...` (integers, + and -)."""
    tokens = expression.split()
    total, lines = int(tokens[0]), []
    for op, term in zip(tokens[1::2], tokens[2::2]):
        new = total + int(term) if op == "+" else total - int(term)
        lines.append(f"{total} {op} {term} = {new}")
        total = new
    return "\n".join([*lines, f"Answer: {total}"])


def ask(expression: str) -> str:
    return f"Compute {expression} one step at a time."


# Four terms, both operators; the same wording as every question.
EXAMPLE = (ask("12 + 34 - 5 + 7"), worked_solution("12 + 34 - 5 + 7"))


class ChainStepsTask(ArithmeticTask):
    """chain_sum with task.min_terms..max_terms terms, asked for one partial result per line."""

    system_prompt = SYSTEM_PROMPT
    example = EXAMPLE

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        self.name = "chain_steps"

    def question(self, entry: dict) -> str:
        return ask(entry["metadata"]["expression"])
