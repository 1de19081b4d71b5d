"""The eval stage and `qstar eval`: one model, each decoding strategy, the held-out problems.

Decoding (pipeline.decoding) produces one final completion per problem from prompts alone;
grading against the gold answer happens afterwards, in `grade`, and nowhere else.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import DecodeStrategy, QstarConfig, to_dict
from pipeline.decoding import decode
from pipeline.decoding.base import Decoded
from pipeline.errors import QstarError
from pipeline.lm.models import load_model, resolve_model_path
from pipeline.run.atomic import write_json
from pipeline.run.store import BASELINE
from pipeline.stages.base import Loop
from pipeline.stages.critics import load_critic_set, load_critics
from pipeline.tasks import make_task
from pipeline.tasks.base import Problem, Task
from pipeline.tasks.prompt import task_prompts


@dataclass
class EvalResult:
    strategy: str
    accuracy: float
    correct: int
    total: int
    tokens: int
    seconds: float
    rows: list[dict]
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        return {"strategy": self.strategy, "accuracy": self.accuracy, "correct": self.correct,
                "total": self.total, "tokens": self.tokens, "seconds": round(self.seconds, 2),
                "tokens_per_s": round(self.tokens_per_s, 2), **self.extra}


def grade(task: Task, problems: Sequence[Problem], decoded: Decoded, strategy: str,
          seconds: float) -> EvalResult:
    rows = []
    for k, (p, completion) in enumerate(zip(problems, decoded.completions)):
        rows.append({"id": p.id, "correct": task.is_correct(p, completion),
                     "predicted": task.extract_answer(completion), "completion": completion,
                     **(decoded.row_extra[k] if decoded.row_extra else {})})
    correct = sum(r["correct"] for r in rows)
    extra = dict(decoded.extra)
    if "select" in decoded.extra:  # best-of-N: every selection made from the same candidates
        extra["accuracy_by_select"] = {decoded.extra["select"]: correct / max(len(rows), 1)}
        for name, completions in decoded.alternatives.items():
            hits = sum(task.is_correct(p, c) for p, c in zip(problems, completions))
            extra["accuracy_by_select"][name] = hits / max(len(rows), 1)
    return EvalResult(strategy=strategy, accuracy=correct / max(len(rows), 1), correct=correct,
                      total=len(rows), tokens=decoded.tokens, seconds=seconds, rows=rows,
                      extra=extra)


def evaluate(cfg: QstarConfig, strategy: DecodeStrategy, model, tokenizer, task: Task,
             problems: Sequence[Problem], critics=None) -> EvalResult:
    """Decode the held-out problems with `strategy`, then grade. `critics` serve ORM/MCTS."""
    prompts = task_prompts(tokenizer, task, problems)
    progress = f"eval {strategy.value}" if cfg.progress else None
    start = time.perf_counter()
    decoded = decode(cfg, strategy, model, tokenizer, prompts, critics, progress,
                     task.extract_answer)
    return grade(task, problems, decoded, strategy.value, time.perf_counter() - start)


def format_table(results: Sequence[EvalResult]) -> str:
    header = f"{'strategy':<10} {'accuracy':>8} {'correct':>9} {'tokens':>8} {'seconds':>8} {'tok/s':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.strategy:<10} {r.accuracy:>8.3f} {r.correct:>4}/{r.total:<4} "
                     f"{r.tokens:>8} {r.seconds:>8.1f} {r.tokens_per_s:>7.1f}")
        for name, accuracy in r.extra.get("accuracy_by_select", {}).items():
            lines.append(f"  {name:<8} {accuracy:>8.3f}   (same samples, select={name})")
    return "\n".join(lines)


def default_output(strategy: str) -> str:
    return os.path.join("runs", "eval", time.strftime("%Y-%m-%d_%H-%M-%S") + f"-{strategy}.json")


def run_eval(cfg: QstarConfig) -> EvalResult:
    """`qstar eval`: load, decode the held-out split, print the table, write JSON."""
    task = make_task(cfg.task)
    _, heldout = task.splits()
    critics_dir = cfg.eval.critics
    if critics_dir and not os.path.isfile(os.path.join(critics_dir, "orm", "meta.json")):
        raise QstarError(f"eval.critics={critics_dir!r}: not a critics directory "
                         "(expected <run>/iter_NNN/critics with value/, prm/, orm/)")
    model, tokenizer = load_model(cfg.model)
    critics = None
    if critics_dir:
        critics = load_critic_set(critics_dir, resolve_model_path(cfg.model), model, tokenizer,
                                  cfg.model, cfg.critics.score_batch_size)
    result = evaluate(cfg, cfg.decode.strategy, model, tokenizer, task, heldout, critics=critics)
    print(format_table([result]))
    output = cfg.eval.output or default_output(result.strategy)
    write_json(output, {"summary": result.summary(), "config": to_dict(cfg), "rows": result.rows})
    print(f"wrote {output}")
    return result


def evaluate_policy(loop: Loop, policy_dir: str, critics_dir: Path | None, out_dir: Path) -> dict:
    """Every strategy in `eval.decodes` on the held-out problems; one JSON per strategy."""
    model, tokenizer = loop.model(policy_dir)
    critics = load_critics(critics_dir, policy_dir, model, tokenizer, loop.cfg)
    results = {}
    for name in loop.cfg.eval.decodes:
        result = evaluate(loop.cfg, DecodeStrategy(name), model, tokenizer, loop.task,
                          loop.heldout, critics=critics)
        results[name] = result.summary()
        write_json(out_dir / f"{name}.json", {"summary": result.summary(), "rows": result.rows})
    metrics = {"policy_dir": policy_dir, "decodes": results}
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def run_baseline(loop: Loop, i: int = 0) -> dict:
    """Iteration 0 evaluates the base policy first: every run carries its own baseline."""
    return evaluate_policy(loop, loop.base_policy, None, loop.store.stage_dir(i, BASELINE))


def run(loop: Loop, i: int) -> dict:
    """policy_{i+1} with critics_{i+1}."""
    return evaluate_policy(loop, loop.policy(i + 1), loop.store.critics_dir(i + 1),
                           loop.store.stage_dir(i, "eval"))
