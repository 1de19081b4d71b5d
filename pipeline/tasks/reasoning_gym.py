"""task=reasoning_gym: any reasoning-gym generator, graded by its own scorer (exactly 1.0 is correct)."""

from __future__ import annotations

from pipeline.config import TaskConfig
from pipeline.errors import QstarError
from pipeline.tasks.base import Problem, Task, _one_line, _too_few, layout, split_sizes


class ReasoningGymTask(Task):
    """Any reasoning-gym generator; correct means its own scorer gives exactly 1.0."""

    def __init__(self, cfg: TaskConfig, generator: str | None = None, **generator_config):
        import reasoning_gym  # slow to import, and only this task needs it
        from reasoning_gym.factory import DATASETS

        self.generator = generator or cfg.name
        self.name = self.generator
        if self.generator not in DATASETS:
            raise QstarError(
                f"task.name={self.generator!r} is not a reasoning-gym generator; valid names: "
                f"{', '.join(sorted(DATASETS))}"
            )
        need = split_sizes(cfg)
        size = 4 * need + 100  # room for duplicate questions; fixed by cfg, so deterministic
        try:
            self.dataset = reasoning_gym.create_dataset(
                self.generator, seed=cfg.seed, size=size, **generator_config
            )
            problems = self._distinct(need, cfg.seed)
        except Exception as e:  # config validation or generation inside reasoning-gym
            raise QstarError(f"reasoning-gym {self.generator}: {_one_line(e)}") from None
        if len(problems) < need:
            raise _too_few(len(problems), cfg, f"reasoning-gym {self.generator} (seed {cfg.seed}, "
                                               f"{size} items generated)")
        self._set_splits(*layout(problems, cfg))  # [test | dev | train] in generation order

    def _distinct(self, need: int, seed: int) -> list[Problem]:
        problems, seen = [], set()
        for idx in range(len(self.dataset)):
            entry = self.dataset[idx]
            if entry["question"] in seen:
                continue
            seen.add(entry["question"])
            # some generators (boxnet, rush_hour, ...) have no single gold answer: None
            gold = "" if entry["answer"] is None else str(entry["answer"])
            pid = f"{self.generator}/seed{seed}/{idx}"
            problems.append(Problem(pid, self.question(entry), gold, entry))
            if len(problems) == need:
                break
        return problems

    def question(self, entry: dict) -> str:
        """The question the model sees (reasoning-gym's own text)."""
        return entry["question"]

    def grade(self, problem: Problem, answer: str) -> bool:
        try:
            return self.dataset.score_answer(answer, problem.entry) == 1.0
        except Exception:  # some scorers crash on malformed answers: that is a wrong answer
            return False
