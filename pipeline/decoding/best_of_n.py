"""decode=best_of_n: n samples per prompt, selected by majority vote (over every sample, or over
those the step check passes), ORM argmax, ORM-weighted vote, or the policy's summed DPO implicit
reward, argmax or weighted vote (`decode.select`); every selection the critics and the step
check allow is graded on the same samples."""

from __future__ import annotations

from collections.abc import Callable

from critics.critic_set import Scorer
from critics.implicit import implicit_score
from pipeline.config import DecodeConfig, SearchConfig, Selection
from pipeline.decoding.base import Decoded
from pipeline.decoding.sampling import sample_generations
from pipeline.decoding.voting import majority_vote, orm_select, orm_weighted_vote
from pipeline.errors import QstarError
from pipeline.tasks.equations import false_equation, unsupported_answer


def check_selection(d: DecodeConfig, has_orm: bool, has_implicit: bool, has_check: bool) -> None:
    """Refuse a selection whose critic is missing, with one line saying what to pass."""
    if d.select == Selection.checked_majority and not has_check:
        raise QstarError("decode.select=checked_majority needs a check: set "
                         "search.check_equations=true or search.check_answers=true, or use "
                         "decode.select=majority")
    if d.select in (Selection.orm, Selection.orm_vote) and not has_orm:
        raise QstarError(f"decode.select={d.select.value} needs a trained ORM: pass "
                         "eval.critics=<run>/iter_NNN/refit, or use decode.select=majority")
    if d.select in (Selection.implicit, Selection.implicit_vote) and not has_implicit:
        raise QstarError(f"decode.select={d.select.value} needs a policy trained by DPO (its meta.json "
                         "names the reference): use model=<run>/iter_NNN/train/policy")


def sample_check(s: SearchConfig) -> Callable[[str], bool] | None:
    """What a whole sample must pass for checked_majority: no line stating a false equality
    (search.check_equations) and an answer that is its working's last number
    (search.check_answers); None when both are off."""
    checks = [check for check, on in ((false_equation, s.check_equations),
                                      (unsupported_answer, s.check_answers)) if on]
    return (lambda text: any(check(text) for check in checks)) if checks else None


def _per_group(flat: list[float], groups: list[list]) -> list[list[float]]:
    found, k = [], 0
    for g in groups:
        found.append([float(x) for x in flat[k:k + len(g)]])
        k += len(g)
    return found


def checked_majority(candidates: list[str], extract: Callable[[str], str | None],
                     step_check: Callable[[str], bool]) -> str:
    """Majority vote over the candidates `step_check` does not flag (`sample_check`; none sees
    gold); every candidate flagged: majority over all of them."""
    passed = [c for c in candidates if not step_check(c)]
    return majority_vote(passed or candidates, extract)


def decode_best_of_n(model, tokenizer, prompts: list[str], d: DecodeConfig, seed: int,
                     progress: str | None, extract: Callable[[str], str | None],
                     orm_score: Scorer | None = None, implicit=None,
                     step_check: Callable[[str], bool] | None = None) -> Decoded:
    """n samples per prompt; every selection the critics allow is made from the same samples.
    `implicit`: a critics.ImplicitCritic for the policy (None: no DPO reference). `step_check`
    (`sample_check`) adds checked_majority; the samples decode as without it."""
    check_selection(d, orm_score is not None, implicit is not None, step_check is not None)
    gens = sample_generations(model, tokenizer, prompts, d, seed, progress)
    groups = [[g.text for g in group] for group in gens]
    flat_p = [p for p, g in zip(prompts, groups) for _ in g]
    picks = {Selection.majority.value: [majority_vote(g, extract) for g in groups]}
    if step_check is not None:
        picks[Selection.checked_majority.value] = [checked_majority(g, extract, step_check)
                                                   for g in groups]
    row_extra = [{"candidates": g} for g in groups]
    if orm_score is not None:
        by_group = _per_group(orm_score(flat_p, [c for g in groups for c in g]), groups)
        for extra, scores in zip(row_extra, by_group):
            extra["orm_scores"] = scores
        picks[Selection.orm.value] = [orm_select(g, s) for g, s in zip(groups, by_group)]
        picks[Selection.orm_vote.value] = [orm_weighted_vote(g, s, extract)
                                           for g, s in zip(groups, by_group)]
    if implicit is not None:  # log pi from the sampling pass, log pi_ref in one batched forward
        flat = [g for group in gens for g in group]
        rewards = implicit.of_tokens(flat_p, [g.token_ids for g in flat], [g.logprobs for g in flat])
        by_group = _per_group(rewards, groups)
        for extra, scores in zip(row_extra, by_group):
            extra["implicit_rewards"] = scores
        picks[Selection.implicit.value] = [orm_select(g, s) for g, s in zip(groups, by_group)]
        picks[Selection.implicit_vote.value] = [
            orm_weighted_vote(g, [implicit_score(r) for r in s], extract)
            for g, s in zip(groups, by_group)]
    chosen = picks.pop(d.select.value)
    return Decoded(chosen, sum(g.num_tokens for group in gens for g in group),
                   extra={"select": d.select.value}, alternatives=picks, row_extra=row_extra,
                   alternatives_of="select")
