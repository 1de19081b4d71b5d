"""Held-out evaluation: one model, one decoding strategy.

Decoding produces one final completion per problem from prompts alone; grading against the
gold answer happens afterwards, in `grade`, and nowhere else. Selection among candidates
(majority vote, ORM) never sees the gold answer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pipeline.config import DecodeConfig, DecodeStrategy, QstarConfig, Selection
from pipeline.errors import QstarError
from pipeline.generation import chat_prompt, generate
from pipeline.tasks import Problem, Task, to_messages


@dataclass
class Decoded:
    completions: list[str]  # one final completion per problem
    tokens: int  # every token generated to get them (all samples, rollouts, options)
    extra: dict = field(default_factory=dict)
    # Other selections from the same candidates (best-of-N: majority, orm, orm_vote), graded
    # beside the chosen one so they compare on identical samples.
    alternatives: dict[str, list[str]] = field(default_factory=dict)
    row_extra: list[dict] = field(default_factory=list)  # per problem, kept in the result rows


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


def render_prompts(tokenizer, questions: Sequence[str]) -> list[str]:
    return [chat_prompt(tokenizer, to_messages(q)) for q in questions]


def decode_greedy(model, tokenizer, prompts: list[str], d: DecodeConfig, seed: int,
                  progress: str | None) -> Decoded:
    gens = generate(model, tokenizer, prompts, max_new_tokens=d.max_new_tokens,
                    batch_size=d.batch_size, progress=progress)
    return Decoded([g.text for g in gens], sum(g.num_tokens for g in gens))


def decode_sample(model, tokenizer, prompts: list[str], d: DecodeConfig, seed: int,
                  progress: str | None) -> Decoded:
    gens = generate(model, tokenizer, prompts, max_new_tokens=d.max_new_tokens,
                    temperature=d.temperature, top_p=d.top_p, batch_size=d.batch_size,
                    seed=seed, progress=progress)
    return Decoded([g.text for g in gens], sum(g.num_tokens for g in gens))


def sample_candidates(model, tokenizer, prompts: list[str], d: DecodeConfig, seed: int,
                      progress: str | None) -> tuple[list[list[str]], int]:
    """n sampled completions per prompt, in one batched stream."""
    repeated = [p for p in prompts for _ in range(d.n)]
    gens = generate(model, tokenizer, repeated, max_new_tokens=d.max_new_tokens,
                    temperature=d.temperature, top_p=d.top_p, batch_size=d.batch_size,
                    seed=seed, progress=progress)
    groups = [[g.text for g in gens[i * d.n:(i + 1) * d.n]] for i in range(len(prompts))]
    return groups, sum(g.num_tokens for g in gens)


def weighted_vote(candidates: Sequence[str], weights: Sequence[float],
                  extract: Callable[[str], str | None]) -> int | None:
    """Index of the winning candidate: the answer whose candidates' weights sum highest (ties:
    the answer seen first), then its highest-weighted candidate (ties: earliest). None when no
    candidate has an answer. Majority vote is every weight 1."""
    answers = [extract(c) for c in candidates]
    totals: dict[str, float] = {}
    for answer, weight in zip(answers, weights, strict=True):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + weight
    if not totals:
        return None
    winner = max(totals, key=totals.get)  # dicts keep insertion order: ties go to the first seen
    mine = [j for j, a in enumerate(answers) if a == winner]
    return max(mine, key=lambda j: (weights[j], -j))


def majority_vote(candidates: list[str], extract: Callable[[str], str | None]) -> str:
    """The first candidate whose extracted answer is the most common one (ties: earliest)."""
    best = weighted_vote(candidates, [1.0] * len(candidates), extract)
    return candidates[0 if best is None else best]


Scorer = Callable[[list[str], list[str]], list[float]]  # (prompts, completions) -> scores


def orm_select(candidates: list[str], scores: list[float]) -> str:
    """The candidate the ORM scores highest (ties: earliest)."""
    return candidates[max(range(len(candidates)), key=lambda j: (scores[j], -j))]


def orm_weighted_vote(candidates: list[str], scores: list[float],
                      extract: Callable[[str], str | None]) -> str:
    """Votes weighted by the ORM: agreement still counts, but a confident ORM can outvote a weak
    majority. No extracted answer: plain ORM selection."""
    best = weighted_vote(candidates, scores, extract)
    return orm_select(candidates, scores) if best is None else candidates[best]


def decode_best_of_n(model, tokenizer, prompts: list[str], d: DecodeConfig, seed: int,
                     progress: str | None, extract: Callable[[str], str | None],
                     orm_score: Scorer | None = None) -> Decoded:
    """n samples per prompt; every selection the critics allow is made from the same samples."""
    if d.select != Selection.majority and orm_score is None:
        raise QstarError(f"decode.select={d.select.value} needs a trained ORM: pass "
                         "eval.critics=<run>/iter_NNN/critics, or use decode.select=majority")
    groups, tokens = sample_candidates(model, tokenizer, prompts, d, seed, progress)
    picks = {Selection.majority.value: [majority_vote(g, extract) for g in groups]}
    row_extra = [{"candidates": g} for g in groups]
    if orm_score is not None:
        flat_p = [p for p, g in zip(prompts, groups) for _ in g]
        scores = orm_score(flat_p, [c for g in groups for c in g])
        by_group, k = [], 0
        for g, extra in zip(groups, row_extra):
            by_group.append([float(x) for x in scores[k:k + len(g)]])
            extra["orm_scores"] = by_group[-1]
            k += len(g)
        picks[Selection.orm.value] = [orm_select(g, s) for g, s in zip(groups, by_group)]
        picks[Selection.orm_vote.value] = [orm_weighted_vote(g, s, extract)
                                           for g, s in zip(groups, by_group)]
    chosen = picks.pop(d.select.value)
    return Decoded(chosen, tokens, extra={"select": d.select.value}, alternatives=picks,
                   row_extra=row_extra)


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
    prompts = render_prompts(tokenizer, [p.question for p in problems])
    progress = f"eval {strategy.value}" if cfg.progress else None
    start = time.perf_counter()
    decoded = decode(cfg, strategy, model, tokenizer, prompts, critics, progress,
                     task.extract_answer)
    return grade(task, problems, decoded, strategy.value, time.perf_counter() - start)


def decode(cfg: QstarConfig, strategy: DecodeStrategy, model, tokenizer, prompts: list[str],
           critics, progress: str | None, extract: Callable[[str], str | None]) -> Decoded:
    """One completion per prompt. `extract` reads answers for voting; it never sees gold."""
    d, seed = cfg.decode, cfg.seed
    if strategy == DecodeStrategy.greedy:
        return decode_greedy(model, tokenizer, prompts, d, seed, progress)
    if strategy == DecodeStrategy.sample:
        return decode_sample(model, tokenizer, prompts, d, seed, progress)
    if strategy == DecodeStrategy.best_of_n:
        orm = critics.orm_scorer() if critics is not None else None
        return decode_best_of_n(model, tokenizer, prompts, d, seed, progress, extract, orm)
    if strategy == DecodeStrategy.beam:
        from pipeline.beam import decode_beam

        return decode_beam(cfg, model, tokenizer, prompts, progress)
    from pipeline.search_stage import decode_mcts

    return decode_mcts(cfg, model, tokenizer, prompts, critics, progress, extract)


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
    from pipeline.atomic import write_json
    from pipeline.config import to_dict
    from pipeline.models import load_model
    from pipeline.tasks import make_task

    task = make_task(cfg.task)
    _, heldout = task.splits()
    critics_dir = cfg.eval.critics
    if critics_dir and not os.path.isfile(os.path.join(critics_dir, "orm", "meta.json")):
        raise QstarError(f"eval.critics={critics_dir!r}: not a critics directory "
                         "(expected <run>/iter_NNN/critics with value/, prm/, orm/)")
    model, tokenizer = load_model(cfg.model)
    critics = None
    if critics_dir:
        from pipeline.critics_stage import load_critic_set
        from pipeline.models import resolve_model_path

        critics = load_critic_set(critics_dir, resolve_model_path(cfg.model), model, tokenizer,
                                  cfg.model, cfg.critics.score_batch_size)
    result = evaluate(cfg, cfg.decode.strategy, model, tokenizer, task, heldout, critics=critics)
    print(format_table([result]))
    output = cfg.eval.output or default_output(result.strategy)
    write_json(output, {"summary": result.summary(), "config": to_dict(cfg), "rows": result.rows})
    print(f"wrote {output}")
    return result
