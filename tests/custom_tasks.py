"""Task classes for tests/test_custom_task.py: one good task, and one per way to get it wrong."""

from __future__ import annotations


class Echo:
    """Problems `say N`; the answer is N; partial credit 0.5 for an answer with the right length."""

    name = "echo"

    def __init__(self, count: int = 20):
        self.count = count
        self.graded: list[float] = []  # every grade this object returned (GRPO reward test)

    def problems(self):
        return [{"id": k, "question": f"say {k}", "answer": str(k)} for k in range(self.count)]

    def prompt(self, problem):
        return f"Repeat the number. {problem['question']}"

    def extract_answer(self, completion):
        return completion.strip()

    def grade(self, problem, answer):
        value = 1.0 if answer == problem["answer"] else 0.5 if len(answer) == len(
            problem["answer"]) else 0.0
        self.graded.append(value)
        return value


class NoGrade(Echo):
    grade = None


class DuplicateIds(Echo):
    def problems(self):
        return [{**p, "id": "a" if k in (2, 5) else p["id"]}
                for k, p in enumerate(super().problems())]


class MissingId(Echo):
    def problems(self):
        rows = super().problems()
        del rows[3]["id"]
        return rows


class TextGrade(Echo):
    def grade(self, problem, answer):
        return "correct"


class TooBigGrade(Echo):
    def grade(self, problem, answer):
        return 2.0


class NanGrade(Echo):
    def grade(self, problem, answer):
        return float("nan")


class GoldIsWrong(Echo):
    def grade(self, problem, answer):
        return 0.0


class EverythingIsRight(Echo):
    def grade(self, problem, answer):
        return 1.0


class CrashingGrade(Echo):
    def grade(self, problem, answer):
        return 1.0 / 0.0


class BadPrompt(Echo):
    def prompt(self, problem):
        return 42


class BadConstructor(Echo):
    def __init__(self):
        raise RuntimeError("needs a data file")
