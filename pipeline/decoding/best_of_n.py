"""decode=best_of_n: n samples per prompt, selected by majority vote, ORM argmax or ORM-weighted
vote (`decode.select`); every selection the critics allow is graded on the same samples."""

from __future__ import annotations

from collections.abc import Callable

from critics.critic_set import Scorer
from pipeline.config import DecodeConfig, Selection
from pipeline.decoding.base import Decoded
from pipeline.decoding.sampling import sample_candidates
from pipeline.decoding.voting import majority_vote, orm_select, orm_weighted_vote
from pipeline.errors import QstarError


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
