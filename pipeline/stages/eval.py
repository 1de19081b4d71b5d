"""The eval stage and `qstar eval`: one model, each decoding strategy, the `eval.split` problems.

Both read the dev split by default: the loop's per-iteration eval and a `qstar eval` run are
tuning signals. The test split is read only when named (`eval.split=test`): the README's
numbers, computed once per benchmark run.

Decoding (pipeline.decoding) produces one final completion per problem from prompts alone;
grading against the gold answer happens afterwards, in `grade`, and nowhere else.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import DecodeStrategy, QstarConfig, replace_model_name, to_dict
from pipeline.decoding import decode
from pipeline.decoding.base import Decoded
from pipeline.decoding.best_of_n import check_selection, sample_check
from pipeline.errors import QstarError
from pipeline.lm.models import load_model, resolve_model_path
from pipeline.run.atomic import write_json
from pipeline.run.store import BASELINE
from pipeline.stages.base import Loop, resolve_ref
from pipeline.stages.critics import load_critic_set, load_critics
from pipeline.stages.reference import dpo_reference, load_implicit, searches_implicit
from pipeline.tasks import make_task
from pipeline.tasks.base import Problem, Task
from pipeline.tasks.prompt import chat_prompts, task_prompts


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
    if key := decoded.alternatives_of:  # every rule read off the same samples or trees
        chosen = decoded.extra[key]
        by_rule = extra[f"accuracy_by_{key}"] = {chosen: correct / max(len(rows), 1)}
        for row in rows:  # per problem too, so two rules compare problem by problem
            row[f"correct_by_{key}"] = {chosen: row["correct"]}
        for name, completions in decoded.alternatives.items():
            hits = [task.is_correct(p, c) for p, c in zip(problems, completions)]
            by_rule[name] = sum(hits) / max(len(rows), 1)
            for row, hit in zip(rows, hits):
                row[f"correct_by_{key}"][name] = hit
    if rows and "candidates" in rows[0]:  # best-of-N
        # pass@n: a problem counts when any of its n candidates is correct (an upper bound on
        # every selection rule)
        solved = sum(any(task.is_correct(p, c) for c in row["candidates"])
                     for p, row in zip(problems, rows))
        extra["pass_at_n"] = solved / max(len(rows), 1)
    return EvalResult(strategy=strategy, accuracy=correct / max(len(rows), 1), correct=correct,
                      total=len(rows), tokens=decoded.tokens, seconds=seconds, rows=rows,
                      extra=extra)


def evaluate(cfg: QstarConfig, strategy: DecodeStrategy, model, tokenizer, task: Task,
             problems: Sequence[Problem], critics=None, implicit=None) -> EvalResult:
    """Decode the problems with `strategy`, then grade. `critics` serve ORM/MCTS; `implicit`
    (the policy's DPO implicit reward) serves best-of-N selection and MCTS."""
    prompts = task_prompts(tokenizer, task, problems)
    progress = f"eval {strategy.value}" if cfg.progress else None
    start = time.perf_counter()
    decoded = decode(cfg, strategy, model, tokenizer, prompts, critics, progress,
                     task.extract_answer, implicit)
    return grade(task, problems, decoded, strategy.value, time.perf_counter() - start)


def format_table(results: Sequence[EvalResult]) -> str:
    header = f"{'strategy':<10} {'accuracy':>8} {'correct':>9} {'tokens':>8} {'seconds':>8} {'tok/s':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.strategy:<10} {r.accuracy:>8.3f} {r.correct:>4}/{r.total:<4} "
                     f"{r.tokens:>8} {r.seconds:>8.1f} {r.tokens_per_s:>7.1f}")
        for key in ("select", "best_path"):
            for name, accuracy in r.extra.get(f"accuracy_by_{key}", {}).items():
                lines.append(f"  {name:<8} {accuracy:>8.3f}   (same candidates, {key}={name})")
        if "pass_at_n" in r.extra:
            lines.append(f"  {'pass@n':<8} {r.extra['pass_at_n']:>8.3f}   (any sample correct)")
    return "\n".join(lines)


def uses_implicit(cfg: QstarConfig, strategies: Sequence[str]) -> bool:
    """Whether a strategy needs the policy's implicit reward: best-of-N (it grades every
    selection), MCTS with an implicit weight."""
    return (DecodeStrategy.best_of_n.value in strategies or
            (DecodeStrategy.mcts.value in strategies and searches_implicit(cfg.critics)))


def implicit_for(cfg: QstarConfig, strategies: Sequence[str], policy_dir: str, model,
                 tokenizer):
    """The policy's implicit reward where a strategy uses it, else None; loads the policy's
    DPO reference."""
    if not uses_implicit(cfg, strategies):
        return None
    return load_implicit(policy_dir, model, tokenizer, cfg.model, cfg.critics.score_batch_size)


