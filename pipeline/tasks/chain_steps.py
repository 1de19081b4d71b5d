"""task=chain_steps: reasoning-gym chain_sum of 3-5 terms, solved one partial result per line.

    Compute 12 + 34 - 5 one step at a time.
    12 + 34 = 46
    46 - 5 = 41
    Answer: 41

Every solution takes at least three lines (two partial results and the answer), so option-level
search has steps to choose between. The prompt shows one worked example.

With `task.verify_steps` the training verifier (`score`: both loops' terminal reward, GRPO's
reward) also checks the working: a right answer scores 1 only when the result of every line with
an "=" is the question's next partial sum, left to right, and no line adds another ("6 - 4 = 2",
"2 + 0 = 2" for 6 - 0 - 4 is right but scores 0). It reads the gold question, so evaluation
(`is_correct`) never uses it.
"""

from __future__ import annotations

from fractions import Fraction

from pipeline.config import TaskConfig
from pipeline.tasks.answers import NUMBER_IN_TEXT
from pipeline.tasks.arithmetic import ArithmeticTask
from pipeline.tasks.base import Problem

SYSTEM_PROMPT = (
    "Add or subtract the numbers one at a time, left to right. Write one partial result per "
    "line. End with a final line of the form:\nAnswer: <value>"
)



def partial_sums(expression: str) -> list[int]:
    """The running totals of chain_sum's `a op b op c ...` (integers, + and -), left to right,
    after each operation: `12 + 34 - 5` gives [46, 41]."""
    tokens = expression.split()
    totals = [int(tokens[0])]
    for op, term in zip(tokens[1::2], tokens[2::2]):
        totals.append(totals[-1] + int(term) if op == "+" else totals[-1] - int(term))
    return totals[1:]


def worked_solution(expression: str) -> str:
    """The solution the prompt asks for: one partial result per line, then `Answer:`."""
    tokens, sums = expression.split(), partial_sums(expression)
    lines = [f"{before} {op} {term} = {after}" for before, op, term, after
             in zip([int(tokens[0]), *sums], tokens[1::2], tokens[2::2], sums)]
    return "\n".join([*lines, f"Answer: {sums[-1]}"])


def line_results(working: str) -> list[Fraction | None]:
    """The first number after the last "=" of every line that has one, in order (None for such
    a line without a number)."""
    results = []
    for line in working.splitlines():
        if "=" in line:
            found = NUMBER_IN_TEXT.search(line.rsplit("=", 1)[1])
            results.append(Fraction(found.group(0).replace(",", "")) if found else None)
    return results


def follows_steps(expression: str, completion: str) -> bool:
    """Whether the working's results (`line_results`) are exactly the question's partial sums."""
    return line_results(completion) == [Fraction(s) for s in partial_sums(expression)]


def leaves_steps(expression: str, working: str) -> bool:
    """Whether the working so far has left the question's partial sums: its results so far are
    not the first of them, in order (one result too many leaves them too)."""
    results = line_results(working)
    return results != [Fraction(s) for s in partial_sums(expression)][:len(results)]


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
        self.verify_steps = cfg.verify_steps

    def score(self, problem: Problem, completion: str) -> float:
        """The training verifier: 1.0 for a right answer, and with task.verify_steps only when
        the working follows the question's partial sums too."""
        if self.verify_steps and not follows_steps(problem.entry["metadata"]["expression"],
                                                   completion):
            return 0.0
        return super().score(problem, completion)

    def off_track(self, problem: Problem, working: str) -> bool:
        """With task.verify_steps: a line's result is not the question's next partial sum."""
        return self.verify_steps and leaves_steps(problem.entry["metadata"]["expression"], working)

    @property
    def checks_working(self) -> bool:
        return self.verify_steps

    def question(self, entry: dict) -> str:
        return ask(entry["metadata"]["expression"])
