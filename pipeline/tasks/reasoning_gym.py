"""task=reasoning_gym: any reasoning-gym generator, graded by its own scorer (exactly 1.0 is correct)."""

from __future__ import annotations

import hashlib

from pipeline.config import TaskConfig
from pipeline.errors import QstarError
from pipeline.tasks.base import Problem, Task, _one_line, _too_few, layout, split_sizes

# reasoning-gym draws item idx from random.Random(seed + idx), so seeds s and s + 1 would share
# every item but one. Each task.seed > 0 starts the generator at its own offset, a hash of the
# seed in [0, 2**31): two seeds' runs of `size` items overlap with odds about 2 * size / 2**31,
# and every generator seed stays one 32-bit word (Mersenne Twister seeds of two words can
# collide with one-word ones: Random(2) and Random(2**32 + 2) are the same stream).
# task.seed=0 keeps offset 0, the problems it always had.
GENERATOR_SEEDS = 2**31


def generation_seed(task_seed: int) -> int:
    """The reasoning-gym seed of a task.seed (>= 0, validated)."""
    if task_seed == 0:
        return 0
    digest = hashlib.sha256(f"qstar task.seed {task_seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % GENERATOR_SEEDS


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
                self.generator, seed=generation_seed(cfg.seed), size=size, **generator_config
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