def default_output(strategy: str) -> str:
    return os.path.join("runs", "eval", time.strftime("%Y-%m-%d_%H-%M-%S") + f"-{strategy}.json")


def run_eval(cfg: QstarConfig) -> EvalResult:
    """`qstar eval`: load, decode the eval.split problems, print the table, write JSON."""
    task = make_task(cfg.task)
    problems = task.split(cfg.eval.split)
    critics_dir = cfg.eval.critics
    if critics_dir and not os.path.isfile(os.path.join(critics_dir, "orm", "meta.json")):
        raise QstarError(f"eval.critics={critics_dir!r}: not a critics directory "
                         "(expected <run>/iter_NNN/refit or iter_NNN/critics, with value/, prm/, orm/)")
    if cfg.decode.strategy == DecodeStrategy.best_of_n:  # refuse before loading anything
        check_selection(cfg.decode, bool(critics_dir),
                        dpo_reference(resolve_model_path(cfg.model)) is not None,
                        sample_check(cfg.search) is not None)
    model, tokenizer = load_model(cfg.model)
    critics = None
    if critics_dir:
        critics = load_critic_set(critics_dir, resolve_model_path(cfg.model), model, tokenizer,
                                  cfg.model, cfg.critics.score_batch_size)
    implicit = implicit_for(cfg, [cfg.decode.strategy.value], resolve_model_path(cfg.model),
                            model, tokenizer)
    result = evaluate(cfg, cfg.decode.strategy, model, tokenizer, task, problems, critics=critics,
                      implicit=implicit)
    print(f"split: {cfg.eval.split.value} ({len(problems)} problems)")
    print(format_table([result]))
    output = cfg.eval.output or default_output(result.strategy)
    write_json(output, {"summary": {**result.summary(), "split": cfg.eval.split.value},
                        "config": to_dict(cfg), "rows": result.rows})
    print(f"wrote {output}")
    return result


def decode_policy(root: Path, out: Path, policy: str, critics: str | None, cfg: QstarConfig,
                  task: Task, conversations: Sequence[list[dict]]) -> dict[str, tuple[Decoded, float]]:
    """Every strategy in `eval.decodes` on the eval.split problems, given as their chat
    messages: (decoded, seconds) each. Runs where the stage runs (stage_work): in-process, or a
    Ray task with the stage's GPU, so the driver needs no device. It never sees a gold answer;
    the driver grades."""
    policy_dir = resolve_ref(root, policy, cfg.model)
    model, tokenizer = load_model(replace_model_name(cfg.model, policy_dir))
    critic_set = load_critics(root / critics if critics else None, policy_dir, model, tokenizer,
                              cfg)
    implicit = implicit_for(cfg, cfg.eval.decodes, policy_dir, model, tokenizer)
    prompts = chat_prompts(tokenizer, conversations)
    found = {}
    for name in cfg.eval.decodes:
        start = time.perf_counter()
        decoded = decode(cfg, DecodeStrategy(name), model, tokenizer, prompts, critic_set,
                         f"eval {name}" if cfg.progress else None, task.extract_answer, implicit)
        found[name] = (decoded, time.perf_counter() - start)
    return found


def evaluate_policy(loop: Loop, i: int, stage: str, policy: str, critics: str | None,
                    rels: list[str]) -> dict:
    """Decode (pipeline.stages.base.Loop.run_remote), then grade here; one JSON per strategy."""
    reference = (dpo_reference(resolve_ref(loop.store.root, policy, loop.cfg.model))
                 if uses_implicit(loop.cfg, loop.cfg.eval.decodes) else None)
    files = loop.run_files([policy, *rels, loop.store.relative(reference[0]) if reference else None],
                           implicit=policy if reference else None)
    found = loop.run_remote(decode_policy, i, stage, files, policy, critics, loop.cfg,
                            loop.task, [loop.task.messages(p) for p in loop.eval_problems])
    out, results = loop.store.stage_dir(i, stage), {}
    for name, (decoded, seconds) in found.items():
        result = grade(loop.task, loop.eval_problems, decoded, name, seconds)
        results[name] = result.summary()
        write_json(out / f"{name}.json", {"summary": result.summary(), "rows": result.rows})
    metrics = {"policy_dir": policy, "split": loop.cfg.eval.split.value, "decodes": results}
    write_json(out / "metrics.json", metrics)
    return metrics


def run_baseline(loop: Loop, i: int = 0) -> dict:
    """Iteration 0 evaluates the base policy first: every run carries its own baseline."""
    return evaluate_policy(loop, i, BASELINE, loop.policy_ref(0), None, [])


def run(loop: Loop, i: int) -> dict:
    """policy_{i+1} with critics_{i+1}."""
    critics, critic_rels = loop.critics_refs(i + 1)
    return evaluate_policy(loop, i, "eval", loop.policy_ref(i + 1), critics, critic_rels)
